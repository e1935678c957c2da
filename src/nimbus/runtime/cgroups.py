"""Per-instance cgroups: memory, processes and CPU for an instance and every
process it starts.

The platform (:class:`CgroupTree`, root only) finds the hierarchies it may
use (cgroup v1 controllers ``memory``, ``pids``, ``cpu`` — or one v2
hierarchy whose controllers are delegated), makes a folder of its own under
its current cgroup in each, and sweeps what a previous run left there.
An instance joins its cgroup itself, right after the fork and before it
runs any user code (:func:`join`), through folder descriptors the zygote
opened before it chrooted; so no process of the instance ever runs outside
it. When the instance is gone the platform kills whatever is left in the
cgroup and removes it (:meth:`CgroupTree.remove`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

CONTROLLERS = ("memory", "pids", "cpu")
# Joined ahead by every spare. The v1 cpu controller only when a function
# asks for a CPU cap: a cgroup of its own costs every wake-up of the
# instance (group scheduling: 8% of warm throughput measured) and without
# a quota buys nothing.
AHEAD = ("memory", "pids", "unified")
CPU_PERIOD_US = 100_000
RUNTIME_HEADROOM_MB = 32  # pages the runtime itself dirties after the fork


@dataclass(frozen=True, slots=True)
class Limits:
    memory_mb: int
    max_processes: int
    cpu: float | None  # a fraction of one core; None: no cap

    def files(self, version: int) -> list[tuple[str, str]]:
        """(file, value) pairs to write, in order, for cgroup ``version``."""
        memory = str((self.memory_mb + RUNTIME_HEADROOM_MB) * 1024 * 1024)
        quota = None if self.cpu is None else max(1000, int(self.cpu * CPU_PERIOD_US))
        if version == 2:
            out = [("memory.max", memory), ("memory.swap.max", "0"),
                   ("pids.max", str(self.max_processes))]
            if quota is not None:
                out.append(("cpu.max", f"{quota} {CPU_PERIOD_US}"))
            return out
        out = [("memory/memory.limit_in_bytes", memory),
               ("pids/pids.max", str(self.max_processes))]
        if quota is not None:
            out += [("cpu/cpu.cfs_period_us", str(CPU_PERIOD_US)),
                    ("cpu/cpu.cfs_quota_us", str(quota))]
        return out


def _write(path: str, value: str, dir_fd: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def name_for(host_pid: int) -> str:
    """An instance's cgroup, named by its host pid (a spare joins it before
    it knows its instance id)."""
    return f"p{host_pid}"


def join(root_fds: dict[str, int], name: str, controllers: tuple[str, ...]) -> None:
    """Create cgroup ``name`` under the platform's folders (given as open
    folder descriptors, one per controller; one named ``unified`` for v2)
    in ``controllers`` (those of them that are there) and move the calling
    process into it."""
    pid = str(os.getpid())
    for fd in (root_fds[c] for c in controllers if c in root_fds):
        with contextlib.suppress(FileExistsError):  # left by a process of a reused pid
            os.mkdir(name, 0o700, dir_fd=fd)
        _write(f"{name}/cgroup.procs", pid, fd)


def limit(version: int, root_fds: dict[str, int], name: str, limits: Limits) -> None:
    """Write ``limits`` to cgroup ``name``."""
    for file, value in limits.files(version):
        ctrl, _, leaf = file.rpartition("/")
        fd = root_fds[ctrl] if ctrl else root_fds["unified"]
        with contextlib.suppress(FileNotFoundError):  # e.g. no swap accounting
            _write(f"{name}/{leaf}", value, fd)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _src, opts = right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4], fstype, opts))
    return out


def _own_paths() -> dict[str, str]:
    """Controller (or ``unified``) -> this process's cgroup path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _hid, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else ["unified"]):
                out[c] = path
    return out


def _under(mount_root: str, mountpoint: str, own: str) -> str | None:
    if mount_root != "/" and not (own == mount_root or own.startswith(mount_root + "/")):
        return None
    rel = own[len(mount_root):] if mount_root != "/" else own
    path = mountpoint + rel
    return path if os.path.isdir(path) else None


class CgroupTree:
    """The platform's cgroup folders (``nimbus-<tag>``), one per controller."""

    def __init__(self, version: int, dirs: dict[str, str]) -> None:
        self.version = version
        self.dirs = dirs

    @classmethod
    def detect(cls, tag: str) -> CgroupTree | None:
        """The hierarchies this (root) process can use, with its folders made
        and swept; None if there are none (then rlimits alone apply)."""
        if os.geteuid() != 0:
            return None
        try:
            mounts, own = _mounts(), _own_paths()
        except OSError:
            return None
        v1: dict[str, str] = {}
        v2: str | None = None
        for root, point, fstype, opts in mounts:
            if fstype == "cgroup":
                for c in CONTROLLERS:
                    if c in opts.split(",") and c in own and c not in v1:
                        base = _under(root, point, own[c])
                        if base is not None:
                            v1[c] = base
            elif "unified" in own and v2 is None:
                v2 = _under(root, point, own["unified"])
        name = f"nimbus-{tag}"
        try:
            if len(v1) == len(CONTROLLERS):
                tree = cls(1, {c: os.path.join(p, name) for c, p in v1.items()})
            elif v2 is not None and _delegate_v2(v2):
                tree = cls(2, {"unified": os.path.join(v2, name)})
            else:
                return None
            for path in tree.dirs.values():
                os.makedirs(path, mode=0o700, exist_ok=True)
            if tree.version == 2:
                _write(os.path.join(tree.dirs["unified"], "cgroup.subtree_control"),
                       "+memory +pids +cpu")
            tree.sweep()
        except OSError:
            return None
        return tree

    def describe(self) -> str:
        if self.version == 1:
            return "cgroup v1 (memory, pids, cpu)"
        return "cgroup v2 (memory, pids, cpu)"

    def open_roots(self) -> dict[str, int]:
        """Folder descriptors for :func:`join` (the caller closes them)."""
        return {c: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for c, p in self.dirs.items()}

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "dirs": self.dirs}

    def prune(self) -> None:
        """Remove every cgroup that has no process left (spares that were
        never used). Safe at any time: a busy cgroup cannot be removed."""
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                for e in list(os.scandir(path)):
                    if e.is_dir():
                        with contextlib.suppress(OSError):
                            os.rmdir(e.path)

    def close(self) -> None:
        """Remove the platform's folders if nothing is left in them."""
        self.prune()
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def sweep(self) -> None:
        """Remove every instance cgroup a previous run left (killing its processes)."""
        names: set[str] = set()
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                names.update(e.name for e in os.scandir(path) if e.is_dir())
        for name in names:
            self.remove(name)

    def pids(self, name: str) -> list[int]:
        out: set[int] = set()
        for path in self.dirs.values():
            try:
                with open(os.path.join(path, name, "cgroup.procs")) as f:
                    out.update(int(x) for x in f.read().split())
            except (OSError, ValueError):
                continue
        return sorted(out)

    def remove(self, name: str, deadline_s: float = 5.0) -> bool:
        """Kill every process in cgroup ``name`` and remove it. Idempotent;
        True if it is gone. Blocking: call it off the event loop."""
        deadline = time.monotonic() + deadline_s
        while True:
            left = self.pids(name)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            gone = True
            for path in self.dirs.values():
                try:
                    os.rmdir(os.path.join(path, name))
                except FileNotFoundError:
                    pass
                except OSError:
                    gone = False  # still has processes (exiting, or forked meanwhile)
            if gone:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def memory_bytes(self, name: str) -> int | None:
        """Memory charged to the instance and everything it started."""
        leaf = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        base = self.dirs["memory" if self.version == 1 else "unified"]
        try:
            with open(os.path.join(base, name, leaf)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None


def _delegate_v2(own: str) -> bool:
    """v2 only works when our cgroup may enable the controllers below it."""
    try:
        with open(os.path.join(own, "cgroup.controllers")) as f:
            available = set(f.read().split())
        if not {"memory", "pids", "cpu"} <= available:
            return False
        _write(os.path.join(own, "cgroup.subtree_control"), "+memory +pids +cpu")
    except OSError:
        return False
    return True
