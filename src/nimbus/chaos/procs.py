"""Processes of a region on this machine: found by PID, killed as a tree,
and started again from what ``/proc`` said about them before they died.

Every signal goes to a PID the region itself reported (its control API's
``/v1/status``) or to a descendant of one; nothing is found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def parent_of(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after it
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    try:
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except IndexError:
        return False


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            ppid = parent_of(int(entry.name))
            if ppid is not None:
                out.setdefault(ppid, []).append(int(entry.name))
    return out


def tree(root: int) -> list[int]:
    """``root`` and every descendant, parents before children."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(kids.get(pid, [])))
    return out


def kill_tree(roots: list[int]) -> list[int]:
    """SIGKILL every process of the trees under ``roots``, as one blow:
    first SIGSTOP them all (a stopped process cannot fork or react to its
    children dying), gather the trees again, then SIGKILL. Returns the PIDs
    signalled."""
    hit: list[int] = []
    for _ in range(2):
        for root in roots:
            for pid in tree(root):
                if pid not in hit:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGSTOP)
                        hit.append(pid)
    for pid in hit:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return hit


def wait_gone(pids: list[int], deadline: float) -> bool:
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass(frozen=True)
class CommandLine:
    """Enough to start a process again: its argv, folder and environment."""

    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]

    @classmethod
    def of(cls, pid: int) -> CommandLine:
        base = PROC / str(pid)
        raw = (base / "cmdline").read_bytes()
        argv = tuple(a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a)
        env: dict[str, str] = {}
        for item in (base / "environ").read_bytes().split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep and key:
                env[key.decode(errors="surrogateescape")] = value.decode(
                    errors="surrogateescape")
        return cls(argv, os.readlink(base / "cwd"), env)

    def with_option(self, name: str, value: str) -> CommandLine:
        """The same command with ``name``'s value set to ``value`` (replacing
        ``name V`` or ``name=V``; appended when absent)."""
        argv = list(self.argv)
        for i, arg in enumerate(argv):
            if arg == name and i + 1 < len(argv):
                argv[i + 1] = value
                break
            if arg.startswith(name + "="):
                argv[i] = f"{name}={value}"
                break
        else:
            argv += [name, value]
        return CommandLine(tuple(argv), self.cwd, self.env)

    def option(self, name: str) -> str | None:
        for i, arg in enumerate(self.argv):
            if arg == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    def spawn(self, log: Path) -> int:
        """Start it again in its own session (it outlives this command, as
        the killed one would have), output appended to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(self.argv), cwd=self.cwd, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        return proc.pid


def looks_like_nimbus(pid: int) -> bool:
    """A last check before killing a PID a region reported: it runs nimbus."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return b"nimbus" in raw
