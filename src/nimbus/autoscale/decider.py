"""How many instances a function should have: a pure decision over samples.

Knative's KPA, with ``now`` as a parameter (no clock, no sleeping, no I/O):
the caller records one sample per tick (at most 1 s apart, possibly
irregular or missing) and asks for a decision once per tick.

Demand
    A sample is the concurrency at ``now`` (invocations in flight plus
    requests held waiting for an instance) and the number of requests that
    arrived since the previous sample. Averages are per-bucket means over
    the stable window and the panic window
    (:class:`~nimbus.autoscale.window.BucketWindow`, buckets of 1 s, or
    of the panic window if that is shorter). A missing sample means the
    last value continued: in-flight requests do not finish because a tick
    was late, so gaps never make a function look idle.

Stable mode
    desired = ceil(stable average / target_concurrency). Up at once (within
    the rate and bounds below). Down only after the lower value has held for
    ``scale_down_delay_s``, then one instance per decision, and never below
    ceil(current concurrency / target): an instance the requests in flight
    right now need is not taken away (on a rising ramp the lagging stable
    average would otherwise remove capacity that is about to be used).
    "The lower value held" is Knative's rule: desired never falls below the
    highest count asked for over the last ``scale_down_delay_s`` (panic
    decisions included, so the delay runs from the panic's end), which a
    decline follows without stalling each time the steps catch up.

Panic mode
    The panic figure is the panic-window average, or the current
    concurrency if higher: in-flight and held requests are demand that
    exists now, not a forecast, and waiting for a 6 s window to fill would
    make a step take seconds to meet. Panic starts (or is renewed) when
    panic figure / target >= ``panic_threshold`` x max(ready, 1), i.e. the
    demand needs twice the instances there are (an unrounded ratio, as
    Knative's, so one request on one instance at target 0.7 is no panic).
    While panicking, desired = max(ceil(panic figure / target), ready at
    entry, the highest desired so far in this panic, ready): never down.
    Panic ends once its condition has not held for a whole stable window.

Idle and zero
    Any demand now (concurrency > 0, or arrivals in the latest sample)
    means at least one instance, so the first request after zero never
    waits for a window to fill. With none, the function is idle since its
    last activity (or, if it never had any, since the decider's first
    sample or decision, so a deploy's warm instance lives for the grace).
    Within ``scale_to_zero_after_s`` of that, at least one instance if
    there was activity or an instance is up; after it, zero at once, not
    step by step: every instance is idle, so nothing is lost. Panic takes
    precedence: no scale to zero until the panic has ended.

Bounds (applied last, in this order)
    desired <= ceil(max_scale_up_rate x max(ready, 1)); desired <=
    max_instances; desired >= min_instances. So min_instances <= desired
    <= max_instances always holds, even against the rate limit.

``decide`` updates the panic and scale-down timers, so call it once per
tick; ``record`` and ``decide`` raise ``ValueError`` if time goes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nimbus.autoscale.window import EPSILON, BucketWindow, RecentMax

MAX_BUCKET_S = 1.0


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """One function's autoscaling settings, validated on construction:
    a bad value raises ``ValueError`` naming the field, the rule and the value."""

    target_concurrency: float  # in-flight invocations per instance to aim for
    max_instances: int
    min_instances: int = 0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0  # x current capacity
    scale_to_zero_after_s: float = 30.0  # idle grace
    max_scale_up_rate: float = 1000.0  # x max(ready, 1) per decision
    scale_down_delay_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_instances", "min_instances"):
            value = getattr(self, name)
            _require(self, name, isinstance(value, int) and not isinstance(value, bool),
                     "must be an integer")
        for name in ("target_concurrency", "stable_window_s", "panic_window_s",
                     "panic_threshold", "scale_to_zero_after_s", "max_scale_up_rate",
                     "scale_down_delay_s"):
            value = getattr(self, name)
            _require(self, name, isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value), "must be a finite number")
        _require(self, "target_concurrency", self.target_concurrency > 0, "must be positive")
        _require(self, "max_instances", self.max_instances >= 1, "must be at least 1")
        _require(self, "min_instances", 0 <= self.min_instances <= self.max_instances,
                 f"must be within 0..max_instances ({self.max_instances})")
        _require(self, "stable_window_s", self.stable_window_s > 0, "must be positive")
        _require(self, "panic_window_s", 0 < self.panic_window_s <= self.stable_window_s,
                 f"must be positive and at most stable_window_s ({self.stable_window_s})")
        # at or below 1x, a function at its target would panic forever
        _require(self, "panic_threshold", self.panic_threshold > 1, "must be greater than 1")
        _require(self, "scale_to_zero_after_s", self.scale_to_zero_after_s >= 0,
                 "cannot be negative")
        # at or below 1x, a function could never grow
        _require(self, "max_scale_up_rate", self.max_scale_up_rate > 1, "must be greater than 1")
        _require(self, "scale_down_delay_s", self.scale_down_delay_s >= 0, "cannot be negative")


def _require(config: ScalingConfig, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, was: {getattr(config, name)!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int  # instances wanted now
    panic: bool
    stable_concurrency: float  # average over the stable window
    panic_concurrency: float  # average over the panic window
    reason: str  # short human text: which rule decided
    current_concurrency: float = 0.0  # the latest sample


class Decider:
    """The decision for one function version. Not thread-safe; one owner."""

    def __init__(self, config: ScalingConfig) -> None:
        self.config = config
        self._window = BucketWindow(min(MAX_BUCKET_S, config.panic_window_s),
                                    config.stable_window_s)
        self._now = -math.inf  # latest time seen by record or decide
        self._started: float | None = None  # first record or decide
        self._last_activity: float | None = None  # last sample with demand or arrivals
        self._panic_last: float | None = None  # last time the panic condition held
        self._panic_peak = 0  # highest desired in the current panic
        # what each decision asked for, for the scale-down delay
        self._asked = RecentMax(config.scale_down_delay_s)

    def record(self, now: float, concurrency: float, arrivals: int = 0) -> None:
        """One sample: in-flight + held (waiting) invocations at ``now``, and
        how many requests arrived since the previous sample. Raises
        ``ValueError`` for negative values or if ``now`` went back."""
        if arrivals < 0:
            raise ValueError(f"arrivals cannot be negative, was: {arrivals!r}")
        self._check_time(now)
        self._window.record(now, concurrency)
        self._advance(now)
        if concurrency > 0 or arrivals > 0:
            self._last_activity = now

    def decide(self, now: float, ready: int) -> Decision:
        """Desired instance count given ``ready`` instances now. Called once
        per tick; raises ``ValueError`` if ``now`` went back or ``ready`` < 0."""
        if ready < 0:
            raise ValueError(f"ready cannot be negative, was: {ready!r}")
        self._check_time(now)
        self._advance(now)
        c = self.config
        stable = self._window.average(now, c.stable_window_s)
        panic_avg = self._window.average(now, c.panic_window_s)
        current = self._window.latest
        burst = max(panic_avg, current)

        panic = self._update_panic(now, burst, ready)
        if panic:
            desired = max(self._need(burst), self._panic_peak, ready)
            self._asked.push(now, desired)  # so a scale-down waits from the panic's end
            reason = "panic"
        else:
            desired, reason = self._stable(now, self._need(stable), self._need(current), ready)
        desired, reason = self._idle(now, desired, reason, ready, current, panic)
        desired, reason = self._bound(desired, reason, ready)
        if panic:
            self._panic_peak = max(self._panic_peak, desired)
        return Decision(desired, panic, stable, panic_avg, reason, current)

    def _check_time(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number, was: {now!r}")
        if now < self._now:
            raise ValueError(f"time went back: now {now!r} is before {self._now!r}")

    def _advance(self, now: float) -> None:
        if self._started is None:
            self._started = now
        self._now = max(self._now, now)

    def _need(self, concurrency: float) -> int:
        """Instances that carry ``concurrency`` at the target per instance."""
        return max(0, math.ceil(concurrency / self.config.target_concurrency - EPSILON))

    def _update_panic(self, now: float, burst: float, ready: int) -> bool:
        """Enter or renew panic if the burst needs ``panic_threshold`` x the
        capacity there is; leave it a stable window after it last did."""
        c = self.config
        if burst / c.target_concurrency >= c.panic_threshold * max(ready, 1):
            if self._panic_last is None:
                self._panic_peak = ready  # never below what panic started from
            self._panic_last = now
        elif self._panic_last is not None and now - self._panic_last >= c.stable_window_s:
            self._panic_last = None
            self._panic_peak = 0
        return self._panic_last is not None

    def _stable(self, now: float, want: int, floor: int, ready: int) -> tuple[int, str]:
        """Stable mode: up at once to ``want``; down one step at a time once
        everything asked for over the last scale-down delay (the stable
        need, or the current one if higher) was below ``ready``."""
        self._asked.push(now, max(want, floor))
        if want > ready:
            return want, "scale up (stable window)"
        if max(want, floor) >= ready:
            return ready, "steady" if want == ready else "hold (current demand)"
        if self._asked.max(now) >= ready or not self._asked.covers(now):
            return ready, "hold (scale-down delay)"
        return ready - 1, "scale down one step"

    def _idle(self, now: float, desired: int, reason: str, ready: int, current: float,
              panic: bool) -> tuple[int, str]:
        """At least one instance with demand now or within the idle grace;
        zero after the grace with no requests (not while panicking)."""
        # arrivals count as demand at the instant of their sample
        active_now = current > 0 or (self._last_activity is not None
                                     and self._last_activity >= now)
        if active_now:
            return (desired, reason) if desired >= 1 else (1, "scale from zero")
        if panic:
            return desired, reason
        quiet_since = self._last_activity
        if quiet_since is None:
            quiet_since = self._started if self._started is not None else now
        grace = self.config.scale_to_zero_after_s
        if now - quiet_since >= grace:
            return 0, f"scale to zero after {grace:g} s idle"
        if desired < 1 and (self._last_activity is not None or ready > 0):
            return 1, "hold (idle grace)"
        return desired, reason

    def _bound(self, desired: int, reason: str, ready: int) -> tuple[int, str]:
        """Scale-up rate, then max_instances, then min_instances (which wins)."""
        c = self.config
        up_limit = math.ceil(c.max_scale_up_rate * max(ready, 1) - EPSILON)
        if desired > up_limit:
            desired, reason = up_limit, f"{reason}, capped by max_scale_up_rate"
        if desired > c.max_instances:
            desired, reason = c.max_instances, f"{reason}, capped by max_instances"
        if desired < c.min_instances:
            desired, reason = c.min_instances, f"{reason}, held at min_instances"
        return desired, reason
