"""The worker's side of the zygote: start it, ask it to fork, stop it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import orjson

from nimbus.errors import ClosedError, UnavailableError

log = logging.getLogger("nimbus.worker")

ZYGOTE_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONHASHSEED", "NIMBUS_ZYGOTE_SPARES")
START_TIMEOUT_S = 60.0  # preloading a dependency set may import a lot
FORK_TIMEOUT_S = 5.0


class ZygoteClient:
    """One zygote process for one dependency set (``sys_path`` entries to
    add and modules to preload). Restarts it on the next fork if it died."""

    def __init__(self, sys_path: tuple[str, ...] = (), preload: tuple[str, ...] = (),
                 contain: dict[str, Any] | None = None) -> None:
        self.sys_path = sys_path
        self.preload = preload
        self.contain = contain or {}
        self.preload_failed: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._ctl: socket.socket | None = None
        self._pending: dict[str, asyncio.Future[int]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The zygote's pid (under full containment not the process we
        started, which waits outside the zygote's PID namespace)."""
        return self._pid if self._proc else None

    async def start(self) -> None:
        async with self._lock:
            await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._closed:
            raise ClosedError("worker is closed")
        if self._proc is not None and self._proc.poll() is None and self._ctl is not None:
            return
        self._teardown()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Nothing of the platform's environment (tokens, credentials) reaches
        # the zygote; instances then set Lambda's environment only.
        env = {k: v for k, v in os.environ.items() if k in ZYGOTE_ENV}
        # One malloc arena: threads in an instance must not reserve 64 MB
        # arenas of address space, which RLIMIT_AS counts.
        env["MALLOC_ARENA_MAX"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self._proc = subprocess.Popen(  # noqa: ASYNC220 - fork + exec, no waiting
                [sys.executable, "-m", "nimbus.runtime.zygote",
                 str(theirs.fileno()), str(os.getpid()),
                 orjson.dumps({"sys_path": self.sys_path, "preload": self.preload,
                               "contain": self.contain}).decode()],
                pass_fds=[theirs.fileno()],
                start_new_session=True,  # Ctrl-C goes to us; we stop instances
                env=env,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._ctl = ours
        loop = asyncio.get_running_loop()
        try:
            first = await asyncio.wait_for(loop.sock_recv(ours, 65536), START_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            self._teardown()
            raise UnavailableError("zygote did not start") from exc
        if not first:
            self._teardown()
            raise UnavailableError("zygote exited during start")
        hello = orjson.loads(first)
        if not hello.get("ready"):
            self._teardown()
            raise UnavailableError(f"zygote could not start: {hello.get('error')}")
        self.preload_failed = hello.get("preload_failed", [])
        self._pid = int(hello.get("pid") or self._proc.pid)
        for line in self.preload_failed:
            log.warning("zygote could not preload %s", line)
        self._reader = asyncio.create_task(self._read_replies(ours))
        log.debug("zygote %d ready", self._proc.pid)

    async def _read_replies(self, ctl: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await loop.sock_recv(ctl, 65536)
                if not msg:
                    break
                reply = orjson.loads(msg)
                fut = self._pending.pop(reply.get("instance_id"), None)
                if fut is None or fut.done():
                    continue
                if "error" in reply:
                    fut.set_exception(UnavailableError(f"fork failed: {reply['error']}"))
                else:
                    fut.set_result(reply["pid"])
        except OSError:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(UnavailableError("zygote exited"))
            self._pending.clear()

    async def fork(self, spec: dict[str, Any]) -> tuple[int, socket.socket]:
        """Start an instance; returns its pid and the worker's end of its socket."""
        async with self._lock:
            await self._ensure_started()
            assert self._ctl is not None
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._pending[spec["instance_id"]] = fut
            try:
                await _send_with_fd(self._ctl, orjson.dumps(spec), theirs.fileno())
            except OSError as exc:
                self._pending.pop(spec["instance_id"], None)
                ours.close()
                raise UnavailableError("could not reach the zygote") from exc
            finally:
                theirs.close()
        try:
            pid = await asyncio.wait_for(fut, FORK_TIMEOUT_S)
        except BaseException:
            ours.close()
            raise
        return pid, ours

    def _hang_up(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._ctl is not None:
            self._ctl.close()  # the zygote exits when its socket closes
            self._ctl = None

    def _teardown(self) -> None:
        self._hang_up()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Stop the zygote: hang up (it exits when its socket closes), wait up
        to ``grace_s``, then SIGKILL. Idempotent."""
        self._closed = True
        proc = self._proc
        self._hang_up()
        if proc is None:
            return
        self._proc = None
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), grace_s)
        except TimeoutError:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)


async def _send_with_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [data], [fd])
            return
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(sock, ready.set_result, None)
            try:
                await asyncio.wait_for(ready, FORK_TIMEOUT_S)
            finally:
                loop.remove_writer(sock)
