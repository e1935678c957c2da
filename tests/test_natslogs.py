"""Region-wide logs on a real 3-server NATS cluster: several workers write,
any reader tails and follows (across the death of its server), the stream's
limits drop the oldest, and a flood never blocks the writer."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from nimbus.errors import UnavailableError
from nimbus.natsd import NATS_USER, NatsCluster
from nimbus.observe.logfilter import LogFilter
from nimbus.observe.logs import LogSink as FileLogSink
from nimbus.observe.logs import read_records
from nimbus.observe.natslogs import (
    BATCH_BYTES,
    NatsLogLimits,
    NatsLogSink,
    NatsLogSource,
    encode_function,
    ensure_stream,
    open_region_logs,
    subject_for,
)
from nimbus.observe.protocols import LogSink, LogSource

pytestmark = pytest.mark.timeout(180)
DEADLINE_S = 30.0


async def connect(cluster: NatsCluster, first: int = 0) -> NATS:
    """A client that connects to server ``first`` and fails over to the others."""
    urls = [s.url for s in cluster.servers]
    urls = urls[first:] + urls[:first]
    return await nats.connect(urls, user=NATS_USER, password=cluster.password,
                              dont_randomize=True, reconnect_time_wait=0.2,
                              max_reconnect_attempts=-1, connect_timeout=2)


async def until(what: str, cond: Callable[[], bool | Awaitable[bool]],
                timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


def texts(records: list[dict[str, Any]], worker: str | None = None) -> list[str]:
    return [r["text"] for r in records if worker is None or r.get("worker") == worker]


def test_function_names_become_distinct_safe_subject_tokens() -> None:
    names = ["hello", "a.b", "a_b", "a=2Eb", "a*b", "a>b", "x y", "é", "a-b"]
    tokens = [encode_function(n) for n in names]
    assert len(set(tokens)) == len(names)
    for t in tokens:
        assert not set(t) & set(".*> \t")
    assert subject_for("eu", "a.b") == "nimbus.eu.logs.a=2Eb"
    with pytest.raises(ValueError, match="region"):
        subject_for("bad.region", "fn")
    with pytest.raises(ValueError, match="max_msgs_per_function"):
        NatsLogLimits(max_msgs_per_function=0)


def test_both_implementations_satisfy_the_seam(cluster: NatsCluster, tmp_path: Path) -> None:
    async def run() -> None:
        nc = await connect(cluster)
        try:
            assert isinstance(FileLogSink(tmp_path), LogSink)
            assert isinstance(NatsLogSink(nc, region="seam", worker="w"), LogSink)
            assert isinstance(NatsLogSource(nc, region="seam"), LogSource)
            # a region without its log stream: a clear error, before any record
            with pytest.raises(UnavailableError, match="nimbus-nostream-logs"):
                await NatsLogSource(nc, region="nostream", timeout_s=2).read("fn", tail=5)
        finally:
            await nc.close()
    asyncio.run(run())


def test_two_workers_lines_all_in_one_tail_in_order_per_worker(
        cluster: NatsCluster, tmp_path: Path) -> None:
    region = "two"

    async def run() -> None:
        ncs = [await connect(cluster, i) for i in range(3)]
        try:
            await ensure_stream(ncs[0], region)
            local = FileLogSink(tmp_path / "w1-logs")
            w1 = NatsLogSink(ncs[0], region=region, worker="w1", local=local)
            w2 = NatsLogSink(ncs[1], region=region, worker="w2")
            w1.start()
            w2.start()
            for i in range(300):
                w1.write("fn.x", f"r{i % 3}", "stdout", f"a{i}\n")
                w2.write("fn.x", None, "stderr", f"b{i}")
                if i % 50 == 0:
                    await asyncio.sleep(0.15)  # several batches, interleaved
            w1.write("other", None, "stdout", "not fn.x")
            w1.write("lv", "r9", "stdout", '{"m": 1}', "INFO", {"m": 1})
            w2.write("lv", None, "platform", "throttled", "WARNING")
            await w1.aclose()
            await w2.aclose()
            assert (w1.published, w2.published, w1.dropped, w2.dropped) == (302, 301, 0, 0)

            reader = NatsLogSource(ncs[2], region=region)
            recs, last = await reader.tail("fn.x", 10_000)
            assert last > 0
            assert texts(recs, "w1") == [f"a{i}" for i in range(300)]
            assert texts(recs, "w2") == [f"b{i}" for i in range(300)]
            assert len(recs) == 600
            a = next(r for r in recs if r["worker"] == "w1")
            assert set(a) == {"ts", "rid", "stream", "text", "worker"}
            assert (a["rid"], a["stream"]) == ("r0", "stdout")
            # the last n, as the stream has them
            tail, _ = await reader.tail("fn.x", 7)
            assert tail == recs[-7:]
            # one request's lines
            mine, _ = await reader.tail("fn.x", 10_000, request_id="r1")
            assert texts(mine) == [f"a{i}" for i in range(1, 300, 3)]
            assert texts((await reader.tail("other", 5))[0]) == ["not fn.x"]
            assert (await reader.tail("never-written", 5)) == ([], 0)
            # levels and fields kept; a filter applies before the tail counts
            warned = [r async for b in await reader.read(
                "lv", tail=1, match=LogFilter(level="WARNING").matches) for r in b]
            assert [(r["text"], r["level"], r["worker"]) for r in warned] == [
                ("throttled", "WARNING", "w2")]
            infos = sorted([r async for b in await reader.read(
                "lv", match=LogFilter(level="INFO").matches) for r in b],
                key=lambda r: r["worker"])
            assert [(r["level"], r.get("fields")) for r in infos] == [
                ("INFO", {"m": 1}), ("WARNING", None)]
            assert await reader.has_logs("lv") and not await reader.has_logs("never-written")
            # all of it through the seam the control API uses
            every = [r async for b in await reader.read("fn.x") for r in b]
            assert every == recs
            # the optional per-worker file copy has the same lines (no worker field)
            local_texts = [r["text"] for r in _file_records(local.path("fn.x"))]
            assert local_texts == [f"a{i}" for i in range(300)]
        finally:
            for nc in ncs:
                await nc.close()
    asyncio.run(run())


def _file_records(path: Path) -> list[dict[str, Any]]:
    recs, _ = read_records(path)
    return recs


def test_follow_sees_new_lines_live_across_the_death_of_its_server(
        cluster: NatsCluster) -> None:
    region = "follow"
    victim = 1

    async def run() -> None:
        reader_nc = await connect(cluster, victim)
        writer_nc = await connect(cluster, 0)
        try:
            await ensure_stream(writer_nc, region)
            assert reader_nc.connected_url is not None
            assert reader_nc.connected_url.port == cluster.servers[victim].port
            sink = NatsLogSink(writer_nc, region=region, worker="w1")
            sink.start()
            for i in range(20):
                sink.write("fn", None, "stdout", f"old{i}")
            await until("the old lines are published", lambda: sink.published == 20)

            source = NatsLogSource(reader_nc, region=region, timeout_s=1.0)
            seen: list[dict[str, Any]] = []

            async def follow() -> None:
                async for batch in await source.read("fn", tail=5, follow=True):
                    seen.extend(batch)

            task = asyncio.create_task(follow())
            await until("the tail is read", lambda: len(seen) >= 5)
            for i in range(10):
                sink.write("fn", None, "stdout", f"live{i}")
            await until("live lines followed", lambda: len(seen) >= 15)

            cluster.kill(victim)  # SIGKILL the reader's server
            for i in range(30):
                sink.write("fn", None, "stdout", f"after{i}")
                await asyncio.sleep(0.02)
            await until("lines written after the kill followed", lambda: len(seen) >= 45)
            assert reader_nc.connected_url is not None
            assert reader_nc.connected_url.port != cluster.servers[victim].port
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert texts(seen) == ([f"old{i}" for i in range(15, 20)]
                                   + [f"live{i}" for i in range(10)]
                                   + [f"after{i}" for i in range(30)])
            await sink.aclose()
        finally:
            await reader_nc.close()
            cluster.restart(victim)
            cluster.wait_healthy()
            await _placeable_on_all(writer_nc)
            await writer_nc.close()
    asyncio.run(run())


async def _placeable_on_all(nc: NATS) -> None:
    """Wait until a restarted server is a peer again: a stream of 3 replicas
    can be placed (then remove that probe stream)."""
    js = nc.jetstream()

    async def placed() -> bool:
        try:
            await js.add_stream(name="probe", subjects=["probe.x"], num_replicas=3)
        except nats.js.errors.APIError:
            return False
        await js.delete_stream("probe")
        return True
    await until("the restarted server is a peer again", placed)


def test_limits_drop_the_oldest(cluster: NatsCluster) -> None:
    region = "limits"
    limits = NatsLogLimits(max_bytes=1024 * 1024, max_msgs_per_function=5)

    async def run() -> None:
        nc = await connect(cluster)
        try:
            await ensure_stream(nc, region, limits)
            info = await nc.jetstream().stream_info(f"nimbus-{region}-logs")
            assert info.config.num_replicas == 3
            sink = NatsLogSink(nc, region=region, worker="w1")
            sink.start()
            # ten batches of one function: five are kept, the newest
            for i in range(10):
                sink.write("few", None, "stdout", f"batch{i}")
                await until("published", _published(sink, i + 1))
            source = NatsLogSource(nc, region=region)
            recs, _ = await source.tail("few", 100)
            assert texts(recs) == [f"batch{i}" for i in range(5, 10)]
            # 1.5 MiB in 60 KiB lines through a 1 MiB stream: the oldest go
            line = "x" * (60 * 1024)
            for i in range(25):
                sink.write("big", None, "stdout", f"{i:03d}{line}")
                await until("published", _published(sink, 11 + i))
            recs, _ = await source.tail("big", 100)
            kept = [int(r["text"][:3]) for r in recs]
            assert kept == list(range(kept[0], 25))
            assert kept[0] > 0
            # and updating the limits is taken by the existing stream
            await ensure_stream(nc, region, NatsLogLimits(max_bytes=2 * 1024 * 1024,
                                                          max_msgs_per_function=5))
            info = await nc.jetstream().stream_info(f"nimbus-{region}-logs")
            assert info.config.max_bytes == 2 * 1024 * 1024
            await sink.aclose()
        finally:
            await nc.close()
    asyncio.run(run())


def _published(sink: NatsLogSink, n: int) -> Callable[[], bool]:
    return lambda: sink.published == n


def test_a_flood_does_not_block_the_writer_and_drops_are_counted(
        cluster: NatsCluster) -> None:
    region = "flood"
    bound = 2 * BATCH_BYTES
    written = 50_000

    async def run() -> None:
        nc = await connect(cluster)
        try:
            await ensure_stream(nc, region)
            sink = NatsLogSink(nc, region=region, worker="w1", buffer_bytes=bound)
            sink.start()
            most = 0
            # no await in this loop: the publisher cannot run meanwhile, so
            # every line past the bound must be dropped, not waited for
            for i in range(written):
                sink.write("fn", "rid", "stdout", f"line {i:06d}")
                most = max(most, sink.buffered_bytes)
            assert most <= bound
            assert sink.dropped > 0
            await sink.aclose(timeout_s=20)
            assert sink.published + sink.dropped == written

            recs, _ = await NatsLogSource(nc, region=region).tail("fn", written + 10)
            notices = [r for r in recs if r["stream"] == "platform"]
            lines = [r for r in recs if r["stream"] == "stdout"]
            assert len(notices) == 1
            dropped = int(notices[0]["text"].split()[0])
            assert notices[0]["text"] == f"{dropped} log lines dropped (log buffer full)"
            assert dropped == sink.dropped
            assert len(lines) + dropped == written
            # the newest kept, in order, the drop told where it happened
            assert texts(lines) == [f"line {i:06d}" for i in range(dropped, written)]
            assert recs[0] is notices[0]
        finally:
            await nc.close()
    asyncio.run(run())


class _GatedJetStream:
    """Stands in for a NATS connection in the pure buffer test: publishes
    wait for a gate, then are recorded."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent: list[bytes] = []

    def jetstream(self, timeout: float | None = None) -> _GatedJetStream:
        return self

    async def publish(self, subject: str, payload: bytes, **_: object) -> None:
        await self.gate.wait()
        self.sent.append(payload)


def test_dropped_unsent_batches_are_told_where_the_gap_is() -> None:
    import orjson

    async def run() -> None:
        fake = _GatedJetStream()
        sink = NatsLogSink(fake, region="r", worker="w",  # type: ignore[arg-type]
                           buffer_bytes=4 * BATCH_BYTES)
        sink.start()
        pad = "x" * 4000
        for i in range(200):  # about 800 KB: four batches, the first in flight
            sink.write("fn", None, "stdout", f"{i:04d}{pad}")
        await until("batches made, the first in flight", lambda: not sink._lines)
        for i in range(200, 300):  # past the bound: an unsent batch goes
            sink.write("fn", None, "stdout", f"{i:04d}{pad}")
        assert sink.dropped > 0
        assert sink.buffered_bytes <= 4 * BATCH_BYTES
        fake.gate.set()
        await sink.aclose()
        assert sink.published + sink.dropped == 300
        recs = [orjson.loads(line) for msg in fake.sent for line in msg.splitlines()]
        kept = [int(r["text"][:4]) for r in recs if r["stream"] == "stdout"]
        notices = [(n, r["text"]) for n, r in enumerate(recs) if r["stream"] == "platform"]
        assert len(notices) == 1
        at, text = notices[0]
        gap = int(text.split()[0])
        assert gap == sink.dropped
        assert at > 0 and at + gap < 200  # an unsent batch went, not the newest lines
        # the lines before the notice run up to the gap, those after resume past it
        assert kept[:at] == list(range(at))
        assert kept[at:] == list(range(at + gap, 300))
    asyncio.run(run())


def test_the_control_api_serves_a_regions_logs_from_nats(cluster: NatsCluster) -> None:
    """The logs endpoint reads the LogSource it is given: tail, request id
    and follow, over real HTTP, from lines a worker published to NATS."""
    from types import SimpleNamespace

    import httpx
    import orjson
    import uvicorn

    from nimbus.control.api import create_control_app

    region = "api"
    token = secrets.token_urlsafe(32)

    async def run() -> None:
        nc = await connect(cluster, 2)
        sink_nc = await connect(cluster, 0)
        server: uvicorn.Server | None = None
        serving: asyncio.Task[None] | None = None
        try:
            sink, _ = await open_region_logs(sink_nc, region=region, worker="w9")
            assert sink is not None
            for i in range(10):
                sink.write("fn", f"r{i % 2}", "stdout", f"line{i}")
            await until("published", _published(sink, 10))
            platform = SimpleNamespace(
                token=token, max_bundle_bytes=1024 * 1024,
                routes=SimpleNamespace(functions={"fn": object()}),
                worker=SimpleNamespace(logs=sink))
            app = create_control_app(platform,  # type: ignore[arg-type]
                                     log_source=NatsLogSource(nc, region=region))
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                   log_level="warning", lifespan="off"))
            serving = asyncio.create_task(server.serve())
            await until("the API listens", lambda: bool(server and server.started))
            port = server.servers[0].sockets[0].getsockname()[1]
            headers = {"authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         headers=headers, timeout=DEADLINE_S) as http:
                r = await http.get("/v1/functions/fn/logs", params={"tail": 3})
                assert r.status_code == 200
                got = [orjson.loads(x) for x in r.content.splitlines()]
                assert texts(got) == ["line7", "line8", "line9"]
                assert {g["worker"] for g in got} == {"w9"}
                r = await http.get("/v1/functions/fn/logs", params={"request_id": "r1"})
                assert texts([orjson.loads(x) for x in r.content.splitlines()]) == [
                    f"line{i}" for i in range(1, 10, 2)]
                r = await http.get("/v1/functions/nope/logs")
                assert r.status_code == 404
                followed: list[str] = []
                async with http.stream("GET", "/v1/functions/fn/logs",
                                       params={"tail": 1, "follow": "true"}) as resp:
                    lines = resp.aiter_lines()
                    followed.append(orjson.loads(await anext(lines))["text"])
                    sink.write("fn", None, "stderr", "live")
                    followed.append(orjson.loads(await asyncio.wait_for(
                        anext(lines), DEADLINE_S))["text"])
                assert followed == ["line9", "live"]
            await sink.aclose()
        finally:
            if server is not None:
                server.should_exit = True
            if serving is not None:
                await asyncio.wait_for(serving, DEADLINE_S)
            await nc.close()
            await sink_nc.close()
    asyncio.run(run())
