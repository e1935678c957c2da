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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("nimbus.tracing")

MODES = ("off", "file", "otlp", "region")  # region: only to the region's stream
DEFAULT_MODE = "off"  # see docs/architecture.md, "Traces": the file costs more than its goal
FILE_NAME = "traces.jsonl"
DEFAULT_MAX_FILE_BYTES = 8 * 1024 * 1024
DEFAULT_KEEP_FILES = 3
MAX_PENDING = 100_000  # finished spans waiting for the exporter; beyond, the oldest go
RECENT_BYTES = 16 * 1024 * 1024  # exported spans kept in memory for `nimbus trace`
FLUSH_EVERY_S = 0.1

KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = "internal", "server", "client"

# -- the switch and the request path's state ----------------------------------

on = False
# request id -> the span that steps of that request hang under (set by the
# gateway or the async dispatcher, read by the pool)
active: dict[str, Span] = {}
# Finished spans as JSON-ready dicts (ids already hex): the exporter thread
# turns a whole batch into bytes with one orjson call, so it holds the GIL
# for one short C call per batch, never for a Python loop the event loop
# would have to wait behind.
_done: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING)
_now_ns = time.time_ns
_IDS_PER_BLOCK = 512


def _hex_ids(digits: int) -> Iterator[str]:
    """Random non-zero ids of ``digits`` hex digits, cut from one
    ``os.urandom(...).hex()`` per 512 ids: a slice of a ready string costs
    the request path less than formatting a fresh random int per id."""
    zero = "0" * digits
    while True:
        block = os.urandom(digits // 2 * _IDS_PER_BLOCK).hex()
        for i in range(0, len(block), digits):
            got = block[i:i + digits]
            if got != zero:
                yield got


_new_span_id = _hex_ids(16).__next__
_new_trace_id = _hex_ids(32).__next__


def _reseed_ids() -> None:
    """A forked child must not hand out its parent's next ids."""
    global _new_span_id, _new_trace_id
    _new_span_id = _hex_ids(16).__next__
    _new_trace_id = _hex_ids(32).__next__


os.register_at_fork(after_in_child=_reseed_ids)


class Span:
    """A span still open (the request's, an async attempt's); its steps are
    recorded finished, straight into the exporter's queue (:func:`child`)."""

    __slots__ = ("trace_id", "span_id", "parent_id", "name", "start_ns", "attrs", "kind",
                 "tracestate")

    def __init__(self, name: str, trace_id: str, parent_id: str | None, start_ns: int,
                 attrs: dict[str, Any], kind: str = KIND_INTERNAL) -> None:
        self.trace_id = trace_id
        self.span_id = _new_span_id()
        self.parent_id = parent_id
        self.name = name
        self.start_ns = start_ns
        self.attrs = attrs
        self.kind = kind
        self.tracestate = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"


def start(name: str, rid: str, parent: Span | None = None, *, trace_id: int = 0,
          parent_id: int = 0, kind: str = KIND_INTERNAL, start_ns: int = 0,
          attrs: dict[str, Any] | None = None) -> Span:
    """A span begun now (or at ``start_ns``): under ``parent``, or under the
    remote ``trace_id``/``parent_id``, or a new trace's root. ``attrs``
    becomes the span's own (not copied: pass a fresh dict)."""
    if attrs is None:
        a = {"nimbus.request_id": rid}
    else:
        a = attrs
        a["nimbus.request_id"] = rid
    if parent is not None:
        return Span(name, parent.trace_id, parent.span_id, start_ns or _now_ns(), a, kind)
    if trace_id:
        return Span(name, f"{trace_id:032x}", f"{parent_id:016x}" if parent_id else None,
                    start_ns or _now_ns(), a, kind)
    return Span(name, _new_trace_id(), None, start_ns or _now_ns(), a, kind)


def end(span: Span, error: str | None = None, end_ns: int = 0) -> None:
    # deque.append is atomic: the exporter thread pops
    _done.append({"trace_id": span.trace_id, "span_id": span.span_id,
                  "parent_id": span.parent_id, "name": span.name, "kind": span.kind,
                  "start_ns": span.start_ns, "end_ns": end_ns or _now_ns(),
                  "attributes": span.attrs, "status": "ok" if error is None else "error",
                  "error": error})


def child(parent: Span, name: str, start_ns: int, end_ns: int, error: str | None = None,
          attrs: dict[str, Any] | None = None) -> None:
    """Record a finished step of ``parent``'s request; ``attrs`` becomes the
    step's own (not copied: pass a fresh dict)."""
    if attrs is None:
        a = {"nimbus.request_id": parent.attrs["nimbus.request_id"]}
    else:
        a = attrs
        a["nimbus.request_id"] = parent.attrs["nimbus.request_id"]
    _done.append({"trace_id": parent.trace_id, "span_id": _new_span_id(),
                  "parent_id": parent.span_id, "name": name, "kind": KIND_INTERNAL,
                  "start_ns": start_ns, "end_ns": end_ns, "attributes": a,
                  "status": "ok" if error is None else "error", "error": error})


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
    s = Span("", f"{remote[0]:032x}", None, 0, {"nimbus.request_id": rid})
    s.span_id = f"{remote[1]:016x}"
    return s


def begin_remote(rid: str, traceparent: str) -> bool:
    """Steps of request ``rid`` hang under the remote span ``traceparent``
    (a gateway's, sent with the call) until ``active.pop(rid)``; False when
    the value is not a valid ``traceparent``."""
    from nimbus.observe.traceids import parse_traceparent

    ids = parse_traceparent(traceparent)
    if ids is None:
        return False
    s = Span("", f"{ids[0]:032x}", None, 0, {"nimbus.request_id": rid})
    s.span_id = f"{ids[1]:016x}"
    active[rid] = s
    return True


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
    when there is none (or it is invalid, or sent twice)."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name == b"traceparent":
            if "traceparent" in carrier:
                return 0, 0, ""  # sent twice: invalid (W3C), start a new trace
            carrier["traceparent"] = value.decode("latin-1")
        elif name == b"tracestate":
            # several tracestate headers are one comma-separated list
            text = value.decode("latin-1")
            carrier["tracestate"] = (carrier["tracestate"] + "," + text
                                     if "tracestate" in carrier else text)
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
    ``nimbus trace``); ``region`` (a region's processes: only to the region's
    trace stream, :mod:`nimbus.observe.natstraces`)."""

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
    alone means ``otlp``; no mode means the default (``off``)."""
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
        self._fd = -1  # kept open between batches: one write a batch, not three calls

    def write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, data)
        self._size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        self.close()
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
        # exported batches, newest last, as the file has them (bytes: nothing
        # for the garbage collector to scan), at most RECENT_BYTES of them
        self.recent: deque[bytes] = deque()
        self._recent_bytes = 0
        self._otlp: Any = None
        if config.mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            assert config.otlp_endpoint
            self._otlp = OTLPSpanExporter(endpoint=otlp_traces_url(config.otlp_endpoint),
                                          timeout=5)
        # more homes for every batch (a region's trace stream): called on
        # this thread with the batch's bytes, they must only hand it on
        self.sinks: tuple[Callable[[bytes], None], ...] = ()
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
            # only this drain (one at a time) takes from the left, and a full
            # deque drops as many as it gains: the first len() are there
            batch = [_done.popleft() for _ in range(len(_done))]
            if not batch:
                return
            try:
                data = orjson.dumps(batch, option=orjson.OPT_APPEND_NEWLINE)
            except TypeError:  # an attribute value orjson cannot write: one by one
                data = b"[" + b",".join(orjson.dumps(r, default=str) for r in batch) + b"]\n"
            for sink in self.sinks:
                sink(data)
            if self.file is None and not self.sinks:  # else `nimbus trace` reads those
                self.recent.append(data)
                self._recent_bytes += len(data)
                while self._recent_bytes > RECENT_BYTES and len(self.recent) > 1:
                    self._recent_bytes -= len(self.recent.popleft())
            try:
                if self.file is not None:
                    self.file.write([data])
                if self._otlp is not None:
                    self._otlp.export(_to_sdk(batch, self.resource))
            except Exception:  # noqa: BLE001 - a lost batch must not stop tracing
                log.warning("exporting %d spans failed", len(batch), exc_info=True)

    def add_sink(self, sink: Callable[[bytes], None]) -> None:
        self.sinks = (*self.sinks, sink)

    def remove_sink(self, sink: Callable[[bytes], None]) -> None:
        self.sinks = tuple(s for s in self.sinks if s is not sink)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.file is not None:
            with self._lock:
                self.file.close()
        if self._otlp is not None:
            self._otlp.shutdown()

    def find(self, request_id: str) -> list[dict[str, Any]]:
        """Every span of the traces that ``request_id``'s spans belong to."""
        self.flush()
        lines = list(self.recent)
        if self.file is not None:
            for path in self.file.files():
                try:
                    lines.extend(path.read_bytes().splitlines())
                except OSError:
                    continue
        return select(_parse(lines, request_id), request_id)


def _parse(lines: list[bytes], request_id: str) -> list[dict[str, Any]]:
    """The spans of the batches (JSON arrays, one a line) that may belong to
    ``request_id``'s traces: those naming it, then those naming one of their
    trace ids."""
    def spans(chosen: Iterable[bytes]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in chosen:
            try:
                got = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(got, list):
                out.extend(r for r in got if isinstance(r, dict))
        return out
    rid = request_id.encode()
    traces = {r["trace_id"].encode() for r in spans(x for x in lines if rid in x)
              if isinstance(r.get("trace_id"), str)}
    return spans(x for x in lines if any(t in x for t in traces))


def select(records: Iterable[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    """The spans of the traces that have a span of ``request_id``, by start."""
    records = list(records)
    traces = {r.get("trace_id") for r in records
              if (r.get("attributes") or {}).get("nimbus.request_id") == request_id}
    out = {(r["trace_id"], r.get("span_id")): r for r in records
           if r.get("trace_id") in traces}
    return sorted(out.values(), key=lambda r: (r["start_ns"], r["end_ns"]))


def _to_sdk(batch: list[dict[str, Any]], resource: Mapping[str, str]) -> list[Any]:
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
    for r in batch:
        trace_id = int(r["trace_id"], 16)
        parent = (SpanContext(trace_id, int(r["parent_id"], 16), is_remote=True,
                              trace_flags=flags) if r["parent_id"] else None)
        error = r["error"]
        out.append(ReadableSpan(
            name=r["name"], context=SpanContext(trace_id, int(r["span_id"], 16), False, flags),
            parent=parent, resource=res, attributes=r["attributes"], kind=kinds[r["kind"]],
            status=Status(StatusCode.ERROR, error) if error is not None
            else Status(StatusCode.UNSET),
            start_time=r["start_ns"], end_time=r["end_ns"], instrumentation_scope=scope))
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
    lines: list[bytes] = []
    for path in paths:
        try:
            lines.extend(path.read_bytes().splitlines())
        except OSError:
            continue
    return select(_parse(lines, request_id), request_id)
