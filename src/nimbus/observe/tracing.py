"""Traces: a span per request and its steps, exported off the request path.

The request path records spans in :class:`Span`, a slim slotted record (ids
as ints, times from ``time.time_ns()``); only the exporter thread turns them
into JSON lines or OpenTelemetry SDK spans for OTLP. When tracing is off the
request path pays one boolean check (``tracing.on``) per step.

Span names:

- ``nimbus.request`` the gateway's span for one HTTP request (kind SERVER),
  ``nimbus.edge.request`` the edge's, with one ``nimbus.edge.try`` per try
  of a region (``nimbus.retry`` true on the second and later);
- ``nimbus.hold`` waiting for an instance slot, ``nimbus.cold_start`` an
  instance started for this request (fork asked -> READY),
  ``nimbus.invoke`` the call to the instance;
- ``nimbus.async.attempt`` one try of an async invocation (``nimbus.attempt``,
  ``nimbus.retry``), with ``nimbus.queue_wait`` (accepted -> started) under it.

Every span has the attribute ``nimbus.request_id`` so that
:func:`find` (``GET /v1/traces/{request_id}``) can gather one invocation.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from nimbus.observe.traceids import format_traceparent

log = logging.getLogger("nimbus.tracing")

MODES = ("off", "file", "otlp")
DEFAULT_MODE = "file"
FILE_NAME = "traces.jsonl"
DEFAULT_MAX_FILE_BYTES = 8 * 1024 * 1024
DEFAULT_KEEP_FILES = 3
MAX_PENDING = 50_000  # finished spans waiting for the exporter; beyond, the oldest go
RECENT = 20_000  # finished spans kept in memory for `nimbus trace`
FLUSH_EVERY_S = 0.25

KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 0, 1, 2

# -- the switch and the request path's state ----------------------------------

on = False
# request id -> the span that steps of that request hang under (set by the
# gateway or the async dispatcher, read by the pool)
active: dict[str, Span] = {}
_done: deque[Span] = deque(maxlen=MAX_PENDING)
_getrandbits = random.getrandbits  # ids need to be unique, not secret
_now_ns = time.time_ns


class Span:
    __slots__ = ("trace_id", "span_id", "parent_id", "name", "start_ns", "end_ns",
                 "attrs", "error", "kind", "tracestate")

    def __init__(self, name: str, trace_id: int, parent_id: int, start_ns: int,
                 attrs: dict[str, Any], kind: int = KIND_INTERNAL) -> None:
        self.trace_id = trace_id
        self.span_id = _getrandbits(64) or 1
        self.parent_id = parent_id
        self.name = name
        self.start_ns = start_ns
        self.end_ns = 0
        self.attrs = attrs
        self.error: str | None = None
        self.kind = kind
        self.tracestate = ""

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.span_id)

    def to_json(self) -> dict[str, Any]:
        return {"trace_id": f"{self.trace_id:032x}", "span_id": f"{self.span_id:016x}",
                "parent_id": f"{self.parent_id:016x}" if self.parent_id else None,
                "name": self.name, "kind": _KIND_NAMES[self.kind],
                "start_ns": self.start_ns, "end_ns": self.end_ns,
                "attributes": self.attrs,
                "status": "error" if self.error is not None else "ok",
                **({"error": self.error} if self.error is not None else {})}


_KIND_NAMES = {KIND_INTERNAL: "internal", KIND_SERVER: "server", KIND_CLIENT: "client"}


def start(name: str, rid: str, parent: Span | None = None, *, trace_id: int = 0,
          parent_id: int = 0, kind: int = KIND_INTERNAL, start_ns: int = 0,
          attrs: dict[str, Any] | None = None) -> Span:
    """A span begun now (or at ``start_ns``): under ``parent``, or under the
    remote ``trace_id``/``parent_id``, or a new trace's root."""
    if parent is not None:
        trace_id, parent_id = parent.trace_id, parent.span_id
    elif not trace_id:
        trace_id, parent_id = _getrandbits(128) or 1, 0
    a = {"nimbus.request_id": rid}
    if attrs:
        a.update(attrs)
    return Span(name, trace_id, parent_id, start_ns or _now_ns(), a, kind)


def end(span: Span, error: str | None = None, end_ns: int = 0) -> None:
    span.end_ns = end_ns or _now_ns()
    if error is not None:
        span.error = error
    _done.append(span)  # deque.append is atomic: the exporter thread pops


def child(parent: Span, name: str, start_ns: int, end_ns: int, error: str | None = None,
          attrs: dict[str, Any] | None = None) -> None:
    """Record a finished step of ``parent``'s request."""
    s = start(name, parent.attrs["nimbus.request_id"], parent, start_ns=start_ns, attrs=attrs)
    end(s, error, end_ns)


def parent_of(rid: str, event: Any) -> Span | None:
    """The span a step of request ``rid`` hangs under: the one registered in
    :data:`active`, or (a request that came from a remote gateway) a stand-in
    for the span named by the event's ``traceparent`` header."""
    span = active.get(rid)
    if span is not None:
        return span
    remote = remote_parent(event)
    if remote is None:
        return None
    s = Span("", remote[0], 0, 0, {"nimbus.request_id": rid})
    s.span_id = remote[1]
    return s


def remote_parent(event: Any) -> tuple[int, int] | None:
    """``(trace_id, span_id)`` of the event's ``traceparent`` header, if any."""
    from nimbus.observe.traceids import parse_traceparent

    headers = event.get("headers") if isinstance(event, dict) else None
    value = headers.get("traceparent") if isinstance(headers, dict) else None
    if not isinstance(value, str):
        return None
    ids = parse_traceparent(value)
    return None if ids is None else (ids[0], ids[1])


def extract(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, int, str]:
    """``(trace_id, parent_span_id, tracestate)`` from an HTTP request's W3C
    headers through OpenTelemetry's TraceContext propagator; zeros and ""
    when there is none (or it is invalid)."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name == b"traceparent" or name == b"tracestate":
            carrier[name.decode("latin-1")] = value.decode("latin-1")
    if "traceparent" not in carrier:
        return 0, 0, ""
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    sc = otel_trace.get_current_span(
        TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    if not sc.is_valid:
        return 0, 0, ""
    return sc.trace_id, sc.span_id, sc.trace_state.to_header() if sc.trace_state else ""


def inject(span: Span, headers: dict[str, Any]) -> None:
    """Put ``span``'s W3C context into an event's (or a request's) headers."""
    headers["traceparent"] = span.traceparent
    if span.tracestate:
        headers["tracestate"] = span.tracestate
    else:
        headers.pop("tracestate", None)


# -- setup ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """``mode``: ``off``, ``file`` (JSON lines under ``<state>/traces/``) or
    ``otlp`` (OTLP/HTTP to ``otlp_endpoint``; also kept in memory for
    ``nimbus trace``)."""

    mode: str = DEFAULT_MODE
    otlp_endpoint: str | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    keep_files: int = DEFAULT_KEEP_FILES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"trace mode must be one of {', '.join(MODES)}, was: {self.mode!r}")
        if self.mode == "otlp" and not self.otlp_endpoint:
            raise ValueError("trace mode otlp needs an OTLP endpoint URL")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"OTLP endpoint must be an http:// or https:// URL, was: "
                             f"{self.otlp_endpoint!r}")
        if self.max_file_bytes < 4096:
            raise ValueError(f"max_file_bytes must be at least 4096, was: {self.max_file_bytes}")
        if self.keep_files < 1:
            raise ValueError(f"keep_files must be at least 1, was: {self.keep_files}")


def trace_config(mode: str | None, otlp_endpoint: str | None) -> TraceConfig:
    """The config for ``--trace MODE`` and ``--otlp-endpoint URL``: an endpoint
    alone means ``otlp``; no mode means the default (``file``)."""
    if mode is None:
        mode = "otlp" if otlp_endpoint else DEFAULT_MODE
    return TraceConfig(mode=mode, otlp_endpoint=otlp_endpoint)


def otlp_traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL (``http://collector:4318``) gets ``/v1/traces``;
    a URL that already names a path is used as it is."""
    rest = endpoint.split("://", 1)[1]
    if "/" in rest and rest.split("/", 1)[1]:
        return endpoint
    return endpoint.rstrip("/") + "/v1/traces"


class FileSink:
    """JSON lines in ``folder/traces.jsonl``, rotated at ``max_bytes`` into
    ``traces.jsonl.1`` .. ``.{keep}`` (the oldest dropped)."""

    def __init__(self, folder: Path, max_bytes: int, keep: int) -> None:
        self.folder = folder
        self.path = folder / FILE_NAME
        self.max_bytes = max_bytes
        self.keep = keep
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._size = self.path.stat().st_size if self.path.exists() else 0

    def write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self._size += len(data)

    def _rotate(self) -> None:
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else self.folder / f"{FILE_NAME}.{i - 1}"
            if src.exists():
                os.replace(src, self.folder / f"{FILE_NAME}.{i}")
        self._size = 0

    def files(self) -> list[Path]:
        """Oldest first."""
        out = [self.folder / f"{FILE_NAME}.{i}" for i in range(self.keep, 0, -1)]
        return [p for p in out + [self.path] if p.exists()]


class Exporter:
    """The background thread that takes finished spans off :data:`_done`."""

    def __init__(self, config: TraceConfig, folder: Path | None,
                 resource: Mapping[str, str]) -> None:
        self.config = config
        self.resource = dict(resource)
        self.file = (FileSink(folder, config.max_file_bytes, config.keep_files)
                     if config.mode == "file" and folder is not None else None)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._otlp: Any = None
        if config.mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            assert config.otlp_endpoint
            self._otlp = OTLPSpanExporter(endpoint=otlp_traces_url(config.otlp_endpoint),
                                          timeout=5)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one drain at a time (thread, flush())
        self._thread = threading.Thread(target=self._run, name="nimbus-traces", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY_S):
            self.flush()
        self.flush()

    def flush(self) -> None:
        with self._lock:
            batch: list[Span] = []
            while _done:
                try:
                    batch.append(_done.popleft())
                except IndexError:
                    break
            if not batch:
                return
            records = [s.to_json() for s in batch]
            self.recent.extend(records)
            try:
                if self.file is not None:
                    self.file.write([orjson.dumps(r) + b"\n" for r in records])
                if self._otlp is not None:
                    self._otlp.export(_to_sdk(batch, self.resource))
            except Exception:  # noqa: BLE001 - a lost batch must not stop tracing
                log.warning("exporting %d spans failed", len(batch), exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._otlp is not None:
            self._otlp.shutdown()

    def find(self, request_id: str) -> list[dict[str, Any]]:
        """Every span of the traces that ``request_id``'s spans belong to."""
        self.flush()
        records: list[dict[str, Any]] = list(self.recent)
        if self.file is not None:
            seen = {(r["trace_id"], r["span_id"]) for r in records}
            for path in self.file.files():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if request_id.encode() not in data:
                    continue
                for line in data.splitlines():
                    if request_id.encode() in line:
                        try:
                            r = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            continue
                        if (r.get("trace_id"), r.get("span_id")) not in seen:
                            records.append(r)
        return select(records, request_id)


def select(records: Iterable[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    """The spans of the traces that have a span of ``request_id``, by start."""
    records = list(records)
    traces = {r["trace_id"] for r in records
              if r.get("attributes", {}).get("nimbus.request_id") == request_id}
    out = {(r["trace_id"], r["span_id"]): r for r in records if r["trace_id"] in traces}
    return sorted(out.values(), key=lambda r: (r["start_ns"], r["end_ns"]))


def _to_sdk(batch: list[Span], resource: Mapping[str, str]) -> list[Any]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    res = Resource.create(dict(resource))
    scope = InstrumentationScope("nimbus")
    kinds = {KIND_INTERNAL: SpanKind.INTERNAL, KIND_SERVER: SpanKind.SERVER,
             KIND_CLIENT: SpanKind.CLIENT}
    flags = TraceFlags(TraceFlags.SAMPLED)
    out = []
    for s in batch:
        parent = (SpanContext(s.trace_id, s.parent_id, is_remote=True, trace_flags=flags)
                  if s.parent_id else None)
        out.append(ReadableSpan(
            name=s.name, context=SpanContext(s.trace_id, s.span_id, False, flags),
            parent=parent, resource=res, attributes=s.attrs, kind=kinds[s.kind],
            status=Status(StatusCode.ERROR, s.error) if s.error is not None
            else Status(StatusCode.UNSET),
            start_time=s.start_ns, end_time=s.end_ns, instrumentation_scope=scope))
    return out


_exporter: Exporter | None = None


def setup(config: TraceConfig, state_dir: Path | None, *, role: str = "up",
          region: str = "local") -> Exporter | None:
    """Start tracing for this process (replacing any earlier setup)."""
    global on, _exporter
    shutdown()
    if config.mode == "off":
        return None
    folder = state_dir / "traces" if state_dir is not None else None
    _exporter = Exporter(config, folder, {"service.name": "nimbus", "nimbus.role": role,
                                          "nimbus.region": region})
    on = True
    return _exporter


def shutdown() -> None:
    """Stop recording and export what is left."""
    global on, _exporter
    on = False
    active.clear()
    if _exporter is not None:
        _exporter.close()
        _exporter = None


def exporter() -> Exporter | None:
    return _exporter


def find_in_files(folder: Path, request_id: str) -> list[dict[str, Any]]:
    """The same as :meth:`Exporter.find`, from the files alone (tracing off now)."""
    paths = sorted(folder.glob(FILE_NAME + "*"), key=lambda p: -int(p.suffix[1:])
                   if p.suffix[1:].isdigit() else 0)
    records = []
    for path in paths:
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return select(records, request_id)
