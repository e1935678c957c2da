"""The zygote: a Python process with the runtime preloaded that forks instances.

Started by the worker once per dependency set (``python -m
nimbus.runtime.zygote FD PARENT_PID DEPS_JSON``, DEPS_JSON naming the
requirements venv's site-packages and the modules to preload). It reads fork
requests from a SOCK_SEQPACKET socket; each
request is an instance spec (JSON) with one file descriptor attached, the
instance's end of a socketpair to its worker. The zygote forks, answers
``{"instance_id", "pid"}``, and the child runs
:func:`nimbus.runtime.bootstrap.run_instance`. Forking a warm interpreter
costs a millisecond or two, where a fresh interpreter costs tens.

Lifetimes: the zygote dies with its worker and every instance dies with the
zygote (``PR_SET_PDEATHSIG``), so a SIGKILLed worker leaves nothing behind.
Instances are reaped automatically (SIGCHLD ignored); the worker learns of a
death from its socket closing.

Under full containment (``DEPS_JSON["contain"]``) the zygote is pid 1 of a
PID namespace of its own (when it dies, every process any instance started
dies too) and lives in a chrooted view of the filesystem; each instance
enters its own mount namespace and cgroup and drops to its function's uid
before it runs user code (:mod:`nimbus.runtime.sandbox`). Pids reported to
the worker are the host's.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from collections import deque
from typing import Any, NoReturn

import orjson

from nimbus.runtime import bootstrap, cgroups, runtime_api, sandbox
from nimbus.runtime import protocol as p

# Modules handlers commonly import, loaded once here so that every forked
# instance shares them copy-on-write instead of importing them again.
PRELOAD = (
    "base64", "collections", "dataclasses", "datetime", "decimal", "hashlib",
    "json", "logging", "re", "typing", "urllib.parse", "uuid",
)

MAX_SPEC_BYTES = 1 << 20
SPARE_READY_TIMEOUT_S = 5.0  # a spare's own preparation (namespace, cgroup)
# Spare children forked ahead of need (Android's "USAP pool"): a fork request
# takes a spare that is already forked and prepared, so the fork itself
# (about a millisecond) is off the cold-start path; the zygote forks the
# replacement after it has answered.
SPARES = int(os.environ.get("NIMBUS_ZYGOTE_SPARES", "2"))


class Confinement:
    """What the zygote holds for containing its children: the host's /proc
    (to learn a child's host pid) and the cgroup folders, both opened before
    the chroot. Empty when containment is not full."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.full = config.get("mode") == "full"
        self.proc_fd: int | None = None
        self.cg_version = 0
        self.cg_fds: dict[str, int] = {}
        if not self.full:
            return
        sandbox.enter_pid_namespace()  # from here on we are pid 1 of our namespace
        self.proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
        cg = config.get("cgroups")
        if cg:
            self.cg_version = int(cg["version"])
            self.cg_fds = {c: os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                           for c, d in cg["dirs"].items()}
        binds = [tuple(b) for b in config.get("binds", [])]
        sandbox.build_view(config["mountpoint"], config["exposed"], [
            *sandbox.zygote_binds(config["code_root"], config["tmp_root"]), *binds])

    def host_pid(self) -> int:
        """The calling process's pid as the host (the worker) sees it."""
        if self.proc_fd is None:
            return os.getpid()
        return int(os.readlink("self", dir_fd=self.proc_fd))

    def close(self) -> None:
        """In a child: let go of everything the zygote holds open."""
        for fd in (self.proc_fd, *self.cg_fds.values()):
            if fd is not None:
                os.close(fd)

    def prepare(self, host_pid: int) -> None:
        """In a spare, before it knows its function: what costs the most
        (a mount namespace, a cgroup) is done ahead, off the cold-start path."""
        if not self.full:
            return
        sandbox.prepare_instance(cgroups.name_for(host_pid))
        if self.cg_fds:
            cgroups.join(self.cg_fds, cgroups.name_for(host_pid), cgroups.AHEAD)

    def enter(self, spec: dict[str, Any], host_pid: int, zygote_pid: int) -> None:
        """In a spare that was given ``spec``: become the contained instance."""
        c = spec.get("contain") or {}
        if self.full:
            if self.cg_fds:
                name = cgroups.name_for(host_pid)
                if c.get("cpu") is not None:
                    cgroups.join(self.cg_fds, name, ("cpu",))
                cgroups.limit(self.cg_version, self.cg_fds, name,
                              cgroups.Limits(c["memory_mb"], c["max_processes"], c.get("cpu")))
            self.close()
            sandbox.enter_instance(cgroups.name_for(host_pid), c["digest"], c["uid"], c["gid"])
        if "ephemeral_storage_mb" in c:
            sandbox.limit_files(c["ephemeral_storage_mb"])
        if self.full:
            if not self.cg_fds:  # no pids cgroup: bound the function's uid instead
                sandbox.limit_tasks(c["nproc"])
            sandbox.drop_privileges(c["uid"], c["gid"], zygote_pid)


def _prepare_child(zygote_pid: int, inherited: list[socket.socket]) -> None:
    """Everything a child does before it knows which function it will run."""
    for s in inherited:  # the zygote's sockets: not ours to hold
        s.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # handlers may use subprocess
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sandbox.die_with_parent(zygote_pid)
    os.setsid()  # a process group of its own: killed as a whole, cannot signal ours
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _run(fd: int, spec: dict[str, Any], confinement: Confinement, host_pid: int,
         zygote_pid: int) -> NoReturn:
    code = 0
    sock = socket.socket(fileno=fd)
    try:
        try:
            confinement.enter(spec, host_pid, zygote_pid)
        except OSError as exc:
            body = {"errorMessage": f"could not contain the instance: {exc}",
                    "errorType": "Runtime.ContainmentError"}
            sock.sendall(p.frame(p.INIT_ERROR, orjson.dumps(body)))
            raise
        if "bootstrap" in spec:  # a custom runtime: serve its bootstrap the Runtime API
            runtime_api.run_instance(sock, spec)
        else:
            bootstrap.run_instance(sock, spec)
    except BaseException:  # noqa: BLE001 - never return into the zygote loop
        code = 1
    finally:
        os._exit(code)


class Zygote:
    def __init__(self, ctl: socket.socket, confinement: Confinement) -> None:
        self.ctl = ctl
        self.pid = os.getpid()
        self.confinement = confinement
        self.spares: deque[tuple[int, socket.socket]] = deque()

    def _inherited(self) -> list[socket.socket]:
        return [self.ctl, *(s for _pid, s in self.spares)]

    def fork_spare(self) -> None:
        """Fork a child that waits for its spec; it tells us its host pid first."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _prepare_child(self.pid, self._inherited())
            try:
                host_pid = self.confinement.host_pid()
                self.confinement.prepare(host_pid)
                theirs.send(str(host_pid).encode())
                msg, fds, _f, _a = socket.recv_fds(theirs, MAX_SPEC_BYTES, 1)
            except OSError:
                os._exit(0)
            theirs.close()
            if not msg or len(fds) != 1:
                os._exit(0)  # the zygote went away: nothing to run
            _run(fds[0], orjson.loads(msg), self.confinement, host_pid, self.pid)
        theirs.close()
        try:
            ours.settimeout(SPARE_READY_TIMEOUT_S)
            host_pid = int(ours.recv(32))
            ours.settimeout(None)
        except (OSError, ValueError):
            ours.close()
            raise OSError("a spare child died before it started") from None
        self.spares.append((host_pid, ours))

    def start(self, msg: bytes, fd: int) -> int:
        """Start an instance on ``fd`` (``msg`` is its spec); returns its host pid."""
        for _ in range(SPARES + 2):
            if not self.spares:
                self.fork_spare()
            pid, sock = self.spares.popleft()
            try:
                socket.send_fds(sock, [msg], [fd])
                return pid
            except OSError:
                continue  # that spare died; try the next
            finally:
                sock.close()
        raise OSError("could not start a child")

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
                pid = self.start(msg, fds[0])
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
    sandbox.die_with_parent(parent)
    # Ctrl-C reaches the whole foreground group; the worker decides when
    # instances stop, so the zygote ignores SIGINT. SIGCHLD ignored = auto-reap.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=fd)
    try:
        confinement = Confinement(deps.get("contain") or {})
    except OSError as exc:
        ctl.send(orjson.dumps({"ready": False, "error": f"containment: {exc}"}))
        sys.exit(1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    failed = preload(deps.get("sys_path", []), deps.get("preload", []))
    gc.collect()
    gc.freeze()  # keep preloaded objects out of the collector: fewer COW faults
    ctl.send(orjson.dumps({"ready": True, "pid": confinement.host_pid(),
                           "preload_failed": failed}))
    Zygote(ctl, confinement).serve()


if __name__ == "__main__":
    main()
