"""The autoscaler's decision, driven by recorded traffic traces (no sleeps)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from nimbus.autoscale.decider import Decider, ScalingConfig

TICK = 0.5


def simulate(config: ScalingConfig, demand: Callable[[float], float], duration_s: float,
             start_delay_ticks: int = 1) -> list[tuple[float, int, int, bool]]:
    """Feed ``demand(now)`` to a decider every tick; ready instances follow
    the decision ``start_delay_ticks`` later when growing (starts take time)
    and at once when shrinking. Returns (now, desired, ready, panic) per tick."""
    d = Decider(config)
    ready = 0
    pending: list[tuple[int, int]] = []  # (tick it becomes ready, count)
    curve = []
    for i in range(int(duration_s / TICK) + 1):
        now = i * TICK
        ready += sum(n for t, n in pending if t == i)
        pending = [(t, n) for t, n in pending if t > i]
        c = demand(now)
        d.record(now, c, arrivals=1 if c > 0 else 0)
        decision = d.decide(now, ready)
        coming = ready + sum(n for _, n in pending)
        if decision.desired > coming:
            pending.append((i + start_delay_ticks, decision.desired - coming))
        elif decision.desired < ready:
            ready = decision.desired
        curve.append((now, decision.desired, ready, decision.panic))
    return curve


def at(curve, t):
    return next(row for row in curve if row[0] >= t)


def cfg(**kw) -> ScalingConfig:
    base = dict(target_concurrency=0.7, max_instances=50, stable_window_s=60,
                panic_window_s=6, scale_to_zero_after_s=30, scale_down_delay_s=2)
    base.update(kw)
    return ScalingConfig(**base)


@pytest.mark.parametrize("field,value,message", [
    ("target_concurrency", 0, "target_concurrency must be positive, was: 0"),
    ("max_instances", 0, "max_instances must be at least 1, was: 0"),
    ("min_instances", 60, "min_instances must be within 0..max_instances (50), was: 60"),
    ("stable_window_s", -1, "stable_window_s must be positive, was: -1"),
    ("panic_window_s", 90, "panic_window_s must be positive and at most stable_window_s"),
    ("panic_threshold", 1, "panic_threshold must be greater than 1, was: 1"),
    ("scale_to_zero_after_s", -5, "scale_to_zero_after_s cannot be negative, was: -5"),
    ("max_scale_up_rate", 1, "max_scale_up_rate must be greater than 1, was: 1"),
    ("scale_down_delay_s", -1, "scale_down_delay_s cannot be negative, was: -1"),
])
def test_config_validation_names_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg(**{field: value})


def test_scale_from_zero_on_the_first_request():
    d = Decider(cfg())
    d.record(0.0, 0)
    assert d.decide(0.0, 0).desired == 0  # nothing deployed, nothing asked
    d.record(0.5, 1, arrivals=1)
    decision = d.decide(0.5, 0)
    assert decision.desired >= 1  # at once, not after a window fills


def test_step_reaches_the_need_through_panic_within_two_ticks():
    curve = simulate(cfg(), lambda t: 0 if t < 10 else 32, 40)
    need = math.ceil(32 / 0.7)  # 46
    assert at(curve, 10.0)[1] == need and at(curve, 10.0)[3]  # panic: scale at once
    assert at(curve, 10.0 + 2 * TICK)[2] == need  # ready follows one tick later
    assert max(row[1] for row in curve) == need  # never overshoots


def test_max_instances_caps_every_decision():
    curve = simulate(cfg(max_instances=10), lambda t: 100, 20)
    assert max(row[1] for row in curve) == 10
    assert at(curve, 1.0)[1] == 10


def test_max_scale_up_rate_limits_growth_per_decision():
    curve = simulate(cfg(max_scale_up_rate=2.0), lambda t: 0 if t < 5 else 40, 15)
    grows = [(a[1], b[1]) for a, b in zip(curve, curve[1:]) if b[1] > a[1]]
    assert grows and all(new <= math.ceil(2.0 * max(old, 1)) for old, new in grows)
    assert max(row[1] for row in curve) == 50  # max_instances


def test_ramp_follows_demand_without_panic_once_warm():
    # 0 -> 20 concurrent over 200 s: slow enough that the stable window keeps up
    curve = simulate(cfg(), lambda t: min(20.0, t / 10), 260)
    # At one or two instances any doubling panics (as in Knative); that panic
    # ends a stable window after its last trigger, and a slow ramp never
    # triggers another.
    assert not any(row[3] for row in curve if row[0] >= 120)
    assert at(curve, 259)[1] == math.ceil(20 / 0.7)
    desired = [row[1] for row in curve if row[0] >= 120]
    assert desired == sorted(desired)  # once warm, a ramp never scales down


def test_spike_panics_holds_during_panic_and_exits_after_a_stable_window():
    c = cfg(stable_window_s=20, panic_window_s=2)
    curve = simulate(c, lambda t: 30 if 10 <= t < 13 else 1, 80)
    top = math.ceil(30 / 0.7)
    assert at(curve, 10.0)[3] and at(curve, 10.0)[1] == top
    in_panic = [row for row in curve if row[3] and row[0] >= 10]
    assert min(row[1] for row in in_panic) == top  # no scale-down while panicking
    # the condition last held at 10 s (once 43 were ready, demand was not 2x
    # capacity); the panic ends a stable window (20 s) later
    assert in_panic[-1][0] == 30 - TICK
    assert at(curve, 30 + c.scale_down_delay_s - TICK)[1] == top  # then the delay ...
    assert at(curve, 30 + c.scale_down_delay_s + TICK)[1] < top  # ... and only then down
    assert at(curve, 79)[1] == math.ceil(1 / 0.7)  # back to the steady need


def test_diurnal_follows_without_flapping():
    def sine(t: float) -> float:
        return 10 + 8 * math.sin(2 * math.pi * t / 600)

    curve = simulate(cfg(), sine, 1200)
    desired = [row[1] for row in curve[240:]]  # after the first window
    assert max(desired) <= math.ceil(18 / 0.7) and min(desired) >= math.ceil(2 / 0.7) - 1
    changes = [b - a for a, b in zip(desired, desired[1:]) if b != a]
    reversals = sum(1 for a, b in zip(changes, changes[1:]) if (a > 0) != (b > 0))
    assert reversals <= 6  # two periods: about one turn at each peak and trough


def test_idle_steps_down_one_at_a_time_then_zero_after_the_grace():
    c = cfg(stable_window_s=10, panic_window_s=2, scale_to_zero_after_s=30,
            scale_down_delay_s=2)
    curve = simulate(c, lambda t: 7 if t < 30 else 0, 100)
    assert at(curve, 29)[1] == 10
    after = [row for row in curve if row[0] >= 30]
    steps = [a[1] - b[1] for a, b in zip(after, after[1:]) if b[1] < a[1]]
    assert all(s == 1 for s in steps[:-1])  # one step at a time ...
    first_drop = next(row[0] for row in after if row[1] < 10)
    assert first_drop >= 30 + 2  # ... after the delay
    assert at(curve, 59)[1] >= 1  # within the idle grace: never zero
    assert at(curve, 60.5)[1] == 0  # 30 s after the last request: zero


def test_never_below_min_instances():
    curve = simulate(cfg(min_instances=2, scale_to_zero_after_s=5), lambda t: 3 if t < 5 else 0,
                     120)
    assert all(row[1] >= 2 for row in curve)
    assert at(curve, 119)[1] == 2


def test_a_new_idle_pool_keeps_its_warm_instance_for_the_grace():
    d = Decider(cfg(scale_to_zero_after_s=30))
    d.record(0.0, 0)
    assert d.decide(0.0, 1).desired == 1  # the deploy's warm instance stays ...
    d.record(29.5, 0)
    assert d.decide(29.5, 1).desired == 1
    d.record(30.0, 0)
    assert d.decide(30.0, 1).desired == 0  # ... until the grace has passed
