"""Which containment is in force on this node, and the platform's side of it.

``full`` (the platform runs as root and the kernel allows namespaces):
every function runs as a uid and gid of its own, in a view of the
filesystem without the state folder, each instance with a private /tmp,
its own cgroup (memory of it and its children, processes, CPU) and a PID
namespace per zygote (nothing outlives it). See
:mod:`nimbus.runtime.sandbox` for the kernel calls.

``rlimits`` (not root, or asked for): instances run as the platform's
user, in a process group of their own (killed as a whole when the instance
ends), with RLIMIT_AS / RLIMIT_FSIZE limits, a private TMPDIR and Lambda's
environment only. They can read what the platform's user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

import nimbus
from nimbus.errors import UnavailableError
from nimbus.manifest.model import FunctionSpec
from nimbus.runtime.cgroups import CgroupTree, name_for
from nimbus.runtime.sandbox import TASK_ROOT, VENV_ROOT
from nimbus.worker.uids import UidTable

log = logging.getLogger("nimbus.worker")

MODES = ("auto", "full", "rlimits")
OS_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
LINKED_ETC = ("/etc/resolv.conf", "/etc/hosts", "/etc/localtime", "/etc/nsswitch.conf",
              "/etc/ssl/certs/ca-certificates.crt")
DEFAULT_UID_RANGE = (200_000, 265_535)

_PROBE = (
    "import ctypes,os,sys\n"
    "libc=ctypes.CDLL(None,use_errno=True)\n"
    "sys.exit(0 if libc.unshare(0x00020000|0x20000000)==0 else 1)\n"
)


def platform_paths(state_dir: Path) -> tuple[str, ...]:
    """Host paths an instance needs read-only: the OS, the Python runtime and
    nimbus's code, none of them inside the state folder."""
    candidates = [*OS_PATHS, sys.base_prefix, sys.prefix, sys.exec_prefix,
                  str(Path(nimbus.__file__).resolve().parent.parent)]
    candidates += [p for p in sys.path if p and os.path.isabs(p)]
    # Files under /etc that are often links elsewhere (resolv.conf into
    # /run/systemd/resolve on many distributions): their folders too.
    candidates += [os.path.dirname(os.path.realpath(f)) for f in LINKED_ETC if os.path.islink(f)]
    state = str(state_dir.resolve())
    out: list[str] = []
    for raw in candidates:
        path = os.path.normpath(raw)
        if not os.path.lexists(path):
            continue
        if not os.path.islink(path):
            path = os.path.realpath(path)
            if not os.path.isdir(path):
                continue
        if path == state or path.startswith(state + "/") or state.startswith(path + "/"):
            continue  # never the state folder, nor a folder holding it
        out.append(path)
    kept: list[str] = []
    for path in sorted(set(out), key=len):
        if not any(path.startswith(k + "/") for k in kept if not os.path.islink(k)):
            kept.append(path)
    return tuple(kept)


@dataclass(frozen=True, slots=True)
class Containment:
    mode: str  # "full" or "rlimits"
    state_dir: Path
    uids: UidTable | None = None
    cgroups: CgroupTree | None = None
    exposed: tuple[str, ...] = ()
    reason: str = ""  # why not full, when it is not

    @classmethod
    def create(cls, state_dir: Path, mode: str = "auto",
               uid_range: tuple[int, int] = DEFAULT_UID_RANGE) -> Containment:
        """Decide what this node can enforce. ``full`` raises
        UnavailableError when it cannot be had; ``auto`` falls back to
        ``rlimits`` and says why."""
        if mode not in MODES:
            raise ValueError(f"containment must be one of {', '.join(MODES)}, was: {mode!r}")
        (state_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
        if mode == "rlimits":
            return cls("rlimits", state_dir, reason="asked for (--containment rlimits)")
        why = _why_not_full()
        if why:
            if mode == "full":
                raise UnavailableError(f"full containment is not available: {why}")
            return cls("rlimits", state_dir, reason=why)
        for sub in ("code", "view"):
            (state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
        return cls("full", state_dir, UidTable(state_dir / "uids.json", *uid_range),
                   CgroupTree.detect(tag), platform_paths(state_dir))

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def describe(self) -> dict[str, Any]:
        """What is enforced, for ``nimbus status`` and the start-up log line."""
        if not self.full:
            return {"mode": "rlimits", "uid_separation": False, "cgroups": None,
                    "limits": "RLIMIT_AS (memory_mb), RLIMIT_FSIZE, process group",
                    "reason": self.reason}
        assert self.uids is not None
        return {"mode": "full", "uid_separation": True,
                "uid_range": f"{self.uids.first}-{self.uids.last}",
                "cgroups": self.cgroups.describe() if self.cgroups else None,
                "limits": ("cgroup memory, pids (cpu under a cap) + RLIMIT_AS, RLIMIT_FSIZE"
                           if self.cgroups else "RLIMIT_AS, RLIMIT_FSIZE (no usable cgroups)"),
                "reason": ""}

    def summary(self) -> str:
        d = self.describe()
        if not self.full:
            return f"containment: rlimits only ({d['reason']}): functions run as this user"
        cg = d["cgroups"] or "no cgroups (rlimits)"
        return (f"containment: full: a uid per function ({d['uid_range']}), private /tmp, "
                f"filesystem view, {cg}")

    def venv_dir(self, requirements_hash: str) -> Path:
        """Where a requirements venv is, as instances (and pip) see it: under
        full containment at ``/var/nimbus/venvs/<hash>`` in their view (it is
        built there too, so the paths baked into it hold)."""
        if self.full:
            return Path(VENV_ROOT) / requirements_hash
        return self.state_dir / "venvs" / requirements_hash

    def zygote_config(self, venvs: tuple[str, ...]) -> dict[str, Any]:
        """What a zygote needs to build its view (``{}`` when not full);
        ``venvs`` are the requirements hashes of its dependency set."""
        if not self.full:
            return {}
        return {
            "mode": "full",
            "mountpoint": str(self.state_dir / "view"),
            "exposed": list(self.exposed),
            "binds": [[str(self.state_dir / "venvs" / h), f"{VENV_ROOT}/{h}", True, 0o755]
                      for h in venvs],
            "code_root": str(self.state_dir / "code"),
            "tmp_root": str(self.state_dir / "tmp"),
            "cgroups": self.cgroups.to_json() if self.cgroups else None,
        }

    def instance_fields(self, spec: FunctionSpec, digest: str) -> dict[str, Any]:
        """The instance spec's ``contain`` entry."""
        fields: dict[str, Any] = {"mode": self.mode,
                                  "ephemeral_storage_mb": spec.ephemeral_storage_mb}
        if self.full:
            assert self.uids is not None
            uid = self.uids.get(spec.name)
            fields.update(uid=uid, gid=uid, digest=digest, memory_mb=spec.memory_mb,
                          max_processes=spec.max_processes, cpu=spec.cpu,
                          # without cgroups: the function's uid may have this many
                          # tasks, all its instances together
                          nproc=spec.max_processes * spec.max_instances)
        return fields

    def builder_command(self, cmd: list[str], app_dir: Path, build_dir: Path,
                        venv: Path, tmp_dir: Path) -> list[str]:
        """``cmd`` wrapped to run as the builder uid in a view holding the OS,
        the Python runtime, ``app_dir`` at /var/task (read-only, the working
        folder), ``build_dir`` at ``venv`` (writable) and ``tmp_dir`` as /tmp.
        Unchanged when containment is not full."""
        if not self.full:
            return cmd
        assert self.uids is not None
        uid = self.uids.builder
        exposed = [*self.exposed, *(p for p in ("/opt",) if os.path.isdir(p))]
        env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
        env.update(PATH="/usr/local/bin:/usr/bin:/bin", LANG="C.UTF-8", HOME="/tmp",
                   TMPDIR="/tmp")
        config = {
            "mountpoint": str(self.state_dir / "view"), "exposed": exposed,
            "binds": [[str(app_dir), TASK_ROOT, True, 0o755],
                      [str(build_dir), str(venv), False, 0o755],
                      [str(tmp_dir), "/tmp", False, 0o1777]],
            "uid": uid, "gid": uid, "cwd": TASK_ROOT, "env": env,
        }
        return [sys.executable, "-m", "nimbus.runtime.sandbox_exec",
                orjson.dumps(config).decode(), "--", *cmd]

    def hand_over(self, folder: Path, to_builder: bool) -> None:
        """Give ``folder`` (recursively) to the builder uid, or back to root."""
        if not self.full:
            return
        assert self.uids is not None
        owner = self.uids.builder if to_builder else 0
        for root, dirs, files in os.walk(folder):
            os.lchown(root, owner, owner)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), owner, owner)

    def instance_tmp(self, instance_id: str, pid: int) -> Path:
        """A started instance's /tmp on the host (full: named by its host
        pid, made by the instance itself)."""
        return self.state_dir / "tmp" / name_for(pid) if self.full else self.tmp_dir(instance_id)

    def tmp_dir(self, instance_id: str) -> Path:
        """The instance's temporary folder on the host, when not full (full:
        named by the instance's host pid, made by the instance itself)."""
        return self.state_dir / "tmp" / instance_id

    async def release(self, instance_id: str, pid: int) -> None:
        """After an instance is gone: end everything it started, remove its
        cgroup and its temporary folder."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # its process group (it called setsid)
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.remove, name_for(pid))
        await asyncio.to_thread(shutil.rmtree, self.instance_tmp(instance_id, pid), True)

    def memory_bytes(self, pid: int) -> int | None:
        """Memory charged to the instance ``pid`` and all it started."""
        return self.cgroups.memory_bytes(name_for(pid)) if self.cgroups else None

    async def aclose(self) -> None:
        """After every instance is gone: remove the platform's cgroup folders."""
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.close)

    async def prune(self) -> None:
        """Remove the cgroups of spares that died unused (after a zygote stops)."""
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.prune)


def share_read_only(folder: Path) -> None:
    """Make ``folder``'s tree readable (not writable) by every uid: folders
    0755, files 0644 (0755 if their owner may run them). Links untouched."""
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)


def _why_not_full() -> str:
    if os.geteuid() != 0:
        return "nimbus is not running as root"
    if not hasattr(os, "setresuid") or sys.platform != "linux":
        return "not Linux"
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not probe namespaces: {exc}"
    if probe.returncode != 0:
        return "the kernel refused mount and PID namespaces"
    return ""

