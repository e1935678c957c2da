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
"""

from __future__ import annotations

import io
import os
import selectors
import threading
from collections.abc import Callable

Send = Callable[[str | None, str, str], None]  # (request_id, stream, text)


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
        if not s:
            return 0
        buf = self._local.__dict__.setdefault("buf", [])
        buf.append(s)
        if "\n" in s:
            self.flush()
        return len(s)

    def flush(self) -> None:
        buf = getattr(self._local, "buf", None)
        if not buf:
            return
        text = "".join(buf)
        buf.clear()
        self._send(self._ids.current(), self._stream, text)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False


def capture_fds(send: Send, ids: RequestIds) -> None:
    """Point fds 1 and 2 at pipes drained by a daemon thread into ``send``."""
    streams = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        streams[r] = name

    def pump() -> None:
        sel = selectors.DefaultSelector()
        for r in streams:
            sel.register(r, selectors.EVENT_READ)
        partial = {r: b"" for r in streams}
        while streams:
            for key, _ in sel.select():
                r = key.fd
                data = os.read(r, 65536)
                if not data:
                    sel.unregister(r)
                    del streams[r]
                    continue
                data = partial[r] + data
                head, sep, tail = data.rpartition(b"\n")
                partial[r] = tail
                if sep:
                    send(ids.current(), streams[r], head.decode(errors="replace") + "\n")

    threading.Thread(target=pump, name="nimbus-fd-capture", daemon=True).start()
