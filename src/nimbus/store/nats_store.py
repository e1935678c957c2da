"""``Store`` on a NATS JetStream key-value bucket, ``nimbus-<region>-store``.

The bucket is a stream (``KV_nimbus-<region>-store``, subjects
``$KV.nimbus-<region>-store.>``) made the way JetStream KV buckets are, plus
what campaigns need: per-message TTL allowed and server-placed delete
markers when a message expires. Any process may open it; the first one
creates it (replicas 3 when the cluster has at least three servers).

* Revisions are the stream's sequence numbers: bucket-wide and increasing.
  History is 1: a replay from an old revision gets the latest change of each
  key changed since (intermediate values are skipped), deletes included.
* Keys: ``/`` becomes ``.`` (a subject token separator), so a prefix
  ``apps/`` is the subject filter ``apps.>`` and neither ``list`` nor
  ``watch`` reads the rest of the bucket. Every character outside
  ``[A-Za-z0-9_-]`` is written ``=XX`` (its UTF-8 bytes in hex), an empty
  segment is ``=``: reversible, and always a valid KV key.
* Compare-and-set is the server's expected-last-subject-sequence check.
* Campaigns are messages with a ``Nats-TTL``: the server deletes them (and
  places a delete marker watchers see) when their time runs out, whoever
  is or isn't connected. NATS counts TTLs in whole seconds: ``ttl_s`` is
  rounded up, at least 1 s.
* Deletes leave a tombstone, and expiries a marker, that the server removes
  after ``MARKER_TTL_S`` (the bucket does not grow with every key that ever
  existed). A watcher replaying from a revision older than that may miss
  those deletes; when a tombstone goes, watchers may see the delete again.
* Reads go to the stream leader (no direct gets from possibly stale
  replicas): a read after a write sees it.
* Watches: an ephemeral push consumer from ``after + 1`` with idle
  heartbeats. A gap in its sequence, heartbeats that stop, a failed
  subscribe or a reconnect of the connection make the watch yield
  ``reset`` and subscribe again (with backoff) from the last revision it
  delivered.

Driver errors become ``UnavailableError`` (``__cause__`` set), a lost
compare-and-set ``ConflictError``, a closed store or connection
``ClosedError``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from nimbus.aio import wait_event
from nimbus.errors import ClosedError, ConflictError, UnavailableError, UserInputError
from nimbus.region import check_region_name
from nimbus.store.base import Entry, Watch, WatchEvent
from nimbus.store.nats_conn import connection_events, retry_read, retry_unrouted
from nimbus.store.nats_scan import ScanError, last_per_subject

log = logging.getLogger("nimbus.store")
T = TypeVar("T")

MARKER_TTL_S = 900  # tombstones and expiry markers live this long (whole seconds)
DUPLICATE_WINDOW_S = 120.0
HEARTBEAT_S = 1.0  # a watch's consumer says it is alive this often
MISSED_HEARTBEATS = 3  # a watch resubscribes after this many heartbeats go missing
CONSUMER_IDLE_S = 30.0  # the server drops a consumer nobody listens to after this
REQUEST_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 2.0  # a watch retries sooner than other requests time out
LIST_TIMEOUT_S = 30.0
RETRY_S = (0.1, 3.0)  # a watch's resubscribe backoff: first pause, cap
CAS_TRIES = 20  # create/delete retries when a tombstone moves under them

WRONG_LAST_SEQUENCE = (10071, 10164)
NO_MESSAGE_FOUND = 10037
STREAM_NOT_FOUND = 10059
STREAM_NAME_IN_USE = 10058
NO_SUITABLE_PEERS = 10005  # a server just started is not yet known to the meta leader
# A bucket's creation is tried again on these (and on no answer at all).
CREATE_AGAIN = (None, STREAM_NAME_IN_USE, NO_SUITABLE_PEERS)
BUCKET_READY_S = 20.0

_KEEP = re.compile(r"[A-Za-z0-9_-]")
_OP = "KV-Operation"
_MARKER = "Nats-Marker-Reason"
_EXPECT = "Nats-Expected-Last-Subject-Sequence"
_TTL = "Nats-TTL"


def check_region(region: str) -> str:
    """A region name usable in stream and bucket names, or ``UserInputError``."""
    try:
        return check_region_name(region)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def encode_key(key: str) -> str:
    """The KV key (subject tokens) for a nimbus key."""
    return ".".join(_encode_segment(seg) for seg in key.split("/"))


def _encode_segment(seg: str) -> str:
    if not seg:
        return "="
    return "".join(c if _KEEP.match(c) else "".join(f"={b:02X}" for b in c.encode())
                   for c in seg)


def decode_key(token: str) -> str:
    """The nimbus key for a KV key made by :func:`encode_key`."""
    return "/".join(_decode_segment(t) for t in token.split("."))


def _decode_segment(tok: str) -> str:
    if tok == "=":
        return ""
    if "=" not in tok:
        return tok
    out = bytearray()
    i = 0
    while i < len(tok):
        if tok[i] == "=":
            out.append(int(tok[i + 1:i + 3], 16))
            i += 3
        else:
            out += tok[i].encode()
            i += 1
    return out.decode()


def prefix_filter(prefix: str) -> str:
    """The KV key pattern covering every key under ``prefix``: the whole
    segments of the prefix, then ``>``. Keys it matches still need a
    ``startswith(prefix)`` check when the prefix ends inside a segment."""
    whole, sep, _ = prefix.rpartition("/")
    return (encode_key(whole) + ".>") if sep else ">"


def ttl_header(ttl_s: float) -> str:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, was: {ttl_s}")
    return str(max(1, math.ceil(ttl_s)))


def _is_delete(headers: dict[str, str] | None) -> bool:
    return headers is not None and (headers.get(_OP) in ("DEL", "PURGE") or _MARKER in headers)


def _key_of(subject: str, pre: str) -> str | None:
    try:
        return decode_key(subject[len(pre):])
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring %s: not a key this store wrote", subject)
        return None


async def open_nats_store(nc: NATS, *, region: str, replicas: int | None = None) -> NatsStore:
    """The region's store on the connection ``nc``, creating its bucket if
    needed (``replicas`` defaults to 3 on a cluster of three or more
    servers, else 1). ``nc`` stays the caller's to close."""
    store = NatsStore(nc, check_region(region))
    await store._ensure_bucket(replicas)
    store._listen()
    return store


def cluster_replicas(nc: NATS) -> int:
    """3 if the connection knows of at least three servers, else 1."""
    return 3 if len(nc.servers) >= 3 else 1


class NatsStore:
    """Use :func:`open_nats_store`."""

    def __init__(self, nc: NATS, region: str) -> None:
        self.nc = nc
        self.bucket = f"nimbus-{region}-store"
        self.stream = f"KV_{self.bucket}"
        self._pre = f"$KV.{self.bucket}."
        self._js = nc.jetstream(timeout=REQUEST_TIMEOUT_S)
        self._closed = False
        self._watches: set[_NatsWatch] = set()
        self._chores: set[asyncio.Task[None]] = set()

    # -- plumbing -------------------------------------------------------------

    def _subject(self, key: str) -> str:
        return self._pre + encode_key(key)

    def _check_open(self) -> None:
        if self._closed or self.nc.is_closed:
            raise ClosedError(f"NATS store {self.bucket} is closed")

    async def _call(self, what: str, aw: Awaitable[T]) -> T:
        """Await one driver call, translating its errors (once, here)."""
        try:
            return await aw
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise ConflictError(f"{what}: {exc.description}") from exc
            raise UnavailableError(f"NATS store {self.bucket}: {what}: {_describe(exc)}") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise ClosedError(f"NATS store {self.bucket}: the connection is closed") from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            if self._closed or self.nc.is_closed:
                raise ClosedError(f"NATS store {self.bucket} is closed") from exc
            raise UnavailableError(f"NATS store {self.bucket}: {what}: {_describe(exc)}") from exc

    async def _publish(self, what: str, key: str, value: bytes,
                       headers: dict[str, str] | None = None) -> int:
        self._check_open()
        ack = await self._call(what, retry_unrouted(lambda: self._js.publish(
            self._subject(key), bytes(value), headers=headers or None)))
        return int(ack.seq)

    async def _last(self, key: str) -> api.RawStreamMsg | None:
        """The last message of ``key`` (a value, tombstone or marker), or None."""
        self._check_open()
        try:
            return await self._call(f"get {key}", retry_read(lambda: self._js.get_msg(
                self.stream, subject=self._subject(key), direct=False)))
        except UnavailableError as exc:
            cause = exc.__cause__
            if isinstance(cause, nats.js.errors.APIError) and cause.err_code == NO_MESSAGE_FOUND:
                return None
            raise

    async def _ensure_bucket(self, replicas: int | None) -> None:
        config = api.StreamConfig(
            name=self.stream, subjects=[f"$KV.{self.bucket}.>"],
            description=f"nimbus store ({self.bucket})",
            allow_direct=False, allow_rollup_hdrs=True, allow_msg_ttl=True, deny_delete=True,
            discard=api.DiscardPolicy.NEW, duplicate_window=DUPLICATE_WINDOW_S,
            max_msgs_per_subject=1, max_msgs=-1, max_bytes=-1, max_consumers=-1,
            num_replicas=replicas or cluster_replicas(self.nc), storage=api.StorageType.FILE,
            subject_delete_marker_ttl=float(MARKER_TTL_S))
        # A stream another process is creating right now may not answer yet
        # (no leader elected): try again for a while before giving up.
        deadline = time.monotonic() + BUCKET_READY_S
        while True:
            try:
                info = await self._call("stream info", self._js.stream_info(self.stream))
                break
            except UnavailableError as exc:
                if _api_code(exc) == STREAM_NOT_FOUND:
                    try:
                        await self._call("create the bucket", self._js.add_stream(config))
                        log.info("created the store bucket %s (replicas %d)", self.bucket,
                                 config.num_replicas)
                        return
                    except UnavailableError as exc2:  # in use: someone was faster
                        exc = exc2
                if _api_code(exc) not in CREATE_AGAIN \
                        or time.monotonic() > deadline:
                    raise exc from exc.__cause__
                await asyncio.sleep(0.2)
        have = info.config
        if not have.allow_msg_ttl or not have.subject_delete_marker_ttl:
            # A bucket made by an older nimbus or by hand: campaigns need both.
            have.allow_msg_ttl = True
            have.subject_delete_marker_ttl = float(MARKER_TTL_S)
            await self._call("enable TTLs on the bucket", self._js.update_stream(have))

    def _listen(self) -> None:
        events = connection_events(self.nc)
        events.on_reconnect.append(self._on_reconnect)

    def _on_reconnect(self) -> None:
        for w in list(self._watches):
            w.trouble("the NATS connection was re-established")

    # -- Store ----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        msg = await self._last(key)
        if msg is None or _is_delete(msg.headers):
            return None
        return Entry(key, msg.data or b"", int(msg.seq or 0))

    async def list(self, prefix: str) -> list[Entry]:
        """One ephemeral consumer on the prefix's subject filter, delivering
        the last message of each subject (see ``nats_scan``)."""
        self._check_open()
        try:
            got = await self._call(f"list {prefix!r}", last_per_subject(
                self.nc, self._js, self.stream, self._pre + prefix_filter(prefix),
                timeout_s=LIST_TIMEOUT_S, forget=self._forget_consumer))
        except ScanError as exc:
            raise UnavailableError(f"NATS store {self.bucket}: list {prefix!r}: {exc}") from exc
        entries: dict[str, Entry] = {}
        for m in got:
            key = _key_of(m.subject, self._pre)
            if key is not None and key.startswith(prefix):
                if _is_delete(m.headers):
                    entries.pop(key, None)
                else:
                    entries[key] = Entry(key, m.data, m.seq)
        return [entries[k] for k in sorted(entries)]

    def _forget_consumer(self, name: str | None) -> None:
        """Delete a consumer we are done with, without waiting for it (if
        that fails, the server drops the consumer when idle anyway)."""
        if name and not self.nc.is_closed:
            task = asyncio.get_running_loop().create_task(self._delete_consumer(name))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)

    async def _delete_consumer(self, name: str) -> None:
        try:
            await self._js.delete_consumer(self.stream, name)
        except (nats.errors.Error, OSError, TimeoutError):
            log.debug("could not delete consumer %s (it will idle out)", name, exc_info=True)

    async def put(self, key: str, value: bytes) -> int:
        return await self._publish(f"put {key}", key, value)

    async def create(self, key: str, value: bytes) -> int:
        rev = await self._take(key, value, None)
        if rev is None:
            raise ConflictError(f"{key} already exists")
        return rev

    async def _take(self, key: str, value: bytes, ttl: str | None) -> int | None:
        """Write ``key`` if it has no value (never written, deleted, or
        expired); None if it has one."""
        last = 0
        for attempt in range(CAS_TRIES):
            headers = {_EXPECT: str(last)}
            if ttl is not None:
                headers[_TTL] = ttl
            try:
                return await self._publish(f"create {key}", key, value, headers)
            except ConflictError:
                msg = await self._last(key)
                if msg is not None and not _is_delete(msg.headers):
                    return None
                seq = int(msg.seq or 0) if msg is not None else 0
                if seq == last:
                    # A rival's write is accepted but not yet readable: wait for it.
                    await asyncio.sleep(min(0.005 * 2 ** attempt, 0.5))
                last = seq
        raise UnavailableError(f"NATS store {self.bucket}: create {key}: its tombstone kept "
                               f"moving ({CAS_TRIES} tries)")

    async def update(self, key: str, value: bytes, revision: int) -> int:
        if revision <= 0:
            raise ConflictError(f"{key} is not at revision {revision}")
        return await self._publish(f"update {key} at {revision}", key, value,
                                   {_EXPECT: str(revision)})

    def _tombstone(self, revision: int) -> dict[str, str]:
        return {_OP: "DEL", _EXPECT: str(revision), _TTL: str(MARKER_TTL_S)}

    async def delete(self, key: str, *, revision: int | None = None) -> bool:
        if revision is not None:
            if revision <= 0:
                raise ConflictError(f"{key} is not at revision {revision}")
            await self._publish(f"delete {key} at {revision}", key, b"",
                                self._tombstone(revision))
            return True
        for _ in range(CAS_TRIES):
            msg = await self._last(key)
            if msg is None or _is_delete(msg.headers):
                return False
            try:
                await self._publish(f"delete {key}", key, b"",
                                    self._tombstone(int(msg.seq or 0)))
                return True
            except ConflictError:
                continue  # written meanwhile: delete the newer value
        raise UnavailableError(f"NATS store {self.bucket}: delete {key}: it kept changing "
                               f"({CAS_TRIES} tries)")

    async def campaign(self, key: str, value: bytes, ttl_s: float) -> int | None:
        return await self._take(key, value, ttl_header(ttl_s))

    async def renew(self, key: str, revision: int, ttl_s: float,
                    value: bytes | None = None) -> int:
        ttl = ttl_header(ttl_s)
        if value is None:
            msg = await self._last(key)
            if msg is None or _is_delete(msg.headers) or msg.seq != revision:
                raise ConflictError(f"campaign {key} lost: it is no longer at {revision}")
            value = msg.data or b""
        try:
            return await self._publish(f"renew {key} at {revision}", key, value,
                                       {_EXPECT: str(revision), _TTL: ttl})
        except ConflictError as exc:
            raise ConflictError(f"campaign {key} lost: it is no longer at {revision}") from exc

    async def resign(self, key: str, revision: int) -> None:
        if revision <= 0:
            return
        with contextlib.suppress(ConflictError):  # not ours (any more): nothing to do
            await self._publish(f"resign {key}", key, b"", self._tombstone(revision))

    def watch(self, prefix: str, *, after: int = 0) -> Watch:
        self._check_open()
        w = _NatsWatch(self, prefix, after)
        self._watches.add(w)
        return w

    async def aclose(self) -> None:
        """End every watch; the connection stays open (it is shared)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            connection_events(self.nc).on_reconnect.remove(self._on_reconnect)
        for w in builtins.list(self._watches):
            await w.aclose()
        for task in builtins.list(self._chores):
            task.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)


def _api_code(exc: BaseException) -> int | None:
    """The JetStream error code behind a translated error, if any."""
    cause = exc.__cause__
    return cause.err_code if isinstance(cause, nats.js.errors.APIError) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        return f"{type(exc).__name__} {exc.code}/{exc.err_code}: {exc.description}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_END: Any = object()  # queued to wake a consumer when the watch ends


class _NatsWatch:
    """A self-healing ordered subscription to the changes under a prefix."""

    def __init__(self, store: NatsStore, prefix: str, after: int) -> None:
        self._store = store
        self._prefix = prefix
        self._filter = store._pre + prefix_filter(prefix)
        self._last = max(0, after)  # last stream sequence seen
        self._queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._trouble = asyncio.Event()
        self._why = ""
        self._generation = 0
        self._dseq = 0  # last consumer sequence of the current subscription
        self._seen = 0.0  # monotonic time of the last message or heartbeat
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._reset_queued = False

    def __aiter__(self) -> _NatsWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._closed:
            raise StopAsyncIteration
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name=f"watch {self._prefix}")
        event = await self._queue.get()
        if event is _END:
            self._queue.put_nowait(_END)  # every later call ends too
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store._watches.discard(self)
        self._queue.put_nowait(_END)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._unsubscribe()

    def trouble(self, why: str) -> None:
        """Something may have been lost: reset and subscribe again."""
        if not self._trouble.is_set():
            self._why = why
            self._trouble.set()

    async def _keep(self) -> None:
        delay = RETRY_S[0]
        while not self._closed:
            self._trouble.clear()
            try:
                await self._subscribe()
            except ClosedError:
                break
            except Exception as exc:  # noqa: BLE001 - a watch must outlive any failure
                log.warning("watch of %r: subscribing failed (%s); again in %.1fs",
                            self._prefix, exc, delay,
                            exc_info=not isinstance(exc, UnavailableError))
                self._reset()  # the consumer re-lists now; we replay from _last anyway
                await self._unsubscribe()
                await self._pause(delay)
                delay = min(delay * 2, RETRY_S[1])
                continue
            delay = RETRY_S[0]
            if not await self._supervise():
                break
            log.warning("watch of %r: %s; resubscribing from revision %d", self._prefix,
                        self._why, self._last)
            self._reset()
            await self._unsubscribe()
        self._queue.put_nowait(_END)

    async def _pause(self, delay: float) -> None:
        await wait_event(self._trouble, delay)
        self._trouble.clear()

    def _reset(self) -> None:
        if not self._reset_queued:  # one is enough until something else is queued
            self._reset_queued = True
            self._queue.put_nowait(WatchEvent("reset", "", b"", self._last))

    async def _supervise(self) -> bool:
        """Wait until the subscription is in trouble (True) or the watch or
        the store is closed (False)."""
        limit = HEARTBEAT_S * MISSED_HEARTBEATS
        while not self._closed and not self._store._closed:
            if await wait_event(self._trouble, HEARTBEAT_S):
                return True
            if time.monotonic() - self._seen > limit:
                self._why = f"no heartbeat for {limit:.0f}s"
                return True
        return False

    async def _subscribe(self) -> None:
        store = self._store
        store._check_open()
        self._generation += 1
        generation = self._generation
        self._dseq = 0
        inbox = store.nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            if generation == self._generation and not self._closed:
                self._on_msg(msg)

        self._sub = await store._call("watch", store.nc.subscribe(inbox, cb=on_msg))
        info = await store._call(f"watch {self._prefix!r}", store._js.add_consumer(
            store.stream, api.ConsumerConfig(
                deliver_subject=inbox, filter_subject=self._filter,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._last + 1, ack_policy=api.AckPolicy.NONE, max_deliver=1,
                idle_heartbeat=HEARTBEAT_S, mem_storage=True, num_replicas=1,
                inactive_threshold=CONSUMER_IDLE_S), timeout=SUBSCRIBE_TIMEOUT_S))
        self._consumer = info.name
        self._seen = time.monotonic()

    def _on_msg(self, msg: Msg) -> None:
        try:
            self._take(msg)
        except Exception as exc:  # noqa: BLE001 - a message we cannot read is a lost one
            log.exception("watch of %r: unreadable message on %s", self._prefix, msg.subject)
            self.trouble(f"unreadable message ({type(exc).__name__})")

    def _take(self, msg: Msg) -> None:
        self._seen = time.monotonic()
        headers = msg.headers or {}
        status = headers.get("Status")
        if status:
            if status == "100" and not msg.reply:  # idle heartbeat
                last = headers.get("Nats-Last-Consumer")
                if last is not None and int(last) != self._dseq:
                    self.trouble(f"heartbeat says {last} sent, {self._dseq} arrived")
            elif status != "100":
                self.trouble(f"the consumer said {status} {headers.get('Description', '')}")
            return
        md = msg.metadata
        if md.sequence.consumer != self._dseq + 1:
            self.trouble(f"consumer sequence {md.sequence.consumer} after {self._dseq}")
            return
        self._dseq = md.sequence.consumer
        seq = md.sequence.stream
        if seq <= self._last:
            return  # replayed after a resubscribe: already delivered
        self._last = seq
        key = _key_of(msg.subject, self._store._pre)
        if key is None or not key.startswith(self._prefix):
            return
        self._reset_queued = False
        if _is_delete(msg.headers):
            self._queue.put_nowait(WatchEvent("delete", key, b"", seq))
        else:
            self._queue.put_nowait(WatchEvent("put", key, msg.data or b"", seq))

    async def _unsubscribe(self) -> None:
        self._generation += 1  # late messages of the old subscription are dropped
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        name, self._consumer = self._consumer, None
        self._store._forget_consumer(name)

