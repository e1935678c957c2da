"""The worker pool with real instances: a real zygote, real forks, real sockets.

Each test runs a scenario against ``FunctionPool`` of a real ``Worker`` (as
``bench/coldstart.py`` does), inside an event loop with an overall deadline.
No mocks: the handlers below run in forked instance processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nimbus.errors import ClosedError, HandlerError, InstanceDiedError, InvocationTimeoutError
from nimbus.manifest.model import FunctionSpec
from nimbus.observe.logs import LogSink
from nimbus.worker.instance import InitError
from nimbus.worker.pool import FunctionPool
from nimbus.worker.target import Target, code_dir_for
from nimbus.worker.worker import Worker

CODE = r'''
import os, threading, time

def work(event, context):
    time.sleep(event.get("s", 0))
    if event.get("die"):
        os._exit(9)
    if event.get("hog"):
        blocks = [bytearray(8 << 20) for _ in range(64)]
    if event.get("raise"):
        raise ValueError("asked to")
    return {"pid": os.getpid(), "rid": context.aws_request_id}

_barriers = {}
_lock = threading.Lock()

def meet(event, context):
    with _lock:
        b = _barriers.setdefault(event["group"], threading.Barrier(event["n"], timeout=5))
    b.wait()  # raises unless n invocations run in this process at the same time
    return os.getpid()
'''

BROKEN = "raise RuntimeError('cannot import me')\n\ndef work(event, context):\n    return 1\n"

Scenario = Callable[[FunctionPool], Awaitable[Any]]


def run(tmp_path: Path, scenario: Scenario, *, source: str = CODE, callable: str = "work",
        deadline_s: float = 40.0, **spec: Any) -> Any:
    state = tmp_path / "state"
    code = code_dir_for(state, "code")
    code.mkdir(parents=True)
    (code / "h.py").write_text(source)
    target = Target("t", 1, FunctionSpec(name="fn", module="h", callable=callable, **spec),
                    "code", None)

    async def main() -> Any:
        sink = LogSink(state / "logs")
        worker = Worker(state, sink)
        await worker.start()
        try:
            async with asyncio.timeout(deadline_s):
                return await scenario(worker.pool(target))
        finally:
            await worker.aclose(1.0)
            sink.close()  # its files, now: not whenever the collector gets to them

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main())
    return uvloop.run(main())


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.002)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_concurrency_runs_invocations_at_once_in_one_instance(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        pids = await asyncio.gather(*(pool.invoke(f"r{i}", {"group": "g", "n": 3})
                                      for i in range(3)))
        assert len(set(pids)) == 1
        assert len(pool.instances) == 1 and pool.cold_starts == 1
        assert pool.instances[0].outstanding == 0

    run(tmp_path, scenario, callable="meet", concurrency=3, max_instances=1, timeout_s=10)


def test_max_instances_is_a_hard_bound_and_every_request_is_served(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(pool.instances) + pool._starting)
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(pool.invoke(f"r{i}", {"s": 0.05}) for i in range(12)))
        done.set()
        await sampler
        assert len({r["pid"] for r in results}) <= 2
        assert [r["rid"] for r in results] == [f"r{i}" for i in range(12)]
        assert peak <= 2 and pool.cold_starts <= 2
        assert all(i.outstanding == 0 for i in pool.instances)

    run(tmp_path, scenario, max_instances=2, timeout_s=5)


def test_simultaneous_cold_starts_coalesce(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        results = await asyncio.gather(pool.invoke("a", {}), pool.invoke("b", {}))
        assert [r["rid"] for r in results] == ["a", "b"]
        assert pool.cold_starts <= 2 and len(pool.instances) <= 2

    run(tmp_path, scenario, max_instances=4)


async def _queued_behind(pool: FunctionPool, first: dict[str, Any]) -> tuple[Any, Any]:
    """Invoke ``first`` on the only instance, queue a second request behind it."""
    await pool.ensure_warm()
    a = asyncio.create_task(pool.invoke("a", first))
    await until(lambda: pool.instances[0].outstanding == 1)
    b = asyncio.create_task(pool.invoke("b", {}))
    await until(lambda: len(pool._waiters) == 1)
    ra, rb = await asyncio.gather(a, b, return_exceptions=True)
    return ra, rb


def test_a_request_queued_behind_a_timed_out_invocation_is_served_by_the_replacement(tmp_path):
    # issue 2: past timeout_s -> 504, "its instance is killed and replaced". The
    # request waiting for that instance must get the replacement, not the corpse.
    async def scenario(pool: FunctionPool) -> None:
        ra, rb = await _queued_behind(pool, {"s": 5})
        assert isinstance(ra, InvocationTimeoutError), ra
        assert isinstance(rb, dict) and rb["rid"] == "b", f"queued request got {rb!r}"

    run(tmp_path, scenario, max_instances=1, timeout_s=0.5)


def test_a_request_queued_behind_an_out_of_memory_invocation_is_served(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        ra, rb = await _queued_behind(pool, {"s": 0.2, "hog": 1})
        assert isinstance(ra, HandlerError), ra
        assert ra.error["errorType"] == "Runtime.OutOfMemory"
        assert isinstance(rb, dict) and rb["rid"] == "b", f"queued request got {rb!r}"

    run(tmp_path, scenario, max_instances=1, memory_mb=32, timeout_s=5)


def test_a_request_queued_behind_a_crash_is_served(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        ra, rb = await _queued_behind(pool, {"s": 0.2, "die": 1})
        assert isinstance(ra, InstanceDiedError), ra
        assert isinstance(rb, dict) and rb["rid"] == "b", f"queued request got {rb!r}"

    run(tmp_path, scenario, max_instances=1, timeout_s=5)


def test_slots_are_balanced_after_every_kind_of_failure(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        events = ([{"raise": 1}] * 3 + [{"s": 0.05, "die": 1}] * 2 + [{"s": 2}] * 2
                  + [{"s": 0.05}] * 5)
        await asyncio.gather(*(pool.invoke(f"m{i}", e) for i, e in enumerate(events)),
                             return_exceptions=True)
        await until(lambda: all(i.alive for i in pool.instances))
        assert [i.outstanding for i in pool.instances] == [0] * len(pool.instances)
        assert not [w for w in pool._waiters if not w.done()]
        assert len(pool.instances) <= 2
        results = await asyncio.gather(*(pool.invoke(f"after{i}", {}) for i in range(4)))
        assert [r["rid"] for r in results] == [f"after{i}" for i in range(4)]

    run(tmp_path, scenario, max_instances=2, timeout_s=0.5)


def test_drain_lets_the_invocation_in_flight_finish_then_stops_the_instance(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        inst = await pool.ensure_warm()
        pid = inst.pid
        inflight = asyncio.create_task(pool.invoke("a", {"s": 0.3}))
        await until(lambda: inst.outstanding == 1)
        await pool.drain(1.0)
        assert (await inflight)["rid"] == "a"
        await until(lambda: not pid_alive(pid), 5.0)
        with pytest.raises(ClosedError):
            await pool.invoke("late", {})

    run(tmp_path, scenario, max_instances=1, timeout_s=5)


def test_a_start_that_cannot_import_fails_the_waiting_request_at_once(tmp_path):
    async def scenario(pool: FunctionPool) -> None:
        t0 = time.monotonic()
        with pytest.raises(InitError) as info:
            await asyncio.wait_for(pool.invoke("a", {}), 5.0)
        assert "cannot import me" in str(info.value)
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(InitError):  # and again: no slot or waiter was left behind
            await asyncio.wait_for(pool.invoke("b", {}), 5.0)
        assert pool.instances == [] and not pool._waiters

    run(tmp_path, scenario, source=BROKEN, max_instances=1, timeout_s=3)


def test_instances_get_their_own_environment_and_tmp(tmp_path):
    src = CODE + (
        "\ndef env(event, context):\n"
        "    import tempfile\n"
        "    with tempfile.NamedTemporaryFile() as f:\n"
        "        where = f.name\n"
        "    return {k: os.environ.get(k) for k in ('AWS_LAMBDA_FUNCTION_NAME', 'TMPDIR',"
        " 'AWS_LAMBDA_LOG_STREAM_NAME')} | {'tmp': where, 'cwd': os.getcwd()}\n")

    async def scenario(pool: FunctionPool) -> None:
        got = await asyncio.gather(pool.invoke("a", {}), pool.invoke("b", {}))
        assert got[0]["AWS_LAMBDA_FUNCTION_NAME"] == "fn"
        for g in got:
            assert g["tmp"].startswith(g["TMPDIR"] + os.sep)
            assert g["cwd"].endswith(os.path.join("code", "code"))
        if got[0]["AWS_LAMBDA_LOG_STREAM_NAME"] != got[1]["AWS_LAMBDA_LOG_STREAM_NAME"]:
            assert got[0]["TMPDIR"] != got[1]["TMPDIR"]

    run(tmp_path, scenario, source=src, callable="env", max_instances=2)


def test_a_request_held_past_its_deadline_is_throttled_not_failed(tmp_path, monkeypatch):
    # max_instances 1, timeout 2 s, no extra grace: a request held behind two
    # 1.5 s invocations cannot start before its 2 s deadline, so it gets a
    # ThrottledError (429), while the two before it succeed.
    from nimbus.errors import ThrottledError
    from nimbus.worker import pool as pool_module

    monkeypatch.setattr(pool_module, "ACQUIRE_GRACE_S", 0.0)

    async def scenario(pool: FunctionPool) -> list[Any]:
        async def call(i: int) -> Any:
            await asyncio.sleep(0.05 * i)  # arrive in order
            return await pool.invoke(f"r{i}", {"s": 1.5})

        return await asyncio.gather(*(call(i) for i in range(3)), return_exceptions=True)

    results = run(tmp_path, scenario, max_instances=1, timeout_s=2.0)
    assert isinstance(results[0], dict) and isinstance(results[1], dict), results
    assert isinstance(results[2], ThrottledError), results


def test_start_and_start_when_free_keep_the_pools_figures(tmp_path):
    """The callback entry points (used by the frame server): a future when an
    instance is free, None when not; waiting can be cancelled without a trace;
    a shorter timeout from the caller applies."""
    async def scenario(pool: FunctionPool) -> None:
        await pool.ensure_warm()
        first = pool.start("a", {"s": 0.3})
        assert first is not None and pool.in_flight == 1
        assert pool.start("b", {}) is None  # the only instance is busy
        waiting = asyncio.ensure_future(pool.start_when_free("c", {}))
        await until(lambda: pool.held == 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert pool.held == 0 and pool.in_flight == 1
        assert (await first)["rid"] == "a"
        await until(lambda: pool.in_flight == 0)
        assert pool.instances[0].outstanding == 0
        second = await pool.start_when_free("d", {})
        assert (await second)["rid"] == "d"
        await until(lambda: pool.in_flight == 0)
        short = pool.start("e", {"s": 3}, timeout_s=0.3)
        assert short is not None
        with pytest.raises(InvocationTimeoutError, match="0.30 seconds"):
            await short

    run(tmp_path, scenario, max_instances=1, timeout_s=10)
