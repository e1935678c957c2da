"""Region-wide traces on NATS JetStream.

One request crosses processes in a region (the gateway's span, the worker's
``nimbus.invoke``; an async attempt on whichever gateway consumed it), and
``nimbus trace`` may ask any controller: so every traced region process
publishes its finished spans to one stream per region,
``nimbus-<region>-traces``, and any controller reads them back from there.

Subjects: ``nimbus.<region>.traces.<request token>.<trace id>``, one message
per (request id, trace id) group of a process's batch; the request token is
the first 32 hex digits of the SHA-256 of the request id (any request id
makes a valid token, and lengths stay fixed). Finding a request is then two
direct gets by subject, no scan of the stream: ``traces.<token>.*`` gives its
spans and so its trace ids, ``traces.*.<trace id>`` every span of those
traces (an HTTP request's async attempts, or the request that submitted an
invocation).

Writing (:class:`NatsTraceSink`): the tracing exporter thread hands it each
batch it makes (the JSON array it exports anyway), a locked append; the
publishing task (:class:`~nimbus.observe.natsstream.StreamPublisher`) splits
batches into groups off the request path and publishes them every
``flush_s``. The buffer is bounded in bytes: past it the oldest batches are
dropped and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from nimbus.errors import UserInputError
from nimbus.observe import natsstream, tracing
from nimbus.observe.natsstream import Outgoing, StreamPublisher
from nimbus.region import check_region_name

FLUSH_S = 0.1
DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
MAX_MSG_BYTES = 1024 * 1024
GROUP_BYTES = 256 * 1024  # aim of one message (a longer span goes alone)
# a retry comes within seconds (publish timeout, backoff); many messages a
# second make every remembered id count in the servers' memory
DUPLICATE_WINDOW_S = 30.0
MAX_TRACES = 16  # trace ids one lookup follows
MAX_SPANS = 20_000  # spans one lookup returns
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def stream_name(region: str) -> str:
    return f"nimbus-{check_region_name(region)}-traces"


def request_token(request_id: str) -> str:
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]


def subject_for(region: str, request_id: str, trace_id: str) -> str:
    return f"nimbus.{region}.traces.{request_token(request_id)}.{trace_id}"


@dataclass(frozen=True, slots=True)
class NatsTraceLimits:
    """How much of the region's spans the stream keeps (oldest dropped first)."""

    max_bytes: int = 512 * 1024 * 1024  # the whole stream, on each replica
    max_age_s: float = 24 * 3600.0
    replicas: int = 3

    def __post_init__(self) -> None:
        natsstream.check_limit("trace", "max_bytes", self.max_bytes, 1024 * 1024)
        natsstream.check_limit("trace", "replicas", self.replicas, 1, 5)
        natsstream.check_age("trace", self.max_age_s)

    def stream_config(self, region: str) -> StreamConfig:
        return natsstream.region_stream(
            stream_name(region), f"nimbus.{region}.traces.>", replicas=self.replicas,
            max_bytes=self.max_bytes, max_age_s=self.max_age_s, max_msg_size=MAX_MSG_BYTES,
            duplicate_window_s=DUPLICATE_WINDOW_S,
            description="nimbus spans, one subject per request id and trace id")


async def ensure_stream(nc: NATS, region: str, limits: NatsTraceLimits | None = None,
                        ready_s: float = natsstream.STREAM_READY_S) -> None:
    await natsstream.ensure_stream(nc, (limits or NatsTraceLimits()).stream_config(region),
                                   "trace", ready_s)


# -- writing -----------------------------------------------------------------------


def groups(batch: bytes) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """An exporter batch (a JSON array of spans) by (request id, trace id);
    spans without both are left out."""
    try:
        spans = orjson.loads(batch)
    except orjson.JSONDecodeError:
        return {}
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for span in spans if isinstance(spans, list) else ():
        if not isinstance(span, dict):
            continue
        rid = (span.get("attributes") or {}).get("nimbus.request_id")
        trace_id = span.get("trace_id")
        if isinstance(rid, str) and rid and isinstance(trace_id, str) \
                and _TRACE_ID.fullmatch(trace_id):
            out.setdefault((rid, trace_id), []).append(span)
    return out


class NatsTraceSink(StreamPublisher):
    """Publishes one process's spans to the region's stream. Call it with a
    batch from any thread (the exporter's); ``start()`` on the event loop."""

    what = "traces"
    window = 64  # spans need no order: many small messages in flight at once

    def __init__(self, nc: NATS, *, region: str, node: str,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, flush_s: float = FLUSH_S) -> None:
        super().__init__(nc, region=region, name=node, flush_s=flush_s,
                         buffer_bytes=buffer_bytes, least_buffer_bytes=2 * MAX_MSG_BYTES)
        self.node = node
        self._lock = threading.Lock()  # the exporter thread appends, the loop takes
        self._incoming: deque[bytes] = deque()
        self._in_bytes = 0

    def __call__(self, batch: bytes) -> None:
        """The exporter's hook: keep ``batch`` for the next round."""
        if self._closing:
            return
        with self._lock:
            self._incoming.append(batch)
            self._in_bytes += len(batch)
            while self._in_bytes + self._bytes > self.buffer_bytes and self._incoming:
                old = self._incoming.popleft()
                self._in_bytes -= len(old)
                self.dropped += old.count(b'"span_id"')

    def _pending(self) -> bool:
        return bool(self._incoming)

    def _make_batches(self) -> None:
        with self._lock:
            batches = list(self._incoming)
            self._incoming.clear()
            self._in_bytes = 0
        for batch in batches:
            for (rid, trace_id), spans in groups(batch).items():
                subject = subject_for(self.region, rid, trace_id)
                chunk: list[bytes] = []
                size = 0
                for span in spans:
                    span["node"] = self.node
                    data = orjson.dumps(span, default=str)
                    if len(data) + 2 > MAX_MSG_BYTES:
                        self.dropped += 1
                        continue
                    if chunk and size + len(data) + 1 > GROUP_BYTES:
                        self._add(subject, chunk)
                        chunk, size = [], 0
                    chunk.append(data)
                    size += len(data) + 1
                if chunk:
                    self._add(subject, chunk)

    def _add(self, subject: str, spans: list[bytes]) -> None:
        payload = b"[" + b",".join(spans) + b"]"
        self._outbox.append(Outgoing(subject, payload, len(spans), self.next_msg_id()))
        self._bytes += len(payload)


async def attach(nc: NATS | None, *, region: str, node: str,
                 limits: NatsTraceLimits | None = None) -> NatsTraceSink | None:
    """With tracing on in this process: the region's trace stream made sure
    of, and a started sink the exporter hands its batches to (None when
    tracing is off, or the region has no NATS: a file or a collector is
    then all there is). Undo with :func:`detach`."""
    exporter = tracing.exporter()
    if exporter is None:
        return None
    if nc is None:
        if exporter.config.mode == "region":
            raise UserInputError("--trace region: the region's traces live on NATS, and this "
                                 "store is not (--store nats://...); use --trace file or otlp")
        return None
    await ensure_stream(nc, region, limits)
    sink = NatsTraceSink(nc, region=region, node=node)
    sink.start()
    exporter.add_sink(sink)
    return sink


async def detach(sink: NatsTraceSink | None, timeout_s: float = 5.0) -> None:
    """The spans recorded so far published (within ``timeout_s``), then the
    sink closed."""
    if sink is None:
        return
    exporter = tracing.exporter()
    if exporter is not None:
        await asyncio.to_thread(exporter.flush)
        exporter.remove_sink(sink)
    await sink.aclose(timeout_s)


# -- reading -----------------------------------------------------------------------


class NatsTraceSource:
    """Finds a request's spans in the region's stream (any server answers)."""

    def __init__(self, nc: NATS, *, region: str,
                 timeout_s: float = natsstream.READ_TIMEOUT_S) -> None:
        self.region = check_region_name(region)
        self._reader = natsstream.DirectReader(nc, stream_name(region), "traces", timeout_s)

    async def _spans(self, subject: str, into: dict[tuple[str, str], dict[str, Any]]) -> None:
        async for _seq, data in self._reader.range(subject, 1, None):
            try:
                spans = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            for span in spans if isinstance(spans, list) else ():
                if isinstance(span, dict) and isinstance(span.get("trace_id"), str):
                    into[(span["trace_id"], str(span.get("span_id")))] = span
            if len(into) >= MAX_SPANS:
                return

    async def find(self, request_id: str) -> list[dict[str, Any]]:
        """Every span of the traces that ``request_id``'s spans belong to,
        by start time ([] when there are none)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        await self._spans(f"nimbus.{self.region}.traces.{request_token(request_id)}.*", found)
        traces = sorted({trace_id for (trace_id, _), span in found.items()
                         if (span.get("attributes") or {}).get("nimbus.request_id")
                         == request_id})[:MAX_TRACES]
        for trace_id in traces:
            if len(found) >= MAX_SPANS:
                break
            await self._spans(f"nimbus.{self.region}.traces.*.{trace_id}", found)
        return tracing.select(found.values(), request_id)


async def open_source(nc: NATS, region: str,
                      limits: NatsTraceLimits | None = None) -> NatsTraceSource:
    """A controller's reader, the stream made sure of first."""
    await ensure_stream(nc, region, limits)
    return NatsTraceSource(nc, region=region)
