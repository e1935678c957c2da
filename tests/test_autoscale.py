"""The autoscaler's decision, driven by recorded traffic traces (no sleeps).

Traces run through :func:`nimbus.autoscale.simulate.simulate` at 0.5 s
ticks; instances asked for become ready one tick later. Each trace checks
the instance curve at key times and the invariants over the whole run.
"""

from __future__ import annotations

import math
import random

import pytest

from nimbus.autoscale.decider import Decider, ScalingConfig
from nimbus.autoscale.simulate import Tick, at, direction_changes, simulate
from nimbus.autoscale.window import BucketWindow, RecentMax

TICK = 0.5


def cfg(**kw: object) -> ScalingConfig:
    base: dict[str, object] = dict(target_concurrency=0.7, max_instances=50)
    base.update(kw)
    return ScalingConfig(**base)  # type: ignore[arg-type]


def check_invariants(curve: list[Tick], c: ScalingConfig) -> None:
    """What must hold at every tick of every trace."""
    for prev, t in zip([None, *curve], curve, strict=False):
        assert c.min_instances <= t.desired <= c.max_instances, t
        assert t.desired <= math.ceil(c.max_scale_up_rate * max(t.ready, 1)), t
        if t.concurrency > 0:
            assert t.desired >= 1, t  # demand is never left without an instance
        if t.panic:
            assert t.desired >= t.ready, t  # never down while panicking
        if prev is not None and t.desired < t.ready:
            # down one step at a time, except all idle instances at once
            assert t.desired == t.ready - 1 or t.reason.startswith("scale to zero"), t


def desired_at(curve: list[Tick], *times: float) -> list[int]:
    return [at(curve, t).desired for t in times]


# -- config ------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("target_concurrency", 0, "target_concurrency must be positive, was: 0"),
    ("target_concurrency", -0.5, "target_concurrency must be positive, was: -0.5"),
    ("target_concurrency", math.nan, "target_concurrency must be a finite number, was: nan"),
    ("max_instances", 0, "max_instances must be at least 1, was: 0"),
    ("max_instances", 2.5, "max_instances must be an integer, was: 2.5"),
    ("max_instances", True, "max_instances must be an integer, was: True"),
    ("min_instances", -1, "min_instances must be within 0..max_instances (50), was: -1"),
    ("min_instances", 60, "min_instances must be within 0..max_instances (50), was: 60"),
    ("stable_window_s", -1, "stable_window_s must be positive, was: -1"),
    ("stable_window_s", math.inf, "stable_window_s must be a finite number, was: inf"),
    ("panic_window_s", 0, "panic_window_s must be positive and at most stable_window_s (60.0),"
                          " was: 0"),
    ("panic_window_s", 90, "panic_window_s must be positive and at most stable_window_s (60.0),"
                           " was: 90"),
    ("panic_threshold", 1, "panic_threshold must be greater than 1, was: 1"),
    ("scale_to_zero_after_s", -5, "scale_to_zero_after_s cannot be negative, was: -5"),
    ("scale_to_zero_after_s", "30", "scale_to_zero_after_s must be a finite number, was: '30'"),
    ("max_scale_up_rate", 1, "max_scale_up_rate must be greater than 1, was: 1"),
    ("scale_down_delay_s", -1, "scale_down_delay_s cannot be negative, was: -1"),
])
def test_config_validation_names_field_rule_and_value(field, value, message):
    with pytest.raises(ValueError) as info:
        cfg(**{field: value})
    assert str(info.value) == message


def test_config_defaults_are_valid_and_edges_are_allowed():
    c = cfg()
    assert (c.min_instances, c.stable_window_s, c.panic_window_s, c.panic_threshold,
            c.scale_to_zero_after_s, c.max_scale_up_rate, c.scale_down_delay_s) == (
        0, 60.0, 6.0, 2.0, 30.0, 1000.0, 2.0)
    cfg(min_instances=50, panic_window_s=60, scale_to_zero_after_s=0, scale_down_delay_s=0)


# -- windows -----------------------------------------------------------------

def test_window_averages_buckets_and_holds_the_last_value_through_gaps():
    w = BucketWindow(bucket_s=1.0, span_s=10)
    assert w.average(5.0, 10) == 0.0  # nothing observed yet
    w.record(0.0, 2)
    w.record(0.5, 4)  # same bucket: its mean is 3
    assert w.average(0.5, 10) == 3  # only the time observed so far counts
    w.record(1.0, 6)
    assert w.average(1.0, 10) == (3 + 6) / 2
    assert w.average(1.0, 1) == 6  # the panic-style window: the current bucket
    # no samples for 2..4: the level held at 6
    assert w.average(4.2, 10) == (3 + 6 * 4) / 5
    w.record(5.0, 0)
    assert w.average(5.0, 3) == (6 + 6 + 0) / 3
    assert w.average(30.0, 10) == 0  # long after: the held zero fills the window


def test_window_rejects_time_going_back_and_bad_values():
    w = BucketWindow(1.0, 10)
    w.record(3.0, 1)
    with pytest.raises(ValueError, match="time went back"):
        w.record(2.5, 1)
    with pytest.raises(ValueError, match="time went back"):
        w.average(2.0, 10)
    with pytest.raises(ValueError, match="concurrency must be a finite number >= 0, was: -1"):
        w.record(4.0, -1)


def test_recent_max_counts_a_value_for_as_long_as_it_held():
    m = RecentMax(2.0)
    m.push(0.0, 5)
    assert not m.covers(1.0) and m.covers(2.0)
    m.push(1.0, 3)
    m.push(2.0, 1)
    assert m.max(2.0) == 5  # 5 held from 0 to 1, inside [0, 2]
    assert m.max(2.5) == 5  # ... and still in [0.5, 2.5]
    assert m.max(3.0) == 3  # 5 ended at 1, the window's start
    assert m.max(4.0) == 1
    m.push(4.0, 4)
    assert m.max(4.0) == 4


# -- single decisions ---------------------------------------------------------

def test_scale_from_zero_on_the_first_arrival():
    d = Decider(cfg())
    d.record(0.0, 0)
    first = d.decide(0.0, 0)
    assert (first.desired, first.reason) == (0, "steady")  # nothing asked, nothing started
    d.record(0.5, 0, arrivals=1)  # arrived and held, not yet counted in flight
    decision = d.decide(0.5, 0)
    assert (decision.desired, decision.reason) == (1, "scale from zero")

    d = Decider(cfg())  # the first sample of a pool is a request in flight
    d.record(100.0, 1, arrivals=1)
    assert d.decide(100.0, 0).desired == 2  # ceil(1 / 0.7), no window to fill


def test_a_new_idle_pool_keeps_its_warm_instance_for_the_grace():
    d = Decider(cfg(scale_to_zero_after_s=30))
    d.record(0.0, 0)
    assert d.decide(0.0, 1).desired == 1  # the deploy's warm instance stays ...
    d.record(29.5, 0)
    assert d.decide(29.5, 1).desired == 1
    d.record(30.0, 0)
    assert d.decide(30.0, 1).desired == 0  # ... until the grace has passed


def test_a_gap_in_samples_means_the_last_value_continued():
    d = Decider(cfg(scale_to_zero_after_s=5, scale_down_delay_s=0))
    d.record(0.0, 7, arrivals=7)
    later = d.decide(40.0, 10)  # no samples for 40 s: the 7 in flight still are
    assert later.stable_concurrency == 7 and later.desired == 10
    assert later.reason == "steady"

    d = Decider(cfg(scale_to_zero_after_s=5))
    d.record(0.0, 7, arrivals=7)
    d.record(1.0, 0)
    assert d.decide(40.0, 1).desired == 0  # a held zero: idle for 39 s


def test_panic_threshold_is_on_the_unrounded_ratio():
    d = Decider(cfg())
    d.record(0.0, 1, arrivals=1)
    assert not d.decide(0.0, 1).panic  # 1 / 0.7 = 1.43 instances on 1: not 2x
    d.record(0.5, 1.4, arrivals=1)
    assert d.decide(0.5, 1).panic  # 1.4 / 0.7 = 2.0 instances on 1


def test_panic_ends_a_stable_window_after_its_condition_last_held():
    c = cfg(stable_window_s=10, panic_window_s=2)
    d = Decider(c)
    d.record(0.0, 14, arrivals=14)
    assert d.decide(0.0, 1).desired == 20  # 14 / 0.7
    for i in range(1, 20):
        now = i * TICK
        d.record(now, 0)
        decision = d.decide(now, 20)
        assert decision.panic and decision.desired == 20, (now, decision)
    d.record(10.0, 0)
    assert not d.decide(10.0, 20).panic


def test_time_going_back_or_negative_inputs_raise():
    d = Decider(cfg())
    d.record(5.0, 1)
    d.decide(6.0, 1)
    with pytest.raises(ValueError, match="time went back"):
        d.record(5.5, 1)
    with pytest.raises(ValueError, match="time went back"):
        d.decide(5.9, 1)
    with pytest.raises(ValueError, match="arrivals cannot be negative"):
        d.record(7.0, 1, arrivals=-1)
    with pytest.raises(ValueError, match="ready cannot be negative"):
        d.decide(7.0, -1)


# -- traces -------------------------------------------------------------------

def test_step_0_to_32_reaches_the_need_at_once_through_panic():
    c = cfg()
    curve = simulate(c, lambda t: 0 if t < 10 else 32, 80)
    check_invariants(curve, c)
    need = math.ceil(32 / 0.7)
    assert need == 46
    assert desired_at(curve, 0, 9.5) == [0, 0]  # nothing asked, nothing started
    step = at(curve, 10.0)
    assert (step.desired, step.panic) == (need, True)  # the tick the step is seen
    assert at(curve, 10.5).ready == need  # ready one tick later
    assert max(t.desired for t in curve) == need  # never overshoots
    # panic last held at 10.0 (then 46 were ready), so it ends at 70.0
    assert at(curve, 69.5).panic and not at(curve, 70.0).panic
    assert {t.desired for t in curve if t.now >= 10} == {need}  # and nothing flaps


def test_step_beyond_max_instances_is_capped_at_once():
    c = cfg(max_instances=10)
    curve = simulate(c, lambda t: 0 if t < 5 else 100, 20)
    check_invariants(curve, c)
    assert desired_at(curve, 4.5, 5.0, 5.5, 20) == [0, 10, 10, 10]
    assert at(curve, 5.0).reason == "panic, capped by max_instances"


def test_max_scale_up_rate_limits_each_decision():
    c = cfg(max_scale_up_rate=2.0)
    curve = simulate(c, lambda t: 0 if t < 5 else 40, 15)
    check_invariants(curve, c)
    # ceil(2 x max(ready, 1)) per tick: 2, 4, 8, 16, 32, then max_instances
    assert desired_at(curve, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0) == [2, 4, 8, 16, 32, 50, 50]
    assert at(curve, 5.0).reason == "panic, capped by max_scale_up_rate"


def test_min_instances_wins_over_the_scale_up_rate():
    c = cfg(min_instances=5, max_scale_up_rate=2.0)
    curve = simulate(c, lambda t: 0, 5)
    assert {t.desired for t in curve} == {5}


def test_ramp_follows_demand_without_scaling_down():
    # 0 -> 20 concurrent over 200 s, then flat
    c = cfg()
    curve = simulate(c, lambda t: min(20.0, t / 10), 260)
    check_invariants(curve, c)
    desired = [t.desired for t in curve]
    assert desired == sorted(desired)  # a ramp never scales down
    # At 1 instance, 1.4 concurrent is 2x capacity: a panic (as in Knative),
    # which ends a stable window after that; the slow ramp never panics again.
    assert not at(curve, 13.5).panic and at(curve, 14.0).panic
    assert [t.now for t in curve if t.panic][-1] == 73.5
    # After the panic the lagging stable average asks for fewer instances
    # than are in use; the current demand holds them instead.
    assert at(curve, 80).reason == "hold (current demand)"
    assert all(t.ready >= t.concurrency for t in curve if t.now >= 20)  # no queueing
    assert desired_at(curve, 0.5, 50, 100, 150, 200, 260) == [1, 8, 11, 18, 25, 29]
    assert at(curve, 260).desired == math.ceil(20 / 0.7)


def test_spike_panics_holds_during_the_panic_and_steps_down_after():
    c = cfg(stable_window_s=20, panic_window_s=2)
    curve = simulate(c, lambda t: 30 if 10 <= t < 13 else 1, 80)
    check_invariants(curve, c)
    top = math.ceil(30 / 0.7)
    assert desired_at(curve, 0, 9.5) == [2, 2]  # ceil(1 / 0.7)
    assert at(curve, 10.0).panic and at(curve, 10.0).desired == top
    panicking = [t for t in curve if t.panic]
    assert {t.desired for t in panicking} == {top}  # no scale-down while panicking
    # The condition last held at 10.0 (43 then were ready); panic ends one
    # stable window (20 s) later, and the scale-down delay (2 s) runs from there.
    assert (panicking[0].now, panicking[-1].now) == (10.0, 29.5)
    assert desired_at(curve, 30.0, 31.5) == [top, top]
    assert at(curve, 30.0).reason == "hold (scale-down delay)"
    # then one instance per tick down to the steady need
    down = [t.desired for t in curve if 32.0 <= t.now <= 52.0]
    assert down == list(range(top - 1, 1, -1))
    assert {t.desired for t in curve if t.now >= 52} == {2}


def test_diurnal_follows_within_bounds_without_flapping():
    def sine(t: float) -> float:
        return 10 + 8 * math.sin(2 * math.pi * t / 600)

    c = cfg()
    curve = simulate(c, sine, 1800)
    check_invariants(curve, c)
    warm = [t for t in curve if t.now >= 60]  # after the first stable window
    assert not any(t.panic for t in warm)
    assert max(t.desired for t in warm) == math.ceil(18 / 0.7)  # the peak's need, no more
    assert min(t.desired for t in warm) >= math.ceil(2 / 0.7)  # the trough's need, no less
    # three periods: one turn at each peak and each trough, none in between
    assert direction_changes([t.desired for t in warm]) == 6
    # it follows: within a stable window's lag of the demand's need
    for t in warm:
        lo = min(sine(t.now - lag) for lag in range(0, 61))
        hi = max(sine(t.now - lag) for lag in range(0, 61))
        assert math.floor(lo / 0.7) <= t.desired <= math.ceil(hi / 0.7) + 1, t


def test_noisy_steady_load_does_not_flap():
    rng = random.Random(7)
    noise = [max(0.0, rng.gauss(10, 2)) for _ in range(3700)]
    c = cfg()
    curve = simulate(c, lambda t: noise[round(t / TICK)], 1800)
    check_invariants(curve, c)
    warm = [t.desired for t in curve if t.now >= 60]
    assert direction_changes(warm) <= 10  # in 29 minutes
    assert max(warm) - min(warm) <= 6


def test_idle_steps_down_one_at_a_time_then_to_zero_after_the_grace():
    c = cfg(stable_window_s=10, panic_window_s=2, scale_to_zero_after_s=30,
            scale_down_delay_s=2)
    curve = simulate(c, lambda t: 7 if t < 30 else 0, 100)
    check_invariants(curve, c)
    assert desired_at(curve, 0, 29.5) == [10, 10]  # ceil(7 / 0.7)
    # the last request at 29.5; the lower need holds from 30.0, so the first
    # step is at 32.0, then the steps follow the need 2 s late, one at a time
    assert desired_at(curve, 30.0, 31.5) == [10, 10]
    assert desired_at(curve, 32.0, 33.0, 34.0, 36.0, 38.0, 40.0) == [9, 8, 7, 5, 3, 1]
    # within the idle grace at least one instance stays warm ...
    assert {t.desired for t in curve if 40.0 <= t.now < 59.5} == {1}
    assert at(curve, 45).reason == "hold (idle grace)"
    # ... and 30 s after the last request there is none
    assert at(curve, 59.5).desired == 0
    assert at(curve, 59.5).reason == "scale to zero after 30 s idle"
    assert {t.desired for t in curve if t.now >= 59.5} == {0}


def test_idle_never_goes_below_min_instances():
    c = cfg(min_instances=2, stable_window_s=10, panic_window_s=2, scale_to_zero_after_s=5)
    curve = simulate(c, lambda t: 7 if t < 20 else 0, 60)
    check_invariants(curve, c)
    assert all(t.desired >= 2 for t in curve)
    assert at(curve, 20).desired == 10
    assert {t.desired for t in curve if t.now >= 30} == {2}
    assert at(curve, 60).reason == "scale to zero after 5 s idle, held at min_instances"


def test_scale_to_zero_waits_for_a_panic_to_end():
    c = cfg(stable_window_s=20, panic_window_s=2, scale_to_zero_after_s=5)
    curve = simulate(c, lambda t: 30 if t < 2 else 0, 40)
    check_invariants(curve, c)
    assert at(curve, 10).panic and at(curve, 10).desired == 43  # idle, but panicking
    assert not at(curve, 20).panic and at(curve, 20).desired == 0


def test_traffic_after_zero_scales_from_zero_again():
    c = cfg(stable_window_s=10, panic_window_s=2, scale_to_zero_after_s=5)
    curve = simulate(c, lambda t: 0.5 if t < 1 or 30 <= t < 31 else 0, 60)
    check_invariants(curve, c)
    assert at(curve, 29.5).desired == 0
    assert at(curve, 30.0).desired == 1 and at(curve, 30.5).ready == 1
    assert at(curve, 60).desired == 0


def test_slow_starts_do_not_make_the_decision_overshoot():
    c = cfg()
    curve = simulate(c, lambda t: 0 if t < 10 else 32, 30, start_delay_ticks=4)
    check_invariants(curve, c)
    assert max(t.desired for t in curve) == 46
    assert at(curve, 11.5).ready == 0 and at(curve, 12.0).ready == 46
