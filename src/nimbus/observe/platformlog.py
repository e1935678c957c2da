"""Platform lines that come in bursts, counted instead of written one by one.

A throttled request is on the hot path of an overloaded function: writing a
log line for each would add work exactly when there is least room for it,
and thousands of identical lines say less than one with a count. A
:class:`ThrottleNotes` adds one to a counter per throttled request; the
first one of a quiet period arms a timer, and when it fires (``window_s``
later) one ``platform`` line at level WARNING says how many requests were
throttled in that window and why. So a function gets at most one such
line per window, and an idle one costs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

THROTTLE_WINDOW_S = 1.0

# (request id, stream, text, level): a function's log
Write = Callable[[str | None, str, str, str], None]


def throttle_line(counts: dict[str, int], window_s: float) -> str:
    """The line for one window: ``counts`` is throttled requests per reason."""
    total = sum(counts.values())
    noun = "request" if total == 1 else "requests"
    why = "; ".join(f"{n} {reason}" for reason, n in counts.items())
    return f"throttled {total} {noun} in the last {window_s:g} s ({why})"


class ThrottleNotes:
    """Counts throttled requests; writes one line per window with the count."""

    __slots__ = ("_write", "window_s", "counts", "_timer")

    def __init__(self, write: Write, window_s: float = THROTTLE_WINDOW_S) -> None:
        self._write = write
        self.window_s = window_s
        self.counts: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def hit(self, reason: str) -> None:
        """One request throttled for ``reason`` (a short, fixed phrase)."""
        counts = self.counts
        counts[reason] = counts.get(reason, 0) + 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.window_s, self.flush)

    def flush(self) -> None:
        """Write the window's line now (if anything was counted)."""
        self._timer = None
        if self.counts:
            counts, self.counts = self.counts, {}
            self._write(None, "platform", throttle_line(counts, self.window_s), "WARNING")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
