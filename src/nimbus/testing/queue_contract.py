"""The contract suite every ``Queue`` backend must pass.

Call it from a backend's tests::

    async def open_queue(clock: ManualClock) -> Queue:
        return await open_my_queue(<the same storage every call>, clock=clock)

    asyncio.run(check_queue(open_queue))

``open_queue(clock)`` opens the backend over the SAME storage every time it
is called (the suite reopens it to check durability) and must measure
delays, leases and the dedup window by ``clock.now()``. The suite uses fresh
queue names, closes every queue it opens, and raises ``AssertionError``
naming the broken rule. Every wait has a deadline.

Among the rules: a try counts when its handler starts (``begin``), never
when a message is merely leased, and a begun try still counts after the
queue is closed without settling it (the process died mid-run).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from nimbus.clock import ManualClock
from nimbus.errors import ClosedError, ConflictError
from nimbus.store.queue import DEFAULT_DEDUP_WINDOW_S, Message, Outgoing, Queue

OpenQueue = Callable[[ManualClock], Awaitable[Queue]]
WAIT_S = 5.0
ERR = {"errorType": "Boom", "errorMessage": "it failed"}


def _name(what: str) -> str:
    return f"contract-{what}-{uuid.uuid4().hex[:8]}"


async def _one(q: Queue, name: str, visibility_s: float = 30.0) -> Message:
    got = await q.receive(name, max_messages=1, visibility_s=visibility_s)
    assert len(got) == 1, f"receive({name}): expected one message, got {len(got)}"
    return got[0]


async def _nothing(q: Queue, name: str, why: str) -> None:
    got = await q.receive(name, max_messages=10, visibility_s=30.0)
    assert got == [], f"receive({name}) should be empty ({why}), got {[m.id for m in got]}"


async def check_queue(open_queue: OpenQueue) -> None:
    clock = ManualClock()
    q = await open_queue(clock)
    try:
        for check in (_roundtrip, _order_and_batches, _lease_and_redelivery, _retry_delay,
                      _release_not_counted, _dead_letters, _fail, _dedup, _isolation,
                      _wakes_waiting_receiver, _stats, _purge, _tries_count_when_begun):
            await check(q, clock)
        q = await _begun_tries_survive_a_death(q, open_queue, clock)
        name = _name("durable")
        sent = await q.send(name, [Outgoing(b'{"n": 1}'), Outgoing(b'{"n": 2}')])
        first = await _one(q, name)
        await q.ack(first, result=b"1")
    finally:
        await q.aclose()
    with _raises(ClosedError, "send after aclose"):
        await q.send(_name("closed"), [Outgoing(b"x")])
    await q.aclose()  # idempotent

    q = await open_queue(clock)  # everything acknowledged survives a reopen
    try:
        rec = await q.get(sent[0].id)
        assert rec is not None and rec.status == "succeeded" and rec.result == b"1", \
            f"after reopen, the acked message should be succeeded with its result: {rec}"
        again = await _one(q, name)
        assert again.id == sent[1].id and again.body == b'{"n": 2}', \
            "after reopen, the unacked message should still be delivered"
    finally:
        await q.aclose()


class _raises:
    def __init__(self, exc: type[BaseException], what: str) -> None:
        self.exc, self.what = exc, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: object) -> bool:
        if et is None:
            raise AssertionError(f"{self.what}: expected {self.exc.__name__}, nothing raised")
        return issubclass(et, self.exc)


async def _roundtrip(q: Queue, clock: ManualClock) -> None:
    name = _name("roundtrip")
    [sent] = await q.send(name, [Outgoing(b'{"a": 1}', {"kind": "invoke"})])
    assert sent.created and sent.id, "send should create a message with an id"
    rec = await q.get(sent.id)
    assert rec is not None and rec.status == "queued" and rec.attempts == 0, \
        f"a sent message should be queued with 0 attempts: {rec}"
    m = await _one(q, name)
    assert (m.id, m.queue, m.body, m.attributes, m.attempts) == \
        (sent.id, name, b'{"a": 1}', {"kind": "invoke"}, 1), f"delivered message wrong: {m}"
    assert m.enqueued_at == clock.now(), "enqueued_at should be the clock's time at send"
    rec = await q.get(m.id)
    assert rec is not None and rec.status == "running", f"a received message is running: {rec}"
    await q.begin([m])
    await q.ack(m, result=b'{"ok": true}', request_id="r-1")
    rec = await q.get(m.id)
    assert rec is not None and (rec.status, rec.result, rec.request_id, rec.attempts) == \
        ("succeeded", b'{"ok": true}', "r-1", 1), f"an acked message is succeeded: {rec}"
    await _nothing(q, name, "its only message was acked")
    assert await q.get("no-such-id") is None, "get of an unknown id should be None"
    with _raises(ConflictError, "ack of an already acked delivery"):
        await q.ack(m)


async def _order_and_batches(q: Queue, clock: ManualClock) -> None:
    name = _name("order")
    sent = await q.send(name, [Outgoing(str(i).encode()) for i in range(5)])
    first = await q.receive(name, max_messages=3, visibility_s=30)
    rest = await q.receive(name, max_messages=10, visibility_s=30)
    assert [m.id for m in first] == [s.id for s in sent[:3]], "oldest first, max_messages kept"
    assert [m.id for m in rest] == [s.id for s in sent[3:]], "the rest in order"
    recs = await q.records(name)
    assert [r.id for r in recs] == [s.id for s in reversed(sent)], "records: newest first"
    assert len(await q.records(name, limit=2)) == 2, "records: limit kept"


async def _lease_and_redelivery(q: Queue, clock: ManualClock) -> None:
    name = _name("lease")
    await q.send(name, [Outgoing(b"x")])
    m1 = await _one(q, name, visibility_s=10)
    await q.begin([m1])
    clock.advance(9)
    await _nothing(q, name, "its lease has 1 s left")
    clock.advance(2)
    m2 = await _one(q, name, visibility_s=10)
    assert m2.id == m1.id and m2.attempts == 2 and m2.receipt != m1.receipt, \
        f"an expired lease whose try had begun is delivered again with attempts 2: {m2}"
    with _raises(ConflictError, "ack with the stale delivery"):
        await q.ack(m1)
    await q.begin([m2])
    await q.ack(m2)
    rec = await q.get(m2.id)
    assert rec is not None and rec.attempts == 2, f"two tries began, two count: {rec}"


async def _retry_delay(q: Queue, clock: ManualClock) -> None:
    name = _name("retry")
    await q.send(name, [Outgoing(b"x")])
    m = await _one(q, name)
    await q.begin([m])
    await q.retry(m, delay_s=5, error=ERR, request_id="r-1")
    rec = await q.get(m.id)
    assert rec is not None and rec.status == "retrying" and rec.error == ERR, \
        f"a retried message is retrying with its error: {rec}"
    assert rec.visible_at == clock.now() + 5, "next_attempt_at is the delay from now"
    await _nothing(q, name, "its retry delay has not passed")
    clock.advance(5)
    m2 = await _one(q, name)
    assert m2.attempts == 2, f"a retried message comes back with attempts 2: {m2}"
    rec = await q.get(m.id)
    assert rec is not None and rec.attempts == 1, \
        f"leased again, the record still counts the one try that began: {rec}"
    await q.begin([m2])
    await q.ack(m2)


async def _release_not_counted(q: Queue, clock: ManualClock) -> None:
    name = _name("release")
    await q.send(name, [Outgoing(b"x")])
    m = await _one(q, name)
    await q.release(m, delay_s=1)
    rec = await q.get(m.id)
    assert rec is not None and rec.status == "queued" and rec.attempts == 0, \
        f"a released first delivery is queued with 0 attempts: {rec}"
    clock.advance(1)
    m2 = await _one(q, name)
    assert m2.attempts == 1, f"a released delivery does not count: {m2}"
    await q.begin([m2])  # begun, then throttled: given back, still not a try
    await q.release(m2, delay_s=0)
    rec = await q.get(m.id)
    assert rec is not None and (rec.status, rec.attempts) == ("queued", 0), \
        f"a released delivery does not count even if begun: {rec}"
    m3 = await _one(q, name)
    assert m3.attempts == 1, f"a released delivery does not count: {m3}"
    await q.ack(m3)


async def _dead_letters(q: Queue, clock: ManualClock) -> None:
    name = _name("dlq")
    sent = await q.send(name, [Outgoing(b"a"), Outgoing(b"b"), Outgoing(b"c")])
    for m in await q.receive(name, max_messages=3, visibility_s=30):
        await q.begin([m])
        await q.dead_letter(m, error=ERR)
    dead = await q.records(name, status="dead")
    assert {r.id for r in dead} == {s.id for s in sent}, "dead letters are listed"
    assert all(r.error == ERR for r in dead), "dead letters keep their error"
    assert all(r.attempts == 1 for r in dead), "a dead letter counts its begun try"
    await _nothing(q, name, "every message is dead")
    clock.advance(7)
    assert await q.redrive(name, [sent[0].id]) == 1, "redrive of one id moves one"
    m = await _one(q, name)
    assert m.id == sent[0].id and m.attempts == 1, f"a redriven message starts over: {m}"
    assert m.enqueued_at == clock.now(), \
        f"a redriven message is young again (its age and destinations start over): {m}"
    await q.ack(m)
    assert await q.redrive(name, []) == 0, "redrive of no ids moves none"
    moved = await q.redrive(name)
    assert moved == 2, f"redrive of the queue moves the rest: moved {moved}, " \
        f"dead now {[r.id for r in await q.records(name, status='dead')]}"
    assert len(await q.receive(name, max_messages=5, visibility_s=30)) == 2


async def _fail(q: Queue, clock: ManualClock) -> None:
    name = _name("fail")
    await q.send(name, [Outgoing(b"x")])
    m = await _one(q, name)
    await q.fail(m, error=ERR)
    rec = await q.get(m.id)
    assert rec is not None and rec.status == "failed" and rec.error == ERR
    assert rec.attempts == 0, f"given up without beginning: no try counted: {rec}"
    assert await q.redrive(name) == 0, "failed messages are not redriven"


async def _dedup(q: Queue, clock: ManualClock) -> None:
    name = _name("dedup")
    a = await q.send(name, [Outgoing(b"1", dedup_key="k")])
    b = await q.send(name, [Outgoing(b"2", dedup_key="k")])
    assert a[0].created and not b[0].created and a[0].id == b[0].id, \
        "a second send with the same dedup key returns the first id, not created"
    other = await q.send(_name("dedup-other"), [Outgoing(b"3", dedup_key="k")])
    assert other[0].created, "dedup keys are per queue"
    m = await _one(q, name)
    assert m.body == b"1"
    await q.ack(m)
    c = await q.send(name, [Outgoing(b"4", dedup_key="k")])
    assert not c[0].created, "dedup holds after the first message was processed"
    clock.advance(DEFAULT_DEDUP_WINDOW_S + 1)
    d = await q.send(name, [Outgoing(b"5", dedup_key="k")])
    assert d[0].created and d[0].id != a[0].id, "after the window the key is new again"
    fixed = f"id-{uuid.uuid4().hex}"
    e = await q.send(name, [Outgoing(b"6", id=fixed), Outgoing(b"7", id=fixed)])
    assert [r.created for r in e] == [True, False] and e[1].id == fixed, \
        "a message sent again with the same id is not created twice"


async def _isolation(q: Queue, clock: ManualClock) -> None:
    a, b = _name("iso-a"), _name("iso-b")
    await q.send(a, [Outgoing(b"a")])
    await _nothing(q, b, "messages belong to their queue")
    m = await _one(q, a)
    await q.ack(m)


async def _wakes_waiting_receiver(q: Queue, clock: ManualClock) -> None:
    name = _name("wake")
    waiting = asyncio.ensure_future(q.receive(name, max_messages=1, visibility_s=30,
                                              wait_s=WAIT_S))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "receive with wait_s should wait for a message"
    await q.send(name, [Outgoing(b"x")])
    got = await asyncio.wait_for(waiting, WAIT_S)
    assert len(got) == 1, "a waiting receiver gets a message sent meanwhile"
    await q.ack(got[0])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await q.receive(name, max_messages=1, visibility_s=30, wait_s=0.2) == []
    assert loop.time() - t0 >= 0.15, "an empty receive waits about wait_s"


async def _stats(q: Queue, clock: ManualClock) -> None:
    name = _name("stats")
    await q.send(name, [Outgoing(b"1"), Outgoing(b"2"), Outgoing(b"3"), Outgoing(b"4")])
    ms = await q.receive(name, max_messages=3, visibility_s=30)
    await q.ack(ms[0])
    await q.retry(ms[1], delay_s=60, error=ERR)
    s = await q.stats(name)
    assert (s.ready, s.delayed, s.running, s.succeeded, s.dead, s.failed) == (1, 1, 1, 1, 0, 0), \
        f"stats should count 1 ready, 1 delayed, 1 running, 1 succeeded: {s}"


async def _purge(q: Queue, clock: ManualClock) -> None:
    name = _name("purge")
    sent = await q.send(name, [Outgoing(b"1"), Outgoing(b"2")])
    m = await _one(q, name)
    await q.ack(m)
    clock.advance(10)
    removed = await q.purge_settled(clock.now() - 5)
    assert removed >= 1 and await q.get(sent[0].id) is None, "settled messages are purged"
    assert await q.get(sent[1].id) is not None, "unsettled messages are never purged"


async def _tries_count_when_begun(q: Queue, clock: ManualClock) -> None:
    name = _name("tries")
    sent = await q.send(name, [Outgoing(b"a"), Outgoing(b"b"), Outgoing(b"c")])
    leased = await q.receive(name, max_messages=3, visibility_s=10)
    assert [m.attempts for m in leased] == [1, 1, 1], "a lease is not a try"
    for rec in [await q.get(s.id) for s in sent]:
        assert rec is not None and (rec.status, rec.attempts) == ("running", 0), \
            f"leased, not begun: running with 0 attempts: {rec}"
    await q.begin(leased[:2])  # one batch of two begins; the third never does
    clock.advance(11)  # every lease ends unsettled, as if its consumer vanished
    again = {m.id: m for m in await q.receive(name, max_messages=3, visibility_s=10)}
    assert {m.id: m.attempts for m in again.values()} == \
        {sent[0].id: 2, sent[1].id: 2, sent[2].id: 1}, \
        f"only the begun tries count, once each: {[(m.id, m.attempts) for m in again.values()]}"
    for m in again.values():
        await q.begin([m])
        await q.retry(m, delay_s=0, error=ERR)
    recs = {s.id: await q.get(s.id) for s in sent}
    assert {i: r.attempts for i, r in recs.items() if r} == \
        {sent[0].id: 2, sent[1].id: 2, sent[2].id: 1}, \
        f"records count the tries that began: {recs}"
    for m in await q.receive(name, max_messages=3, visibility_s=10):
        await q.ack(m)  # settled without beginning (as a test may): no try added
    recs = {s.id: await q.get(s.id) for s in sent}
    assert [r.attempts for s in sent if (r := recs[s.id])] == [2, 2, 1], \
        f"an ack without a begun try adds none: {recs}"


async def _begun_tries_survive_a_death(q: Queue, open_queue: OpenQueue,
                                       clock: ManualClock) -> Queue:
    """Close without settling (the process died mid-run); reopen: the try
    that had begun counts, the one that had not costs nothing."""
    name = _name("death")
    sent = await q.send(name, [Outgoing(b"ran"), Outgoing(b"waited")])
    ran, _waited = await q.receive(name, max_messages=2, visibility_s=10)
    await q.begin([ran])
    await q.aclose()
    q = await open_queue(clock)
    try:
        clock.advance(11)
        back = {m.id: m.attempts
                for m in await q.receive(name, max_messages=2, visibility_s=10)}
        assert back == {sent[0].id: 2, sent[1].id: 1}, \
            f"after a death, a begun try counts and a lease does not: {back}"
        rec = await q.get(ran.id)
        assert rec is not None and rec.attempts == 1, f"the cut-short try is on record: {rec}"
    except BaseException:
        await q.aclose()
        raise
    return q


# -- real clock: backends whose leases and delays are timed by a server ------------

OpenReal = Callable[[], Awaitable[Queue]]
LEASE_S = 0.6  # a short visibility, long enough for a slow machine to act within it
DELAY_S = 0.5


async def _eventually(q: Queue, name: str, what: str, *, n: int = 1,
                      visibility_s: float = 30.0) -> list[Message]:
    """Receive ``n`` messages within a bounded wait (leases and delays end by
    the server's clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S + 10 * LEASE_S
    got: list[Message] = []
    while len(got) < n:
        left = deadline - loop.time()
        assert left > 0, f"receive({name}): {what}: got {len(got)} of {n} in time"
        got += await q.receive(name, max_messages=n - len(got), visibility_s=visibility_s,
                               wait_s=min(left, 1.0))
    return got


async def check_queue_realtime(open_queue: OpenReal) -> None:
    """The rules again on the wall clock, with short leases and delays (no
    ManualClock): for a backend whose timers run in a server. ``open_queue()``
    opens the backend over the same storage every call."""
    q = await open_queue()
    try:
        for check in (_rt_roundtrip, _rt_order, _rt_lease, _rt_retry, _rt_release,
                      _rt_dead_letters, _rt_fail, _rt_dedup, _rt_isolation, _rt_wakes,
                      _rt_stats, _rt_delayed_send, _rt_tries):
            await check(q)
        q = await _rt_death(q, open_queue)
        name = _name("rt-durable")
        sent = await q.send(name, [Outgoing(b"1"), Outgoing(b"2")])
        first = await _eventually(q, name, "the first of two")
        await q.ack(first[0], result=b"1")
    finally:
        await q.aclose()
    with _raises(ClosedError, "send after aclose"):
        await q.send(_name("closed"), [Outgoing(b"x")])
    await q.aclose()
    q = await open_queue()
    try:
        rec = await q.get(sent[0].id)
        assert rec is not None and rec.status == "succeeded" and rec.result == b"1", \
            f"after reopen, the acked message is succeeded with its result: {rec}"
        [again] = await _eventually(q, name, "the unacked message after a reopen")
        assert again.id == sent[1].id and again.body == b"2"
        await q.ack(again)
    finally:
        await q.aclose()


async def _rt_roundtrip(q: Queue) -> None:
    name = _name("rt-roundtrip")
    [sent] = await q.send(name, [Outgoing(b'{"a": 1}', {"kind": "invoke"})])
    rec = await q.get(sent.id)
    assert rec is not None and (rec.status, rec.attempts) == ("queued", 0), rec
    [m] = await _eventually(q, name, "a sent message")
    assert (m.id, m.queue, m.body, m.attributes, m.attempts) == \
        (sent.id, name, b'{"a": 1}', {"kind": "invoke"}, 1), f"delivered message wrong: {m}"
    rec = await q.get(m.id)
    assert rec is not None and rec.status == "running", f"a received message is running: {rec}"
    await q.begin([m])
    await q.ack(m, result=b'{"ok": true}', request_id="r-1")
    rec = await q.get(m.id)
    assert rec is not None and (rec.status, rec.result, rec.request_id, rec.attempts) == \
        ("succeeded", b'{"ok": true}', "r-1", 1), f"an acked message is succeeded: {rec}"
    await _nothing(q, name, "its only message was acked")
    assert await q.get("no-such-id") is None
    with _raises(ConflictError, "ack of an already acked delivery"):
        await q.ack(m)


async def _rt_order(q: Queue) -> None:
    name = _name("rt-order")
    sent = await q.send(name, [Outgoing(str(i).encode()) for i in range(5)])
    first = await _eventually(q, name, "three of five", n=3)
    rest = await _eventually(q, name, "the other two", n=2)
    assert [m.id for m in first + rest] == [s.id for s in sent], "oldest first"
    recs = await q.records(name)
    assert [r.id for r in recs] == [s.id for s in reversed(sent)], "records: newest first"
    assert len(await q.records(name, limit=2)) == 2, "records: limit kept"
    for m in first + rest:
        await q.ack(m)


async def _rt_lease(q: Queue) -> None:
    name = _name("rt-lease")
    await q.send(name, [Outgoing(b"x")])
    [m1] = await _eventually(q, name, "a sent message", visibility_s=LEASE_S)
    await q.begin([m1])
    await _nothing(q, name, "it is leased")
    [m2] = await _eventually(q, name, "a message whose lease ended", visibility_s=LEASE_S)
    assert m2.id == m1.id and m2.attempts == 2 and str(m2.receipt) != str(m1.receipt), \
        f"an expired lease whose try had begun comes back with attempts 2: {m2}"
    with _raises(ConflictError, "ack with the stale delivery"):
        await q.ack(m1)
    await q.begin([m2])
    await q.ack(m2)
    rec = await q.get(m2.id)
    assert rec is not None and (rec.status, rec.attempts) == ("succeeded", 2), rec


async def _rt_retry(q: Queue) -> None:
    name = _name("rt-retry")
    await q.send(name, [Outgoing(b"x")])
    [m] = await _eventually(q, name, "a sent message")
    await q.begin([m])
    t0 = asyncio.get_running_loop().time()
    await q.retry(m, delay_s=DELAY_S, error=ERR, request_id="r-1")
    rec = await q.get(m.id)
    assert rec is not None and (rec.status, rec.error, rec.attempts) == ("retrying", ERR, 1), \
        f"a retried message is retrying with its error and its try: {rec}"
    assert rec.visible_at is not None, "a retrying record says when it runs next"
    [m2] = await _eventually(q, name, "a retried message after its delay")
    waited = asyncio.get_running_loop().time() - t0
    assert waited >= DELAY_S * 0.8, f"delivered again after {waited:.2f} s, before its delay"
    assert m2.attempts == 2, f"a retried message comes back with attempts 2: {m2}"
    await q.begin([m2])
    await q.ack(m2)


async def _rt_release(q: Queue) -> None:
    name = _name("rt-release")
    await q.send(name, [Outgoing(b"x")])
    [m] = await _eventually(q, name, "a sent message")
    await q.begin([m])  # begun, then throttled: given back, not a try
    await q.release(m, delay_s=0)
    rec = await q.get(m.id)
    assert rec is not None and (rec.status, rec.attempts) == ("queued", 0), \
        f"a released delivery does not count even if begun: {rec}"
    [m2] = await _eventually(q, name, "a released message")
    assert m2.attempts == 1, f"a released delivery does not count: {m2}"
    await q.ack(m2)


async def _rt_dead_letters(q: Queue) -> None:
    name = _name("rt-dlq")
    sent = await q.send(name, [Outgoing(b"a"), Outgoing(b"b"), Outgoing(b"c")])
    for m in await _eventually(q, name, "three messages", n=3):
        await q.begin([m])
        await q.dead_letter(m, error=ERR)
    dead = await q.records(name, status="dead")
    assert {r.id for r in dead} == {s.id for s in sent}, "dead letters are listed"
    assert all(r.error == ERR and r.attempts == 1 for r in dead), dead
    await _nothing(q, name, "every message is dead")
    assert await q.redrive(name, [sent[0].id]) == 1, "redrive of one id moves one"
    [m] = await _eventually(q, name, "a redriven message")
    assert m.id == sent[0].id and m.attempts == 1, f"a redriven message starts over: {m}"
    await q.ack(m)
    assert await q.redrive(name, []) == 0
    moved = await q.redrive(name)
    assert moved == 2, f"redrive of the queue moves the rest: moved {moved}, " \
        f"dead now {[r.id for r in await q.records(name, status='dead')]}"
    for m in await _eventually(q, name, "two redriven messages", n=2):
        await q.ack(m)
    assert await q.redrive(name) == 0, "nothing dead is left"


async def _rt_fail(q: Queue) -> None:
    name = _name("rt-fail")
    await q.send(name, [Outgoing(b"x")])
    [m] = await _eventually(q, name, "a sent message")
    await q.fail(m, error=ERR)
    rec = await q.get(m.id)
    assert rec is not None and (rec.status, rec.error, rec.attempts) == ("failed", ERR, 0), rec
    assert await q.redrive(name) == 0, "failed messages are not redriven"
    await _nothing(q, name, "it failed")


async def _rt_dedup(q: Queue) -> None:
    name = _name("rt-dedup")
    a = await q.send(name, [Outgoing(b"1", dedup_key="k")])
    b = await q.send(name, [Outgoing(b"2", dedup_key="k")])
    assert a[0].created and not b[0].created and a[0].id == b[0].id, \
        "a second send with the same dedup key returns the first id, not created"
    other = await q.send(_name("rt-dedup-other"), [Outgoing(b"3", dedup_key="k")])
    assert other[0].created, "dedup keys are per queue"
    [m] = await _eventually(q, name, "the first of two alike")
    assert m.body == b"1"
    await q.ack(m)
    c = await q.send(name, [Outgoing(b"4", dedup_key="k")])
    assert not c[0].created, "dedup holds after the first message was processed"
    await _nothing(q, name, "the repeats were not sent")
    fixed = f"id-{uuid.uuid4().hex}"
    e = await q.send(name, [Outgoing(b"6", id=fixed)])
    f = await q.send(name, [Outgoing(b"7", id=fixed)])
    assert (e[0].created, f[0].created, f[0].id) == (True, False, fixed), \
        "a message sent again with the same id is not created twice"
    [m] = await _eventually(q, name, "the message with its own id")
    assert m.body == b"6"
    await q.ack(m)
    await _nothing(q, name, "one message per id")


async def _rt_isolation(q: Queue) -> None:
    a, b = _name("rt-iso-a"), _name("rt-iso-b")
    await q.send(a, [Outgoing(b"a")])
    await _nothing(q, b, "messages belong to their queue")
    [m] = await _eventually(q, a, "a sent message")
    await q.ack(m)


async def _rt_wakes(q: Queue) -> None:
    name = _name("rt-wake")
    waiting = asyncio.ensure_future(q.receive(name, max_messages=1, visibility_s=30,
                                              wait_s=WAIT_S))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "receive with wait_s waits for a message"
    await q.send(name, [Outgoing(b"x")])
    got = await asyncio.wait_for(waiting, WAIT_S + 1)
    assert len(got) == 1, "a waiting receiver gets a message sent meanwhile"
    await q.ack(got[0])


async def _rt_stats(q: Queue) -> None:
    name = _name("rt-stats")
    await q.send(name, [Outgoing(b"1"), Outgoing(b"2"), Outgoing(b"3"), Outgoing(b"4")])
    ms = await _eventually(q, name, "three of four", n=3)
    await q.ack(ms[0])
    await q.retry(ms[1], delay_s=60, error=ERR)
    s = await q.stats(name)
    assert (s.ready, s.delayed, s.running, s.succeeded, s.dead, s.failed) == (1, 1, 1, 1, 0, 0), \
        f"stats should count 1 ready, 1 delayed, 1 running, 1 succeeded: {s}"
    await q.dead_letter(ms[2], error=ERR)
    s = await q.stats(name)
    assert (s.running, s.dead) == (0, 1), f"a dead letter is counted dead: {s}"


async def _rt_delayed_send(q: Queue) -> None:
    name = _name("rt-delay")
    t0 = asyncio.get_running_loop().time()
    [sent] = await q.send(name, [Outgoing(b"later", delay_s=DELAY_S)])
    await _nothing(q, name, "it was sent with a delay")
    [m] = await _eventually(q, name, "a delayed message once due")
    waited = asyncio.get_running_loop().time() - t0
    assert waited >= DELAY_S * 0.8, f"a delayed send came after {waited:.2f} s"
    assert (m.id, m.attempts) == (sent.id, 1), f"waiting for a delay is no try: {m}"
    await q.ack(m)


async def _rt_tries(q: Queue) -> None:
    name = _name("rt-tries")
    sent = await q.send(name, [Outgoing(b"a"), Outgoing(b"b"), Outgoing(b"c")])
    leased = await _eventually(q, name, "three messages", n=3, visibility_s=LEASE_S)
    assert [m.attempts for m in leased] == [1, 1, 1], "a lease is not a try"
    await q.begin(leased[:2])
    again = {m.id: m for m in await _eventually(q, name, "three whose leases ended", n=3)}
    assert {i: m.attempts for i, m in again.items()} == \
        {sent[0].id: 2, sent[1].id: 2, sent[2].id: 1}, \
        f"only the begun tries count, once each: {[(i, m.attempts) for i, m in again.items()]}"
    for m in again.values():
        await q.ack(m)  # not begun: no try added
    recs = [await q.get(s.id) for s in sent]
    assert [r.attempts for r in recs if r] == [1, 1, 0], f"records count begun tries: {recs}"


async def _rt_death(q: Queue, open_queue: OpenReal) -> Queue:
    """Close without settling (the holder died mid-run): after the lease,
    the try that had begun counts, the one that had not costs nothing."""
    name = _name("rt-death")
    sent = await q.send(name, [Outgoing(b"ran"), Outgoing(b"waited")])
    ran, _waited = await _eventually(q, name, "two messages", n=2, visibility_s=LEASE_S)
    await q.begin([ran])
    await q.aclose()
    q = await open_queue()
    try:
        back = {m.id: m for m in await _eventually(q, name, "two messages of a dead holder",
                                                   n=2)}
        assert {i: m.attempts for i, m in back.items()} == {sent[0].id: 2, sent[1].id: 1}, \
            f"after a death, a begun try counts and a lease does not: {back}"
        rec = await q.get(ran.id)
        assert rec is not None and rec.attempts == 1, f"the cut-short try is on record: {rec}"
        for m in back.values():
            await q.ack(m)
    except BaseException:
        await q.aclose()
        raise
    return q


# -- two clients of one backend ---------------------------------------------------

async def check_queue_shared(open_queue: OpenReal) -> None:
    """Two queue objects over the same storage (as two processes of a region
    hold): leases, stale settles and counts hold across them."""
    a, b = await open_queue(), await open_queue()
    try:
        name = _name("shared")
        sent = await a.send(name, [Outgoing(b"x")])
        [ma] = await _eventually(a, name, "a message sent by the other", visibility_s=LEASE_S)
        assert ma.id == sent[0].id
        await _nothing(b, name, "the other client holds its lease")
        [mb] = await _eventually(b, name, "a message whose lease the other let lapse")
        assert mb.id == ma.id and mb.attempts == 1, f"a lapsed lease (not begun) is no try: {mb}"
        with _raises(ConflictError, "a settle by the stale delivery of the other client"):
            await a.ack(ma)
        await b.begin([mb])
        await b.ack(mb, result=b"2")
        rec = await a.get(mb.id)
        assert rec is not None and (rec.status, rec.result, rec.attempts) == \
            ("succeeded", b"2", 1), f"each client sees the other's settle: {rec}"
        more = await b.send(name, [Outgoing(b"1"), Outgoing(b"2"), Outgoing(b"3")])
        got = await _eventually(a, name, "three sent by the other", n=3)
        assert sorted(m.id for m in got) == sorted(r.id for r in more)
        await a.retry(got[0], delay_s=60, error=ERR)
        await a.ack(got[1])
        sa, sb = await a.stats(name), await b.stats(name)
        assert sa == sb, f"both clients count the same: {sa} / {sb}"
        assert (sa.delayed, sa.running, sa.succeeded) == (1, 1, 2), sa
        await a.dead_letter(got[2], error=ERR)
        assert await b.redrive(name) == 1, "one client redrives what the other dead-lettered"
        [again] = await _eventually(b, name, "a message the other redrove")
        assert again.id == got[2].id
        await b.ack(again)
        sa, sb = await a.stats(name), await b.stats(name)
        assert sa == sb and (sa.dead, sa.succeeded) == (0, 3), f"{sa} / {sb}"
    finally:
        await a.aclose()
        await b.aclose()
