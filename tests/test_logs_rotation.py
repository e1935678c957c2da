"""Function logs: rotation by size, bounded records, tail from the end, following
across rotation."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from nimbus.observe.logs import MAX_LINE_CHARS, LogLimits, LogReader, LogSink, rotated


def texts(recs):
    return [r["text"] for r in recs]


def everything(path: Path, **kw) -> list[dict]:
    with LogReader(path, **kw) as reader:
        return [r for batch in reader.history() for r in batch]


def test_logs_rotate_by_size_and_keep_a_bounded_number_of_files(tmp_path):
    sink = LogSink(tmp_path, LogLimits(max_bytes=4096, files=3))
    for i in range(1000):
        sink.write("fn", "r1", "stdout", f"line {i:04d} " + "x" * 40)
    sink.close()
    path = sink.path("fn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fn.log", "fn.log.1", "fn.log.2"]
    for p in (path, rotated(path, 1), rotated(path, 2)):
        assert os.path.getsize(p) <= 4096
    kept = texts(everything(path))
    assert kept == [f"line {i:04d} " + "x" * 40 for i in range(1000 - len(kept), 1000)]
    assert 60 < len(kept) < 150  # about three files' worth, oldest dropped


def test_one_file_setting_starts_over(tmp_path):
    sink = LogSink(tmp_path, LogLimits(max_bytes=4096, files=1))
    for i in range(300):
        sink.write("fn", None, "stdout", f"{i} " + "y" * 50)
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["fn.log"]
    assert texts(everything(sink.path("fn")))[-1].startswith("299 ")


@pytest.mark.parametrize("bad", [{"max_bytes": 10}, {"files": 0}, {"files": "3"}])
def test_log_limits_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LogLimits(**bad)


def test_a_long_line_is_cut_into_bounded_records(tmp_path):
    sink = LogSink(tmp_path)
    sink.write("fn", "r", "stdout", "z" * (MAX_LINE_CHARS * 3 + 5) + "\nshort\n")
    sink.close()
    recs = everything(sink.path("fn"))
    assert [len(t) for t in texts(recs)] == [MAX_LINE_CHARS] * 3 + [5, 5]
    assert texts(recs)[-1] == "short"


def test_tail_spans_rotated_files_and_filters_by_request(tmp_path):
    sink = LogSink(tmp_path, LogLimits(max_bytes=4096, files=3))
    for i in range(200):
        sink.write("fn", "odd" if i % 2 else "even", "stdout", f"n{i}")
    sink.close()
    path = sink.path("fn")
    with LogReader(path) as reader:
        assert texts(next(reader.history(5))) == [f"n{i}" for i in range(195, 200)]
    with LogReader(path, request_id="even") as reader:
        assert texts(next(reader.history(3))) == ["n194", "n196", "n198"]
    total = len(everything(path))
    with open(path, "rb") as f:
        current = f.read().count(b"\n")
    assert total > current  # the rotated files hold some
    with LogReader(path) as reader:  # more than the current file holds, in order
        assert texts(next(reader.history(current + 10))) == [
            f"n{i}" for i in range(200 - current - 10, 200)]


def test_tail_of_a_huge_file_reads_only_its_end(tmp_path):
    # 8 GiB of nothing (sparse) and then records: reading it whole would not fit.
    path = tmp_path / "fn.log"
    with open(path, "wb") as f:
        f.truncate(8 * 1024**3)
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
        for i in range(20):
            f.write(orjson.dumps({"ts": 1, "rid": "r", "stream": "stdout", "text": f"t{i}"}))
            f.write(b"\n")
        f.write(b'{"ts": 1, "rid": "r", "str')  # torn: being written
    with LogReader(path) as reader:
        assert texts(next(reader.history(5))) == [f"t{i}" for i in range(15, 20)]
        assert reader.more() == []  # the torn record is not read half


def test_garbage_and_overlong_lines_are_skipped(tmp_path):
    path = tmp_path / "fn.log"
    good = orjson.dumps({"ts": 1, "rid": None, "stream": "stdout", "text": "ok"}) + b"\n"
    path.write_bytes(good + b"not json\n" + b"[1,2]\n" + b"q" * (3 * 1024 * 1024) + b"\n" + good)
    assert texts(everything(path)) == ["ok", "ok"]
    with LogReader(path) as reader:
        assert texts(next(reader.history(10))) == ["ok", "ok"]


def test_following_goes_on_across_rotation_without_losing_records(tmp_path):
    sink = LogSink(tmp_path, LogLimits(max_bytes=4096, files=2))
    sink.write("fn", None, "stdout", "before")
    sink.flush()
    reader = LogReader(sink.path("fn"))
    assert texts(next(reader.history())) == ["before"]
    seen: list[str] = []
    for i in range(400):  # several rotations, read between some of them
        sink.write("fn", None, "stdout", f"f{i} " + "w" * 30)
        sink.flush()
        if i % 40 == 0:
            while batch := reader.more():
                seen += texts(batch)
    while batch := reader.more():
        seen += texts(batch)
    reader.close()
    sink.close()
    assert seen == [f"f{i} " + "w" * 30 for i in range(400)]


def test_an_existing_oversized_log_is_rotated_on_the_first_write(tmp_path):
    path = tmp_path / "fn.log"
    path.write_bytes(b"x" * 10_000)
    sink = LogSink(tmp_path, LogLimits(max_bytes=4096, files=3))
    sink.write("fn", None, "stdout", "fresh")
    sink.close()
    assert os.path.getsize(rotated(path, 1)) == 10_000
    assert texts(everything(path)) == ["fresh"]


# -- what an instance may claim in a LOG frame ------------------------------------------


def _log_frames(frames: list[bytes], pending: list[str], answered: list[str]) -> list[tuple]:
    import asyncio

    from nimbus.runtime import protocol as p
    from nimbus.worker.instance import InstanceProtocol

    got: list[tuple] = []

    async def run() -> None:
        proto = InstanceProtocol(lambda *rec: got.append(rec[:3]), lambda: None)
        loop = asyncio.get_running_loop()
        for rid in pending + answered:  # handed over, as Instance.invoke does
            proto.pending[rid] = loop.create_future()
            proto.recent.append(rid)
        for rid in answered:
            proto.data_received(p.frame(p.RESULT, orjson.dumps([rid, "ok"])))
        for body in frames:
            proto.data_received(p.frame(p.LOG, body))

    asyncio.run(run())
    return got


def test_log_frames_keep_the_instances_own_request_ids_and_streams():
    got = _log_frames([orjson.dumps(["a", "stdout", "x"]), orjson.dumps(["a", "stderr", "y"]),
                       orjson.dumps([None, "stdout", "init"])], ["a"], [])
    assert got == [("a", "stdout", "x"), ("a", "stderr", "y"), (None, "stdout", "init")]


def test_late_output_of_an_answered_invocation_keeps_its_request_id():
    got = _log_frames([orjson.dumps(["done", "stdout", "late"])], [], ["done"])
    assert got == [("done", "stdout", "late")]


def test_forged_request_ids_and_platform_streams_are_not_believed():
    frames = [orjson.dumps(["someone-else", "stdout", "forged"]),
              orjson.dumps(["a", "platform", "instance exited"]),
              orjson.dumps([["x"], ["y"], 3]),
              b"not json at all"]
    got = _log_frames(frames, ["a"], [])
    assert got == [("a", "stdout", "forged"), ("a", "stderr", "instance exited"),
                   ("a", "stderr", "3"), (None, "stderr", "not json at all")]
    # with several invocations in flight, a forged id belongs to none of them
    got = _log_frames([orjson.dumps(["someone-else", "stdout", "forged"])], ["a", "b"], [])
    assert got == [(None, "stdout", "forged")]
