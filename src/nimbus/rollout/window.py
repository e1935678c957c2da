"""Invocation counts of one function version over a span of time.

A :class:`Window` holds what ``nimbus_invocations_total`` and
``nimbus_invocation_duration_seconds`` say about one function version:
counts by outcome and the duration histogram (non-cumulative, one count per
:data:`nimbus.observe.metrics.DURATION_BUCKETS` bound plus one for +Inf).
Counters read from processes are cumulative; the window of a rollout step is
the difference between two readings, taken per process by :func:`delta` so
that a process that restarted (its counters went down) or appeared during
the step is still counted right.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nimbus.observe.metrics import DURATION_BUCKETS, OUTCOMES

N_BUCKETS = len(DURATION_BUCKETS) + 1
_ZERO_BUCKETS: tuple[int, ...] = (0,) * N_BUCKETS


@dataclass(frozen=True, slots=True)
class Window:
    """Invocations of one function version: counts by outcome, durations."""

    success: int = 0
    error: int = 0
    timeout: int = 0
    throttled: int = 0
    instance_died: int = 0
    buckets: tuple[int, ...] = _ZERO_BUCKETS
    total_s: float = 0.0  # sum of the durations counted in ``buckets``

    def __post_init__(self) -> None:
        if len(self.buckets) != N_BUCKETS:
            raise ValueError(f"a window has {N_BUCKETS} duration buckets, "
                             f"got {len(self.buckets)}")

    @staticmethod
    def empty() -> Window:
        return _EMPTY

    # -- figures ------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Every invocation, whatever its outcome."""
        return self.success + self.error + self.timeout + self.throttled + self.instance_died

    @property
    def failed(self) -> int:
        """Invocations that failed for the caller through the function:
        the handler raised, ran past its timeout, or its instance died."""
        return self.error + self.timeout + self.instance_died

    def _rate(self, n: int) -> float:
        total = self.requests
        return n / total if total else 0.0

    @property
    def error_rate(self) -> float:
        """(error + timeout + instance_died) / requests; 0.0 with no requests."""
        return self._rate(self.failed)

    @property
    def throttle_rate(self) -> float:
        return self._rate(self.throttled)

    @property
    def timeout_rate(self) -> float:
        return self._rate(self.timeout)

    @property
    def death_rate(self) -> float:
        return self._rate(self.instance_died)

    @property
    def observed(self) -> int:
        """Invocations with a duration (an instance answered them)."""
        return sum(self.buckets)

    @property
    def mean(self) -> float | None:
        """Mean duration in seconds, None without durations."""
        n = self.observed
        return self.total_s / n if n else None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of durations, in seconds, interpolated
        linearly inside its bucket as Prometheus' ``histogram_quantile`` does:
        the first bucket starts at 0, and a rank in the +Inf bucket answers
        the highest finite bound. None without durations."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile is within 0..1, got {q}")
        total = self.observed
        if total == 0:
            return None
        rank = q * total
        below = 0
        for i, n in enumerate(self.buckets):
            if n and below + n >= rank:
                if i == len(DURATION_BUCKETS):
                    return DURATION_BUCKETS[-1]
                lower = DURATION_BUCKETS[i - 1] if i else 0.0
                upper = DURATION_BUCKETS[i]
                return lower + (upper - lower) * (rank - below) / n
            below += n
        return DURATION_BUCKETS[-1]  # pragma: no cover - rank <= total always lands above

    def figures(self) -> dict[str, Any]:
        """The figures a rollout shows and records (rates 0..1, seconds)."""
        return {
            "requests": self.requests, "failed": self.failed,
            "error_rate": self.error_rate, "throttle_rate": self.throttle_rate,
            "timeout_rate": self.timeout_rate, "death_rate": self.death_rate,
            "p50": self.quantile(0.5), "p90": self.quantile(0.9),
            "p95": self.quantile(0.95), "p99": self.quantile(0.99), "mean": self.mean,
        }

    # -- arithmetic -----------------------------------------------------------------

    def __add__(self, other: Window) -> Window:
        return Window(
            self.success + other.success, self.error + other.error,
            self.timeout + other.timeout, self.throttled + other.throttled,
            self.instance_died + other.instance_died,
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True)),
            self.total_s + other.total_s)

    def __sub__(self, other: Window) -> Window:
        return Window(
            self.success - other.success, self.error - other.error,
            self.timeout - other.timeout, self.throttled - other.throttled,
            self.instance_died - other.instance_died,
            tuple(a - b for a, b in zip(self.buckets, other.buckets, strict=True)),
            self.total_s - other.total_s)

    def went_down_from(self, earlier: Window) -> bool:
        """Whether any count is below ``earlier``'s: the process restarted."""
        if any(getattr(self, o) < getattr(earlier, o) for o in OUTCOMES):
            return True
        return any(a < b for a, b in zip(self.buckets, earlier.buckets, strict=True))

    # -- records --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {o: getattr(self, o) for o in OUTCOMES}
        d["buckets"] = list(self.buckets)
        d["total_s"] = self.total_s
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Window:
        """The window :meth:`to_dict` wrote (missing counts are 0)."""
        buckets = d.get("buckets")
        return Window(
            success=int(d.get("success", 0)), error=int(d.get("error", 0)),
            timeout=int(d.get("timeout", 0)), throttled=int(d.get("throttled", 0)),
            instance_died=int(d.get("instance_died", 0)),
            buckets=_ZERO_BUCKETS if buckets is None else tuple(int(n) for n in buckets),
            total_s=float(d.get("total_s", 0.0)))


_EMPTY = Window()

# (function, version) -> process id -> cumulative window of that process.
Counters = dict[tuple[str, int], dict[str, Window]]


def delta(start: Mapping[str, Window], now: Mapping[str, Window]) -> Window:
    """What the processes in ``now`` counted since ``start``, summed.

    Per process: one missing at ``start`` (it appeared since) counts from
    zero, and so does one whose counters went down (it restarted). A process
    in ``start`` but not in ``now`` (gone, or not answering) adds nothing."""
    acc = _EMPTY
    for pid, w in now.items():
        before = start.get(pid)
        restarted = before is None or w.went_down_from(before)
        acc = acc + (w if restarted or before is None else w - before)
    return acc


def total(now: Mapping[str, Window]) -> Window:
    """Every process's window summed (the cumulative counts)."""
    return delta({}, now)


def counters_to_dict(counters: Counters) -> dict[str, dict[str, dict[str, Any]]]:
    """``counters`` as JSON: ``{"fn@version": {process: window dict}}``."""
    return {f"{fn}@{version}": {pid: w.to_dict() for pid, w in by_pid.items()}
            for (fn, version), by_pid in counters.items()}


def counters_from_dict(d: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Counters:
    """The counters :func:`counters_to_dict` wrote."""
    out: Counters = {}
    for key, by_pid in d.items():
        fn, _, version = key.rpartition("@")
        out[(fn, int(version))] = {pid: Window.from_dict(w) for pid, w in by_pid.items()}
    return out
