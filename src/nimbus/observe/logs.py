"""Invocation logs: JSON-lines files per function under ``<state>/logs``.

Each record is ``{"ts": epoch_s, "rid": request_id | null, "stream":
"stdout" | "stderr" | "platform", "text": one line}``. A line longer than
``MAX_LINE_CHARS`` is cut into several records, so no record is unbounded.
Writes are buffered and flushed every ``FLUSH_S`` (and on close), so
printing handlers pay for a memory append, not a disk write, on the request
path.

Rotation by size: ``<fn>.log`` is the current file; when it would pass
``LogLimits.max_bytes`` it becomes ``<fn>.log.1`` (``.1`` becomes ``.2``,
and so on; the oldest past ``LogLimits.files`` is deleted). A function's
logs so take at most ``files x max_bytes`` (plus one record).

Reading (:class:`LogReader`): the last N records are read from the end of
the files backwards, block by block, never the whole file; following keeps
the current file open, reads it to its end when it is rotated away, then
goes on with the new one (as ``tail -F`` does). Readers block on disk:
callers on an event loop run them in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import orjson

FLUSH_S = 0.1
MAX_LINE_CHARS = 64 * 1024
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_FILES = 3
_BLOCK = 64 * 1024  # read size going backwards
_CHUNK = 1024 * 1024  # most read at once going forwards
# A record can be ~6x its text (JSON escapes); anything longer is not ours
# (a file from elsewhere): skipped, not buffered.
MAX_RECORD_BYTES = 8 * MAX_LINE_CHARS
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class LogLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # of one file, before it is rotated
    files: int = DEFAULT_FILES  # the current one and the rotated ones kept

    def __post_init__(self) -> None:
        for key, least in (("max_bytes", 4096), ("files", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"log limit {key} must be an integer of at least {least}, "
                                 f"was: {value!r}")


def record_extra(stream: str, level: str | None, fields: dict[str, Any] | None,
                 text: str = "") -> dict[str, Any]:
    """A record's optional keys: ``level`` (platform lines default to
    ERROR, printed lines have none) and ``fields`` (a JSON-format line's).
    A line cut into pieces (longer than ``MAX_LINE_CHARS``) keeps its text
    but not its fields: every piece would carry them all, and a record
    stays bounded."""
    if level is None and stream == "platform":
        level = "ERROR"
    if level is None:
        return {}
    if fields is None or len(text) > MAX_LINE_CHARS:
        return {"level": level}
    return {"level": level, "fields": fields}


def rotated(path: Path, n: int) -> Path:
    """The n-th older file of the log at ``path`` (``<fn>.log.<n>``)."""
    return path.with_name(f"{path.name}.{n}")


def older_files(path: Path) -> list[Path]:
    """The rotated files of the log at ``path``, newest first."""
    found = []
    n = 1
    while (p := rotated(path, n)).exists():
        found.append(p)
        n += 1
    return found


class LogSink:
    def __init__(self, root: Path, limits: LogLimits | None = None) -> None:
        self.root = root
        self.limits = limits or LogLimits()
        root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self._sizes: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._flusher: asyncio.TimerHandle | None = None

    def path(self, function: str) -> Path:
        return self.root / f"{_SAFE.sub('_', function)}.log"

    def write(self, function: str, rid: str | None, stream: str, text: str,
              level: str | None = None, fields: dict[str, Any] | None = None) -> None:
        f = self._files.get(function)
        if f is None:
            f = self._open(function)
        now = time.time()
        limit = self.limits.max_bytes
        extra = record_extra(stream, level, fields, text)
        # "\n" only: str.splitlines would also split on \f, \x1c, \u2028 ...
        for line in text.removesuffix("\n").split("\n"):
            for start in range(0, max(len(line), 1), MAX_LINE_CHARS):
                rec = orjson.dumps({"ts": now, "rid": rid, "stream": stream,
                                    "text": line[start:start + MAX_LINE_CHARS], **extra},
                                   default=str) + b"\n"
                size = self._sizes[function]
                if size and size + len(rec) > limit:
                    f = self._rotate(function)
                f.write(rec)
                self._sizes[function] += len(rec)
        self._dirty.add(function)
        if self._flusher is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flusher = loop.call_later(FLUSH_S, self.flush)

    def _open(self, function: str) -> IO[bytes]:
        f = self._files[function] = open(self.path(function), "ab")  # noqa: SIM115
        self._sizes[function] = os.fstat(f.fileno()).st_size
        return f

    def _rotate(self, function: str) -> IO[bytes]:
        """Close the current file, shift the older ones, open a new one."""
        self._files.pop(function).close()
        self._dirty.discard(function)
        path = self.path(function)
        keep = self.limits.files - 1  # rotated files kept
        with contextlib.suppress(FileNotFoundError):
            if keep == 0:
                path.unlink()
            else:
                for n in range(keep, 0, -1):
                    src = path if n == 1 else rotated(path, n - 1)
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(src, rotated(path, n))
        n = keep + 1  # files left by a larger `files` setting earlier
        while rotated(path, n).exists():
            rotated(path, n).unlink()
            n += 1
        return self._open(function)

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
        self._sizes.clear()


class LogReader:
    """One function's log as of now (:meth:`history`), then what comes after
    (:meth:`more`). Opening pins the current file and its end, so history
    and following meet exactly, whatever is written or rotated meanwhile."""

    def __init__(self, path: Path, *, request_id: str | None = None,
                 match: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.path = path
        self.request_id = request_id
        self.match = match
        self._f: IO[bytes] | None = None
        self._pos = 0
        self._skipping = False  # inside a line too long to be a record
        self._older: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            self._f = open(path, "rb")  # noqa: SIM115
            self._older = older_files(path)
            self._pos = _last_newline(self._f, os.fstat(self._f.fileno()).st_size)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- history ---------------------------------------------------------------

    def history(self, tail: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """Batches of records up to the pinned end, oldest first: all of
        them, or the last ``tail`` (read backwards from the end)."""
        if tail is not None:
            yield self._tail(tail)
            return
        for older in reversed(self._older):
            with contextlib.suppress(FileNotFoundError), open(older, "rb") as f:
                yield from self._forward(f, 0, os.fstat(f.fileno()).st_size)
        if self._f is not None:
            yield from self._forward(self._f, 0, self._pos)

    def _tail(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if n <= 0:
            return out
        sources: list[tuple[Path | None, int | None]] = [(None, self._pos)]
        sources += [(p, None) for p in self._older]
        for path, end in sources:
            if path is None:
                if self._f is None:
                    continue
                lines = _backward(self._f, end or 0)
                out.extend(self._matching(lines, n - len(out)))
            else:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    out.extend(self._matching(_backward(f, _last_newline(f, size)),
                                              n - len(out)))
            if len(out) >= n:
                break
        out.reverse()
        return out

    def _matching(self, lines: Iterator[bytes], n: int) -> list[dict[str, Any]]:
        got = []
        for line in lines:
            rec = self._parse(line)
            if rec is not None:
                got.append(rec)
                if len(got) >= n:
                    break
        return got

    def _forward(self, f: IO[bytes], start: int, end: int) -> Iterator[list[dict[str, Any]]]:
        pos = start
        skipping = False
        while pos < end:
            f.seek(pos)
            chunk = f.read(min(_CHUNK, end - pos))
            if not chunk:
                return
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:  # no line end in a whole chunk: not a record; skip it
                pos += len(chunk)
                skipping = True
                continue
            lines = chunk[:cut].split(b"\n")
            if skipping:
                lines = lines[1:]
                skipping = False
            pos += cut
            yield [r for r in map(self._parse, lines) if r is not None]

    # -- following -------------------------------------------------------------

    def more(self) -> list[dict[str, Any]]:
        """Records written since the last call (at most about 1 MiB of them);
        follows the log across rotation. Empty when there is nothing new."""
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                return []
            self._pos = 0
        size = os.fstat(self._f.fileno()).st_size
        if size < self._pos:  # truncated or replaced in place
            self._pos = 0
        if size > self._pos:
            self._f.seek(self._pos)
            chunk = self._f.read(min(_CHUNK, size - self._pos))
            cut = chunk.rfind(b"\n") + 1
            if cut:
                lines = chunk[:cut].split(b"\n")
                if self._skipping:
                    lines = lines[1:]
                    self._skipping = False
                self._pos += cut
                return [r for r in map(self._parse, lines) if r is not None]
            if len(chunk) >= _CHUNK:  # a line longer than any record: skip it
                self._pos += len(chunk)
                self._skipping = True
                return []
        # Nothing complete is left in this file: has it been rotated away?
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            return []
        if current != os.fstat(self._f.fileno()).st_ino:
            self._f.close()
            self._f = None
            self._skipping = False
            return self.more()
        return []

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if not line:
            return None
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(rec, dict):
            return None
        if self.request_id is not None and rec.get("rid") != self.request_id:
            return None
        if self.match is not None and not self.match(rec):
            return None
        return rec


def _last_newline(f: IO[bytes], end: int) -> int:
    """The offset just past the last line end before ``end`` (a torn last line
    is left for following), looking back at most one record's length."""
    pos = end
    while pos > 0 and end - pos < MAX_RECORD_BYTES:
        step = min(_BLOCK, pos)
        f.seek(pos - step)
        block = f.read(step)
        at = block.rfind(b"\n")
        if at >= 0:
            return pos - step + at + 1
        pos -= step
    return pos if pos == 0 else end


def _backward(f: IO[bytes], end: int) -> Iterator[bytes]:
    """Complete lines before ``end`` (which is just past a line end), last first."""
    pos = end
    rest = b""
    skipping = False
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step) + rest
        lines = block.split(b"\n")
        rest = lines[0]
        tail = lines[1:]
        if skipping and tail:
            tail = tail[:-1]  # the end of the line that was too long
            skipping = False
        elif skipping:
            rest = b""
            continue
        for line in reversed(tail):
            if line:
                yield line
        if len(rest) > MAX_RECORD_BYTES:  # not a record: drop it as it grows
            rest = b""
            skipping = True
    if rest and not skipping:
        yield rest


def recent_records(path: Path, since: float, *, request_id: str | None = None,
                   max_bytes: int = 4 * 1024 * 1024) -> list[dict[str, Any]]:
    """The records at the end of the log at ``path`` written at ``since`` or
    later (of ``request_id`` only, if given), oldest first. Read backwards
    from the end: it stops at the first older record, or after ``max_bytes``
    (lines before that are not returned), so its cost is what was written
    since, not the log's size. The current file only: what a rotation moved
    away meanwhile is not read."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        read = 0
        for line in _backward(f, _last_newline(f, os.fstat(f.fileno()).st_size)):
            read += len(line) + 1
            if read > max_bytes:
                break
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            ts = rec.get("ts")
            if isinstance(ts, int | float) and ts < since:
                break
            if request_id is None or rec.get("rid") == request_id:
                out.append(rec)
    out.reverse()
    return out


# -- the earlier one-shot API, kept for callers that read without following -------


def read_records(path: Path, *, request_id: str | None = None,
                 tail: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The records in the log at ``path`` (optionally one request's, the last
    ``tail``), and the byte offset in the current file they end at."""
    with LogReader(path, request_id=request_id) as reader:
        return [r for batch in reader.history(tail) for r in batch], reader._pos


async def follow_records(path: Path, offset: int, *, request_id: str | None = None,
                         poll_s: float = 0.2) -> AsyncIterator[dict[str, Any]]:
    """Records appended to the log at ``path`` after ``offset``, as they
    arrive, across rotation. Ends only when the caller stops iterating."""
    reader = LogReader(path, request_id=request_id)
    reader._pos = offset
    try:
        while True:
            batch = await asyncio.to_thread(reader.more)
            for rec in batch:
                yield rec
            if not batch:
                await asyncio.sleep(poll_s)
    finally:
        reader.close()
