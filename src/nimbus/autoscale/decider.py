"""How many instances a function should have: a pure decision over samples.

Knative's KPA, simplified and made to take ``now`` as a parameter:

- Demand is observed concurrency: invocations in flight plus requests held
  waiting for an instance. The autoscaler records one sample per tick; the
  averages are plain means of the samples inside a window (ticks are
  regular, so this is the time average; a missing tick just means fewer
  samples).
- desired = ceil(stable-window average / target concurrency per instance).
- Panic: when the panic-window demand (its average, or the latest sample if
  higher) reaches ``panic_threshold`` x the current capacity (ready
  instances), scale to that demand at once and never scale down while panicking; the panic ends when its
  condition has not held for a whole stable window.
- Scale-down: a lower value must hold for ``scale_down_delay_s``, then the
  count falls one instance per decision.
- Zero: only after ``scale_to_zero_after_s`` with no arrivals and nothing in
  flight or held (then all at once: every instance is idle). Until then, and
  whenever there is any demand, at least one instance. A new pool's idle
  grace starts at its first sample, so a freshly deployed instance lives for
  the grace even if nothing calls it.
- Always ``min_instances <= desired <= max_instances``; growth per decision
  is limited to ``max_scale_up_rate x max(ready, 1)``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    target_concurrency: float
    max_instances: int
    min_instances: int = 0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_to_zero_after_s: float = 30.0
    max_scale_up_rate: float = 1000.0
    scale_down_delay_s: float = 2.0

    def __post_init__(self) -> None:
        def rule(ok: bool, name: str, text: str) -> None:
            if not ok:
                raise ValueError(f"{name} {text}, was: {getattr(self, name)}")

        rule(self.target_concurrency > 0, "target_concurrency", "must be positive")
        rule(self.max_instances >= 1, "max_instances", "must be at least 1")
        rule(0 <= self.min_instances <= self.max_instances, "min_instances",
             f"must be within 0..max_instances ({self.max_instances})")
        rule(self.stable_window_s > 0, "stable_window_s", "must be positive")
        rule(0 < self.panic_window_s <= self.stable_window_s, "panic_window_s",
             f"must be positive and at most stable_window_s ({self.stable_window_s})")
        rule(self.panic_threshold > 1, "panic_threshold", "must be greater than 1")
        rule(self.scale_to_zero_after_s >= 0, "scale_to_zero_after_s", "cannot be negative")
        rule(self.max_scale_up_rate > 1, "max_scale_up_rate", "must be greater than 1")
        rule(self.scale_down_delay_s >= 0, "scale_down_delay_s", "cannot be negative")


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    panic: bool
    stable_concurrency: float
    panic_concurrency: float
    reason: str


class Decider:
    def __init__(self, config: ScalingConfig) -> None:
        self.config = config
        self._samples: deque[tuple[float, float]] = deque()
        self._last_activity: float | None = None  # last sample with demand or arrivals
        self._first_seen: float | None = None
        self._panic_last: float | None = None  # last time the panic condition held
        self._lower_since: float | None = None  # since when desired < ready
        self._last_desired = 0

    def record(self, now: float, concurrency: float, arrivals: int = 0) -> None:
        """One sample: in-flight + held invocations at ``now``, and requests
        that arrived since the previous sample."""
        if self._first_seen is None:
            self._first_seen = now
        self._samples.append((now, float(concurrency)))
        if concurrency > 0 or arrivals > 0:
            self._last_activity = now
        horizon = now - self.config.stable_window_s
        while self._samples and self._samples[0][0] <= horizon:
            self._samples.popleft()

    def _average(self, now: float, window_s: float) -> float:
        values = [c for t, c in self._samples if t > now - window_s]
        return sum(values) / len(values) if values else 0.0

    def decide(self, now: float, ready: int) -> Decision:
        c = self.config
        stable = self._average(now, c.stable_window_s)
        # Held and in-flight requests are demand that exists now: the panic
        # figure is the panic-window average or the latest sample, whichever
        # is higher, so a step is met at once instead of as the window fills.
        latest = self._samples[-1][1] if self._samples else 0.0
        burst = max(self._average(now, c.panic_window_s), latest)
        want_stable = math.ceil(stable / c.target_concurrency - 1e-9)
        want_panic = math.ceil(burst / c.target_concurrency - 1e-9)

        if want_panic > ready and want_panic >= c.panic_threshold * max(ready, 1):
            self._panic_last = now
        elif self._panic_last is not None and now - self._panic_last >= c.stable_window_s:
            self._panic_last = None
        panic = self._panic_last is not None

        if panic:
            desired = max(want_panic, self._last_desired, ready)
            reason = "panic"
        else:
            desired, reason = want_stable, "stable"
            if desired < ready:
                if self._lower_since is None:
                    self._lower_since = now
                if now - self._lower_since < c.scale_down_delay_s:
                    desired, reason = ready, "hold (scale-down delay)"
                else:
                    desired, reason = ready - 1, "scale down one step"
            else:
                self._lower_since = None

        since = self._last_activity if self._last_activity is not None else self._first_seen
        idle_s = now - since if since is not None else math.inf
        demand_now = bool(self._samples) and self._samples[-1][1] > 0
        if demand_now or self._last_activity == now:
            desired = max(desired, 1)  # scale from zero without waiting for a window
        elif idle_s >= c.scale_to_zero_after_s:
            desired, reason = 0, f"scale to zero after {c.scale_to_zero_after_s:g} s idle"
        elif self._last_activity is not None or ready > 0:
            desired = max(desired, 1)  # inside the idle grace

        up_limit = math.ceil(c.max_scale_up_rate * max(ready, 1))
        desired = max(c.min_instances, min(desired, c.max_instances, up_limit))
        self._last_desired = desired
        if desired < ready and reason.startswith("scale to zero"):
            self._lower_since = None
        return Decision(desired, panic, stable, burst, reason)
