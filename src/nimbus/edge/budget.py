"""A retry budget: retries may add at most ``ratio`` of the requests seen in
the last ``window_s`` seconds, plus a small floor of ``min_per_s`` per second
(so a quiet edge can still retry). Pure: every call takes ``now``.

Counts are kept in one-second buckets over the window: O(1) per call."""

from __future__ import annotations


class RetryBudget:  # at most `ratio` extra load, with a small floor
    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0,
                 window_s: int = 10) -> None:
        if ratio < 0 or min_per_s < 0 or window_s < 1:
            raise ValueError("ratio and min_per_s must not be negative, window_s at least 1")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._seconds = [-1] * window_s   # which second each bucket holds
        self._requests = [0] * window_s
        self._retries = [0] * window_s
        self.denied = 0

    def _bucket(self, now: float) -> int:
        second = int(now)
        i = second % self.window_s
        if self._seconds[i] != second:
            self._seconds[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _totals(self, now: float) -> tuple[int, int]:
        oldest = int(now) - self.window_s
        req = ret = 0
        for i, s in enumerate(self._seconds):
            if s > oldest:
                req += self._requests[i]
                ret += self._retries[i]
        return req, ret

    def record_request(self, now: float) -> None:
        self._requests[self._bucket(now)] += 1

    def try_spend(self, now: float) -> bool:
        """One retry, if the budget has room (and then it is counted)."""
        i = self._bucket(now)
        requests, retries = self._totals(now)
        if retries + 1 > self.ratio * requests + self.min_per_s * self.window_s:
            self.denied += 1
            return False
        self._retries[i] += 1
        return True
