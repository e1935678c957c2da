"""Region-wide function logs on NATS JetStream.

Instances of one function run on many workers, and ``nimbus logs FN -f`` may
be served by any controller: so every worker publishes its lines to one
JetStream stream per region, ``nimbus-<region>-logs``, one subject per
function (``nimbus.<region>.logs.<encoded function>``), and any controller
reads them back from there.

Writing (:class:`NatsLogSink`): ``write`` is a memory append on the request
path, never a network call. A background task publishes what has gathered
every ``flush_s`` (0.1 s), one message per function holding a batch of JSON
lines, in order, waiting for each acknowledgement (with a deadline) before
the next, so one worker's lines stay in order. The buffer is bounded in
bytes: past it the oldest lines are dropped and counted, and the function's
next batch begins with a ``platform`` record "N log lines dropped". Nothing
grows without bound, nothing waits on NATS. A batch whose publication fails
is kept (it counts in the bound) and sent again with the same message id, so
JetStream's duplicate window drops it if the first try did land.

Reading (:class:`NatsLogSource`): the stream allows direct gets, so any
replica answers reads by subject (``next_by_subj`` in batches, up to a
sequence). ``tail`` reads windows of sequences backwards from the last one
until it has enough lines; ``follow`` takes everything after a sequence,
then waits for the next line (a plain subscription to the subject serves as
the wake-up, with a deadline as fallback) and reads again from where it
was. Every read is a standalone request with a deadline, so a reconnect to
another server (the one it was connected to having died) loses nothing:
reading goes on from the last sequence seen.

A record is today's file record plus ``worker``: ``{"ts", "rid", "stream",
"text", "worker"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import Error as JsError
from nats.js.errors import NotFoundError

from nimbus.aio import wait_event
from nimbus.errors import UnavailableError
from nimbus.observe.logs import MAX_LINE_CHARS
from nimbus.observe.logs import LogSink as FileLogSink
from nimbus.observe.protocols import Record
from nimbus.region import check_region_name

log = logging.getLogger("nimbus.logs")

FLUSH_S = 0.1
DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
BATCH_BYTES = 256 * 1024  # aim of one published message (a longer record goes alone)
MAX_MSG_BYTES = 1024 * 1024  # the stream's limit: the longest record fits
PUBLISH_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0
STREAM_READY_S = 30.0  # a new cluster electing leaders, or a racing creator
READ_BATCH = 256  # messages per direct-get request
FOLLOW_WAIT_S = 1.0  # longest wait for a wake-up before reading again anyway
_PLAIN = re.compile(r"[A-Za-z0-9_-]")


def stream_name(region: str) -> str:
    return f"nimbus-{check_region(region)}-logs"


def check_region(region: str) -> str:
    return check_region_name(region)


def encode_function(function: str) -> str:
    """A function name as one subject token: letters, digits, ``_`` and
    ``-`` as they are, every other character as ``=XX`` (its UTF-8 bytes
    in hex), so distinct names stay distinct and ``.``/``*``/``>`` never
    reach a subject."""
    if not function:
        raise ValueError("function name must not be empty")
    return "".join(c if _PLAIN.match(c) else "".join(f"={b:02X}" for b in c.encode())
                   for c in function)


def subject_for(region: str, function: str) -> str:
    return f"nimbus.{check_region(region)}.logs.{encode_function(function)}"


@dataclass(frozen=True, slots=True)
class NatsLogLimits:
    """How much of the region's logs the stream keeps (oldest dropped first).

    JetStream bounds a subject by messages, not bytes: a function keeps at
    most ``max_msgs_per_function`` batches, each at most about
    ``BATCH_BYTES`` (256 KiB), whatever is reached first of that, the
    stream's ``max_bytes`` and ``max_age_s``."""

    max_bytes: int = 1024 * 1024 * 1024  # the whole stream, on each replica
    max_age_s: float = 7 * 24 * 3600.0
    max_msgs_per_function: int = 10_000
    replicas: int = 3

    def __post_init__(self) -> None:
        for key, least in (("max_bytes", 1024 * 1024), ("max_msgs_per_function", 1),
                           ("replicas", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"log limit {key} must be an integer of at least {least}, "
                                 f"was: {value!r}")
        if self.replicas > 5:
            raise ValueError(f"log limit replicas must be at most 5, was: {self.replicas}")
        if not isinstance(self.max_age_s, int | float) or not self.max_age_s >= 1:
            raise ValueError(f"log limit max_age_s must be a number of seconds of at least 1, "
                             f"was: {self.max_age_s!r}")

    def stream_config(self, region: str) -> StreamConfig:
        return StreamConfig(
            name=stream_name(region), subjects=[f"nimbus.{region}.logs.>"],
            storage=StorageType.FILE, num_replicas=self.replicas, discard=DiscardPolicy.OLD,
            max_bytes=self.max_bytes, max_age=float(self.max_age_s),
            max_msgs_per_subject=self.max_msgs_per_function, max_msg_size=MAX_MSG_BYTES,
            allow_direct=True, duplicate_window=120.0,
            description="nimbus function logs, one subject per function")


async def ensure_stream(nc: NATS, region: str, limits: NatsLogLimits | None = None,
                        ready_s: float = STREAM_READY_S) -> None:
    """Create the region's log stream, or bring an existing one to ``limits``.
    A cluster still electing its leaders, or another process creating the
    stream at the same moment, is waited out for up to ``ready_s``."""
    limits = limits or NatsLogLimits()
    js = nc.jetstream(timeout=READ_TIMEOUT_S)
    config = limits.stream_config(region)
    deadline = time.monotonic() + ready_s
    while True:
        try:
            try:
                await js.stream_info(config.name or "")
            except NotFoundError:
                await js.add_stream(config)
                return
            await js.update_stream(config)
            return
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                nats.errors.NoRespondersError, nats.js.errors.BadRequestError) as exc:
            # BadRequest: "stream name already in use" while another creates it
            if time.monotonic() > deadline:
                raise UnavailableError(f"the log stream {config.name} did not become "
                                       f"available within {ready_s:.0f}s: {exc!r}") from exc
            await asyncio.sleep(0.2)


async def open_region_logs(nc: NATS, *, region: str, worker: str | None = None,
                           limits: NatsLogLimits | None = None,
                           local: FileLogSink | None = None,
                           ) -> tuple[NatsLogSink | None, NatsLogSource]:
    """What a region process needs: the stream made sure of, a started sink
    for a worker (``worker``: its node id; None for processes that only
    read, as controllers) and a source for the control API. A worker's
    shutdown awaits ``sink.aclose()`` after its instances are gone, so the
    last lines are published."""
    await ensure_stream(nc, region, limits)
    sink = None
    if worker is not None:
        sink = NatsLogSink(nc, region=region, worker=worker, local=local)
        sink.start()
    return sink, NatsLogSource(nc, region=region)


# -- writing -----------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    function: str
    payload: bytes  # the records, one a line
    lines: int
    msg_id: str
    dropped_before: int = 0  # lines dropped just before these: told first
    sent: bytes | None = None  # what was published (the same on a retry)

    def message(self, worker: str) -> bytes:
        if self.sent is None:
            notice = b""
            if self.dropped_before:
                notice = orjson.dumps({
                    "ts": time.time(), "rid": None, "stream": "platform",
                    "text": f"{self.dropped_before} log lines dropped (log buffer full)",
                    "worker": worker}) + b"\n"
            self.sent = notice + self.payload
        return self.sent


class NatsLogSink:
    """Publishes one worker's log lines to the region's stream. ``start()``
    on the event loop first; ``write`` from the loop's thread.

    ``local``: a file sink that also gets every line (a per-worker copy on
    disk, kept only if given)."""

    def __init__(self, nc: NATS, *, region: str, worker: str,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, flush_s: float = FLUSH_S,
                 local: FileLogSink | None = None) -> None:
        if buffer_bytes < 2 * BATCH_BYTES:
            raise ValueError(f"buffer_bytes must be at least {2 * BATCH_BYTES}, "
                             f"was: {buffer_bytes}")
        self.nc = nc
        self.region = check_region(region)
        self.worker = worker
        self.buffer_bytes = buffer_bytes
        self.flush_s = flush_s
        self.local = local
        self.js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self._lines: deque[tuple[str, bytes]] = deque()  # (function, record line)
        self._outbox: deque[_Batch] = deque()  # made, not yet acknowledged
        self._bytes = 0  # in both
        self._dropped: dict[str, int] = {}  # lines dropped per function, not yet told
        self._boot = f"{worker}-{time.time_ns():x}"
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._close_by = 0.0
        self.published = 0  # lines acknowledged by the stream
        self.dropped = 0  # lines dropped, all told
        self.publish_errors = 0

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="nats-log-sink")

    # -- the request path: memory only --

    def write(self, function: str, rid: str | None, stream: str, text: str) -> None:
        if self.local is not None:
            self.local.write(function, rid, stream, text)
        if self._closing:
            return
        now = time.time()
        for line in text.removesuffix("\n").split("\n"):
            for start in range(0, max(len(line), 1), MAX_LINE_CHARS):
                rec = orjson.dumps({"ts": now, "rid": rid, "stream": stream,
                                    "text": line[start:start + MAX_LINE_CHARS],
                                    "worker": self.worker})
                self._lines.append((function, rec))
                self._bytes += len(rec) + 1
        self._shed()

    def _shed(self) -> None:
        """Drop the oldest lines (unsent batches first) until within the bound."""
        while self._bytes > self.buffer_bytes:
            if len(self._outbox) > 1:  # the first may be in flight: left alone
                batch = self._outbox[1]
                del self._outbox[1]
                self._bytes -= len(batch.payload)
                self.dropped += batch.lines
                gap = batch.dropped_before + batch.lines
                # the gap is told where it is: before the function's next batch
                later = next((b for i, b in enumerate(self._outbox)
                              if i > 0 and b.function == batch.function), None)
                if later is not None:
                    later.dropped_before += gap
                else:
                    self._dropped[batch.function] = self._dropped.get(batch.function, 0) + gap
            elif self._lines:
                function, rec = self._lines.popleft()
                self._bytes -= len(rec) + 1
                self.dropped += 1
                self._dropped[function] = self._dropped.get(function, 0) + 1
            else:
                break

    def flush(self) -> None:
        """Publish soon (the next round does not wait for ``flush_s``)."""
        self._wake.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking lines. What is buffered is still published, for at
        most ``timeout_s`` more (await :meth:`aclose` to wait for that)."""
        if not self._closing:
            self._closing = True
            self._close_by = time.monotonic() + timeout_s
        self._wake.set()
        if self.local is not None:
            self.local.close()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Publish what is buffered (within ``timeout_s``), then stop."""
        self.close(timeout_s)
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout_s + 1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- the background task --

    def _make_batches(self) -> None:
        """Turn the buffered lines into messages: per function, in order,
        each at most about BATCH_BYTES; a function's first one tells the
        lines dropped before it."""
        per_fn: dict[str, list[bytes]] = {}
        while self._lines:
            function, rec = self._lines.popleft()
            per_fn.setdefault(function, []).append(rec)
        for function in list(self._dropped):
            per_fn.setdefault(function, [])
        for function, recs in per_fn.items():
            first = len(self._outbox)
            size = 0
            start = 0
            for i, rec in enumerate(recs):
                if size and size + len(rec) + 1 > BATCH_BYTES:
                    self._add_batch(function, recs[start:i])
                    start, size = i, 0
                size += len(rec) + 1
            if start < len(recs) or not recs:
                self._add_batch(function, recs[start:])
            self._outbox[first].dropped_before = self._dropped.pop(function, 0)

    def _add_batch(self, function: str, recs: list[bytes]) -> None:
        self._seq += 1
        payload = b"".join(rec + b"\n" for rec in recs)
        self._outbox.append(_Batch(function, payload, len(recs), f"{self._boot}-{self._seq}"))

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._closing:
                await wait_event(self._wake, self.flush_s + backoff)
            else:
                await asyncio.sleep(backoff)
            self._wake.clear()
            if self._closing and (not (self._lines or self._outbox or self._dropped)
                                  or time.monotonic() > self._close_by):
                return
            if not self._outbox:
                self._make_batches()
            try:
                while self._outbox:
                    await self._publish(self._outbox[0])
                    batch = self._outbox.popleft()
                    self._bytes -= len(batch.payload)
                    self.published += batch.lines
                    if not self._outbox and (self._lines or self._dropped):
                        self._make_batches()
                backoff = 0.0
            except (NatsError, JsError, TimeoutError, OSError) as exc:
                self.publish_errors += 1
                if self.publish_errors == 1 or self.publish_errors % 100 == 0:
                    log.warning("publishing logs failed (%d times so far): %r",
                                self.publish_errors, exc)
                backoff = min(max(2 * backoff, 0.1), 2.0)
            except Exception:  # a bug of ours: logged, the loop goes on
                log.exception("log publisher failed")
                backoff = 1.0

    async def _publish(self, batch: _Batch) -> None:
        await self.js.publish(subject_for(self.region, batch.function),
                              batch.message(self.worker),
                              timeout=PUBLISH_TIMEOUT_S,
                              headers={"Nats-Msg-Id": batch.msg_id})


# -- reading -----------------------------------------------------------------------


def _records(payload: bytes, request_id: str | None) -> list[Record]:
    out = []
    for line in payload.split(b"\n"):
        if not line:
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (request_id is None or rec.get("rid") == request_id):
            out.append(rec)
    return out


class NatsLogSource:
    """Reads a region's function logs from its stream (any server answers)."""

    def __init__(self, nc: NATS, *, region: str, timeout_s: float = READ_TIMEOUT_S,
                 follow_wait_s: float = FOLLOW_WAIT_S) -> None:
        self.nc = nc
        self.region = check_region(region)
        self.stream = stream_name(region)
        self.timeout_s = timeout_s
        self.follow_wait_s = follow_wait_s

    # -- direct gets --

    async def _get(self, request: dict[str, Any], suffix: str = "") -> list[tuple[int, bytes]]:
        """One direct-get request: the (sequence, payload) pairs it answers,
        none for "no message"."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        out: list[tuple[int, bytes]] = []
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self.stream}{suffix}",
                                  orjson.dumps(request) if request else b"", reply=inbox)
            deadline = time.monotonic() + self.timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(f"reading logs from {self.stream}: no answer "
                                           f"within {self.timeout_s}s")
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeoutError:
                    raise UnavailableError(f"reading logs from {self.stream}: no answer "
                                           f"within {self.timeout_s}s") from None
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404" or status == "408":
                    return out
                if status == "204":  # end of batch
                    return out
                if status == "503":
                    raise UnavailableError(
                        f"reading logs from {self.stream}: no server answered for the "
                        "stream (it does not exist yet, or JetStream is unavailable)")
                if status:
                    raise UnavailableError(f"reading logs from {self.stream}: "
                                           f"status {str(status).splitlines()[0]}")
                out.append((int(headers["Nats-Sequence"]), msg.data))
                if "batch" not in request:
                    return out
        except NatsError as exc:
            raise UnavailableError(f"reading logs from {self.stream}: {exc!r}") from exc
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def last_seq(self, function: str) -> int:
        """The stream sequence of the function's newest message (0: none)."""
        got = await self._get({}, "." + subject_for(self.region, function))
        return got[0][0] if got else 0

    async def _range(self, function: str, start: int,
                     up_to: int | None) -> AsyncIterator[tuple[int, bytes]]:
        """The function's messages from sequence ``start`` (to ``up_to``)."""
        subject = subject_for(self.region, function)
        while up_to is None or start <= up_to:
            req: dict[str, Any] = {"seq": max(start, 1), "next_by_subj": subject,
                                   "batch": READ_BATCH}
            if up_to is not None:
                req["up_to_seq"] = up_to
            got = await self._get(req)
            if not got:
                return
            for seq, data in got:
                if up_to is not None and seq > up_to:
                    return
                yield seq, data
            start = got[-1][0] + 1

    # -- the public reads --

    async def first_seq(self, function: str) -> int:
        """The stream sequence of the function's oldest message kept (0: none)."""
        got = await self._get({"seq": 1, "next_by_subj": subject_for(self.region, function)})
        return got[0][0] if got else 0

    async def tail(self, function: str, n: int, *,
                   request_id: str | None = None) -> tuple[list[Record], int]:
        """The function's last ``n`` records (of ``request_id`` only, if
        given), oldest first, and the stream sequence they end at (to
        follow from). Reads windows of sequences backwards from the newest
        message, each four times the last, until it has ``n`` records."""
        last = await self.last_seq(function)
        if last == 0 or n <= 0:
            return [], last
        first = await self.first_seq(function)
        got: list[list[Record]] = []  # windows, newest first
        have = 0
        end = last
        window = 64
        while have < n and first and end >= first:
            start = max(first, end - window + 1)
            part = [r async for _, data in self._range(function, start, end)
                    for r in _records(data, request_id)]
            got.append(part)
            have += len(part)
            end = start - 1
            window *= 4
        out = [r for part in reversed(got) for r in part]
        return out[-n:], last

    async def follow(self, function: str, *, after: int | None = None,
                     request_id: str | None = None) -> AsyncIterator[list[Record]]:
        """Batches of records written after sequence ``after`` (after now if
        None), as they come, across reconnects, until the caller stops."""
        subject = subject_for(self.region, function)
        wake = asyncio.Event()

        async def woken(_msg: Any) -> None:
            wake.set()

        sub = await self.nc.subscribe(subject, cb=woken)
        try:
            if after is None:
                after = await self._retrying(self.last_seq, function)
            backoff = 0.0
            while True:
                wake.clear()
                if self.nc.is_closed:
                    raise ConnectionError("the NATS connection is closed")
                try:
                    async for seq, data in self._range(function, after + 1, None):
                        after = seq
                        if recs := _records(data, request_id):
                            yield recs
                    backoff = 0.0
                except UnavailableError as exc:  # a server gone, a reconnect under way
                    log.debug("following %s: %r; reading again", function, exc)
                    backoff = min(max(2 * backoff, 0.1), 2.0)
                    await asyncio.sleep(backoff)
                    continue
                await wait_event(wake, self.follow_wait_s)
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _retrying(self, fn: Any, *args: Any) -> Any:
        backoff = 0.1
        for _ in range(10):
            try:
                return await fn(*args)
            except UnavailableError:
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
        return await fn(*args)

    async def read(self, function: str, *, tail: int | None = None,
                   request_id: str | None = None,
                   follow: bool = False) -> AsyncGenerator[list[Record], None]:
        if tail is None:
            return self._all(function, await self.last_seq(function), request_id, follow)
        records, last = await self.tail(function, tail, request_id=request_id)
        return self._emit(function, records, last, request_id, follow)

    async def _all(self, function: str, last: int, request_id: str | None,
                   follow: bool) -> AsyncGenerator[list[Record], None]:
        """Everything up to ``last``, message by message, then following."""
        async for _, data in self._range(function, 1, last):
            if recs := _records(data, request_id):
                yield recs
        if follow:
            async for batch in self.follow(function, after=last, request_id=request_id):
                yield batch

    async def _emit(self, function: str, records: list[Record], last: int,
                    request_id: str | None,
                    follow: bool) -> AsyncGenerator[list[Record], None]:
        for start in range(0, len(records), 1000):
            yield records[start:start + 1000]
        if follow:
            async for batch in self.follow(function, after=last, request_id=request_id):
                yield batch
