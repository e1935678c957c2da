"""The zygote: a Python process with the runtime preloaded that forks instances.

Started by the worker once per dependency set (``python -m
nimbus.runtime.zygote FD PARENT_PID DEPS_JSON``, DEPS_JSON naming the
requirements venv's site-packages and the modules to preload). It reads fork requests from a SOCK_SEQPACKET socket; each
request is an instance spec (JSON) with one file descriptor attached, the
instance's end of a socketpair to its worker. The zygote forks, answers
``{"instance_id", "pid"}``, and the child runs
:func:`nimbus.runtime.bootstrap.run_instance`. Forking a warm interpreter
costs a millisecond or two, where a fresh interpreter costs tens.

Lifetimes: the zygote dies with its worker and every instance dies with the
zygote (``PR_SET_PDEATHSIG``), so a SIGKILLed worker leaves nothing behind.
Instances are reaped automatically (SIGCHLD ignored); the worker learns of a
death from its socket closing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
from collections import deque
from typing import NoReturn

import orjson

from nimbus.runtime import bootstrap

# Modules handlers commonly import, loaded once here so that every forked
# instance shares them copy-on-write instead of importing them again.
PRELOAD = (
    "base64", "collections", "dataclasses", "datetime", "decimal", "hashlib",
    "json", "logging", "re", "typing", "urllib.parse", "uuid",
)

_PR_SET_PDEATHSIG = 1
MAX_SPEC_BYTES = 1 << 20
# Spare children forked ahead of need (Android's "USAP pool"): a fork request
# takes a spare that is already forked and prepared, so the fork itself
# (about a millisecond) is off the cold-start path; the zygote forks the
# replacement after it has answered.
SPARES = int(os.environ.get("NIMBUS_ZYGOTE_SPARES", "2"))

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(expected_parent: int) -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:  # the parent died before prctl
        os._exit(1)


def _prepare_child(zygote_pid: int, inherited: list[socket.socket]) -> None:
    """Everything a child does before it knows which function it will run."""
    for s in inherited:  # the zygote's sockets: not ours to hold
        s.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # handlers may use subprocess
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(zygote_pid)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _run(fd: int, spec: dict[str, object]) -> NoReturn:
    code = 0
    try:
        bootstrap.run_instance(socket.socket(fileno=fd), spec)
    except BaseException:  # noqa: BLE001 - never return into the zygote loop
        code = 1
    finally:
        os._exit(code)


class Zygote:
    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.pid = os.getpid()
        self.spares: deque[tuple[int, socket.socket]] = deque()

    def _inherited(self) -> list[socket.socket]:
        return [self.ctl, *(s for _pid, s in self.spares)]

    def fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _prepare_child(self.pid, self._inherited())
            try:
                msg, fds, _f, _a = socket.recv_fds(theirs, MAX_SPEC_BYTES, 1)
            except OSError:
                os._exit(0)
            theirs.close()
            if not msg or len(fds) != 1:
                os._exit(0)  # the zygote went away: nothing to run
            _run(fds[0], orjson.loads(msg))
        theirs.close()
        self.spares.append((pid, ours))

    def start(self, msg: bytes, fd: int, spec: dict[str, object]) -> int:
        """Start an instance running ``spec`` on ``fd``; returns its pid."""
        while self.spares:
            pid, sock = self.spares.popleft()
            try:
                socket.send_fds(sock, [msg], [fd])
                return pid
            except OSError:
                continue  # that spare died; try the next
            finally:
                sock.close()
        pid = os.fork()
        if pid == 0:
            _prepare_child(self.pid, self._inherited())
            _run(fd, spec)
        return pid

    def _reply(self, message: dict[str, object]) -> bool:
        """Answer the worker; False if it has gone (then the zygote ends)."""
        try:
            self.ctl.send(orjson.dumps(message))
            return True
        except OSError:
            return False

    def serve(self) -> None:
        for _ in range(SPARES):
            self.fork_spare()
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.ctl, MAX_SPEC_BYTES, 1)
            except InterruptedError:
                continue
            if not msg:
                return  # the worker hung up
            spec = orjson.loads(msg)
            iid = spec.get("instance_id")
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                self._reply({"instance_id": iid, "error": "fork request without a socket"})
                continue
            try:
                pid = self.start(msg, fds[0], spec)
            except OSError as exc:
                self._reply({"instance_id": iid, "error": str(exc)})
                continue
            finally:
                os.close(fds[0])
            if not self._reply({"instance_id": iid, "pid": pid}):
                return
            while len(self.spares) < SPARES:
                try:
                    self.fork_spare()
                except OSError:
                    break  # out of processes: fork on demand instead


def preload(sys_path: list[str], modules: list[str]) -> list[str]:
    """Put the dependency set's site-packages on the path and import its
    modules; returns one line per module that failed (the instance that
    needs it will report the real error when it imports it)."""
    for path in reversed(sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    failed = []
    for name in (*PRELOAD, *modules):
        try:
            __import__(name)
        except BaseException as exc:  # noqa: BLE001 - a preload is an optimisation only
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    deps = orjson.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    _die_with_parent(parent)
    # Ctrl-C reaches the whole foreground group; the worker decides when
    # instances stop, so the zygote ignores SIGINT. SIGCHLD ignored = auto-reap.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    failed = preload(deps.get("sys_path", []), deps.get("preload", []))
    ctl = socket.socket(fileno=fd)
    gc.collect()
    gc.freeze()  # keep preloaded objects out of the collector: fewer COW faults
    ctl.send(orjson.dumps({"ready": True, "pid": os.getpid(), "preload_failed": failed}))
    Zygote(ctl).serve()


if __name__ == "__main__":
    main()
