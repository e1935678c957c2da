"""The loop that runs inside an instance process.

The zygote forks, then calls :func:`run_instance` in the child with the
socket to its worker and the instance's spec. The instance prepares its
environment (code folder, requirements, env vars, temporary directory),
imports the handler, says READY, then answers INVOKE frames until its worker
hangs up. Anything printed while a handler runs goes back as LOG frames
tagged with the invocation's request id.
"""

from __future__ import annotations

import functools
import importlib
import os
import resource
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import orjson

from nimbus.observe.traceids import ENV_NAME as TRACE_ENV
from nimbus.observe.traceids import xray_from_traceparent
from nimbus.runtime import lambdalog
from nimbus.runtime import protocol as p
from nimbus.runtime.capture import LogWriter, RequestIds, capture_fds
from nimbus.runtime.context import LambdaContext

_HEADER = p.HEADER
_HS = p.HEADER_SIZE


def error_body(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """The Lambda-shaped error: what a client sees for a handler exception."""
    body: dict[str, Any] = {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
    }
    if request_id is not None:
        body["requestId"] = request_id
    return body


class _Channel:
    """Blocking framed I/O on the worker socket; sends are serialised by a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=65536)
        self._lock = threading.Lock()

    def send(self, kind: int, payload: bytes) -> None:
        data = p.frame(kind, payload)
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> tuple[int, bytes] | None:
        head = self.rfile.read(_HS)
        if len(head) < _HS:
            return None
        size, kind = _HEADER.unpack(head)
        if size > p.MAX_FRAME:
            return None  # garbage: treat as a hang-up
        body = self.rfile.read(size)
        if len(body) < size:
            return None
        return kind, body


def _apply_spec(spec: dict[str, Any]) -> None:
    code_dir = spec["code_dir"]
    for path in reversed(spec.get("sys_path", [])):
        sys.path.insert(0, path)
    sys.path.insert(0, code_dir)
    os.chdir(code_dir)
    os.makedirs(spec["tmp_dir"], mode=0o700, exist_ok=True)
    os.environ.clear()  # the platform's environment is not the function's
    os.environ.update(spec["env"])
    time.tzset()
    tempfile.tempdir = None  # chosen again from TMPDIR on first use


def _limit_memory(memory_mb: int) -> None:
    # RLIMIT_AS counts address space, not RSS. Measuring it after the handler
    # module is imported and adding memory_mb gives the handler memory_mb of
    # room for its own allocations; MemoryError is reported as a limit error.
    with open("/proc/self/statm") as f:
        vm_pages = int(f.read().split()[0])
    base = vm_pages * os.sysconf("SC_PAGE_SIZE")
    limit = base + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_instance(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Serve invocations on ``sock`` until the worker hangs up. Never returns
    normally into the zygote's code: the caller must ``os._exit`` after."""
    channel = _Channel(sock)
    concurrency = spec.get("concurrency", 1)
    ids = RequestIds(one_at_a_time=concurrency == 1)

    def send_log(rid: str | None, stream: str, text: str, level: str | None = None,
                 fields: dict[str, Any] | None = None) -> None:
        frame = [rid, stream, text] if level is None else [rid, stream, text, level, fields]
        channel.send(p.LOG, orjson.dumps(frame, default=str))

    # Before the import, so that logging handlers set up at import time
    # write to the invocation logs too; init output has no request id.
    sys.stdout = LogWriter(send_log, "stdout", ids)
    sys.stderr = LogWriter(send_log, "stderr", ids)
    capture_fds(send_log, ids)
    try:
        _apply_spec(spec)
        lambdalog.install(send_log, ids.current, os.environ)
        module = importlib.import_module(spec["module"])
        handler = getattr(module, spec["callable"])
        if not callable(handler):
            raise TypeError(f"{spec['module']}.{spec['callable']} is not callable")
    except BaseException as exc:  # noqa: BLE001 - any import failure is the user's
        body = error_body(exc)
        body["stackTrace"] = traceback.format_exception(type(exc), exc, _user_frames(exc))
        body.update(_failing_line(exc, spec))
        channel.send(p.INIT_ERROR, orjson.dumps(body))
        return
    invoke = functools.partial(_invoke_one, channel, handler, _context_factory(spec), ids)
    if concurrency > 1:
        pool = _started_pool(concurrency)  # thread stacks count in RLIMIT_AS
        _limit_memory(spec["memory_mb"])
        channel.send(p.READY, orjson.dumps({"pid": os.getpid()}))
        with pool:
            _serve(channel, functools.partial(pool.submit, invoke))
    else:
        _limit_memory(spec["memory_mb"])
        channel.send(p.READY, orjson.dumps({"pid": os.getpid()}))
        _serve(channel, invoke)


def _context_factory(spec: dict[str, Any]) -> Callable[..., LambdaContext]:
    name = spec["function"]
    version = str(spec["version"])
    memory = spec["memory_mb"]
    arn = spec["arn"]
    group = f"/aws/lambda/{name}"
    stream = spec["instance_id"]

    def make(request_id: str, deadline: float, traceparent: str | None = None,
             trace_id: str | None = None) -> LambdaContext:
        return LambdaContext(request_id, deadline, name, version, memory, arn, group, stream,
                             traceparent, trace_id)

    return make


# Lambda's limit on a synchronous response, in bytes of JSON (6 MB and a
# little: its own figure).
RESPONSE_LIMIT_BYTES = 6_291_556
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME


def _lambda_default(o: Any) -> Any:
    """What Lambda's Python runtime writes beyond plain JSON: a Decimal (as
    boto3's DynamoDB resource returns numbers) as a number."""
    import decimal

    if isinstance(o, decimal.Decimal):
        return float(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def result_frame(rid: str, result: Any) -> bytes:
    """``[rid, result]`` as JSON, written as Lambda's runtime writes a
    handler's result (``json.dumps`` with Decimals as numbers): keys that
    are not strings become strings, a datetime is refused, and integers past
    64 bits stay exact. ``TypeError`` if it cannot be written."""
    try:  # the common case at full speed: non-string keys cost orjson half again
        return orjson.dumps([rid, result], default=_lambda_default, option=_PASSTHROUGH)
    except TypeError:
        pass
    try:
        return orjson.dumps([rid, result], default=_lambda_default,
                            option=_PASSTHROUGH | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # e.g. an integer past 64 bits: Python's json writes it
        import json

        try:
            return json.dumps([rid, result], default=_lambda_default, allow_nan=False,
                              separators=(",", ":")).encode()
        except ValueError as exc:  # NaN or a circular reference
            raise TypeError(str(exc)) from None


def _invoke_one(
    channel: _Channel,
    handler: Callable[[Any, Any], Any],
    make_context: Callable[..., LambdaContext],
    ids: RequestIds,
    body: bytes,
    received: float,
) -> None:
    rid, timeout_s, event = orjson.loads(body)
    ids.begin(rid)
    fatal = False
    traceparent, xray = _trace_of(event)
    try:
        # The deadline came as a duration: counted from the frame's arrival
        # on this process's monotonic clock.
        result = handler(event, make_context(rid, received + timeout_s, traceparent, xray))
        try:
            payload = result_frame(rid, result)
            kind = p.RESULT
        except TypeError as exc:
            kind, payload = p.ERROR, _error_frame(
                rid, f"Unable to marshal response: {exc}", "Runtime.MarshalError")
        else:
            if len(payload) - len(rid) - 5 > RESPONSE_LIMIT_BYTES:
                kind, payload = p.ERROR, _error_frame(
                    rid, f"Response payload size exceeded maximum allowed payload size "
                         f"({RESPONSE_LIMIT_BYTES} bytes).", "Function.ResponseSizeTooLarge")
    except MemoryError:
        fatal = True  # the heap may be in any state: answer, then leave
        kind, payload = p.ERROR, _error_frame(
            rid, f"function exceeded its memory limit of "
                 f"{make_context(rid, 0).memory_limit_in_mb} MB", "Runtime.OutOfMemory", fatal)
    except (SystemExit, KeyboardInterrupt) as exc:
        # Lambda restarts its runtime here; the instance is still sound, so
        # it answers and keeps serving (its other invocations are untouched).
        kind, payload = p.ERROR, _error_frame(
            rid, f"handler exited: {type(exc).__name__}({exc})", "Runtime.ExitError")
    except Exception as exc:  # noqa: BLE001 - the user's handler failed
        _log_uncaught(channel, rid, exc)
        kind = p.ERROR
        payload = orjson.dumps([rid, error_body(exc, rid)])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        ids.end()
    channel.send(kind, payload)
    if fatal:
        os._exit(3)


def _failing_line(exc: BaseException, spec: dict[str, Any]) -> dict[str, Any]:
    """Where in the function's own code an import failed: the innermost
    frame under its code folder (a syntax error's own file and line)."""
    code_dir = os.path.realpath(spec["code_dir"]) + os.sep
    where: dict[str, Any] = {"function": spec.get("function")}
    found: tuple[str | None, int | None] = (None, None)
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.realpath(frame.filename).startswith(code_dir):
            found = (frame.filename, frame.lineno)
    if isinstance(exc, SyntaxError) and exc.filename and \
            os.path.realpath(exc.filename).startswith(code_dir):
        found = (exc.filename, exc.lineno)
    if found[0] is not None:
        where["file"] = os.path.relpath(os.path.realpath(found[0]), code_dir)
        where["line"] = found[1]
    return where


def _user_frames(exc: BaseException) -> TracebackType | None:
    """``exc``'s traceback without the leading frames of this loop and of
    importlib (the function's own frames, and its libraries', stay)."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name == __file__ or name.startswith("<frozen importlib")
                or name == importlib.__file__):
            break
        tb = tb.tb_next
    return tb


def _log_uncaught(channel: _Channel, rid: str, exc: BaseException) -> None:
    """An exception the handler raised, as Lambda's runtime logs it:
    ``[ERROR] Type: message`` and the traceback, one record at level ERROR."""
    if os.environ.get("AWS_LAMBDA_LOG_FORMAT", "").strip().upper() == "JSON":
        fields = lambdalog.uncaught_fields(exc, rid)
        channel.send(p.LOG, orjson.dumps(
            [rid, "stderr", lambdalog.json_line(fields), "ERROR", fields]))
        return
    text = f"[ERROR] {type(exc).__name__}: {exc}\n" + "".join(
        traceback.format_exception(exc))
    channel.send(p.LOG, orjson.dumps([rid, "stderr", text, "ERROR", None]))


def _trace_of(event: Any) -> tuple[str | None, str | None]:
    """The invocation's ``traceparent`` (from the event's headers) and its
    X-Ray form, which goes into ``_X_AMZN_TRACE_ID`` as on Lambda (process
    wide: with concurrency above 1 it names the latest invocation's trace)."""
    global _trace_env_set
    headers = event.get("headers") if type(event) is dict else None
    tp = headers.get("traceparent") if type(headers) is dict else None
    xray = xray_from_traceparent(tp) if type(tp) is str else None
    if xray is not None:
        # os.environ's own dict, not putenv(): glibc keeps every value ever
        # set with setenv (so a unique one per invocation would grow the
        # process without bound) and the call costs microseconds. Python
        # code sees it (os.environ, os.getenv); a subprocess gets it when
        # started with env=os.environ.
        _ENV_DATA[_TRACE_KEY] = xray.encode()
        _trace_env_set = True
        return tp, xray
    if _trace_env_set:  # (a flag: os.environ's `in` costs microseconds)
        _ENV_DATA.pop(_TRACE_KEY, None)
        _trace_env_set = False
    return None, None


_trace_env_set = False
_ENV_DATA = os.environ._data  # type: ignore[attr-defined]
_TRACE_KEY = os.environ.encodekey(TRACE_ENV)


def _error_frame(rid: str, message: str, kind: str, fatal: bool = False) -> bytes:
    """An ERROR payload; ``fatal`` tells the worker this instance is leaving."""
    return orjson.dumps([rid, {"errorMessage": message, "errorType": kind,
                               "requestId": rid}, fatal])


def _serve(channel: _Channel, run: Callable[[bytes, float], object]) -> None:
    """Hand every INVOKE frame's body, with the monotonic time it arrived,
    to ``run`` until the worker hangs up."""
    monotonic = time.monotonic
    while True:
        got = channel.recv()
        if got is None:
            return
        kind, body = got
        if kind == p.INVOKE:
            run(body, monotonic())


def _started_pool(n: int) -> ThreadPoolExecutor:
    """A pool whose n threads already exist (the executor starts them lazily)."""
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="invoke")
    barrier = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(barrier.wait, 5.0)
    barrier.wait(5.0)
    return pool
