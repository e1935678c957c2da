"""``Blobs`` in a folder: ``<root>/sha256/<first 2 hex>/<digest>``.

Contract (beyond :class:`nimbus.store.base.Blobs`):

* A blob file appears whole or not at all: it is written to a temp file in
  the same folder, fsynced, then ``os.replace``d into place (and the folder
  fsynced), so a crash never leaves a truncated blob under its digest.
* ``get`` re-hashes what it read; a mismatch is ``UnavailableError``.
* A digest that is not 64 lowercase hex chars names no blob (``get`` raises
  ``NotFoundError``, ``has`` is False): it never becomes a path.
* Disk I/O runs in ``asyncio.to_thread``; ``OSError`` becomes ``UnavailableError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

from nimbus.errors import ClosedError, NotFoundError, UnavailableError

_DIGEST = re.compile(r"[0-9a-f]{64}")


class FileBlobs:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._closed = False

    def _path(self, digest: str) -> Path | None:
        if not _DIGEST.fullmatch(digest):
            return None
        return self.root / "sha256" / digest[:2] / digest

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"blobs {self.root} are closed")

    async def put(self, data: bytes) -> str:
        self._check_open()
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        assert path is not None
        try:
            await asyncio.to_thread(_write_atomic, path, data)
        except OSError as exc:
            raise UnavailableError(f"could not store blob {digest}: {exc}") from exc
        return digest

    async def get(self, digest: str) -> bytes:
        self._check_open()
        path = self._path(digest)
        if path is None:
            raise NotFoundError(f"no blob {digest!r} (not a sha256 hex digest)")
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError(f"no blob {digest}") from None
        except OSError as exc:
            raise UnavailableError(f"could not read blob {digest}: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise UnavailableError(f"blob {digest} is corrupt at {path}") from ValueError(
                f"stored bytes hash to {actual}")
        return data

    async def has(self, digest: str) -> bool:
        self._check_open()
        path = self._path(digest)
        if path is None:
            return False
        try:
            return await asyncio.to_thread(path.is_file)
        except OSError as exc:
            raise UnavailableError(f"could not check blob {digest}: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True


def _write_atomic(path: Path, data: bytes) -> None:
    # Content-addressed: an intact file under this name already holds these
    # bytes. A corrupt one is rewritten, so putting again repairs it.
    with contextlib.suppress(FileNotFoundError):
        if hashlib.sha256(path.read_bytes()).hexdigest() == path.name:
            return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def open_file_blobs(root: Path) -> FileBlobs:
    """Blobs under ``root`` (created if missing)."""
    try:
        await asyncio.to_thread(Path(root).mkdir, mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UnavailableError(f"could not create blob folder {root}: {exc}") from exc
    return FileBlobs(Path(root))
