"""Gateway to worker over frames: real worker processes, real TCP, real instances.

The worker processes serve an app folder (``python -m nimbus.worker.frameserver``);
this test process is the gateway side: a ``WorkerDirectory`` and
``RemoteInvoker`` per function, on an event loop with an overall deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from nimbus.errors import ClosedError, HandlerError, InstanceDiedError, ThrottledError
from nimbus.gateway.remote import RemoteInvoker, WorkerDirectory
from nimbus.manifest.loader import load_app
from nimbus.worker import frames as f
from nimbus.worker.target import Target
from tests.workers import TOKEN, WorkerProcess

HANDLERS_WRITE_HOST_FILES = True  # start markers in the test's folder (rlimits workers)

MANIFEST = """
name: remote
functions:
  work:
    handler: h.work
    concurrency: 4
    min_instances: 1
    max_instances: 1
    timeout_s: 10
  one:
    handler: h.work
    concurrency: 1
    min_instances: 1
    max_instances: 1
    timeout_s: 10
  cold:
    handler: h.work
    min_instances: 0
    max_instances: 1
    timeout_s: 1
"""

HANDLER = r'''
import os, time

def work(event, context):
    marks = event.get("marks")
    instance = os.environ["AWS_LAMBDA_LOG_STREAM_NAME"]
    if marks:
        with open(os.path.join(marks, f"{context.aws_request_id} {instance}"), "w"):
            pass
    hold = event.get("hold")  # a file: sleep until it exists, up to s seconds
    if hold:
        end = time.monotonic() + event.get("s", 0)
        while time.monotonic() < end and not os.path.exists(hold):
            time.sleep(0.02)
    else:
        time.sleep(event.get("s", 0))
    if event.get("raise"):
        raise ValueError("asked to")
    return {"instance": instance, "rid": context.aws_request_id,
            "remaining": context.get_remaining_time_in_millis(), "echo": event.get("echo")}
'''


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("app")
    (folder / "app.yaml").write_text(MANIFEST)
    (folder / "h.py").write_text(HANDLER)
    return folder


@pytest.fixture(scope="module")
def shared(app_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker the tests that do not harm it share."""
    w = WorkerProcess(app_dir, tmp_path_factory.mktemp("shared"), "w-shared")
    yield w
    w.stop()


@pytest.fixture
def start_worker(app_dir: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(node_id: str, *extra: str, token: str = TOKEN) -> WorkerProcess:
        w = WorkerProcess(app_dir, tmp_path, node_id, token, *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def target(app_dir: Path, name: str) -> Target:
    spec = load_app(app_dir).functions[name]
    return Target("remote", 1, spec, "app", None)


def http(method: str = "GET", **fields: Any) -> dict[str, Any]:
    return {"requestContext": {"http": {"method": method}}, **fields}


def run(scenario: Callable[[], Awaitable[Any]], deadline_s: float = 90.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(deadline_s):
            return await scenario()

    import uvloop
    return uvloop.run(main())


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


async def directory_with(*workers: WorkerProcess, key: str = "work@1",
                         token: str = TOKEN) -> WorkerDirectory:
    d = WorkerDirectory(token)
    for w in workers:
        d.update(w.node_id, w.address, {})
    await until(lambda: all(d.workers[w.node_id].ready(key) > 0 for w in workers))
    return d


def worker_of(result: dict[str, Any]) -> str:
    """The worker that ran it: instance ids (fn-version-node-n) carry the
    node id, here always w-<name>."""
    return result["instance"].split("-")[3]


# -- over a real worker ---------------------------------------------------------------


def test_invocations_return_results_and_errors(shared, app_dir):
    async def scenario() -> None:
        d = await directory_with(shared)
        inv = RemoteInvoker(target(app_dir, "work"), d)
        try:
            results = await asyncio.gather(*(inv.invoke(f"r{i}", http(echo=i))
                                             for i in range(20)))
            assert [r["rid"] for r in results] == [f"r{i}" for i in range(20)]
            assert [r["echo"] for r in results] == list(range(20))
            # the instance id names the worker: unique region-wide
            assert {r["instance"] for r in results} == {"work-1-w-shared-1"}
            # the deadline came as a duration: what is left is within the timeout
            assert all(0 < r["remaining"] <= 10_000 for r in results)
            with pytest.raises(HandlerError) as err:
                await inv.invoke("bad", http("POST", **{"raise": True}))
            assert err.value.error["errorType"] == "ValueError"
            assert err.value.error["errorMessage"] == "asked to"
            assert inv.in_flight == 0 and inv.held == 0
            assert d.workers["w-shared"].calls == 0
        finally:
            await d.aclose()

    run(scenario)


def test_a_large_event_and_result_cross_intact(shared, app_dir):
    async def scenario() -> None:
        d = await directory_with(shared)
        inv = RemoteInvoker(target(app_dir, "work"), d)
        try:
            blob = secrets.token_hex(2 * 1024 * 1024)  # 4 MB of text, both ways
            result = await inv.invoke("big", http("POST", echo=blob))
            assert result["echo"] == blob
        finally:
            await d.aclose()

    run(scenario)


def test_log_lines_reach_the_workers_logs(shared, app_dir):
    async def scenario() -> None:
        d = await directory_with(shared)
        inv = RemoteInvoker(target(app_dir, "work"), d)
        try:
            inv.log("rid-log-1", "platform", "Runtime.InvalidResponse: a line from the gateway")
            path = shared.state / "logs" / "work.log"
            await until(lambda: path.exists() and b"rid-log-1" in path.read_bytes())
        finally:
            await d.aclose()

    run(scenario)


def test_cap_and_max_queue_throttle_like_the_pool(shared, app_dir):
    async def scenario() -> None:
        d = await directory_with(shared, key="one@1")
        inv = RemoteInvoker(target(app_dir, "one"), d, cap=2)
        inv.max_queue = 1
        try:
            calls = [asyncio.ensure_future(inv.invoke(f"t{i}", http(s=0.5))) for i in range(5)]
            done = await asyncio.gather(*calls, return_exceptions=True)
            throttled = [r for r in done if isinstance(r, ThrottledError)]
            served = [r for r in done if isinstance(r, dict)]
            assert len(throttled) == 2 and len(served) == 3, done
            assert inv.throttles == 2
            # a higher cap lets more through at once
            inv.cap = 5
            done = await asyncio.gather(*(inv.invoke(f"u{i}", http(s=0.2)) for i in range(6)))
            assert len(done) == 6
        finally:
            await d.aclose()

    run(scenario)


def first_on_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equally loaded workers are picked at random; these tests place calls
    on purpose: the first listed worker wins a tie."""
    monkeypatch.setattr("nimbus.gateway.remote.random.random", lambda: 0.99)


def test_a_call_for_a_pool_the_worker_lacks_goes_elsewhere(shared, app_dir, tmp_path,
                                                          monkeypatch):
    """A worker without the function's pool answers that it did not run the
    call; the gateway sends it to another worker, whatever its method."""
    first_on_ties(monkeypatch)
    lacking = tmp_path / "other-app"
    lacking.mkdir()
    (lacking / "app.yaml").write_text("name: remote\nfunctions:\n  one: {handler: h.work}\n")
    (lacking / "h.py").write_text(HANDLER)
    other = WorkerProcess(lacking, tmp_path, "w-other")

    async def scenario() -> None:
        d = WorkerDirectory(TOKEN)
        d.update(other.node_id, other.address, {})  # first: picked first on a tie
        d.update(shared.node_id, shared.address, {})
        await until(lambda: d.workers["w-other"].reported is not None
                    and d.ready("work@1") == 1)
        d.workers["w-other"].reported = {"work@1": 1}  # stale news: it has none
        inv = RemoteInvoker(target(app_dir, "work"), d)
        try:
            result = await inv.invoke("p1", http("POST"))
            assert worker_of(result) == "shared"
            assert inv.rerouted == 1 and inv.retries == 0
        finally:
            await d.aclose()

    try:
        run(scenario)
    finally:
        other.stop()


def test_a_version_no_worker_serves_is_closed_not_failed(tmp_path, app_dir, monkeypatch):
    """Every worker answers "not here": a ClosedError (503), which the event
    dispatcher treats as a retired version (given back, not counted)."""
    monkeypatch.setattr("nimbus.gateway.remote.ACQUIRE_GRACE_S", 0.5)
    lacking = tmp_path / "other-app"
    lacking.mkdir()
    (lacking / "app.yaml").write_text("name: remote\nfunctions:\n  one: {handler: h.work}\n")
    (lacking / "h.py").write_text(HANDLER)
    other = WorkerProcess(lacking, tmp_path, "w-lack")

    async def scenario() -> None:
        d = WorkerDirectory(TOKEN)
        d.update(other.node_id, other.address, {})
        await until(lambda: d.workers["w-lack"].reported is not None)
        d.workers["w-lack"].reported = {"cold@1": 1}  # stale news
        inv = RemoteInvoker(target(app_dir, "cold"), d)
        try:
            with pytest.raises(ClosedError, match="does not run cold version 1"):
                await inv.invoke("c1", http("POST"))
            assert inv.in_flight == 0 and d.workers["w-lack"].calls == 0
        finally:
            await d.aclose()

    try:
        run(scenario)
    finally:
        other.stop()


def test_a_worker_whose_instances_stopped_may_take_the_call_once_it_starts_one(
        start_worker, app_dir):
    """The only worker says it does not run the version (its instances
    stopped after it last said it had one): the call waits, and runs there
    as soon as the worker reports a ready instance again."""
    w = start_worker("w-gone")

    async def scenario() -> None:
        d = WorkerDirectory(TOKEN)
        d.update(w.node_id, w.address, {})
        await until(lambda: d.workers["w-gone"].reported is not None)
        w.command("retire cold")  # as a pool scaled to zero and retired
        await asyncio.sleep(0.3)
        d.workers["w-gone"].reported = {"cold@1": 1}  # stale news: it has none now
        inv = RemoteInvoker(target(app_dir, "cold"), d)
        try:
            call = asyncio.ensure_future(inv.invoke("back-1", http("POST")))
            await until(lambda: inv.rerouted == 1)
            assert d.workers["w-gone"].ready("cold@1") == 0  # not asked again meanwhile
            await asyncio.sleep(0.2)
            assert not call.done()
            w.command("scale cold 1")
            result = await call
            assert result["rid"] == "back-1" and worker_of(result) == "gone"
            assert inv.rerouted == 1 and inv.in_flight == 0
        finally:
            await d.aclose()

    run(scenario)


def test_holds_until_a_worker_reports_a_ready_instance(start_worker, app_dir):
    w = start_worker("w-cold")

    async def scenario() -> None:
        d = WorkerDirectory(TOKEN)
        d.update(w.node_id, w.address, {})
        await until(lambda: d.workers["w-cold"].conn is not None)
        inv = RemoteInvoker(target(app_dir, "cold"), d)
        try:
            call = asyncio.ensure_future(inv.invoke("held-1", http()))
            await until(lambda: inv.held == 1)
            await asyncio.sleep(0.3)
            assert not call.done() and inv.held == 1  # nothing ready: it waits
            w.command("scale cold 1")
            result = await call
            assert result["rid"] == "held-1" and worker_of(result) == "cold"
            assert inv.held == 0 and inv.in_flight == 0
        finally:
            await d.aclose()

    run(scenario)


def test_held_requests_are_throttled_after_their_deadline(start_worker, app_dir, monkeypatch):
    monkeypatch.setattr("nimbus.gateway.remote.ACQUIRE_GRACE_S", 0.5)
    w = start_worker("w-never")

    async def scenario() -> None:
        d = WorkerDirectory(TOKEN)
        d.update(w.node_id, w.address, {})
        await until(lambda: d.workers["w-never"].conn is not None)
        inv = RemoteInvoker(target(app_dir, "cold"), d)  # timeout 1 s + 0.5 s
        try:
            with pytest.raises(ThrottledError, match="became ready"):
                await inv.invoke("never", http())
            assert inv.throttles == 1 and inv.held == 0 and inv.in_flight == 0
        finally:
            await d.aclose()

    run(scenario)


def test_two_workers_share_the_load_by_least_outstanding(start_worker, app_dir):
    a, b = start_worker("w-a"), start_worker("w-b")

    async def scenario() -> None:
        d = await directory_with(a, b)
        inv = RemoteInvoker(target(app_dir, "work"), d, cap=16)  # room on both workers
        try:
            results = await asyncio.gather(*(inv.invoke(f"s{i}", http(s=1.0))
                                             for i in range(8)))
            assert Counter(worker_of(r) for r in results) == {"a": 4, "b": 4}
        finally:
            await d.aclose()

    run(scenario)


def test_a_worker_killed_mid_flight(start_worker, app_dir, tmp_path, monkeypatch):
    """Idempotent calls in flight on the killed worker run again on the
    other; a POST there fails with 502; nothing else runs twice."""
    first_on_ties(monkeypatch)
    a, b = start_worker("w-a"), start_worker("w-b")
    marks = tmp_path / "marks"
    marks.mkdir()
    release = tmp_path / "release"  # the handlers hold until it exists (or 5 s)

    async def scenario() -> None:
        d = await directory_with(a, b)
        inv = RemoteInvoker(target(app_dir, "work"), d, cap=16)  # room on both workers
        try:
            methods = ["GET", "POST", "POST", "PUT", "DELETE", "POST", "POST", "HEAD"]
            calls = {f"k{i}-{m}": asyncio.ensure_future(inv.invoke(
                f"k{i}-{m}", http(m, s=5.0, marks=str(marks), hold=str(release))))
                for i, m in enumerate(methods)}
            await until(lambda: len(os.listdir(marks)) == 8)  # all 8 running
            started = {n.split()[0]: worker_of({"instance": n.split()[1]})
                       for n in os.listdir(marks)}
            assert Counter(started.values()) == {"a": 4, "b": 4}
            on_a = Counter(r.endswith("POST") for r in started if started[r] == "a")
            assert on_a[True] == 2 and on_a[False] == 2  # both kinds were on the lost worker
            a.kill()
            release.touch()  # once its worker is dead: what ran there cannot answer
            outcomes = dict(zip(calls, await asyncio.gather(*calls.values(),
                                                            return_exceptions=True),
                                strict=True))
            for rid, out in outcomes.items():
                on_a = started[rid] == "a"
                if on_a and rid.endswith("POST"):
                    assert isinstance(out, InstanceDiedError), (rid, out)
                else:
                    assert isinstance(out, dict) and worker_of(out) == "b", (rid, out)
            runs = Counter(n.split()[0] for n in os.listdir(marks))
            for rid in calls:
                again = started[rid] == "a" and not rid.endswith("POST")
                assert runs[rid] == (2 if again else 1), (rid, runs[rid])
            assert inv.retries == sum(1 for r in calls if started[r] == "a"
                                      and not r.endswith("POST"))
            assert inv.in_flight == 0
        finally:
            await d.aclose()

    run(scenario)


def test_new_calls_avoid_a_worker_whose_connection_is_down(start_worker, app_dir):
    a, b = start_worker("w-a"), start_worker("w-b")

    async def scenario() -> None:
        d = await directory_with(a, b)
        inv = RemoteInvoker(target(app_dir, "work"), d, cap=16)  # room on both workers
        try:
            a.kill()
            await until(lambda: d.workers["w-a"].conn is None)
            results = await asyncio.gather(*(inv.invoke(f"n{i}", http("POST"))
                                             for i in range(10)))
            assert {worker_of(r) for r in results} == {"b"}
        finally:
            await d.aclose()

    run(scenario)


def test_a_stopping_worker_finishes_its_calls_and_new_ones_go_elsewhere(start_worker, app_dir):
    a, b = start_worker("w-a"), start_worker("w-b")

    async def scenario() -> None:
        d = await directory_with(a, b)
        inv = RemoteInvoker(target(app_dir, "work"), d, cap=16)
        try:
            calls = [asyncio.ensure_future(inv.invoke(f"g{i}", http("POST", s=0.6)))
                     for i in range(4)]
            await until(lambda: d.workers["w-a"].calls == 2)
            await asyncio.sleep(0.2)
            a.proc.send_signal(signal.SIGTERM)  # it drains for up to 1 s
            await asyncio.sleep(0.1)
            during = asyncio.ensure_future(inv.invoke("during", http("POST")))
            results = await asyncio.gather(*calls)  # no 502: they finished before it hung up
            assert Counter(worker_of(r) for r in results) == {"a": 2, "b": 2}
            assert (await during)["rid"] == "during"  # served, by one or the other
            await until(lambda: d.workers["w-a"].conn is None)
            more = await asyncio.gather(*(inv.invoke(f"m{i}", http("POST")) for i in range(4)))
            assert {worker_of(r) for r in more} == {"b"}
        finally:
            await d.aclose()

    run(scenario)


def test_a_removed_worker_gets_no_new_calls_and_its_calls_finish(start_worker, app_dir):
    a, b = start_worker("w-a"), start_worker("w-b")

    async def scenario() -> None:
        d = await directory_with(a, b)
        inv = RemoteInvoker(target(app_dir, "work"), d, cap=16)
        try:
            calls = [asyncio.ensure_future(inv.invoke(f"r{i}", http("POST", s=0.5)))
                     for i in range(4)]
            await until(lambda: d.workers["w-a"].calls == 2)
            link = d.workers["w-a"]
            d.remove("w-a")  # the registry lost it; its connection drains
            assert "w-a" not in d.workers
            more = await asyncio.gather(*(inv.invoke(f"x{i}", http("POST")) for i in range(4)))
            assert {worker_of(r) for r in more} == {"b"}
            results = await asyncio.gather(*calls)
            assert Counter(worker_of(r) for r in results) == {"a": 2, "b": 2}
            await until(lambda: link.conn is None and link.task is not None and link.task.done())
        finally:
            await d.aclose()

    run(scenario)


# -- authentication -------------------------------------------------------------------


def test_a_gateway_with_the_wrong_token_is_refused(start_worker, caplog):
    w = start_worker("w-auth")

    async def scenario() -> None:
        d = WorkerDirectory("x" * 40)
        d.update(w.node_id, w.address, {"work@1": 1})
        try:
            await until(lambda: w.errors().count("refused: wrong proof") >= 3, 30)
            assert d.workers["w-auth"].conn is None
            assert d.ready("work@1") == 0
        finally:
            await d.aclose()

    with caplog.at_level(logging.WARNING, logger="nimbus.remote"):
        run(scenario)
    lines = [r for r in caplog.records if "w-auth" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # once, not per attempt
    assert "refused our proof" in lines[0].getMessage()
    assert TOKEN not in w.errors()


def test_a_silent_or_garbling_peer_is_closed_and_learns_nothing(start_worker):
    w = start_worker("w-peer", "--auth-timeout", "0.5")
    host, port = w.address.rsplit(":", 1)

    async def scenario() -> None:
        # silent: closed after the deadline
        reader, writer = await asyncio.open_connection(host, int(port))
        got = await asyncio.wait_for(reader.read(), 10)  # until EOF
        writer.close()
        kinds = [k for k, _ in f.split(bytearray(got), f.HANDSHAKE_MAX)]
        assert kinds == [f.HELLO]  # only the challenge; no proof, no state
        assert TOKEN.encode() not in got
        # garbage instead of the handshake: closed at once
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert [k for k, _ in f.split(bytearray(got), f.HANDSHAKE_MAX)] == [f.HELLO]
        # an INVOKE without the handshake never runs
        reader, writer = await asyncio.open_connection(host, int(port))
        meta = b'[1,"work",1,"sneaky",3]'
        writer.write(b"".join(f.pack(f.INVOKE, meta, b"\n", b'{}')))
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert [k for k, _ in f.split(bytearray(got), f.HANDSHAKE_MAX)] == [f.HELLO]

    run(scenario)
    errors = w.errors()
    assert errors.count("refused: no valid handshake in time") == 1
    assert errors.count("refused: it does not speak the frame protocol") == 2
    assert not (w.state / "logs" / "work.log").exists() or \
        b"sneaky" not in (w.state / "logs" / "work.log").read_bytes()


def test_the_wire_as_documented_and_its_bounds(shared):
    """A hand-made gateway: the handshake, a call, an answer; then a frame
    over the size bound closes the connection."""
    host, port = shared.address.rsplit(":", 1)

    async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        size, kind = f.HEADER.unpack(await reader.readexactly(f.HEADER_SIZE))
        return kind, await reader.readexactly(size)

    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        kind, body = await read_frame(reader)
        assert kind == f.HELLO
        version, worker_id, nonce_hex = orjson.loads(body)
        assert (version, worker_id) == (f.VERSION, "w-shared")
        nonce_w, nonce_g = bytes.fromhex(nonce_hex), secrets.token_bytes(f.NONCE_BYTES)
        token = TOKEN.encode()
        writer.write(b"".join(f.pack(f.AUTH, nonce_g,
                                     f.gateway_proof(token, worker_id, nonce_w, nonce_g))))
        kind, body = await read_frame(reader)
        assert kind == f.WELCOME
        assert body == f.worker_proof(token, worker_id, nonce_w, nonce_g)
        kind, body = await read_frame(reader)
        assert kind == f.STATE and orjson.loads(body)["work@1"] == 1
        writer.write(b"".join(f.pack(f.INVOKE, b'[7,"work",1,"by-hand",2.5]', b"\n",
                                     b'{"echo":"hi"}')
                              + f.pack(f.INVOKE, b'[8,"nope",1,"by-hand-2",1]', b"\n", b'{}')))
        answers = dict([await read_frame(reader), await read_frame(reader)])
        call_id, _, result = answers[f.RESULT].partition(b"\n")
        assert call_id == b"7" and orjson.loads(result)["echo"] == "hi"
        assert 0 < orjson.loads(result)["remaining"] <= 2500  # our timeout, shorter, applied
        call_id, _, error = answers[f.ERROR].partition(b"\n")
        assert call_id == b"8" and orjson.loads(error)[0] == "absent"
        writer.write(f.HEADER.pack(f.MAX_FRAME + 1, f.INVOKE))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
        writer.close()

    run(scenario)
    assert "over the limit" in shared.errors()


def test_a_fake_worker_is_not_trusted(caplog):
    """Something at a worker's address without the token cannot prove
    itself: the gateway never sends it a call, nor the token."""
    received = bytearray()

    async def scenario() -> None:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonce = secrets.token_bytes(f.NONCE_BYTES)
            writer.write(b"".join(f.pack(f.HELLO, b'["%s","w-x","%s"]' % (
                f.VERSION.encode(), nonce.hex().encode()))))
            data = await reader.read(1 << 16)
            received.extend(data)
            # a made-up proof, and news of many ready instances
            writer.write(b"".join(f.pack(f.WELCOME, secrets.token_bytes(f.PROOF_BYTES))
                                  + f.pack(f.STATE, b'{"work@1": 50}')))
            received.extend(await reader.read(1 << 16))
            writer.close()

        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        d = WorkerDirectory(TOKEN)
        d.update("w-x", f"127.0.0.1:{port}", {"work@1": 1})
        try:
            await until(lambda: any("w-x" in r.getMessage() for r in caplog.records), 20)
            assert d.workers["w-x"].conn is None and d.ready("work@1") == 0
        finally:
            await d.aclose()
            server.close()

    with caplog.at_level(logging.WARNING, logger="nimbus.remote"):
        run(scenario)
    assert "proof is wrong" in " ".join(r.getMessage() for r in caplog.records)
    frames = f.split(received, f.MAX_FRAME)
    assert [k for k, _ in frames] == [f.AUTH]  # the handshake, then nothing
    assert TOKEN.encode() not in received


def test_a_worker_that_claims_another_id_is_not_used(shared, caplog):
    async def scenario() -> None:
        d = WorkerDirectory(TOKEN)
        d.update("w-impostor", shared.address, {"work@1": 1})
        try:
            await until(lambda: any("w-impostor" in r.getMessage() for r in caplog.records))
            assert d.workers["w-impostor"].conn is None
        finally:
            await d.aclose()

    with caplog.at_level(logging.WARNING, logger="nimbus.remote"):
        run(scenario)
    assert "not 'w-impostor'" in " ".join(r.getMessage() for r in caplog.records)


# -- pure parts -------------------------------------------------------------------------


def test_proofs_are_bound_to_side_worker_and_nonces():
    token = TOKEN.encode()
    nw, ng = b"w" * 32, b"g" * 32
    g = f.gateway_proof(token, "w1", nw, ng)
    assert g != f.worker_proof(token, "w1", nw, ng)  # a proof cannot be reflected
    assert g != f.gateway_proof(token, "w2", nw, ng)
    assert g != f.gateway_proof(token, "w1", nw, b"h" * 32)
    assert g != f.gateway_proof(b"another-token-of-some-length-000000", "w1", nw, ng)
    assert f.check_proof(g, g) and not f.check_proof(g, g[:-1]) and not f.check_proof(g, b"")


def test_frames_over_the_limit_are_refused():
    buf = bytearray(b"".join(f.pack(f.PING)) + f.HEADER.pack(10_000, f.INVOKE))
    with pytest.raises(f.FrameError, match="over the limit"):
        f.split(buf, 1000)
    buf = bytearray(b"".join(f.pack(f.RESULT, b"1\n", b"[1]") + f.pack(f.PONG)) + b"\x00")
    assert f.split(buf, 1000) == [(f.RESULT, b"1\n[1]"), (f.PONG, b"")]
    assert buf == b"\x00"  # a partial header waits for the rest


def test_idempotent_methods_come_from_the_http_event():
    from nimbus.gateway.remote import idempotent
    assert all(idempotent(http(m)) for m in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS"))
    assert not any(idempotent(http(m)) for m in ("POST", "PATCH"))
    assert not idempotent({"Records": []})  # queue batches and async events
    assert not idempotent({"requestContext": "odd"}) and not idempotent(None)
    # payload 1.0 (REST) events name the method at the top
    assert idempotent({"httpMethod": "GET", "requestContext": {"httpMethod": "GET"}})
    assert not idempotent({"httpMethod": "POST", "requestContext": {"httpMethod": "POST"}})


def test_errors_cross_the_wire_as_themselves():
    from nimbus import errors as e
    for exc in (e.HandlerError({"errorType": "X", "errorMessage": "m"}),
                e.InvocationTimeoutError("slow"), e.ThrottledError("busy", 3),
                e.InstanceDiedError("gone"), e.ClosedError("retired")):
        back = f.error_from(*f.error_fields(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert f.error_from(*f.error_fields(e.ThrottledError("busy", 3))).retry_after_s == 3


def test_addresses_are_checked():
    from nimbus.gateway.remote import parse_address
    assert parse_address("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    for bad in ("nohost", "h:0", "h:x", ":80"):
        with pytest.raises(ValueError, match="host:port"):
            parse_address(bad)
