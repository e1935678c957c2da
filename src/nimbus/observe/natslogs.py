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

import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig

from nimbus.aio import wait_event
from nimbus.errors import UnavailableError
from nimbus.observe import natsstream
from nimbus.observe.logs import MAX_LINE_CHARS, record_extra
from nimbus.observe.logs import LogSink as FileLogSink
from nimbus.observe.natsstream import READ_TIMEOUT_S, STREAM_READY_S, Outgoing, StreamPublisher
from nimbus.observe.protocols import Match, Record
from nimbus.region import check_region_name

log = logging.getLogger("nimbus.logs")

FLUSH_S = 0.1
DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
BATCH_BYTES = 256 * 1024  # aim of one published message (a longer record goes alone)
MAX_MSG_BYTES = 1024 * 1024  # the stream's limit: the longest record fits
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
        natsstream.check_limit("log", "max_bytes", self.max_bytes, 1024 * 1024)
        natsstream.check_limit("log", "max_msgs_per_function", self.max_msgs_per_function, 1)
        natsstream.check_limit("log", "replicas", self.replicas, 1, 5)
        natsstream.check_age("log", self.max_age_s)

    def stream_config(self, region: str) -> StreamConfig:
        return natsstream.region_stream(
            stream_name(region), f"nimbus.{region}.logs.>", replicas=self.replicas,
            max_bytes=self.max_bytes, max_age_s=self.max_age_s,
            max_msgs_per_subject=self.max_msgs_per_function, max_msg_size=MAX_MSG_BYTES,
            description="nimbus function logs, one subject per function")


async def ensure_stream(nc: NATS, region: str, limits: NatsLogLimits | None = None,
                        ready_s: float = STREAM_READY_S) -> None:
    """Create the region's log stream, or bring an existing one to ``limits``.
    A cluster still electing its leaders, or another process creating the
    stream at the same moment, is waited out for up to ``ready_s``."""
    await natsstream.ensure_stream(nc, (limits or NatsLogLimits()).stream_config(region),
                                   "log", ready_s)


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
class _Batch(Outgoing):
    function: str = ""
    worker: str = ""
    dropped_before: int = 0  # lines dropped just before these: told first
    sent: bytes | None = None  # what was published (the same on a retry)

    def data(self) -> bytes:
        if self.sent is None:
            notice = b""
            if self.dropped_before:
                notice = orjson.dumps({
                    "ts": time.time(), "rid": None, "stream": "platform",
                    "text": f"{self.dropped_before} log lines dropped (log buffer full)",
                    "worker": self.worker, "level": "WARNING"}) + b"\n"
            self.sent = notice + self.payload
        return self.sent


class NatsLogSink(StreamPublisher):
    """Publishes one worker's log lines to the region's stream. ``start()``
    on the event loop first; ``write`` from the loop's thread.

    ``local``: a file sink that also gets every line (a per-worker copy on
    disk, kept only if given)."""

    what = "logs"

    def __init__(self, nc: NATS, *, region: str, worker: str,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, flush_s: float = FLUSH_S,
                 local: FileLogSink | None = None) -> None:
        super().__init__(nc, region=region, name=worker, flush_s=flush_s,
                         buffer_bytes=buffer_bytes, least_buffer_bytes=2 * BATCH_BYTES)
        self.worker = worker
        self.local = local
        self._lines: deque[tuple[str, bytes]] = deque()  # (function, record line)
        self._dropped: dict[str, int] = {}  # lines dropped per function, not yet told

    # -- the request path: memory only --

    def write(self, function: str, rid: str | None, stream: str, text: str,
              level: str | None = None, fields: dict[str, Any] | None = None) -> None:
        if self.local is not None:
            self.local.write(function, rid, stream, text, level, fields)
        if self._closing:
            return
        now = time.time()
        extra = record_extra(stream, level, fields, text)
        for line in text.removesuffix("\n").split("\n"):
            for start in range(0, max(len(line), 1), MAX_LINE_CHARS):
                rec = orjson.dumps({"ts": now, "rid": rid, "stream": stream,
                                    "text": line[start:start + MAX_LINE_CHARS],
                                    "worker": self.worker, **extra}, default=str)
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
                self.dropped += batch.count
                gap = batch.dropped_before + batch.count
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

    def close(self, timeout_s: float = 5.0) -> None:
        super().close(timeout_s)
        if self.local is not None:
            self.local.close()

    # -- the background task --

    def _pending(self) -> bool:
        return bool(self._lines or self._dropped)

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
        payload = b"".join(rec + b"\n" for rec in recs)
        self._outbox.append(_Batch(subject_for(self.region, function), payload, len(recs),
                                   self.next_msg_id(), function, self.worker))


# -- reading -----------------------------------------------------------------------


def _records(payload: bytes, request_id: str | None,
             match: Match | None = None) -> list[Record]:
    out = []
    for line in payload.split(b"\n"):
        if not line:
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (request_id is None or rec.get("rid") == request_id) \
                and (match is None or match(rec)):
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
        self._reader = natsstream.DirectReader(nc, self.stream, "logs", timeout_s)

    async def _get(self, request: dict[str, Any], suffix: str = "") -> list[tuple[int, bytes]]:
        return await self._reader.get(request, suffix)

    async def last_seq(self, function: str) -> int:
        """The stream sequence of the function's newest message (0: none)."""
        got = await self._get({}, "." + subject_for(self.region, function))
        return got[0][0] if got else 0

    def _range(self, function: str, start: int,
               up_to: int | None) -> AsyncIterator[tuple[int, bytes]]:
        """The function's messages from sequence ``start`` (to ``up_to``)."""
        return self._reader.range(subject_for(self.region, function), start, up_to)

    # -- the public reads --

    async def first_seq(self, function: str) -> int:
        """The stream sequence of the function's oldest message kept (0: none)."""
        got = await self._get({"seq": 1, "next_by_subj": subject_for(self.region, function)})
        return got[0][0] if got else 0

    async def tail(self, function: str, n: int, *,
                   request_id: str | None = None,
                   match: Match | None = None) -> tuple[list[Record], int]:
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
                    for r in _records(data, request_id, match)]
            got.append(part)
            have += len(part)
            end = start - 1
            window *= 4
        out = [r for part in reversed(got) for r in part]
        return out[-n:], last

    async def follow(self, function: str, *, after: int | None = None,
                     request_id: str | None = None,
                     match: Match | None = None) -> AsyncIterator[list[Record]]:
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
                        if recs := _records(data, request_id, match):
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
                   follow: bool = False,
                   match: Match | None = None) -> AsyncGenerator[list[Record], None]:
        if tail is None:
            return self._all(function, await self.last_seq(function), request_id, follow,
                             match)
        records, last = await self.tail(function, tail, request_id=request_id, match=match)
        return self._emit(function, records, last, request_id, follow, match)

    async def has_logs(self, function: str) -> bool:
        return await self.last_seq(function) > 0

    async def _all(self, function: str, last: int, request_id: str | None,
                   follow: bool, match: Match | None) -> AsyncGenerator[list[Record], None]:
        """Everything up to ``last``, message by message, then following."""
        async for _, data in self._range(function, 1, last):
            if recs := _records(data, request_id, match):
                yield recs
        if follow:
            async for batch in self.follow(function, after=last, request_id=request_id,
                                           match=match):
                yield batch

    async def _emit(self, function: str, records: list[Record], last: int,
                    request_id: str | None, follow: bool,
                    match: Match | None) -> AsyncGenerator[list[Record], None]:
        for start in range(0, len(records), 1000):
            yield records[start:start + 1000]
        if follow:
            async for batch in self.follow(function, after=last, request_id=request_id,
                                           match=match):
                yield batch
