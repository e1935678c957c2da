"""An instance's output, captured line by line and tagged with request ids.

Three ways output leaves a handler, all caught here and sent as LOG frames:

- ``print`` / ``sys.stdout`` / ``sys.stderr`` (and ``logging`` handlers set up
  at import, since the writers are installed before the handler module is
  imported): :class:`LogWriter`, one line buffer per thread so concurrent
  invocations never glue their lines together;
- writes to file descriptors 1 and 2 (C extensions, subprocesses): a pipe
  per descriptor, read by one thread (:func:`capture_fds`).

The request id of a line is the invocation running on the writing thread;
threads a handler starts itself, and the descriptor reader, take the
instance's only invocation when it runs one at a time.

Output without a line end is sent in pieces of at most ``MAX_LINE_BYTES``,
so a handler writing 100 MB without a newline costs bounded memory and
linear time, and the descriptor reader never dies: if it did, the pipes
would fill and the next write to fd 1 would block the handler for good.
"""

from __future__ import annotations

import array
import codecs
import fcntl
import io
import os
import selectors
import termios
import threading
import time
from collections.abc import Callable

Send = Callable[[str | None, str, str], None]  # (request_id, stream, text)
MAX_LINE_BYTES = 64 * 1024


class RequestIds:
    """Which invocation is running where."""

    def __init__(self, one_at_a_time: bool) -> None:
        self._local = threading.local()
        self._one_at_a_time = one_at_a_time
        self._only: str | None = None

    def begin(self, rid: str) -> None:
        self._local.rid = rid
        if self._one_at_a_time:
            self._only = rid

    def end(self) -> None:
        # ``_only`` stays: descriptor output is read a moment after it was
        # written, by when the invocation that wrote it may have returned.
        self._local.rid = None

    def current(self) -> str | None:
        return getattr(self._local, "rid", None) or self._only


class LogWriter(io.TextIOBase):
    """A text stream whose every line becomes one ``send`` call."""

    def __init__(self, send: Send, stream: str, ids: RequestIds) -> None:
        self._send = send
        self._stream = stream
        self._ids = ids
        self._local = threading.local()  # one partial line per thread

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        local = self._local.__dict__
        buf = local.setdefault("buf", [])
        buf.append(s)
        local["size"] = local.get("size", 0) + len(s)
        if "\n" in s or local["size"] >= MAX_LINE_BYTES:
            self._emit(final=False)
        return len(s)

    def flush(self) -> None:
        """Send everything buffered, a partial line too (the end of an invocation)."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        buf = getattr(self._local, "buf", None)
        if not buf:
            return
        text = "".join(buf)
        buf.clear()
        self._local.size = 0
        if not final:
            # Complete lines, and full pieces of an overlong one, go now;
            # the rest waits for its line end (or the next flush).
            head, sep, rest = text.rpartition("\n")
            full = len(rest) // MAX_LINE_BYTES * MAX_LINE_BYTES
            text, rest = head + sep + rest[:full], rest[full:]
            if rest:
                buf.append(rest)
                self._local.size = len(rest)
        rid = self._ids.current()
        for start in range(0, len(text), MAX_LINE_BYTES):
            self._send(rid, self._stream, text[start:start + MAX_LINE_BYTES])

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False


def capture_fds(send: Send, ids: RequestIds) -> Callable[[float], None]:
    """Point fds 1 and 2 at pipes drained by a daemon thread into ``send``;
    returns ``drain(timeout_s)``, which waits (at most ``timeout_s``) until
    what was written to them so far has been sent: a child that wrote its
    last words and exited gets them sent before its exit is reported."""
    streams = {}
    busy = [False]  # the thread has taken bytes off a pipe and not yet sent them
    for fd, name in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        streams[r] = name

    def pump() -> None:
        sel = selectors.DefaultSelector()
        for r in streams:
            sel.register(r, selectors.EVENT_READ)
        pending = {r: _Pending(streams[r]) for r in streams}
        while streams:
            for key, _ in sel.select():
                busy[0] = True  # before the read: until then the bytes show in the pipe
                r = key.fd
                try:
                    data = os.read(r, 65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(r)
                    del streams[r]
                    continue
                try:
                    for text in pending[r].feed(data):
                        send(ids.current(), pending[r].stream, text)
                except Exception:  # noqa: BLE001 - keep draining, whatever happened
                    pending[r].reset()
            busy[0] = False

    def drain(timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = array.array("i", [0])
        while time.monotonic() < deadline:
            queued = 0
            for r in list(streams):
                try:
                    fcntl.ioctl(r, termios.FIONREAD, waiting)
                except OSError:
                    continue
                queued += waiting[0]
            if not queued and not busy[0]:
                return
            time.sleep(0.005)

    threading.Thread(target=pump, name="nimbus-fd-capture", daemon=True).start()
    return drain


class _Pending:
    """A descriptor's bytes not yet sent: complete lines go out at once,
    a partial line once it ends or reaches ``MAX_LINE_BYTES``."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[bytes] = []
        self._size = 0
        self._cut = False  # the last piece sent was cut at the length limit

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        if self._cut and not self._parts and data.startswith(b"\n"):
            data = data[1:]  # the end of the line just sent in pieces, not an empty line
        self._cut = False
        head, sep, tail = data.rpartition(b"\n")
        if sep:
            self._parts.append(head + sep)
            out.append(self._decoder.decode(b"".join(self._parts)))
            self._parts, self._size = [], 0
            data = tail
        while data:
            room = MAX_LINE_BYTES - self._size
            piece, data = data[:room], data[room:]
            self._parts.append(piece)
            self._size += len(piece)
            if self._size >= MAX_LINE_BYTES:
                text = self._decoder.decode(b"".join(self._parts))
                self._parts, self._size = [], 0
                self._cut = True
                if text:
                    out.append(text)
        return out
