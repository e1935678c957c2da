"""Averages of a sampled level over recent windows, in fixed time buckets.

The level is a gauge: the number of invocations in flight plus held at the
instant of a sample. Time is cut into buckets of ``bucket_s`` seconds
(bucket ``k`` covers ``[k * bucket_s, (k + 1) * bucket_s)``); a bucket's
value is the mean of the samples that fell into it, and a window's average
is the mean of its buckets: the last ``ceil(window_s / bucket_s)`` of them,
the current (partial) one included, as Knative's bucketed windows do. A
sample therefore weighs in the moment it is recorded.

Gaps: a bucket without samples holds the latest sample's value, because a
gauge nobody looked at did not change (in-flight requests do not finish
because a tick was late). The same holds for buckets between the latest
sample and ``now`` at query time. Before the first sample the level is
unknown and every average is 0.0; while less than a window of time has
passed since the first sample, the average is over the buckets since then,
so a new window is not diluted by time it did not observe.

Time never goes back: a sample or query before the latest sample raises
``ValueError``.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import islice, repeat

# Forgives float noise at bucket edges and in ratios: 0.7 / 0.1 is 7, not 6.99...
EPSILON = 1e-9


class BucketWindow:
    """Bucketed history of one level, long enough for windows up to ``span_s``."""

    def __init__(self, bucket_s: float, span_s: float) -> None:
        if not (math.isfinite(bucket_s) and bucket_s > 0):
            raise ValueError(f"bucket_s must be a positive number, was: {bucket_s!r}")
        if not (math.isfinite(span_s) and span_s > 0):
            raise ValueError(f"span_s must be a positive number, was: {span_s!r}")
        self.bucket_s = bucket_s
        self.size = self.buckets(span_s)
        # means of the buckets before the open one, oldest first
        self._closed: deque[float] = deque(maxlen=self.size)
        self._first: int | None = None  # bucket of the first sample
        self._open = 0  # bucket of the latest sample
        self._sum = 0.0  # of the open bucket's samples
        self._count = 0
        self._latest = 0.0
        self._latest_at = -math.inf

    @property
    def latest(self) -> float:
        """The latest sample's value (0.0 before any): the level now."""
        return self._latest

    @property
    def latest_at(self) -> float:
        """When the latest sample was taken (-inf before any)."""
        return self._latest_at

    def buckets(self, window_s: float) -> int:
        """How many buckets a window of ``window_s`` spans (at least one)."""
        return max(1, math.ceil(window_s / self.bucket_s - EPSILON))

    def record(self, now: float, value: float) -> None:
        """Add a sample of the level at ``now``. Raises ``ValueError`` for a
        negative or non-finite value, or a ``now`` before the latest sample."""
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"concurrency must be a finite number >= 0, was: {value!r}")
        self._check_time(now)
        k = self._index(now)
        if self._first is None:
            self._first = self._open = k
        elif k > self._open:
            self._close_through(k)
        self._sum += value
        self._count += 1
        self._latest = value
        self._latest_at = now

    def average(self, now: float, window_s: float) -> float:
        """Mean level over the window ending at ``now`` (windows longer than
        ``span_s`` are cut to it). Pure: does not change the window."""
        if self._first is None:
            return 0.0
        self._check_time(now)
        k = self._index(now)
        n = min(self.buckets(window_s), self.size, k - self._first + 1)
        held = min(k - self._open, n)  # after the latest sample: its value continued
        total = held * self._latest
        rest = n - held
        if rest > 0:
            total += self._sum / self._count
            total += sum(islice(reversed(self._closed), rest - 1))
        return total / n

    def _index(self, now: float) -> int:
        return math.floor(now / self.bucket_s + EPSILON)

    def _check_time(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number, was: {now!r}")
        if now < self._latest_at:
            raise ValueError(f"time went back: now {now!r} is before the latest sample "
                             f"at {self._latest_at!r}")

    def _close_through(self, k: int) -> None:
        """Close the open bucket and fill the empty ones before bucket ``k``
        with the latest value (a gap means the level held)."""
        self._closed.append(self._sum / self._count)
        missing = min(k - self._open - 1, self.size)
        self._closed.extend(repeat(self._latest, missing))
        self._open = k
        self._sum = 0.0
        self._count = 0


class RecentMax:
    """The highest value of a step function over the last ``span_s`` seconds.

    Each pushed value holds from its ``now`` until the next push, so a value
    pushed before ``now - span_s`` still counts while it held into the
    window. Amortised O(1): a value that a later, higher one outlasts is
    dropped at once (a monotonic deque).
    """

    def __init__(self, span_s: float) -> None:
        if not (math.isfinite(span_s) and span_s >= 0):
            raise ValueError(f"span_s must be a finite number >= 0, was: {span_s!r}")
        self.span_s = span_s
        self._entries: deque[list[float]] = deque()  # [since, until, value], values falling
        self._first: float | None = None

    def push(self, now: float, value: float) -> None:
        """The value from ``now`` on. ``now`` must not go back."""
        if self._first is None:
            self._first = now
        if self._entries:
            self._entries[-1][1] = now  # the previous value held until now
        while self._entries and self._entries[-1][2] <= value:
            self._entries.pop()
        self._entries.append([now, math.inf, value])

    def max(self, now: float) -> float:
        """The highest value that held in ``[now - span_s, now]`` (-inf if none)."""
        boundary = now - self.span_s
        while self._entries and self._entries[0][1] <= boundary:
            self._entries.popleft()
        return self._entries[0][2] if self._entries else -math.inf

    def covers(self, now: float) -> bool:
        """Whether values were pushed for the whole span before ``now``."""
        return self._first is not None and now - self._first >= self.span_s
