"""Invocation logs: one JSON-lines file per function under ``<state>/logs``.

Each record is ``{"ts": epoch_s, "rid": request_id | null, "stream":
"stdout" | "stderr" | "platform", "text": one line}``. Writes are buffered
and flushed every ``FLUSH_S`` (and on close), so printing handlers pay for a
memory append, not a disk write, on the request path. Readers tail the
files; following polls the file size.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

FLUSH_S = 0.1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class LogSink:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self._dirty: set[str] = set()
        self._flusher: asyncio.TimerHandle | None = None

    def path(self, function: str) -> Path:
        return self.root / f"{_SAFE.sub('_', function)}.log"

    def write(self, function: str, rid: str | None, stream: str, text: str) -> None:
        f = self._files.get(function)
        if f is None:
            f = self._files[function] = open(self.path(function), "ab")  # noqa: SIM115
        now = time.time()
        # "\n" only: str.splitlines would also split on \f, \x1c, \u2028 ...
        for line in text.removesuffix("\n").split("\n"):
            f.write(orjson.dumps({"ts": now, "rid": rid, "stream": stream, "text": line}))
            f.write(b"\n")
        self._dirty.add(function)
        if self._flusher is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flusher = loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        self._flusher = None
        for name in self._dirty:
            self._files[name].flush()
        self._dirty.clear()

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()


def read_records(path: Path, *, request_id: str | None = None,
                 tail: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The records in ``path`` (optionally one request's, the last ``tail``),
    and the byte offset to follow from."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # a torn last line is read on the next follow
    records = list(_parse(data[:end], request_id))
    if tail is not None:
        records = records[-tail:]
    return records, end


async def follow_records(path: Path, offset: int, *, request_id: str | None = None,
                         poll_s: float = 0.2) -> AsyncIterator[dict[str, Any]]:
    """Records appended to ``path`` after ``offset``, as they arrive. Ends
    only when the caller stops iterating."""
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size < offset:
            offset = 0  # the file was replaced
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            end = chunk.rfind(b"\n") + 1
            offset += end
            for rec in _parse(chunk[:end], request_id):
                yield rec
        await asyncio.sleep(poll_s)


def _parse(data: bytes, request_id: str | None) -> Iterator[dict[str, Any]]:
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if request_id is None or rec.get("rid") == request_id:
            yield rec
