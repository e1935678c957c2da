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
BOOTSTRAP_AS_ALLOWANCE_MB = 512

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
        self._waiter: asyncio.Future[Invocation] | None = None
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port."""
        self.server = await asyncio.start_server(self._serve, host, port,
                                                 limit=MAX_HEAD_BYTES)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening; a waiting ``next`` is let go unanswered."""
        if self.server is not None:
            self.server.close()
        if self._waiter is not None:
            self._waiter.cancel()

    # -- the worker's side ------------------------------------------------------

    def offer(self, inv: Invocation) -> None:
        """An invocation for the runtime: to its waiting ``next``, or kept
        for its next one."""
        w = self._waiter
        if w is not None and not w.done():
            self._waiter = None
            self._hand(inv)
            w.set_result(inv)
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

    async def next(self) -> Invocation:
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
        if self._waiter is not None and not self._waiter.done():
            raise ApiError(400, "InvalidStateTransition",
                           "another request for the next invocation is already waiting")
        w: asyncio.Future[Invocation] = asyncio.get_running_loop().create_future()
        self._waiter = w
        try:
            return await w
        finally:
            if self._waiter is w:
                self._waiter = None

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.peer_uid is not None:
                peer = writer.get_extra_info("peername")
                own = writer.get_extra_info("sockname")
                if socket_uid(peer, own) != self.peer_uid:
                    return  # another function's process: not its API
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ConnectionError):
                    return
                try:
                    method, path, version, headers = _parse_head(head)
                    body = await _read_body(reader, headers)
                except ApiError as exc:
                    writer.write(_response(exc.status, _error_json(exc), close=True))
                    return
                try:
                    status, payload, extra = await self._route(method, path, body, headers)
                except asyncio.CancelledError:
                    return  # the API is closing: a waiting ``next`` gets nothing
                close = (version == "HTTP/1.0" or headers.get("connection", "").lower()
                         == "close")
                writer.write(_response(status, payload, extra, close))
                if close:
                    return
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes, headers: dict[str, str]
                     ) -> tuple[int, bytes, list[tuple[str, str]]]:
        try:
            if path == NEXT:
                if method != "GET":
                    raise ApiError(405, "MethodNotAllowed", f"{method} {path}")
                inv = await self.next()
                return 200, inv.event, self._next_headers(inv)
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

    def _next_headers(self, inv: Invocation) -> list[tuple[str, str]]:
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


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            size = 0
            while True:
                n = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if n == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    return b"".join(parts)
                size += n
                if size > MAX_RESPONSE_BYTES + 1:
                    raise ApiError(413, "RequestEntityTooLarge", "body too large")
                parts.append(await reader.readexactly(n))
                await reader.readexactly(2)
        length = int(headers.get("content-length", "0"))
    except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise ApiError(400, "BadRequest", "malformed body") from None
    if length < 0 or length > 2 * MAX_RESPONSE_BYTES:
        raise ApiError(413, "RequestEntityTooLarge", "body too large")
    try:
        return await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise ApiError(400, "BadRequest", "body shorter than its Content-Length") from None


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
    elif isinstance(doc.get("stackTrace"), list):
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

    capture_fds(send_log, ids)  # the bootstrap writes to our fds 1 and 2
    _apply_spec(spec)
    asyncio.run(_serve_instance(sock, frames, ids, spec))


async def _serve_instance(sock: socket.socket, frames: _Frames, ids: Any,
                          spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    # With a uid per function, only the function's own processes may use the
    # API: loopback is shared with every other instance on the node.
    full = (spec.get("contain") or {}).get("mode") == "full"
    api = RuntimeApi(frames, spec["arn"], ids.begin, os.getuid() if full else None)
    port = await api.start()
    env = dict(os.environ, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{port}")
    try:
        proc = subprocess.Popen(  # noqa: ASYNC220 - fork + exec; its exit is awaited below
            [spec["bootstrap"]], cwd=spec["code_dir"], env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        frames.init_error({"errorMessage": f"could not run bootstrap: {exc}",
                           "errorType": "Runtime.InvalidEntrypoint"})
        return
    limit = (spec["memory_mb"] + BOOTSTRAP_AS_ALLOWANCE_MB) * 1024 * 1024
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
    except OSError:
        pass  # it has already exited: noticed below

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
