"""Files only the owner may read: created ``0600``, tightened if older.

The state folder holds secrets (functions' ``env``, the control token), so
every file nimbus writes there is readable by its owner alone, whatever the
umask. SQLite gives a database's ``-wal`` and ``-shm`` files the mode of the
database itself, so creating the database ``0600`` covers them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if missing; make it 0600 if not."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def private_database(path: Path) -> None:
    """The SQLite file at ``path`` and whatever sidecars it has: 0600."""
    private_file(path)
    for suffix in SQLITE_SIDECARS:
        tighten(path.with_name(path.name + suffix))


def tighten(path: Path, mode: int = FILE_MODE) -> None:
    """``chmod mode`` if ``path`` is a file or folder of ours with looser
    bits; nothing if it is missing or a symlink."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            return
        if stat.S_IMODE(st.st_mode) & ~mode:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


def write_private(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600 (temp file +
    rename: a reader sees the old content or the new, never a part).
    ``durable``: fsync the file and the folder too."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
