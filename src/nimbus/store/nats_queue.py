"""``Queue`` (both seams) on NATS JetStream: a region's async work on a cluster.

Delivery is a work-queue stream, records are a KV bucket; both replicated
(3 replicas on a cluster of 3 or more servers).

* Stream ``nimbus-<region>-work``, subjects ``nimbus.<region>.work.<queue>``
  (the queue name encoded into one subject token). A stream message is a
  pointer: the message id (the body and everything else live in the
  record). One durable pull consumer per queue, ``w-<queue>``, filtered on
  its subject, explicit acks, no delivery limit (tries are counted in the
  record, not by JetStream).
* KV bucket ``nimbus-<region>-records``:

  - ``m.<id>``: the record (JSON: status, attempts, times, body, attributes,
    request id, result, error, and the delivery that holds it);
  - ``s.<queue>``: the queue's counts by class (ready, delayed, running,
    succeeded, failed, dead) and its most recent ``INDEX_KEEP`` ids;
  - ``d.<queue>.<hash of the dedup key>``: the id a dedup key was first sent
    as, expiring after the dedup window (a per-message TTL: the server's
    timer, no sweeper);
  - ``x.<queue>.<id>``: one per dead letter, so redrive finds them all.

Rules:

* ``send``: the record first (created only if absent: a second send of the
  same id is not a second message), then the pointer, published with
  ``Nats-Msg-Id`` = id and generation (the stream drops a repeat within its
  duplicate window). A pointer whose record says another pointer holds the
  message, or that it is settled, is dropped at receive, so publishing a
  pointer twice is harmless: a send that finds its record queued and never
  received publishes the pointer again (it heals a sender that died between
  the two writes).
* ``receive`` fetches pointers and claims each record (compare-and-set:
  ``running``, this delivery). A pointer early for its record's
  ``visible_at`` (a send with ``delay_s``) is NAKed with the rest of the
  delay, not counted, not returned. A claim that fails does not fail the
  others: they are counted and returned, and its delivery lapses.
* Leases: a queue's consumer is made by its first receive, with an AckWait
  of that receive's visibility, at most ``ACK_WAIT_S`` (never changed after:
  lowering it would cut short leases others hold). A receive for a longer
  visibility keeps its deliveries alive with in-progress acks (``+WPI``,
  every AckWait / 3) until the visibility is used up, from its claims on
  (before it waits for its counts, which may be late). So a holder that
  dies loses its leases within AckWait, and one that lives holds them for
  the visibility it asked for, or AckWait if that is longer. A settle that
  fails stops keeping its delivery alive: it comes back within AckWait.
* ``begin`` writes the try into the record (``attempts`` + 1) before the
  handler is handed the message: replicated and on disk when it returns,
  so a try begun counts whatever happens next. ``release`` takes it back.
* Settles write the record (compare-and-set against the delivery's last
  write: a stale delivery gets ``ConflictError``), then act on the stream:
  ack (succeeded), NAK with a delay (retry, release), TERM (dead letter,
  failed). A crash between the two delivers the pointer again and the
  receive drops it (its record is settled): at-least-once, and the record
  never lies.
* A write whose answer is lost (a timeout: a server died with it, or
  leaders moved) may have landed: its key is read back until that is known
  (up to ``UNKNOWN_WRITE_S``), and the operation goes on as if answered, so
  its move is counted once.
* Counts: each write that moves a record from one class to another adds to
  an in-process tally; the tallies (and new ids for the index) are written
  to ``s.<queue>`` in one compare-and-set per queue by a flusher that every
  operation waits for before returning. ``stats`` is one read. A process
  killed between a record write and the flush leaves that queue's counts off
  by the moves not flushed (the records stay right).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from nimbus.errors import ClosedError, ConflictError, UnavailableError
from nimbus.ids import new_id
from nimbus.store.nats_conn import retry_unrouted as _routed
from nimbus.store.queue import (
    DEFAULT_DEDUP_WINDOW_S,
    Message,
    Outgoing,
    QueueStats,
    Record,
    SendResult,
)

ACK_WAIT_S = 10.0  # the longest a dead holder keeps a lease
DUPLICATE_WINDOW_S = 120.0  # the stream's window for Nats-Msg-Id
INDEX_KEEP = 500  # recent ids kept per queue for ``records``
RECORD_TTL_S = 24 * 3600.0  # a settled record expires this long after its settle
MAX_ACK_PENDING = 100_000  # deliveries out at once per queue (leased and NAK-delayed)
CAS_TRIES = 50
OPEN_READY_S = 30.0  # a cluster electing leaders, or a racing creator
COUNT_WAIT_S = 10.0  # an operation waits this long for its counts to land
UNKNOWN_WRITE_S = 30.0  # a write whose answer was lost is read back this long
KEYS_PAGE_TIMEOUT_S = 10.0  # one page of a key listing (up to 100,000 subjects)
WRITER_MEMORY_S = 3600.0  # how long a summary remembers a writer's last batch
CLASSES = ("ready", "delayed", "running", "succeeded", "failed", "dead")
SETTLED = ("succeeded", "failed", "dead")

T = TypeVar("T")
# a request that got no answer: it may have been stored, or not
_OUTCOME_UNKNOWN = (TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.NoStreamResponseError,
                    nats.js.errors.ServiceUnavailableError)
log = logging.getLogger("nimbus.queue")


async def _wait_for_leader(js: JetStreamContext, stream: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:  # just made: the server that answered
            info = None  # does not know it yet (seen at a region's start)
        if info is not None and (info.cluster is None or info.cluster.leader):
            return
        if time.monotonic() > deadline:
            raise UnavailableError(f"stream {stream} has no leader after {timeout_s:g} s")
        await asyncio.sleep(0.05)


def encode_name(queue: str) -> str:
    """A queue name as one subject token / consumer name / KV key token:
    letters, digits and ``-`` kept, every other byte ``_XX``."""
    out = []
    for b in queue.encode():
        c = chr(b)
        out.append(c if c.isascii() and (c.isalnum() or c == "-") else f"_{b:02X}")
    return "".join(out)


def default_replicas(servers: int) -> int:
    return 3 if servers >= 3 else 1


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Driver errors as nimbus errors, in one place."""
    try:
        yield
    except (ClosedError, ConflictError, UnavailableError):
        raise
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise ConflictError(f"{what}: changed meanwhile") from exc
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise UnavailableError(f"{what}: NATS failed: {exc!r}") from exc


@dataclass(eq=False)
class Receipt:
    """One delivery on NATS: the pointer message, and the record as this
    delivery last wrote it (its revision fences stale settles)."""

    msg: Msg
    seq: int
    delivery: int
    rev: int
    rec: dict[str, Any]
    until: float  # wall time the lease should end
    ack_wait: float  # the consumer's, when delivered
    settled: bool = False

    def __str__(self) -> str:
        return f"{self.seq}.{self.delivery}"


@dataclass
class _Tally:
    counts: dict[str, int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


async def open_nats_queue(nc: Client, *, region: str, replicas: int | None = None,
                          dedup_window_s: float = DEFAULT_DEDUP_WINDOW_S,
                          ack_wait_s: float = ACK_WAIT_S,
                          record_ttl_s: float = RECORD_TTL_S) -> NatsQueue:
    """The region's queue over the connected client ``nc`` (credentials
    set). Creates the stream and bucket if absent. ``record_ttl_s``: how long
    a succeeded or failed record is kept (the server expires it)."""
    if replicas is None:
        servers = len(getattr(nc, "servers", []) or []) or 1
        replicas = default_replicas(servers)
    js = nc.jetstream()
    stream = f"nimbus-{region}-work"
    bucket = f"nimbus-{region}-records"
    # A new cluster still electing leaders, or another process creating the
    # same stream at this moment, is waited out for up to OPEN_READY_S.
    deadline = time.monotonic() + OPEN_READY_S
    while True:
        try:
            kv = await _open_parts(js, region, stream, bucket, replicas)
            break
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError,
                nats.js.errors.BadRequestError, UnavailableError) as exc:
            if time.monotonic() > deadline:
                with _mapped(f"opening stream {stream} and bucket {bucket}"):
                    raise exc
            await asyncio.sleep(0.2)
    return NatsQueue(nc, js, kv, region=region, stream=stream,
                     dedup_window_s=dedup_window_s, ack_wait_s=ack_wait_s,
                     record_ttl_s=record_ttl_s)


async def _open_parts(js: JetStreamContext, region: str, stream: str, bucket: str,
                      replicas: int) -> KeyValue:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(
            name=stream, subjects=[f"nimbus.{region}.work.>"],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            num_replicas=replicas, duplicate_window=DUPLICATE_WINDOW_S))
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(KeyValueConfig(
            bucket=bucket, history=1, replicas=replicas, storage=StorageType.FILE,
            direct=False))  # reads from the leader: a settle is seen by the next read
    await _wait_for_leader(js, stream)
    await _wait_for_leader(js, f"KV_{bucket}")
    return kv


class NatsQueue:
    """Use :func:`open_nats_queue`."""

    def __init__(self, nc: Client, js: JetStreamContext, kv: KeyValue, *, region: str,
                 stream: str, dedup_window_s: float, ack_wait_s: float,
                 record_ttl_s: float = RECORD_TTL_S) -> None:
        self._nc = nc
        self._js = js
        self._kv = kv
        self.region = region
        self.stream = stream
        self._window = dedup_window_s
        self._ack_wait = ack_wait_s
        self._record_ttl = record_ttl_s
        self._subs: dict[str, tuple[JetStreamContext.PullSubscription, float]] = {}
        self._sub_locks: dict[str, asyncio.Lock] = {}
        self._held: set[Receipt] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._tally: dict[str, _Tally] = {}
        self._flusher: asyncio.Task[None] | None = None
        # each queue's counts and index as this process last wrote them
        self._summary: dict[str, tuple[dict[str, Any], int]] = {}
        # Each count batch of this process carries (writer, seq); the summary
        # keeps the last seq it applied per writer, so a batch whose write
        # outcome was unknown (a timeout while a server died) is written
        # again until it lands, and never counted twice.
        self._writer = new_id()[:13]
        self._seq = 0
        self._closed = False

    # -- names ------------------------------------------------------------------

    def _subject(self, queue: str) -> str:
        return f"nimbus.{self.region}.work.{encode_name(queue)}"

    @staticmethod
    def _rkey(mid: str) -> str:
        return f"m.{mid}"

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"queue of region {self.region} is closed")

    # -- records ------------------------------------------------------------------

    async def _read(self, key: str) -> tuple[dict[str, Any], int] | None:
        try:
            e = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if e.value is None:
            return None
        return orjson.loads(e.value), int(e.revision or 0)

    async def _write(self, key: str, rec: dict[str, Any], rev: int | None, *,
                     ttl: float | None = None) -> int:
        """Compare-and-set (``rev`` 0: create): the new revision, or
        ``KeyWrongLastSequenceError`` if the key moved.

        A write whose answer is lost (a timeout: the server it went through
        died, or leaders were moving) may have landed or not. Its key is
        read back until that is known, for up to ``UNKNOWN_WRITE_S``: holding
        exactly these bytes, it landed (its revision is returned); still at
        ``rev``, it did not, and is written again; anything else, another
        writer moved it. Without this a settle that landed looked failed:
        the caller skipped its count, and its pointer, found settled at
        redelivery, was dropped, so the move was never counted."""
        data = orjson.dumps(rec)
        last = rev or 0

        async def put() -> int:
            if last == 0:
                return int(await _routed(lambda: self._kv.create(key, data, msg_ttl=ttl)))
            return int(await _routed(lambda: self._kv._update(key, data, last=last,
                                                               msg_ttl=ttl)))
        try:
            return await put()
        except _OUTCOME_UNKNOWN as exc:
            lost: BaseException = exc
        deadline = time.monotonic() + UNKNOWN_WRITE_S
        delay = 0.05
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                e = await self._kv.get(key)
                value, now = e.value, int(e.revision or 0)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                value, now = None, 0
            except _OUTCOME_UNKNOWN as exc:
                lost = exc
                continue
            if value == data:
                return now  # it landed; its answer was lost
            if now != last and not (last == 0 and value is None):
                raise nats.js.errors.KeyWrongLastSequenceError(
                    description=f"{key} moved to revision {now} while a write to it "
                                f"(after {last}) had no answer")
            try:
                return await put()  # it did not land: again
            except (nats.js.errors.KeyWrongLastSequenceError, *_OUTCOME_UNKNOWN) as exc:
                lost = exc  # no answer again, or the first one landed late: read it
        raise lost

    # -- counts -------------------------------------------------------------------

    def _count(self, queue: str, moves: dict[str, int], ids: list[str] | None = None
               ) -> asyncio.Future[None]:
        t = self._tally.setdefault(queue, _Tally())
        for k, v in moves.items():
            t.counts[k] = t.counts.get(k, 0) + v
        if ids:
            t.ids.extend(ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        t.waiters.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="nimbus-queue-counts")
        return fut

    async def _flush_loop(self) -> None:
        while self._tally:
            batch, self._tally = self._tally, {}
            await asyncio.gather(*(self._flush_one(q, t) for q, t in batch.items()))

    async def _flush_one(self, queue: str, t: _Tally) -> None:
        key = f"s.{encode_name(queue)}"
        self._seq += 1
        seq, me = self._seq, self._writer
        delay = 0.05
        while True:
            try:
                with _mapped(f"counting queue {queue}"):
                    got = self._summary.get(queue) or await self._read(key)
                    base, rev = got if got is not None else ({"counts": {}, "recent": []}, 0)
                    applied = dict(base.get("applied", {}))
                    if applied.get(me, [0])[0] >= seq:
                        break  # an earlier try landed (its answer was lost)
                    counts = dict(base.get("counts", {}))
                    for k, v in t.counts.items():
                        counts[k] = counts.get(k, 0) + v
                    recent = base.get("recent", [])
                    if t.ids:
                        recent = (recent + t.ids)[-INDEX_KEEP:]
                    now = time.time()
                    applied[me] = [seq, now]
                    applied = {w: a for w, a in applied.items()
                               if now - a[1] < WRITER_MEMORY_S}
                    summary = {"counts": counts, "recent": recent, "applied": applied}
                    try:
                        rev = await self._write(key, summary, rev)
                        self._summary[queue] = (summary, rev)
                        break
                    except nats.js.errors.KeyWrongLastSequenceError:
                        self._summary.pop(queue, None)  # another process wrote: read it
                        await asyncio.sleep(random.random() * 0.005)
            except (UnavailableError, ConflictError) as exc:
                self._summary.pop(queue, None)
                if self._closed and delay > 1.0:
                    log.warning("counts of queue %s miss %s: %s", queue, t.counts, exc)
                    break
                await asyncio.sleep(delay)  # a server died, or leaders are moving
                delay = min(delay * 2, 1.0)
        for w in t.waiters:
            if not w.done():
                w.set_result(None)

    async def _counted(self, queue: str, moves: dict[str, int],
                       ids: list[str] | None = None) -> None:
        """Wait for the flush that carries these moves. A flush that fails
        does not fail the operation (its record is written): the queue's
        counts are off by these moves, which is logged."""
        moves = {k: v for k, v in moves.items() if v}
        if moves or ids:
            try:
                await asyncio.wait_for(asyncio.shield(self._count(queue, moves, ids)),
                                       COUNT_WAIT_S)
            except TimeoutError:
                log.warning("counts of queue %s are late (NATS unavailable); they are "
                            "written when it answers", queue)

    # -- sending ------------------------------------------------------------------

    async def send(self, queue: str, messages: list[Outgoing]) -> list[SendResult]:
        self._check()
        with _mapped(f"sending to queue {queue}"):
            results = await asyncio.gather(*(self._send_one(queue, m) for m in messages))
        created = [r.id for r in results if r.created]
        if created:
            delayed = sum(1 for r, m in zip(results, messages, strict=True)
                          if r.created and m.delay_s > 0)
            await self._counted(queue, {"ready": len(created) - delayed,
                                        "delayed": delayed}, created)
        return list(results)

    async def _send_one(self, queue: str, m: Outgoing) -> SendResult:
        mid = m.id or new_id()
        dkey: str | None = None
        if m.dedup_key is not None:
            h = hashlib.sha256(m.dedup_key.encode()).hexdigest()[:40]
            dkey = f"d.{encode_name(queue)}.{h}"
            for _ in range(CAS_TRIES):
                try:
                    await _routed(lambda k=dkey: self._kv.create(  # type: ignore[misc]
                        k, mid.encode(), msg_ttl=self._window))
                    break
                except nats.js.errors.KeyNotFoundError:
                    # the driver's create looked at the key it collided with
                    # and found it expired meanwhile: take it
                    continue
                except nats.js.errors.KeyWrongLastSequenceError:
                    got = await self._read_raw(dkey)
                    if got is None:
                        continue  # expired meanwhile: take it
                    return await self._repeat(queue, got, m, dkey)
        now = time.time()
        rec = {"id": mid, "queue": queue, "status": "queued", "attempts": 0,
               "enqueued_at": now, "updated_at": now,
               "body": base64.b64encode(m.body).decode(), "attributes": m.attributes,
               "request_id": None, "result": None, "error": None,
               "visible_at": now + m.delay_s if m.delay_s > 0 else None,
               "settled_at": None, "class": "delayed" if m.delay_s > 0 else "ready",
               "seq": None, "delivery": 0, "begun": False, "dedup": dkey, "gen": 0}
        try:
            rev = await self._write(self._rkey(mid), rec, 0)
        except nats.js.errors.KeyWrongLastSequenceError:
            if m.id is not None:  # the same id again: not a second message
                return await self._repeat(queue, mid, m, None)
            # a repeat of our dedup key wrote our record first (we were slow)
            await self._publish(queue, mid, 0)
            return SendResult(mid, False)
        await self._publish(queue, mid, 0, (rec, rev))
        return SendResult(mid, True)

    async def _read_raw(self, key: str) -> str | None:
        try:
            e = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return e.value.decode() if e.value else None

    async def _repeat(self, queue: str, mid: str, m: Outgoing, dkey: str | None) -> SendResult:
        """A send of an id (or dedup key) sent before: not a new message; if
        its first send stopped between the record and the pointer, finish it."""
        got = await self._read(self._rkey(mid))
        if got is None:
            if dkey is None:
                return SendResult(mid, False)
            # the first sender claimed the key and has not written (or died):
            # write the record it meant to (with this body)
            return await self._send_one(queue, Outgoing(m.body, m.attributes, id=mid,
                                                        delay_s=m.delay_s))
        rec, _rev = got
        if rec["status"] in ("queued", "retrying") and rec["seq"] is None:
            await self._publish(queue, mid, int(rec.get("gen", 0)))
        return SendResult(mid, False)

    async def _publish(self, queue: str, mid: str, gen: int,
                       written: tuple[dict[str, Any], int] | None = None) -> None:
        """The pointer: the id, or (fresh from ``send``) the record as written
        and its revision, so the first receive can claim it without a read."""
        data = mid.encode() if written is None else orjson.dumps(
            {"id": mid, "rev": written[1], "rec": written[0]})
        await _routed(lambda: self._js.publish(self._subject(queue), data,
                                               headers={"Nats-Msg-Id": f"{mid}.{gen}"}))

    # -- receiving ----------------------------------------------------------------

    async def _sub(self, queue: str, visibility_s: float
                   ) -> tuple[JetStreamContext.PullSubscription, float]:
        """The queue's pull subscription and its consumer's AckWait. The
        first receive of a queue (in the region) creates the consumer with
        an AckWait of its visibility, at most ``ack_wait_s``; it is never
        changed after (lowering it would cut short the leases others hold)."""
        have = self._subs.get(queue)
        if have is not None:
            return have
        async with self._sub_locks.setdefault(queue, asyncio.Lock()):
            have = self._subs.get(queue)
            if have is not None:
                return have
            durable = f"w-{encode_name(queue)}"
            try:
                info = await self._js.consumer_info(self.stream, durable)
            except nats.js.errors.NotFoundError:
                want = max(0.05, min(self._ack_wait, visibility_s))
                try:
                    info = await self._js.add_consumer(self.stream, ConsumerConfig(
                        durable_name=durable, filter_subject=self._subject(queue),
                        ack_policy=AckPolicy.EXPLICIT, ack_wait=want, max_deliver=-1,
                        max_ack_pending=MAX_ACK_PENDING, max_waiting=512))
                except nats.js.errors.BadRequestError:  # another process made it just now
                    info = await self._js.consumer_info(self.stream, durable)
            deadline = time.monotonic() + 15.0
            while info.cluster is not None and not info.cluster.leader:
                if time.monotonic() > deadline:
                    raise UnavailableError(f"consumer {durable} has no leader after 15 s")
                await asyncio.sleep(0.05)
                info = await self._js.consumer_info(self.stream, durable)
            ack_wait = float(info.config.ack_wait or self._ack_wait)
            psub = await self._js.pull_subscribe_bind(durable, self.stream)
            self._subs[queue] = (psub, ack_wait)
            return psub, ack_wait

    async def receive(self, queue: str, *, max_messages: int, visibility_s: float,
                      wait_s: float = 0.0) -> list[Message]:
        self._check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        with _mapped(f"receiving from queue {queue}"):
            psub, ack_wait = await self._sub(queue, visibility_s)
            while True:
                left = deadline - loop.time()
                try:
                    msgs = await psub.fetch(max(1, max_messages), timeout=max(0.05, left))
                except TimeoutError:  # nothing came (nats' own TimeoutError is one too)
                    msgs = []
                except nats.js.errors.ServiceUnavailableError:  # its leader is moving
                    msgs = []
                    await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
                got = await asyncio.gather(*(
                    self._claim(queue, msg, visibility_s, ack_wait) for msg in msgs),
                    return_exceptions=True)
                claimed = [c for c in got if isinstance(c, tuple)]
                failed = [c for c in got if isinstance(c, BaseException)]
                if failed:
                    # one claim failing does not lose the others: they are
                    # counted and handed out; its delivery lapses within AckWait
                    if not claimed:
                        raise failed[0]
                    log.warning("receiving from queue %s: %d of %d claims failed (%r); "
                                "they come back", queue, len(failed), len(got), failed[0])
                if claimed or deadline - loop.time() <= 0:
                    moves: dict[str, int] = {"running": len(claimed)}
                    for _m, prev in claimed:
                        moves[prev] = moves.get(prev, 0) - 1
                    # kept alive from now (waiting for late counts can take
                    # AckWait), but only if handed out: a receive cancelled
                    # first lets its claims lapse within AckWait
                    held = [_receipt(m) for m, _prev in claimed] \
                        if visibility_s > ack_wait else []
                    for r in held:
                        self._hold(r)
                    try:
                        await self._counted(queue, moves)
                    except BaseException:
                        self._held.difference_update(held)
                        raise
                    return [m for m, _prev in claimed]

    async def _claim(self, queue: str, msg: Msg, visibility_s: float,
                     ack_wait: float) -> tuple[Message, str] | None:
        """Take the record for this delivery: (message, the class it left)."""
        got: tuple[dict[str, Any], int] | None = None
        md = msg.metadata
        seq, delivery = int(md.sequence.stream), int(md.num_delivered)
        if msg.data[:1] == b"{":  # the record as sent: claimed without a read if unchanged
            first = orjson.loads(msg.data)
            mid = first["id"]
            if delivery == 1:
                got = (first["rec"], int(first["rev"]))
        else:
            mid = msg.data.decode()
        for _ in range(CAS_TRIES):
            if got is None:
                got = await self._read(self._rkey(mid))
            if got is None:
                await msg.term()  # purged, or never written: nothing to run
                return None
            rec, rev = got
            if rec["status"] in SETTLED or rec["seq"] not in (None, seq):
                await msg.ack()  # a repeated pointer, or one left by a crash after a settle
                return None
            now = time.time()
            vis = rec.get("visible_at")
            if rec["status"] != "running" and vis is not None and vis > now + 0.005:
                await msg.nak(delay=vis - now)  # not yet due (a delayed send): not a try
                return None
            prev = rec["class"]
            rec.update(status="running", seq=seq, delivery=delivery, begun=False,
                       updated_at=now, visible_at=None, **{"class": "running"})
            try:
                rev = await self._write(self._rkey(mid), rec, rev)
            except nats.js.errors.KeyWrongLastSequenceError:
                got = None  # it moved: read it
                continue
            r = Receipt(msg, seq, delivery, rev, rec, now + visibility_s, ack_wait)
            return Message(id=mid, queue=queue, body=base64.b64decode(rec["body"]),
                           attributes=dict(rec["attributes"]), attempts=int(rec["attempts"]) + 1,
                           enqueued_at=float(rec["enqueued_at"]), receipt=r), prev
        raise ConflictError(f"message {mid}: its record kept changing while it was received")

    def _hold(self, r: Receipt) -> None:
        self._held.add(r)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="nimbus-queue-leases")

    async def _keep(self) -> None:
        """In-progress acks for deliveries whose visibility outlasts AckWait."""
        while self._held and not self._closed:
            await asyncio.sleep(max(0.05, min(r.ack_wait for r in self._held) / 3))
            now = time.time()
            for r in list(self._held):
                if r.settled or r.until - now <= r.ack_wait:
                    self._held.discard(r)  # the lease now ends by itself, on time
                    continue
                with contextlib.suppress(Exception):
                    await r.msg.in_progress()

    # -- trying and settling ------------------------------------------------------

    async def begin(self, messages: list[Message]) -> None:
        self._check()

        async def one(m: Message) -> None:
            r = _receipt(m)
            rec = dict(r.rec, attempts=m.attempts, begun=True, updated_at=time.time())
            r.rev = await self._cas(m, r, rec)
            r.rec = rec
        with _mapped("beginning tries"):
            await asyncio.gather(*(one(m) for m in messages))

    async def _cas(self, m: Message, r: Receipt, rec: dict[str, Any],
                   ttl: float | None = None) -> int:
        if r.settled:
            raise ConflictError(f"message {m.id}: delivery {r} was settled already")
        try:
            return await self._write(self._rkey(m.id), rec, r.rev, ttl=ttl)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise ConflictError(f"message {m.id} was delivered again or settled since "
                                f"delivery {r}") from exc

    async def _settle(self, m: Message, changes: dict[str, Any], *, tried: bool,
                      then: Callable[[Msg], Awaitable[None]], ttl: float | None = None) -> None:
        self._check()
        r = _receipt(m)
        now = time.time()
        rec = dict(r.rec, updated_at=now, **changes)
        if not tried and r.rec.get("begun"):
            rec["attempts"] = int(r.rec["attempts"]) - 1
        rec["begun"] = False
        with _mapped(f"settling message {m.id}"):
            try:
                r.rev = await self._cas(m, r, rec, ttl)
            finally:
                # settled, or not by this delivery (another holds it, or NATS
                # did not answer): its lease is no longer kept alive, so a
                # delivery left unsettled comes back within AckWait
                self._held.discard(r)
            r.rec, r.settled = rec, True
            with contextlib.suppress(nats.errors.Error):  # if lost: dropped at redelivery
                await then(r.msg)
            await self._counted(m.queue, {"running": -1, rec["class"]: 1})

    async def ack(self, message: Message, *, result: bytes | None = None,
                  request_id: str | None = None) -> None:
        now = time.time()
        await self._settle(message, {
            "status": "succeeded", "class": "succeeded", "settled_at": now,
            "result": result.decode() if result is not None else None,
            "request_id": request_id or _receipt(message).rec.get("request_id")},
            tried=True, then=lambda msg: msg.ack(), ttl=self._record_ttl)

    async def retry(self, message: Message, *, delay_s: float, error: dict[str, Any],
                    request_id: str | None = None) -> None:
        delay = max(0.0, delay_s)
        await self._settle(message, {
            "status": "retrying", "class": "delayed" if delay > 0 else "ready",
            "visible_at": time.time() + delay, "error": error,
            "request_id": request_id or _receipt(message).rec.get("request_id")},
            tried=True, then=lambda msg: msg.nak(delay=delay or None))

    async def release(self, message: Message, *, delay_s: float) -> None:
        delay = max(0.0, delay_s)
        r = _receipt(message)
        attempts = int(r.rec["attempts"]) - (1 if r.rec.get("begun") else 0)
        await self._settle(message, {
            "status": "retrying" if attempts > 0 else "queued",
            "class": "delayed" if delay > 0 else "ready",
            "visible_at": time.time() + delay},
            tried=False, then=lambda msg: msg.nak(delay=delay or None))

    async def dead_letter(self, message: Message, *, error: dict[str, Any],
                          request_id: str | None = None) -> None:
        await self._settle(message, {
            "status": "dead", "class": "dead", "error": error,
            "request_id": request_id or _receipt(message).rec.get("request_id")},
            tried=True, then=lambda msg: msg.term())
        with _mapped(f"listing dead letter {message.id}"):
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self._kv.create(self._dead_key(message.queue, message.id), b"")

    async def fail(self, message: Message, *, error: dict[str, Any],
                   request_id: str | None = None) -> None:
        await self._settle(message, {
            "status": "failed", "class": "failed", "error": error, "settled_at": time.time(),
            "request_id": request_id or _receipt(message).rec.get("request_id")},
            tried=True, then=lambda msg: msg.term(), ttl=self._record_ttl)

    @staticmethod
    def _dead_key(queue: str, mid: str) -> str:
        return f"x.{encode_name(queue)}.{mid}"

    # -- Records --------------------------------------------------------------------

    async def get(self, message_id: str) -> Record | None:
        self._check()
        with _mapped(f"reading record {message_id}"):
            try:
                got = await self._read(self._rkey(message_id))
            except nats.js.errors.InvalidKeyError:
                return None
        return None if got is None else _record(got[0])

    async def _recent(self, queue: str) -> list[str]:
        got = await self._read(f"s.{encode_name(queue)}")
        return list(reversed(got[0].get("recent", []))) if got else []

    async def records(self, queue: str, *, status: str | None = None,
                      limit: int = 100) -> list[Record]:
        """Newest first, from the queue's index of its last ``INDEX_KEEP``
        ids (one read of each record until ``limit`` match), plus every dead
        letter for ``status="dead"``."""
        self._check()
        out: list[Record] = []
        if limit <= 0:
            return out
        with _mapped(f"listing queue {queue}"):
            ids = await self._recent(queue)
            if status == "dead":
                ids += [i for i in await self._dead_ids(queue) if i not in set(ids)]
            for i in range(0, len(ids), 64):
                got = await asyncio.gather(*(self._read(self._rkey(x)) for x in ids[i:i + 64]))
                for g in got:
                    if g is not None and (status is None or g[0]["status"] == status):
                        out.append(_record(g[0]))
                if len(out) >= limit:
                    break
        out.sort(key=lambda rec: rec.enqueued_at, reverse=True)
        return out[:limit]

    async def _keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix``, as the bucket's leader has them (its
        subject list: a follower's copy could miss a key just written). A
        key deleted with a tombstone is still listed (callers read each
        key anyway); dead-letter keys are purged outright, leaving none."""
        pre = self._kv._pre  # "$KV.<bucket>."
        subjects: list[str] = []
        while True:  # the server answers up to 100,000 subjects a page
            resp = await self._nc.request(
                f"$JS.API.STREAM.INFO.{self._kv._stream}",
                orjson.dumps({"subjects_filter": pre + prefix + ">", "offset": len(subjects)}),
                timeout=KEYS_PAGE_TIMEOUT_S)
            info = orjson.loads(resp.data)
            if "error" in info:
                raise UnavailableError(f"listing keys {prefix}>: {info['error']}")
            page = list((info.get("state") or {}).get("subjects") or {})
            subjects += page
            if not page or len(subjects) >= int(info.get("total") or 0):
                return sorted(s[len(pre):] for s in subjects)

    async def _dead_ids(self, queue: str) -> list[str]:
        prefix = f"x.{encode_name(queue)}."
        return [k[len(prefix):] for k in await self._keys(prefix)]

    async def redrive(self, queue: str, ids: list[str] | None = None) -> int:
        self._check()
        if ids == []:
            return 0
        moved = 0
        with _mapped(f"redriving queue {queue}"):
            todo = ids if ids is not None else await self._dead_ids(queue)
            for mid in todo:
                got = await self._read(self._rkey(mid))
                if got is None or got[0]["queue"] != queue:
                    continue
                rec, rev = got
                gen = int(rec.get("gen", 0))
                if rec["status"] == "dead":
                    now = time.time()
                    gen += 1
                    rec.update(status="queued", attempts=0, enqueued_at=now, updated_at=now,
                               seq=None, delivery=0, begun=False, gen=gen, visible_at=None,
                               **{"class": "ready"})
                    try:
                        await self._write(self._rkey(mid), rec, rev)
                    except nats.js.errors.KeyWrongLastSequenceError:
                        continue
                    moved += 1
                    await self._counted(queue, {"dead": -1, "ready": 1})
                elif not (rec["status"] == "queued" and rec["seq"] is None):
                    continue
                await self._publish(queue, mid, gen)
                # purged, not deleted: no tombstone is left to list
                await self._js.purge_stream(self._kv._stream,
                                            subject=self._kv._pre + self._dead_key(queue, mid))
        return moved

    async def stats(self, queue: str) -> QueueStats:
        """One read: the queue's maintained counts."""
        self._check()
        with _mapped(f"counting queue {queue}"):
            got = await self._read(f"s.{encode_name(queue)}")
        counts = got[0].get("counts", {}) if got else {}
        return QueueStats(**{c: max(0, int(counts.get(c, 0))) for c in CLASSES})

    async def purge_settled(self, older_than: float) -> int:
        """Succeeded / failed records expire by themselves ``record_ttl_s``
        after their settle (a per-message TTL: the server's timer), so the
        periodic purge costs nothing. An earlier cut-off walks every queue's
        recent ids (up to ``INDEX_KEEP`` reads per queue). Counts are not
        touched: on NATS ``succeeded`` and ``failed`` count every settle."""
        self._check()
        if older_than <= time.time() - self._record_ttl:
            return 0
        n = 0
        with _mapped("purging settled records"):
            for key in await self._keys("s."):
                got = await self._read(key)
                for mid in got[0].get("recent", []) if got else []:
                    r = await self._read(self._rkey(mid))
                    if r is None:
                        continue
                    rec = r[0]
                    if rec["status"] in ("succeeded", "failed") and \
                            (rec.get("settled_at") or 0) < older_than:
                        await self._kv.purge(self._rkey(mid))
                        if rec.get("dedup"):
                            await self._kv.purge(rec["dedup"])
                        n += 1
        return n

    async def aclose(self) -> None:
        """Stop keeping leases alive and finish writing counts. The
        connection stays open (it is shared)."""
        if self._closed:
            return
        self._closed = True
        for task in (self._keeper, self._flusher):
            if task is not None and not task.done():
                if task is self._keeper:
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(task), 10.0)
        for psub, _ in self._subs.values():
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        self._subs.clear()
        self._held.clear()


def _receipt(m: Message) -> Receipt:
    if not isinstance(m.receipt, Receipt):
        raise ConflictError(f"message {m.id} was not delivered by a NATS queue")
    return m.receipt


def _record(rec: dict[str, Any]) -> Record:
    status = rec["status"]
    return Record(
        id=rec["id"], queue=rec["queue"], status=status, attempts=int(rec["attempts"]),
        enqueued_at=float(rec["enqueued_at"]), updated_at=float(rec["updated_at"]),
        body=base64.b64decode(rec["body"]), attributes=dict(rec["attributes"]),
        request_id=rec.get("request_id"),
        result=rec["result"].encode() if rec.get("result") is not None else None,
        error=rec.get("error"),
        visible_at=rec.get("visible_at") if status in ("queued", "retrying") else None)
