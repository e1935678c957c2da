"""One ``nimbus up`` per state folder.

The embedded store and queue have a single owner: at start the queue makes
everything a dead predecessor had leased deliverable again. A second
process on the same folder would take work the first is running, so the
folder is locked (``flock`` on ``nimbus.lock``, which holds the owner's pid)
for as long as its owner lives; the kernel drops the lock when the owner
dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from nimbus.errors import ConflictError

LOCK_FILE = "nimbus.lock"


class StateLock:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited
        os.fchmod(fd, 0o600)  # also a lock file from before it was made private
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConflictError(
                f"another nimbus (pid {holder}) is using the state folder {state_dir}; "
                "stop it first, or give this one another --state-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
