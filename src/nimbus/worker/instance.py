"""One running instance as the worker sees it: a process and its socket."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from nimbus.errors import (
    DeployError,
    HandlerError,
    InstanceDiedError,
    InvocationTimeoutError,
    UnavailableError,
)
from nimbus.runtime import protocol as p

# (request_id, stream, text[, level, fields]): see nimbus.observe.protocols
LogFn = Callable[..., None]

_HEADER = p.HEADER
_HS = p.HEADER_SIZE
_INVOKE = p.INVOKE
_RESULT = p.RESULT


class InstanceProtocol(asyncio.Protocol):
    """Parses frames from one instance and resolves the matching futures."""

    def __init__(self, on_log: LogFn, on_lost: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.pending: dict[str, asyncio.Future[Any]] = {}
        # Each invocation's timeout, cancelled where its answer is read (not
        # by a done callback: that would cost a loop callback per request).
        self.timers: dict[str, asyncio.TimerHandle] = {}
        # The last invocations handed over: late descriptor output of one
        # that has already answered is still this instance's own.
        self.recent: deque[str] = deque(maxlen=RECENT_IDS)
        self.transport: asyncio.Transport | None = None
        self.alive = True
        # Set when the worker ends the instance itself (stop, kill): its exit
        # is no news. Any other exit of a ready, idle instance is a death.
        self.leaving = False
        self.instance_id = ""
        self._buf = bytearray()
        self.on_log = on_log
        self._on_lost: Callable[[], None] | None = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= _HS:
            size, kind = _HEADER.unpack_from(buf, pos)
            if size > p.MAX_FRAME:  # garbage on the wire: this instance is unusable
                self.doomed()
                if self.transport is not None:
                    self.transport.abort()
                return
            stop = pos + _HS + size
            if stop > end:
                break
            self._frame(kind, bytes(buf[pos + _HS : stop]))
            pos = stop
        if pos:
            del buf[:pos]

    def _frame(self, kind: int, body: bytes) -> None:
        if kind == _RESULT:
            rid, result = orjson.loads(body)
            timer = self.timers.pop(rid, None)
            if timer is not None:
                timer.cancel()
            fut = self.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
        elif kind == p.ERROR:
            rid, error, *fatal = orjson.loads(body)
            if isinstance(error, dict) and str(error.get("errorType", "")).startswith("Runtime."):
                self._platform_error(rid, error)
            if fatal and fatal[0]:
                self.doomed()  # it exits after this frame: hand it nothing more
            timer = self.timers.pop(rid, None)
            if timer is not None:
                timer.cancel()
            fut = self.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(HandlerError(error))
        elif kind == p.LOG:
            self.on_log(*self._log_fields(body))
        elif kind == p.READY:
            if not self.ready.done():
                self.ready.set_result(orjson.loads(body))
        elif kind == p.INIT_ERROR:
            err = orjson.loads(body)
            if not self.ready.done():
                self.ready.set_exception(InitError(err))
            self.on_log(None, "platform", init_error_text(err), "ERROR")

    def _platform_error(self, rid: str, error: dict[str, Any]) -> None:
        """The runtime's own failures (out of memory, an exit, an answer that
        cannot be sent) are platform lines of the function, at level ERROR."""
        self.on_log(rid if rid in self.recent else None, "platform",
                    f"{error.get('errorType')}: {error.get('errorMessage')}", "ERROR")

    def _log_fields(self, body: bytes) -> tuple[str | None, str, str, str | None,
                                                 dict[str, Any] | None]:
        """A LOG frame's (request id, stream, text, level, fields) as the
        platform records them.
        The instance runs user code, so what it claims is checked: the request
        id must be one of its own invocations (in flight, or just answered:
        descriptor output can arrive after the result), else the line goes to
        its only invocation in flight, or to none; the stream is stdout or
        stderr ("platform" lines come from the worker alone)."""
        try:
            frame = orjson.loads(body)
        except orjson.JSONDecodeError:
            frame = body.decode(errors="replace")
        level = fields = None
        if isinstance(frame, list) and len(frame) == 5:
            frame, level, fields = frame[:3], frame[3], frame[4]
            if level not in _LEVELS:
                level = None
            if not isinstance(fields, dict) or level is None:
                fields = None
        rid, stream, text = frame if isinstance(frame, list) and len(frame) == 3 else (
            None, "stderr", frame)
        pending = self.pending
        if rid is not None and not (isinstance(rid, str)
                                    and (rid in pending or rid in self.recent)):
            rid = next(iter(pending)) if len(pending) == 1 else None
        if not isinstance(stream, str) or stream not in _STREAMS:
            stream = "stderr"
        if not isinstance(text, str):
            text = str(text)
        return rid, stream, text, level, fields

    def _idle_death(self) -> None:
        ready = self.ready
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            self.on_log(None, "platform",
                        f"instance {self.instance_id} exited while idle (killed, or its "
                        "zygote or a process it started took it down)", "ERROR")

    def doomed(self) -> None:
        """The process is going (killed, or leaving on its own): stop handing
        it work now, before its socket closes. Idempotent."""
        self.alive = False
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.pending and not self.leaving and self._on_lost is not None:
            self._idle_death()
        self.alive = False
        if not self.ready.done():
            self.ready.set_exception(InstanceDiedError("instance exited while starting"))
        for rid, fut in self.pending.items():
            if not fut.done():
                fut.set_exception(InstanceDiedError("instance exited during the invocation"))
                self.on_log(rid, "platform", "instance exited during the invocation", "ERROR")
        self.pending.clear()
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.doomed()


_STREAMS = frozenset({"stdout", "stderr"})
_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
RECENT_IDS = 64


class InitError(DeployError):
    """The handler module failed to import (Lambda: Runtime.ImportModuleError)."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = {
            "errorMessage": error.get("errorMessage", ""),
            "errorType": _init_error_type(str(error.get("errorType", ""))),
        }
        super().__init__(init_error_summary(error))


def _init_error_type(kind: str) -> str:
    # A custom runtime reports its own Runtime.* type (awslambdaric:
    # Runtime.ImportModuleError); a Python import failure names the exception.
    return kind if kind.startswith("Runtime.") else f"Runtime.ImportModuleError: {kind}"


def init_error_summary(error: dict[str, Any]) -> str:
    """One line naming the function, the file and line of the failing import."""
    where = ""
    if error.get("function"):
        where += f"function {error['function']}: "
    if error.get("file"):
        where += f"{error['file']}, line {error.get('line')}: "
    failure = error.get("failure") or "handler failed to import"  # custom runtimes say theirs
    return (f"{where}{failure}: {error.get('errorType')}: "
            f"{error.get('errorMessage')}")


def init_error_text(error: dict[str, Any]) -> str:
    """The summary and the whole traceback: the function's platform log line."""
    trace = "".join(str(line) for line in error.get("stackTrace", []) or [])
    return init_error_summary(error) + ("\n" + trace if trace else "")


class Instance:
    """A started instance. ``outstanding`` counts invocations it holds."""

    __slots__ = ("id", "pid", "target_key", "proto", "outstanding", "capacity",
                 "draining", "started_at", "last_used")

    def __init__(self, id: str, pid: int, target_key: tuple[str, int],
                 proto: InstanceProtocol, capacity: int) -> None:
        self.id = id
        self.pid = pid
        self.target_key = target_key
        self.proto = proto
        self.outstanding = 0
        self.capacity = capacity
        self.draining = False
        proto.instance_id = id
        self.started_at = time.monotonic()
        self.last_used = self.started_at

    @property
    def alive(self) -> bool:
        return self.proto.alive

    def invoke(self, rid: str, event: Any, timeout_s: float) -> asyncio.Future[Any]:
        """Send one invocation; the future resolves to the handler's result,
        or fails with HandlerError / InvocationTimeoutError / InstanceDiedError.
        On timeout the instance is killed (its state is unknown)."""
        proto = self.proto
        if not proto.alive or proto.transport is None:
            raise UnavailableError("instance is gone")
        loop = proto.loop
        fut = loop.create_future()
        proto.pending[rid] = fut
        proto.recent.append(rid)
        payload = orjson.dumps([rid, timeout_s, event])
        proto.transport.write(_HEADER.pack(len(payload), _INVOKE) + payload)
        proto.timers[rid] = loop.call_later(timeout_s, self._timed_out, rid, fut, timeout_s)
        return fut

    def _timed_out(self, rid: str, fut: asyncio.Future[Any], timeout_s: float) -> None:
        self.proto.timers.pop(rid, None)
        if fut.done():  # its caller gave up waiting (an answer cancels the timer)
            return
        self.proto.pending.pop(rid, None)
        message = f"Task timed out after {timeout_s:.2f} seconds"
        fut.set_exception(InvocationTimeoutError(message))
        self.proto.on_log(rid, "platform", message, "ERROR")
        self.kill()

    def kill(self) -> None:
        self.proto.leaving = True
        if self.proto.alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proto.doomed()

    async def stop(self, grace_s: float) -> None:
        """Hang up (the instance exits on EOF), wait ``grace_s``, then SIGKILL."""
        self.proto.leaving = True
        if self.proto.transport is not None:
            self.proto.transport.close()
        deadline = time.monotonic() + grace_s
        while _pid_alive(self.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if _pid_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
