"""The Lambda Runtime API, served to a custom runtime's ``bootstrap``.

A function with ``runtime: provided`` (or ``provided.al2023``) is any
executable named ``bootstrap`` in its code folder. Its instance is forked
from the zygote and contained like any other (uid, cgroup, private /tmp,
mount namespace), but instead of importing a handler it serves this API on
127.0.0.1 (a port of its own, in ``AWS_LAMBDA_RUNTIME_API``) and runs the
bootstrap as its child, which asks for invocations and posts their answers:

    GET  /2018-06-01/runtime/invocation/next            long-polls for the next event
    POST /2018-06-01/runtime/invocation/{id}/response   the result (202)
    POST /2018-06-01/runtime/invocation/{id}/error      a handler error (202)
    POST /2018-06-01/runtime/init/error                 the runtime could not start (202)

To its worker the instance speaks the same frames as a Python instance
(:mod:`nimbus.runtime.protocol`): READY when the bootstrap first asks for
an invocation (Lambda's end of init), RESULT / ERROR per invocation,
INIT_ERROR when it reports or dies during init, LOG for every line it
writes to its stdout or stderr, tagged with the invocation in flight. So
pools, timeouts (the worker kills the instance, its bootstrap with it),
metrics and logs treat it exactly as a Python instance.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from nimbus.observe.traceids import xray_from_traceparent
from nimbus.runtime import protocol as p

PREFIX = "/2018-06-01/runtime/"
NEXT = PREFIX + "invocation/next"
INIT_ERROR = PREFIX + "init/error"
INVOCATION = PREFIX + "invocation/"
MAX_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
# Address space a bootstrap may map beyond its memory: executables, shared
# libraries and locale files count in RLIMIT_AS though they are not memory.
# Without a memory cgroup (rlimits containment) the bootstrap's address
# space is capped at memory_mb plus this: runtimes reserve far more address
# space than they use (Node.js's code range, the JVM's class space).
BOOTSTRAP_AS_ALLOWANCE_MB = 4096
MAX_BUFFERED_BYTES = 3 * MAX_RESPONSE_BYTES  # a connection holding more is closed
OUTPUT_DRAIN_S = 0.5  # at most this long for a dead bootstrap's last output to be sent
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
            500: "Internal Server Error"}


class Sink(Protocol):
    """Where the API's outcomes go (the worker's frames, in an instance)."""

    def ready(self) -> None: ...
    def result(self, rid: str, result: Any) -> None: ...
    def error(self, rid: str, error: dict[str, Any], fatal: bool = False) -> None: ...
    def init_error(self, error: dict[str, Any]) -> None: ...


class Invocation:
    __slots__ = ("rid", "event", "deadline_ms", "trace_id")

    def __init__(self, rid: str, event: bytes, deadline_ms: int, trace_id: str | None) -> None:
        self.rid = rid
        self.event = event
        self.deadline_ms = deadline_ms
        self.trace_id = trace_id


def invocation_from_frame(body: bytes, now_wall: float) -> Invocation:
    """An INVOKE frame's ``[rid, timeout_s, event]`` as the runtime gets it:
    the deadline in Unix milliseconds, the trace id in X-Ray form."""
    rid, timeout_s, event = orjson.loads(body)
    headers = event.get("headers") if type(event) is dict else None
    tp = headers.get("traceparent") if type(headers) is dict else None
    xray = xray_from_traceparent(tp) if type(tp) is str else None
    return Invocation(rid, orjson.dumps(event), int((now_wall + timeout_s) * 1000), xray)


class RuntimeApi:
    """The API's state for one instance: at most one invocation waiting to
    be taken and one handed out, awaiting its answer."""

    def __init__(self, sink: Sink, arn: str,
                 on_handed: Callable[[str], None] | None = None,
                 peer_uid: int | None = None) -> None:
        """``peer_uid``: only connections from sockets of this uid are
        served (the function's own, when each function has a uid)."""
        self.sink = sink
        self.arn = arn
        self.peer_uid = peer_uid
        self.on_handed = on_handed  # an invocation went to the runtime (log tagging)
        self.initialised = False
        self.queued: Invocation | None = None
        self.current: Invocation | None = None
        self._waiter: _Connection | None = None  # its ``next`` is waiting
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening; a waiting ``next`` is let go unanswered."""
        if self.server is not None:
            self.server.close()
        w, self._waiter = self._waiter, None
        if w is not None and w.transport is not None:
            w.transport.close()

    # -- the worker's side ------------------------------------------------------

    def offer(self, inv: Invocation) -> None:
        """An invocation for the runtime: to its waiting ``next``, or kept
        for its next one."""
        w = self._waiter
        if w is not None:
            self._waiter = None
            self._hand(inv)
            w.deliver(inv)
        else:
            self.queued = inv

    def _hand(self, inv: Invocation) -> None:
        self.current = inv
        if self.on_handed is not None:
            self.on_handed(inv.rid)

    def fail_in_flight(self, error: dict[str, Any]) -> None:
        """The runtime is gone: its invocation, if any, fails with ``error``."""
        inv = self.current or self.queued
        self.current = self.queued = None
        if inv is not None:
            self.sink.error(inv.rid, {**error, "requestId": inv.rid}, True)

    # -- the runtime's side -----------------------------------------------------

    def next(self, conn: _Connection) -> Invocation | None:
        """The runtime asks for an invocation on ``conn``: one now, or None
        when ``conn`` is to wait for :meth:`offer`."""
        if not self.initialised:
            self.initialised = True
            self.sink.ready()
        if self.current is not None:
            rid = self.current.rid
            self.current = None
            self.sink.error(rid, {"errorMessage": "the runtime asked for the next invocation "
                                  "without answering this one",
                                  "errorType": "Runtime.NoResponse", "requestId": rid})
        inv = self.queued
        if inv is not None:
            self.queued = None
            self._hand(inv)
            return inv
        if self._waiter is not None and self._waiter is not conn:
            raise ApiError(400, "InvalidStateTransition",
                           "another request for the next invocation is already waiting")
        self._waiter = conn
        return None

    def answer(self, rid: str, kind: str, body: bytes, headers: dict[str, str]) -> None:
        inv = self.current
        if inv is None or inv.rid != rid:
            raise ApiError(400, "InvalidRequestID",
                           f"request id {rid!r} is not the invocation in flight")
        self.current = None
        if kind == "response":
            if len(body) > MAX_RESPONSE_BYTES:
                self.sink.error(rid, {
                    "errorMessage": f"response payload size ({len(body)} bytes) exceeded "
                                    f"the maximum allowed ({MAX_RESPONSE_BYTES} bytes)",
                    "errorType": "Function.ResponseSizeTooLarge", "requestId": rid})
                raise ApiError(413, "RequestEntityTooLarge", "response payload too large")
            self.sink.result(rid, _decode_result(body))
        else:
            self.sink.error(rid, error_from_runtime(rid, body, headers))

    def init_failed(self, body: bytes, headers: dict[str, str]) -> None:
        if self.initialised:
            raise ApiError(403, "InvalidStateTransition",
                           "init/error after the runtime asked for an invocation")
        self.initialised = True
        err = error_from_runtime(None, body, headers)
        self.sink.init_error(err)

    # -- HTTP -------------------------------------------------------------------

    def route(self, method: str, path: str, body: bytes, headers: dict[str, str],
              conn: _Connection) -> tuple[int, bytes, list[tuple[str, str]]] | None:
        """A request's answer (status, body, headers), or None: ``conn``
        waits for the next invocation."""
        try:
            if path == NEXT:
                if method != "GET":
                    raise ApiError(405, "MethodNotAllowed", f"{method} {path}")
                inv = self.next(conn)
                return None if inv is None else (200, inv.event, self.next_headers(inv))
            if method != "POST" and (path == INIT_ERROR or path.startswith(INVOCATION)):
                raise ApiError(405, "MethodNotAllowed", f"{method} {path}")
            if path == INIT_ERROR:
                self.init_failed(body, headers)
                return 202, b'{"status":"OK"}', []
            if path.startswith(INVOCATION):
                rid, _, kind = path[len(INVOCATION):].rpartition("/")
                if rid and "/" not in rid and kind in ("response", "error"):
                    self.answer(rid, kind, body, headers)
                    return 202, b'{"status":"OK"}', []
            raise ApiError(404, "NotFound", f"no such resource: {path}")
        except ApiError as exc:
            return exc.status, _error_json(exc), []

    def next_headers(self, inv: Invocation) -> list[tuple[str, str]]:
        h = [("Content-Type", "application/json"),
             ("Lambda-Runtime-Aws-Request-Id", inv.rid),
             ("Lambda-Runtime-Deadline-Ms", str(inv.deadline_ms)),
             ("Lambda-Runtime-Invoked-Function-Arn", self.arn)]
        if inv.trace_id is not None:
            h.append(("Lambda-Runtime-Trace-Id", inv.trace_id))
        return h


def socket_uid(peer: tuple[str, int], own: tuple[str, int],
               table: str = "/proc/self/net/tcp") -> int | None:
    """The uid owning the loopback socket at ``peer`` connected to ``own``,
    from the kernel's TCP table (SO_PEERCRED is for Unix sockets only)."""
    local = f"{_hex_addr(peer[0])}:{peer[1]:04X}"
    remote = f"{_hex_addr(own[0])}:{own[1]:04X}"
    try:
        with open(table) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                    return int(fields[7])
    except (OSError, ValueError):
        pass
    return None


def _hex_addr(ip: str) -> str:
    return f"{struct.unpack('=I', socket.inet_aton(ip))[0]:08X}"


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _error_json(exc: ApiError) -> bytes:
    return orjson.dumps({"errorMessage": str(exc), "errorType": exc.kind})


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise ApiError(400, "BadRequest", "malformed request line") from None
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ApiError(400, "BadRequest", "malformed header line")
            headers[name.strip().lower()] = value.strip()
    return method, target.partition("?")[0], version, headers


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from the runtime (kept alive or not),
    parsed as it arrives: no task per request."""

    def __init__(self, api: RuntimeApi) -> None:
        self.api = api
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting: bool | None = None  # a ``next`` waits; True: close after its answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.api.peer_uid is not None and socket_uid(
                transport.get_extra_info("peername"),
                transport.get_extra_info("sockname")) != self.api.peer_uid:
            transport.close()  # another function's process: not its API
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.api._waiter is self:
            self.api._waiter = None  # an invocation offered now is kept for the next ``next``

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > MAX_BUFFERED_BYTES and self.transport is not None:
            self.transport.close()  # more than any request may hold, in any state
            self.transport = None
            return
        if self.waiting is None:
            self._process()

    def _process(self) -> None:
        while self.waiting is None and self.transport is not None:
            try:
                request = take_request(self.buf)
            except ApiError as exc:
                self._write(exc.status, _error_json(exc), [], True)
                return
            if request is None:
                return
            method, path, version, headers, body = request
            close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
            out = self.api.route(method, path, body, headers, self)
            if out is None:
                self.waiting = close
                return
            self._write(*out, close)

    def deliver(self, inv: Invocation) -> None:
        """The invocation this connection's ``next`` waited for."""
        close = bool(self.waiting)
        self.waiting = None
        self._write(200, inv.event, self.api.next_headers(inv), close)
        if self.buf:
            self._process()

    def _write(self, status: int, body: bytes, headers: list[tuple[str, str]],
               close: bool) -> None:
        t = self.transport
        if t is None:
            return
        t.write(_response(status, body, headers, close))
        if close:
            t.close()
            self.transport = None


def take_request(buf: bytearray) -> tuple[str, str, str, dict[str, str], bytes] | None:
    """The first complete request in ``buf`` (removed from it), or None
    while it is incomplete. Raises ApiError for a malformed one."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise ApiError(400, "BadRequest", "request head too large")
        return None
    method, path, version, headers = _parse_head(bytes(buf[:end]))
    start = end + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        got = _chunked(buf, start)
        if got is None:
            return None
        body, stop = got
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise ApiError(400, "BadRequest", "malformed Content-Length") from None
        if length < 0 or length > 2 * MAX_RESPONSE_BYTES:
            raise ApiError(413, "RequestEntityTooLarge", "body too large")
        stop = start + length
        if len(buf) < stop:
            return None
        body = bytes(buf[start:stop])
    del buf[:stop]
    return method, path, version, headers, body


def _chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at ``pos``: (body, where it ends), or None
    while incomplete (spans are found first, bytes copied once at the end)."""
    spans: list[tuple[int, int]] = []
    size = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";")[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise ApiError(400, "BadRequest", "malformed chunk size")
        n = int(size_text, 16)
        pos = eol + 2
        if n == 0:
            while True:  # trailers, up to an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(bytes(buf[a:b]) for a, b in spans), eol + 2
                pos = eol + 2
        size += n
        if size > 2 * MAX_RESPONSE_BYTES:
            raise ApiError(413, "RequestEntityTooLarge", "body too large")
        if len(buf) < pos + n + 2:
            return None
        if buf[pos + n:pos + n + 2] != b"\r\n":
            raise ApiError(400, "BadRequest", "a chunk does not end where its size says")
        spans.append((pos, pos + n))
        pos += n + 2


def _response(status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
              close: bool = False) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Length: {len(body)}"]
    if not headers or headers[0][0] != "Content-Type":
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in headers or ()]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _decode_result(body: bytes) -> Any:
    """The runtime's response as the invocation's result: JSON as a value,
    anything else as its text (Lambda passes the bytes through)."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


def error_from_runtime(rid: str | None, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """A posted error as a Python handler's error looks (``errorMessage``,
    ``errorType``, ``requestId``); the type from the body, else from the
    ``Lambda-Runtime-Function-Error-Type`` header, else ``Unhandled``."""
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        doc = {"errorMessage": body.decode("utf-8", errors="replace")}
    if not isinstance(doc, dict):
        doc = {"errorMessage": str(doc)}
    kind = doc.get("errorType") or headers.get("lambda-runtime-function-error-type") \
        or "Unhandled"
    err: dict[str, Any] = {"errorMessage": str(doc.get("errorMessage", "")),
                           "errorType": str(kind)}
    if rid is not None:
        err["requestId"] = rid
    if isinstance(doc.get("stackTrace"), list):
        err["stackTrace"] = [str(line) for line in doc["stackTrace"]]
    return err


# -- the instance ----------------------------------------------------------------


class _Frames:
    """The API's outcomes as frames to the worker (blocking sends, one lock:
    the descriptor reader thread sends LOG frames too)."""

    def __init__(self, sock: socket.socket, function: str) -> None:
        self.sock = sock
        self.function = function
        self.lock = threading.Lock()

    def send(self, kind: int, payload: bytes) -> None:
        data = p.frame(kind, payload)
        with self.lock:
            self.sock.sendall(data)

    def ready(self) -> None:
        self.send(p.READY, orjson.dumps({"pid": os.getpid()}))

    def result(self, rid: str, result: Any) -> None:
        self.send(p.RESULT, orjson.dumps([rid, result]))

    def error(self, rid: str, error: dict[str, Any], fatal: bool = False) -> None:
        trace = error.pop("stackTrace", None)
        if trace is not None:
            # the error document's stack trace goes to the function's log, as
            # a Python handler's traceback does (the Invoke API reads it
            # there); the answer itself is the same shape as a Python error
            fields = {**error, "stackTrace": trace}
            text = f"[ERROR] {error.get('errorType')}: {error.get('errorMessage')}\n" + \
                "".join(f"  {line}\n" for line in trace)
            self.send(p.LOG, orjson.dumps([rid, "stderr", text, "ERROR", fields]))
        self.send(p.ERROR, orjson.dumps([rid, error, fatal] if fatal else [rid, error]))

    def init_error(self, error: dict[str, Any]) -> None:
        self.send(p.INIT_ERROR, orjson.dumps(
            {**error, "function": self.function, "failure": "custom runtime failed to start"}))


def run_instance(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Serve the Runtime API to the function's bootstrap until the worker
    hangs up or the bootstrap exits. The caller ``os._exit``s after."""
    from nimbus.runtime.bootstrap import _apply_spec
    from nimbus.runtime.capture import RequestIds, capture_fds

    frames = _Frames(sock, spec["function"])
    ids = RequestIds(one_at_a_time=True)

    def send_log(rid: str | None, stream: str, text: str) -> None:
        frames.send(p.LOG, orjson.dumps([rid, stream, text]))

    drain_output = capture_fds(send_log, ids)  # the bootstrap writes to our fds 1 and 2
    _apply_spec(spec)
    asyncio.run(_serve_instance(sock, frames, ids, spec, drain_output))


async def _serve_instance(sock: socket.socket, frames: _Frames, ids: Any,
                          spec: dict[str, Any], drain_output: Callable[[float], None]) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    # With a uid per function, only the function's own processes may use the
    # API: loopback is shared with every other instance on the node.
    # Only processes of this uid may use the API: under full containment that
    # is the function's own uid; otherwise nimbus's (other users are kept out).
    full = (spec.get("contain") or {}).get("mode") == "full"
    api = RuntimeApi(frames, spec["arn"], ids.begin, os.getuid())
    port = await api.start()
    env = dict(os.environ, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{port}")
    # Memory: the cgroup bounds the bootstrap and its children under full
    # containment. Otherwise a soft address-space limit is set on this
    # process around the fork, so the bootstrap starts with it (and what it
    # forks at once inherits it), then ours is put back.
    limit = (spec["memory_mb"] + BOOTSTRAP_AS_ALLOWANCE_MB) * 1024 * 1024
    ours = resource.getrlimit(resource.RLIMIT_AS)
    try:
        if not full:
            hard = ours[1]
            resource.setrlimit(resource.RLIMIT_AS, (
                limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        proc = subprocess.Popen(  # noqa: ASYNC220 - fork + exec; its exit is awaited below
            [spec["bootstrap"]], cwd=spec["code_dir"], env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        frames.init_error({"errorMessage": f"could not run bootstrap: {exc}",
                           "errorType": "Runtime.InvalidEntrypoint"})
        return
    finally:
        if not full:
            resource.setrlimit(resource.RLIMIT_AS, ours)

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def exited(code: int) -> None:
        what = (f"bootstrap exited with status {code}" if code >= 0
                else f"bootstrap was killed by signal {-code}")
        if not api.initialised:
            api.initialised = True
            frames.init_error({"errorMessage": f"{what} before asking for an invocation",
                               "errorType": "Runtime.ExitError"})
        else:
            api.fail_in_flight({"errorMessage": f"{what} during the invocation",
                                "errorType": "Runtime.ExitError"})
        finish()

    def on_init_error(error: dict[str, Any]) -> None:
        real(error)
        finish()  # as Lambda: a runtime that reported its failure is ended

    real = frames.init_error
    frames.init_error = on_init_error  # type: ignore[method-assign]

    def wait_exit() -> None:
        code = proc.wait()
        drain_output(OUTPUT_DRAIN_S)  # its last lines are logged before its exit is told
        loop.call_soon_threadsafe(exited, code)

    # INVOKE frames are read on the loop itself (no thread hop per
    # invocation). The socket stays blocking for the descriptor thread's
    # LOG sends; it is only read when readable.
    fd = sock.fileno()
    buf = bytearray()

    def readable() -> None:
        nonlocal buf
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            finish()  # the worker hung up
            return
        buf += data
        while len(buf) >= p.HEADER_SIZE:
            size, kind = p.HEADER.unpack_from(buf)
            if size > p.MAX_FRAME:
                loop.remove_reader(fd)
                finish()
                return
            end = p.HEADER_SIZE + size
            if len(buf) < end:
                break
            body = bytes(buf[p.HEADER_SIZE:end])
            del buf[:end]
            if kind == p.INVOKE:
                api.offer(invocation_from_frame(body, time.time()))

    threading.Thread(target=wait_exit, name="nimbus-bootstrap-wait", daemon=True).start()
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
