"""The NATS queue on a real 3-server cluster: the real-clock contract, two
clients, and a consumer killed mid-try."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest

from nimbus.errors import ConflictError, UnavailableError
from nimbus.natsd import NATS_USER, NatsCluster
from nimbus.store.nats_queue import NatsQueue, encode_name, open_nats_queue
from nimbus.store.queue import Outgoing
from nimbus.testing import check_queue_realtime, check_queue_shared

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def connected(cluster: NatsCluster) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(servers=cluster.urls.split(","), user=NATS_USER,
                            password=cluster.password, connect_timeout=5,
                            max_reconnect_attempts=5)
    try:
        yield nc
    finally:
        await nc.close()


def region() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_contract_real_clock(cluster: NatsCluster) -> None:
    reg = region()

    async def main() -> None:
        async with connected(cluster) as nc:
            async def open_queue() -> NatsQueue:
                return await open_nats_queue(nc, region=reg)
            await check_queue_realtime(open_queue)
    asyncio.run(main())


def test_two_clients(cluster: NatsCluster) -> None:
    """Two connections (as two processes of a region hold), one stream."""
    reg = region()

    async def main() -> None:
        async with connected(cluster) as nc1, connected(cluster) as nc2:
            conns = iter([nc1, nc2])

            async def open_queue() -> NatsQueue:
                return await open_nats_queue(next(conns), region=reg)
            await check_queue_shared(open_queue)
    asyncio.run(main())


def test_replicated_three_ways(cluster: NatsCluster) -> None:
    reg = region()

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            js = nc.jetstream()
            assert (await js.stream_info(f"nimbus-{reg}-work")).config.num_replicas == 3
            assert (await js.stream_info(f"KV_nimbus-{reg}-records")).config.num_replicas == 3
            await q.aclose()
    asyncio.run(main())


def test_a_stream_just_made_is_waited_for_until_it_is_known() -> None:
    """Right after a stream is made, the server answering its info may not
    know it yet (404): that is waited out like a leader not yet elected.
    (A region's start failed on it now and then.)"""
    from types import SimpleNamespace

    from nimbus.store.nats_queue import _wait_for_leader
    answers: list[Any] = [nats.js.errors.NotFoundError(), nats.js.errors.NotFoundError(),
                          SimpleNamespace(cluster=SimpleNamespace(leader=None)),
                          SimpleNamespace(cluster=SimpleNamespace(leader="n2"))]

    class JS:
        async def stream_info(self, stream: str) -> Any:
            got = answers.pop(0)
            if isinstance(got, Exception):
                raise got
            return got
    asyncio.run(_wait_for_leader(JS(), "KV_x"))  # type: ignore[arg-type]
    assert answers == []


def test_queue_names_become_one_token() -> None:
    assert encode_name("fn/hello") == "fn_2Fhello"
    assert encode_name("topic/a.b/f_1") == "topic_2Fa_2Eb_2Ff_5F1"
    assert encode_name("a>*") == "a_3E_2A"
    assert encode_name("q/ünï") == encode_name("q/ünï") != encode_name("q/uni")


CONSUMER = """
import asyncio, sys
import nats
from nimbus.store.nats_queue import open_nats_queue

async def main():
    urls, password, region, name = sys.argv[1:5]
    nc = await nats.connect(servers=urls.split(","), user="nimbus", password=password)
    q = await open_nats_queue(nc, region=region)
    got = []
    while not got:
        got = await q.receive(name, max_messages=1, visibility_s=1.5, wait_s=1.0)
    await q.begin(got)
    print("begun", got[0].id, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_consumer_killed_mid_try_costs_one_attempt(cluster: NatsCluster) -> None:
    """A consumer process begins a try and is SIGKILLed without settling:
    exactly that one try is on record, and the message comes back once its
    lease ends (no recover step: the lease is the only recovery)."""
    reg, name = region(), "fn/crashy"

    async def send() -> str:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            [sent] = await q.send(name, [Outgoing(b'{"n": 1}')])
            await q.aclose()
            return sent.id

    mid = asyncio.run(send())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, cluster.urls, cluster.password,
                             reg, name], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.split() == ["begun", mid], f"the consumer should begin {mid}: {line!r}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    async def after() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            try:
                rec = await q.get(mid)
                assert rec is not None and (rec.status, rec.attempts) == ("running", 1), \
                    f"the begun try is on record while its lease runs: {rec}"
                t0 = time.monotonic()
                got = []
                while not got and time.monotonic() - t0 < 20:
                    got = await q.receive(name, max_messages=1, visibility_s=30, wait_s=1.0)
                assert [m.id for m in got] == [mid], "delivered again after the lease"
                assert got[0].attempts == 2, f"this is the second try: {got[0]}"
                await q.begin(got)
                await q.ack(got[0])
                rec = await q.get(mid)
                assert rec is not None and (rec.status, rec.attempts) == ("succeeded", 2), rec
            finally:
                await q.aclose()
    asyncio.run(after())


def test_long_visibility_is_kept_alive_past_ack_wait(cluster: NatsCluster) -> None:
    """A lease longer than the consumer's AckWait is held by in-progress
    acks while its holder lives; the other client does not get it."""
    reg, name = region(), "fn/slow"

    async def main() -> None:
        async with connected(cluster) as nc1, connected(cluster) as nc2:
            a = await open_nats_queue(nc1, region=reg, ack_wait_s=0.5)
            b = await open_nats_queue(nc2, region=reg, ack_wait_s=0.5)
            try:
                await a.send(name, [Outgoing(b"x")])
                [m] = await a.receive(name, max_messages=1, visibility_s=3.0, wait_s=5)
                # three AckWaits pass: still leased to a
                assert await b.receive(name, max_messages=1, visibility_s=3.0, wait_s=1.6) == []
                got = await b.receive(name, max_messages=1, visibility_s=30, wait_s=8)
                assert [x.id for x in got] == [m.id], "after the visibility the lease ends"
                with pytest.raises(ConflictError):
                    await a.ack(m)
                await b.ack(got[0])
            finally:
                await a.aclose()
                await b.aclose()
    asyncio.run(main())


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "not-landed"])
def test_a_write_whose_answer_is_lost_is_read_back(cluster: NatsCluster, landed: bool) -> None:
    """A server dying under a write (or leaders moving) loses its answer:
    the write may have landed or not. Every record and count write here
    loses its first answer, landed or not; each call still does its part
    once, so the record and the counts agree. (A settle that landed but
    looked failed once skipped its count, and the pointer, found settled at
    redelivery, was dropped: counts short for good.)"""
    reg, name = region(), "fn/lossy"

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            real = q._kv._update
            lost: list[str] = []

            async def update(key: str, value: bytes, last: int | None = None,
                             **kw: Any) -> int:
                if key.startswith(("m.", "s.")) and f"{key}@{last}" not in lost:
                    lost.append(f"{key}@{last}")
                    if landed:
                        await real(key, value, last=last, **kw)
                    raise nats.errors.TimeoutError
                return await real(key, value, last=last, **kw)
            q._kv._update = update  # type: ignore[method-assign]
            try:
                [sent] = await q.send(name, [Outgoing(b"1")])
                [m] = await q.receive(name, max_messages=1, visibility_s=30, wait_s=5)
                await q.begin([m])
                await q.retry(m, delay_s=0, error={"errorType": "E", "errorMessage": "e"})
                [m2] = await q.receive(name, max_messages=1, visibility_s=30, wait_s=5)
                assert (m2.id, m2.attempts) == (sent.id, 2)
                await q.begin([m2])
                await q.ack(m2)
                rec = await q.get(sent.id)
                assert rec is not None and (rec.status, rec.attempts) == ("succeeded", 2), rec
                s = await q.stats(name)
                assert (s.succeeded, s.ready, s.delayed, s.running) == (1, 0, 0, 0), s
                assert len([k for k in lost if k.startswith("m.")]) == 7, lost
                assert await q.receive(name, max_messages=1, visibility_s=30, wait_s=1) == []
            finally:
                await q.aclose()
    asyncio.run(main())


def test_a_lease_outlives_late_counts_and_lapses_after_a_failed_settle(
        cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receive waiting for late counts (NATS answering slowly) keeps its
    deliveries alive meanwhile, so no one else gets them; a settle NATS
    never answers stops keeping its delivery alive, so it comes back
    within AckWait, not after the whole visibility."""
    import nimbus.store.nats_queue as nq
    monkeypatch.setattr(nq, "UNKNOWN_WRITE_S", 0.5)
    reg, name = region(), "fn/late"

    async def main() -> None:
        async with connected(cluster) as nc1, connected(cluster) as nc2:
            a = await open_nats_queue(nc1, region=reg, ack_wait_s=0.5)
            b = await open_nats_queue(nc2, region=reg, ack_wait_s=0.5)
            real = a._kv._update
            stall: dict[str, float] = {"s.": 0.0, "m.": 0.0}

            async def update(key: str, value: bytes, last: int | None = None,
                             **kw: Any) -> int:
                for prefix, wait_s in stall.items():
                    if key.startswith(prefix) and wait_s:
                        await asyncio.sleep(wait_s)
                        raise nats.errors.TimeoutError
                return await real(key, value, last=last, **kw)
            a._kv._update = update  # type: ignore[method-assign]
            try:
                for q in (b, a):  # the consumer made, and bound by both, before the race
                    assert await q.receive(name, max_messages=1, visibility_s=30) == []
                [sent] = await b.send(name, [Outgoing(b"x")])
                stall["s."] = 0.5  # a's count writes time out for 2.5 s
                asyncio.get_running_loop().call_later(2.5, stall.update, {"s.": 0.0})
                receiving = asyncio.create_task(
                    a.receive(name, max_messages=1, visibility_s=30, wait_s=5))
                while (rec := await b.get(sent.id)) is None or rec.status != "running":
                    await asyncio.sleep(0.02)  # a claimed it; now it waits for counts
                got_b = await b.receive(name, max_messages=1, visibility_s=30, wait_s=3)
                got_a = await receiving
                assert [m.id for m in got_a] == [sent.id] and got_b == []
                assert await b.receive(name, max_messages=1, visibility_s=30, wait_s=1) == []
                stall["m."] = 0.2  # a's settle gets no answer
                with pytest.raises(UnavailableError):
                    await a.ack(got_a[0])
                t0 = time.monotonic()
                again = await b.receive(name, max_messages=1, visibility_s=30, wait_s=5)
                assert [m.id for m in again] == [sent.id], "it came back"
                assert time.monotonic() - t0 < 3
                await b.ack(again[0])
                assert (await b.stats(name)).succeeded == 1
            finally:
                await a.aclose()
                await b.aclose()
    asyncio.run(main())


def test_a_failed_claim_does_not_lose_the_others(
        cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """One claim of a receive failing (NATS never answers its write) does
    not fail the receive: the others are counted and handed out, and the
    failed one comes back within AckWait. (The whole receive failed: the
    claims that landed went uncounted, leaving ready high and running
    negative for good.)"""
    import nimbus.store.nats_queue as nq
    monkeypatch.setattr(nq, "UNKNOWN_WRITE_S", 0.3)
    reg, name = region(), "fn/claims"

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg, ack_wait_s=1.0)
            try:
                sent = await q.send(name, [Outgoing(b"1"), Outgoing(b"2")])
                real = q._kv._update
                unanswered = f"m.{sent[0].id}"

                async def update(key: str, value: bytes, last: int | None = None,
                                 **kw: Any) -> int:
                    if key == unanswered:
                        raise nats.errors.TimeoutError
                    return await real(key, value, last=last, **kw)
                q._kv._update = update  # type: ignore[method-assign]
                got: list[Any] = []
                t0 = time.monotonic()
                while not got:  # (a fetch of the unanswered one alone fails)
                    assert time.monotonic() - t0 < 20, "every receive failed"
                    with contextlib.suppress(UnavailableError):
                        got = await q.receive(name, max_messages=2, visibility_s=30, wait_s=5)
                assert [m.id for m in got] == [sent[1].id]
                s = await q.stats(name)
                assert (s.ready, s.running) == (1, 1), s
                q._kv._update = real  # type: ignore[method-assign]
                [again] = await q.receive(name, max_messages=2, visibility_s=30, wait_s=5)
                assert again.id == sent[0].id
                for m in (*got, again):
                    await q.ack(m)
                s = await q.stats(name)
                assert (s.ready, s.running, s.succeeded) == (0, 0, 2), s
            finally:
                await q.aclose()
    asyncio.run(main())


def test_a_lost_cluster_is_unavailable_not_a_traceback(tmp_path: Path) -> None:
    async def main() -> None:
        c = NatsCluster(tmp_path / "gone", secrets.token_urlsafe(32), size=1)
        c.start()
        nc = await nats.connect(servers=c.urls.split(","), user=NATS_USER, password=c.password,
                                max_reconnect_attempts=0, allow_reconnect=False)
        try:
            q = await open_nats_queue(nc, region="gone")
            c.stop()
            await asyncio.sleep(0.2)
            with pytest.raises(UnavailableError) as info:
                await q.send("fn/x", [Outgoing(b"x")])
            assert info.value.__cause__ is not None
            await q.aclose()
        finally:
            c.stop()
            await nc.close()
    asyncio.run(main())


def test_dedup_keys_and_settled_records_expire_on_the_server(cluster: NatsCluster) -> None:
    """The dedup window and the record retention are server-side TTLs: no
    sweeper runs, yet a key is new again after its window and a settled
    record is gone after its retention; an unsettled one stays."""
    reg, name = region(), "fn/ttl"

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg, dedup_window_s=1.0, record_ttl_s=1.0)
            try:
                [a] = await q.send(name, [Outgoing(b"1", dedup_key="k")])
                [b] = await q.send(name, [Outgoing(b"2", dedup_key="k")])
                assert a.created and not b.created and a.id == b.id
                [m] = await q.receive(name, max_messages=1, visibility_s=30, wait_s=5)
                await q.ack(m)
                [waiting] = await q.send(name, [Outgoing(b"3")])
                t0 = time.monotonic()
                while True:
                    [c] = await q.send(name, [Outgoing(b"4", dedup_key="k")])
                    if c.created:
                        break
                    assert c.id == a.id
                    assert time.monotonic() - t0 < 15, "the dedup key never expired"
                    await asyncio.sleep(0.3)
                assert c.id != a.id
                while await q.get(a.id) is not None:
                    assert time.monotonic() - t0 < 15, "the settled record never expired"
                    await asyncio.sleep(0.3)
                rec = await q.get(waiting.id)
                assert rec is not None and rec.status == "queued", "unsettled records stay"
                assert (await q.stats(name)).succeeded == 1, "counts keep every settle"
            finally:
                await q.aclose()
    asyncio.run(main())


def test_purge_settled_before_their_time(cluster: NatsCluster) -> None:
    reg, name = region(), "fn/purge"

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            try:
                sent = await q.send(name, [Outgoing(b"1"), Outgoing(b"2")])
                [m] = await q.receive(name, max_messages=1, visibility_s=30, wait_s=5)
                await q.ack(m)
                assert await q.purge_settled(time.time() - 3600) == 0, "none settled that early"
                assert await q.purge_settled(time.time() + 1) == 1
                assert await q.get(sent[0].id) is None, "settled records are purged"
                assert await q.get(sent[1].id) is not None, "unsettled ones never are"
            finally:
                await q.aclose()
    asyncio.run(main())


class StubPool:
    """The dispatcher's view of a function (a real pool needs a worker):
    the handler "fails" on odd payloads. The queue under it is the real one."""

    def __init__(self) -> None:
        from nimbus.manifest.model import FunctionSpec
        from nimbus.worker.target import Target
        self.target = Target("app", 1, FunctionSpec("f", "h", "f", retries=1, retry_delay_s=0.2,
                                                     max_instances=8), "0" * 64, None)
        self.cap = 8
        self.runs: dict[str, int] = {}

    async def invoke(self, rid: str, event: Any) -> Any:
        from nimbus.errors import HandlerError
        self.runs[rid] = self.runs.get(rid, 0) + 1
        if event["n"] % 2:
            raise HandlerError({"errorType": "Odd", "errorMessage": f"{event['n']} is odd"})
        return {"n": event["n"]}


def test_the_dispatcher_runs_on_nats(cluster: NatsCluster) -> None:
    """Events and its dispatcher over the NATS queue: async invocations run,
    failures retry once and are dead-lettered, redrive runs them again, and
    records and counts say so."""
    from nimbus.clock import SystemClock
    from nimbus.events.service import Events
    reg = region()

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            pool = StubPool()
            events = Events(q, SystemClock())
            events.sync({"f": pool})  # type: ignore[dict-item]
            try:
                ids = [(await events.submit("f", b'{"n": %d}' % n)).id for n in range(20)]
                t0 = time.monotonic()
                while (s := await events.stats("f"))["succeeded"] + s["dead"] < 20:
                    assert time.monotonic() - t0 < 60, f"not all settled: {s}"
                    await asyncio.sleep(0.1)
                assert (s["succeeded"], s["dead"], s["running"]) == (10, 10, 0), s
                for n, mid in enumerate(ids):
                    rec = await events.invocation(mid)
                    want = ("dead", 2) if n % 2 else ("succeeded", 1)
                    assert (rec.status, rec.attempts) == want, (n, rec)
                    assert pool.runs[mid] == want[1], "attempts are the handler's starts"
                dead = await events.invocations("f", status="dead")
                assert {r.id for r in dead} == set(ids[1::2])
                assert await events.redrive("f") == 10
                while (s := await events.stats("f"))["dead"] < 10 or s["running"] or s["ready"]:
                    assert time.monotonic() - t0 < 120, f"redriven work not settled: {s}"
                    await asyncio.sleep(0.1)
                assert all(pool.runs[mid] == 4 for mid in ids[1::2]), "redriven: two more tries"
            finally:
                await events.aclose()
                await q.aclose()
    asyncio.run(main())


def test_work_goes_on_while_a_server_is_down(cluster: NatsCluster) -> None:
    """Replicas 3: with one of the three servers killed (the one the client
    may be connected to), accepted work is neither lost nor run as if new;
    calls made during the election fail with UnavailableError and are
    retried by the caller."""
    reg, name = region(), "fn/failover"

    async def retried(make: Any) -> Any:
        deadline = time.monotonic() + 30
        while True:
            try:
                return await make()
            except UnavailableError:
                assert time.monotonic() < deadline, "the region did not come back"
                await asyncio.sleep(0.2)

    async def main() -> None:
        async with connected(cluster) as nc:
            q = await open_nats_queue(nc, region=reg)
            try:
                sent = await q.send(name, [Outgoing(b"%d" % i) for i in range(30)])
                first = await q.receive(name, max_messages=10, visibility_s=30, wait_s=5)
                for m in first:
                    await q.ack(m)
                cluster.kill(0)
                done = {m.id for m in first}
                t0 = time.monotonic()
                while len(done) < 30:
                    assert time.monotonic() - t0 < 60, f"only {len(done)} of 30 ran"
                    got = await retried(lambda: q.receive(name, max_messages=10,
                                                          visibility_s=30, wait_s=1))
                    for m in got:
                        try:
                            await retried(lambda m=m: q.ack(m))
                        except ConflictError:  # an ack that landed, its answer lost
                            rec = await retried(lambda m=m: q.get(m.id))
                            if rec is None or rec.status != "succeeded":
                                continue
                        done.add(m.id)
                recs = [await retried(lambda s=s: q.get(s.id)) for s in sent]
                assert all(r is not None and r.status == "succeeded" for r in recs), recs
            finally:
                await q.aclose()
                cluster.restart(0)
                cluster.wait_healthy()
    asyncio.run(main())
