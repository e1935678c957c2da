"""Rollout decisions driven by traffic traces (no sleeps): strategies, the
rollback rule, per-version windows and :func:`decide`.

A trace feeds the cumulative counters of each process, as a sampler would
read them, every ``tick`` seconds from the step's start; each evaluation
takes the window since the step's start with :func:`delta` and decides.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

import pytest

from nimbus.errors import UserInputError
from nimbus.observe.metrics import DURATION_BUCKETS
from nimbus.rollout.policy import (
    BASELINE_MIN_REQUESTS,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_RULE,
    Decision,
    Rule,
    Step,
    check_min_requests,
    decide,
    format_duration,
    parse_rule,
    parse_strategy,
)
from nimbus.rollout.window import (
    N_BUCKETS,
    Window,
    counters_from_dict,
    counters_to_dict,
    delta,
    total,
)


def win(success: int = 0, error: int = 0, timeout: int = 0, throttled: int = 0,
        died: int = 0, durations: list[float] | None = None) -> Window:
    """A window; ``durations`` (one per answered invocation) fill the buckets,
    else every success and error took 10 ms."""
    if durations is None:
        durations = [0.01] * (success + error)
    buckets = [0] * N_BUCKETS
    for d in durations:
        buckets[bisect_left(DURATION_BUCKETS, d)] += 1
    return Window(success, error, timeout, throttled, died, tuple(buckets), sum(durations))


# A process's traffic up to time t: cumulative (canary, baseline) windows.
Traffic = Callable[[float], tuple[Window, Window]]


def run(traffic: Traffic, step: Step, rule: str = DEFAULT_RULE,
        min_requests: int = DEFAULT_MIN_REQUESTS, tick: float = 1.0, until: float = 600.0,
        start: float = 1000.0) -> list[tuple[float, Decision]]:
    """Evaluate every ``tick`` seconds until a decision other than hold (or
    ``until``); counters are read from one process "w1" whose counts before
    the step started are not the step's."""
    r = parse_rule(rule)
    before_c, before_b = win(success=500), win(success=5000)  # counted before the step
    c0, b0 = {"w1": before_c}, {"w1": before_b}
    out: list[tuple[float, Decision]] = []
    t = 0.0
    while t <= until:
        t += tick
        c, b = traffic(t)
        d = decide(step=step, step_started=start, now=start + t,
                   canary=delta(c0, {"w1": before_c + c}),
                   baseline=delta(b0, {"w1": before_b + b}), rule=r,
                   min_requests=min_requests)
        out.append((t, d))
        if d.action != "hold":
            break
    return out


def steady(canary_rps: float, baseline_rps: float, canary_error: float = 0.0,
           canary_s: float = 0.01, baseline_s: float = 0.01,
           canary_throttle: float = 0.0) -> Traffic:
    """Requests at a steady rate; a share of the canary's fail (spread evenly)."""
    def at(t: float) -> tuple[Window, Window]:
        n = int(canary_rps * t)
        errors = int(n * canary_error)
        throttled = int(n * canary_throttle)
        ok = n - errors - throttled
        c = win(ok, errors, throttled=throttled, durations=[canary_s] * (ok + errors))
        nb = int(baseline_rps * t)
        return c, win(nb, durations=[baseline_s] * nb)
    return at


# -- traces ---------------------------------------------------------------------------

def test_a_canary_failing_31_percent_rolls_back_at_the_first_evaluation_with_enough_requests():
    trace = run(steady(10, 90, canary_error=0.31), Step(10, 300.0))
    assert [(t, d.action) for t, d in trace] == [(1.0, "hold"), (2.0, "rollback")]
    assert trace[0][1].reason == "too few requests: 10 of 20 requests; 299s left in the step"
    rollback = trace[-1][1]
    assert rollback.reason == "error_rate 30.0% > 2% over 20 requests"  # 6 of 20 failed
    assert rollback.figures["canary"]["requests"] == 20
    assert rollback.figures["canary"]["failed"] == 6
    assert rollback.figures["baseline"]["requests"] == 180
    assert rollback.figures["baseline"]["error_rate"] == 0.0
    # rolled back long before the step's 5 minutes were over
    assert rollback.figures["elapsed_s"] == 2.0


def test_a_healthy_canary_holds_until_its_wait_ends_then_promotes():
    trace = run(steady(2, 18), Step(10, 60.0), tick=5.0)
    assert [t for t, _ in trace] == [5.0 * i for i in range(1, 13)]
    assert [d.action for _, d in trace] == ["hold"] * 11 + ["promote"]
    # 10 of 20 requests at 5 s, then healthy and waiting for the step's end
    assert trace[0][1].reason == "too few requests: 10 of 20 requests; 55s left in the step"
    assert trace[1][1].reason == "healthy so far over 20 requests; 50s left in the step"
    assert trace[10][1].reason == "healthy so far over 110 requests; 5s left in the step"
    # 10 ms lands in (5 ms, 10 ms]: p99 = 5 + 5 * 0.99 ms
    assert trace[-1][1].reason == ("healthy for 1m over 120 requests "
                                   "(error_rate 0.0%, p99 9.95ms)")


def test_too_few_requests_hold_even_after_the_step_time_is_over():
    def trickle(t: float) -> tuple[Window, Window]:
        return win(min(int(t // 20), 3)), win(100)
    trace = run(trickle, Step(10, 60.0), tick=10.0, until=120.0)
    assert all(d.action == "hold" for _, d in trace)
    assert len(trace) == 13  # evaluated to the end, never passed
    assert trace[-1][1].reason == ("too few requests: 3 of 20 requests; the step's time "
                                   "is over, it passes once enough requests came")
    # with fewer requests asked for, the same trickle passes at the step's end
    passed = run(trickle, Step(10, 60.0), tick=10.0, min_requests=3)
    assert [d.action for _, d in passed][-1:] == ["promote"]
    assert passed[-1][0] == 60.0


def test_a_slow_canary_trips_the_p99_rule_against_the_baseline():
    # baseline answers in 40 ms, canary in 120 ms (3x)
    trace = run(steady(10, 90, canary_s=0.12, baseline_s=0.04), Step(10, 300.0))
    assert [d.action for _, d in trace] == ["hold", "rollback"]
    # p99 in-bucket interpolation: canary (0.1, 0.25] -> 0.1 + 0.15 * 0.99;
    # baseline (0.025, 0.05] -> 0.025 + 0.025 * 0.99 = 49.75 ms, times 2 = 99.5 ms
    f = trace[-1][1].figures
    assert f["canary"]["p99"] == pytest.approx(0.2485)
    assert f["baseline"]["p99"] == pytest.approx(0.04975)
    assert trace[-1][1].reason == ("p99 249ms > 2x baseline (49.8ms) and p99 249ms > 100ms "
                                    "over 20 requests")


def test_a_baseline_with_fewer_than_10_requests_does_not_trip_baseline_clauses():
    rule = "p99 > 2x baseline"
    slow = steady(10, 0, canary_s=0.12)

    def thin(n: int) -> Traffic:
        def at(t: float) -> tuple[Window, Window]:
            c, _ = slow(t)
            return c, win(n, durations=[0.04] * n)
        return at

    trace = run(thin(BASELINE_MIN_REQUESTS - 1), Step(10, 30.0), rule=rule, tick=5.0)
    assert trace[-1][1].action == "promote"  # 9 baseline requests: nothing to compare with
    trace = run(thin(BASELINE_MIN_REQUESTS), Step(10, 30.0), rule=rule, tick=5.0)
    assert [d.action for _, d in trace] == ["rollback"]
    # a baseline with requests but no durations (none answered) is not compared either
    no_latency = run(lambda t: (slow(t)[0], win(timeout=50)), Step(10, 30.0), rule=rule,
                     tick=5.0)
    assert no_latency[-1][1].action == "promote"


def test_throttles_roll_back():
    trace = run(steady(100, 0, canary_throttle=0.02), Step(10, 300.0))
    assert [d.action for _, d in trace] == ["rollback"]
    assert trace[0][1].reason == "throttles 2.0% > 1% over 100 requests"
    # the throttled requests are not errors
    assert trace[0][1].figures["canary"]["error_rate"] == 0.0


def test_errors_timeouts_and_deaths_all_count_as_errors_and_have_their_own_metrics():
    c = win(success=90, error=4, timeout=3, died=2, throttled=1)
    assert (c.requests, c.failed, c.error_rate) == (100, 9, 0.09)
    assert (c.timeout_rate, c.death_rate, c.throttle_rate) == (0.03, 0.02, 0.01)
    base = win(success=100)
    assert parse_rule("timeouts >= 3%").check(c, base) == ["timeouts 3.0% >= 3%"]
    assert parse_rule("deaths > 0").check(c, base) == ["deaths 2.0% > 0"]
    assert parse_rule("deaths > 0.02").check(c, base) == []
    assert parse_rule("error_rate > 2x baseline").check(c, base) == [
        "error_rate 9.0% > 2x baseline (0.0%)"]


def test_and_binds_tighter_than_or_and_parentheses_group():
    # errors 20%, p99 fast, no throttles
    c = win(success=80, error=20)
    b = win(success=100)
    loose = parse_rule("error_rate > 10% or p99 > 1s and throttles > 1%")
    grouped = parse_rule("(error_rate > 10% or p99 > 1s) and throttles > 1%")
    assert loose.check(c, b) == ["error_rate 20.0% > 10%"]
    assert grouped.check(c, b) == []
    # both clauses of an `and` tripped: both reasons, in order
    both = parse_rule("error_rate > 10% and p50 < 1s or deaths > 50%")
    assert both.check(c, b) == ["error_rate 20.0% > 10%", "p50 7.50ms < 1s"]
    assert parse_rule("error_rate > 10% and p50 > 1s").check(c, b) == []
    nested = parse_rule("((error_rate > 10%)) and (p99 < 1s or p99 > 2s)")
    assert nested.check(c, b) == ["error_rate 20.0% > 10%", "p99 9.95ms < 1s"]
    # keywords in any case
    assert parse_rule("ERROR_RATE > 10% OR p99 > 1s").check(c, b) == ["error_rate 20.0% > 10%"]


def test_the_last_step_promotes_at_once():
    d = decide(step=Step(100, 0.0), step_started=0.0, now=0.0, canary=Window.empty(),
               baseline=Window.empty(), rule=parse_rule(DEFAULT_RULE), min_requests=20)
    assert (d.action, d.reason) == ("promote", "last step: all traffic on the new version")


def test_a_clock_behind_the_step_start_counts_as_no_time_passed():
    d = decide(step=Step(10, 60.0), step_started=100.0, now=90.0, canary=win(50),
               baseline=win(50), rule=parse_rule(DEFAULT_RULE), min_requests=20)
    assert (d.action, d.reason) == ("hold", "healthy so far over 50 requests; 1m left in "
                                    "the step")


# -- windows --------------------------------------------------------------------------

def test_quantiles_interpolate_inside_the_bucket_like_histogram_quantile():
    # 10 in (10 ms, 25 ms], 10 in (50 ms, 100 ms]
    w = win(20, durations=[0.02] * 10 + [0.07] * 10)
    assert w.quantile(0.25) == pytest.approx(0.01 + 0.015 * 5 / 10)  # 17.5 ms
    assert w.quantile(0.5) == pytest.approx(0.025)  # the rank ends the first bucket
    assert w.quantile(0.75) == pytest.approx(0.05 + 0.05 * 5 / 10)  # empty bucket skipped
    assert w.quantile(1.0) == pytest.approx(0.1)
    # the first bucket starts at 0
    assert win(4, durations=[0.0005] * 4).quantile(0.5) == pytest.approx(0.0005)
    # a rank in +Inf answers the highest finite bound
    assert win(2, durations=[0.01, 1000.0]).quantile(0.99) == DURATION_BUCKETS[-1]
    assert Window.empty().quantile(0.99) is None
    assert win(timeout=3).quantile(0.5) is None  # no durations
    assert w.mean == pytest.approx((0.02 * 10 + 0.07 * 10) / 20)
    with pytest.raises(ValueError):
        w.quantile(1.5)


def test_delta_across_a_process_restart_and_a_process_that_appeared():
    start = {"w1": win(100, 10), "w2": win(50), "gone": win(1000)}
    now = {
        "w1": win(30, 1),  # restarted: its counters went down, count from zero
        "w2": win(80, 2),  # steady: 30 successes and 2 errors since start
        "w3": win(7),  # appeared since: all of it
    }
    d = delta(start, now)
    assert (d.success, d.error, d.requests) == (30 + 30 + 7, 1 + 2, 70)
    assert d.observed == 70
    # only one histogram bucket went down: still a restart
    w = win(100, durations=[0.01] * 99 + [0.5])
    later = win(101, durations=[0.01] * 101)
    assert later.went_down_from(w)
    assert delta({"p": w}, {"p": later}).requests == 101
    assert total(now).requests == 31 + 82 + 7
    assert delta({}, {}) == Window.empty()


def test_window_arithmetic_and_records_round_trip():
    a = win(5, 1, 2, 3, 4, durations=[0.003] * 6)
    b = win(1, 1, 0, 1, 0)
    assert (a + b) - b == a
    assert Window.from_dict(a.to_dict()) == a
    assert Window.from_dict({"success": 3}) == win(3, durations=[])
    counters = {("hello", 7): {"w1": a, "w2": b}, ("other-fn", 12): {"local": b}}
    assert counters_from_dict(counters_to_dict(counters)) == counters
    with pytest.raises(ValueError, match="duration buckets"):
        Window(buckets=(1, 2))


# -- strategies -----------------------------------------------------------------------

@pytest.mark.parametrize("text,canonical,steps", [
    ("canary:10%:5m", "canary:10%:5m", [(10, 300.0), (100, 0.0)]),
    (" Canary:25:90s ", "canary:25%:90s", [(25, 90.0), (100, 0.0)]),
    ("canary:1%:1500ms", "canary:1%:1.5s", [(1, 1.5), (100, 0.0)]),
    ("linear:20%:1m", "linear:20%:1m", [(20, 60.0), (40, 60.0), (60, 60.0), (80, 60.0),
                                        (100, 0.0)]),
    ("linear:30%:1h", "linear:30%:1h", [(30, 3600.0), (60, 3600.0), (90, 3600.0),
                                        (100, 0.0)]),
    ("linear:50%:2s", "linear:50%:2s", [(50, 2.0), (100, 0.0)]),
    ("all-at-once", "all-at-once", [(100, 0.0)]),
    ("Canary10Percent5Minutes", "canary:10%:5m", [(10, 300.0), (100, 0.0)]),
    ("CodeDeployDefault.LambdaCanary10Percent30Minutes", "canary:10%:30m",
     [(10, 1800.0), (100, 0.0)]),
    ("Linear10PercentEvery1Minute", "linear:10%:1m",
     [(s, 60.0) for s in range(10, 100, 10)] + [(100, 0.0)]),
    ("AllAtOnce", "all-at-once", [(100, 0.0)]),
])
def test_strategies(text, canonical, steps):
    s = parse_strategy(text)
    assert s.text == canonical
    assert [(st.share, st.wait_s) for st in s.steps] == steps
    assert parse_strategy(s.text) == s  # the canonical text reads back the same


@pytest.mark.parametrize("text,message", [
    ("", "--strategy: empty strategy (expected canary:10%:5m, linear:20%:1m or all-at-once "
         "(or a CodeDeploy name such as Canary10Percent5Minutes, Linear10PercentEvery1Minute, "
         "AllAtOnce))"),
    ("blue-green", "--strategy: unknown strategy 'blue-green' in 'blue-green' (expected "
                   "canary:10%:5m, linear:20%:1m or all-at-once (or a CodeDeploy name such "
                   "as Canary10Percent5Minutes, Linear10PercentEvery1Minute, AllAtOnce))"),
    ("canary:10%", "--strategy 'canary:10%': canary needs a share and a wait, as in "
                   "canary:10%:5m"),
    ("linear:1m", "--strategy 'linear:1m': linear needs a share and a wait, as in "
                  "linear:20%:1m"),
    ("canary:100%:5m", "--strategy 'canary:100%:5m': share '100%' must be within 1..99% "
                       "for canary"),
    ("canary:0%:5m", "--strategy 'canary:0%:5m': share '0%' must be within 1..99% for canary"),
    ("linear:60%:1m", "--strategy 'linear:60%:1m': share '60%' must be within 1..50% for "
                      "linear"),
    ("canary:ten:5m", "--strategy 'canary:ten:5m': share 'ten' is not a percentage (e.g. 10%)"),
    ("canary:10%:5", "--strategy 'canary:10%:5': wait '5' is not a duration (e.g. 90s, 5m, 1h, "
                     "1d)"),
    ("canary:10%:5w", "--strategy 'canary:10%:5w': wait '5w' is not a duration (e.g. 90s, "
                      "5m, 1h, 1d)"),
    ("canary:10%:8d", "--strategy 'canary:10%:8d': wait '8d' must be within 1s..7d "
                      "(each step needs time to be measured)"),
    ("canary:10%:500ms", "--strategy 'canary:10%:500ms': wait '500ms' must be within 1s..7d "
                         "(each step needs time to be measured)"),
    ("all-at-once:5m", "--strategy 'all-at-once:5m': all-at-once takes no share or wait"),
    ("Canary200Percent5Minutes", "--strategy 'Canary200Percent5Minutes': share '200%' must "
                                 "be within 1..99% for canary"),
])
def test_strategy_errors_name_the_text_and_the_part(text, message):
    with pytest.raises(UserInputError) as info:
        parse_strategy(text)
    assert str(info.value) == message


def test_strategy_errors_name_where_the_strategy_came_from():
    with pytest.raises(UserInputError, match=r"^app.yaml: rollout.strategy 'linear:0%:1m'"):
        parse_strategy("linear:0%:1m", what="app.yaml: rollout.strategy")


def test_durations_format_back():
    assert [format_duration(s) for s in (300, 90, 1.5, 0.25, 3600, 5400, 7200, 0)] == [
        "5m", "90s", "1.5s", "250ms", "1h", "90m", "2h", "0s"]


# -- the rule's language --------------------------------------------------------------

def test_rule_values_and_units():
    r = parse_rule("error_rate > 0.02 or p95 >= 250ms or mean > 1.5s or p50 <= 2x baseline")
    assert [(c.metric, c.op, c.value, c.times) for c in r.clauses] == [
        ("error_rate", ">", 0.02, None), ("p95", ">=", 0.25, None), ("mean", ">", 1.5, None),
        ("p50", "<=", None, 2.0)]
    assert [str(c) for c in r.clauses] == [
        "error_rate > 0.02", "p95 >= 250ms", "mean > 1.5s", "p50 <= 2x baseline"]
    assert parse_rule("p99 > 2 x baseline").clauses[0].times == 2.0
    assert parse_rule("p99 > 1.5X BASELINE").clauses[0].times == 1.5
    assert parse_rule("  error_rate>2%\n or p99>1s ").text == "error_rate>2% or p99>1s"
    assert isinstance(parse_rule(DEFAULT_RULE), Rule)


METRIC_LIST = "error_rate, throttles, timeouts, deaths, p50, p90, p95, p99, mean"


@pytest.mark.parametrize("text,message", [
    ("p98 > 1s", f"unknown metric 'p98' at column 1 (metrics: {METRIC_LIST})"),
    ("error_rate > 2% or latency > 1s",
     f"unknown metric 'latency' at column 20 (metrics: {METRIC_LIST})"),
    ("", "empty rule (e.g. 'error_rate > 2% or (p99 > 2x baseline and p99 > 100ms) "
         "or throttles > 1%')"),
    ("error_rate > 2% or", f"expected a metric at column 19, found the end "
                           f"(metrics: {METRIC_LIST})"),
    ("and p99 > 1s", f"expected a metric at column 1, found 'and' (metrics: {METRIC_LIST})"),
    ("error_rate = 2%", "expected a comparison (>, >=, <, <=) after 'error_rate' at column "
                        "12, found '='"),
    ("error_rate", "expected a comparison (>, >=, <, <=) after 'error_rate' at column 11, "
                   "found the end"),
    ("error_rate >", "expected a value after 'error_rate >' at column 13, found the end "
                     "(e.g. 2% or 0.02, or 2x baseline)"),
    ("error_rate > 2", "error_rate is a rate within 0..1 (0..100%) but '2' at column 14 is "
                       "more (write 2% or 0.02)"),
    ("error_rate > 250ms", "error_rate is a rate but '250ms' at column 14 is a duration "
                           "(write 2% or 0.02, or 2x baseline)"),
    ("p99 > 250", "p99 is a latency: '250' at column 7 needs a unit (write 250ms or 1.5s, "
                  "or 2x baseline)"),
    ("p99 > 5%", "p99 is a latency but '5%' at column 7 is a percentage (write 250ms or "
                 "1.5s, or 2x baseline)"),
    ("p99 > 2min", "unknown unit 'min' in '2min' at column 7 (units: %, ms, s, x baseline)"),
    ("p99 > 2x", "expected 'baseline' after '2x' at column 9, found the end"),
    ("p99 > 2x normal", "expected 'baseline' after '2x' at column 10, found 'normal'"),
    ("p99 > 0x baseline", "'0x' at column 7: the multiple of the baseline must be more than 0"),
    ("(error_rate > 2% or p99 > 1s", "missing ')' for the '(' at column 1 (found the end "
                                     "at column 29)"),
    ("error_rate > 2%)", "unmatched ')' at column 16"),
    ("error_rate > 2% p99 > 1s", "unexpected 'p99' at column 17 (expected 'and', 'or' or "
                                 "the end)"),
    ("error_rate > 2% ; drop", "unexpected ';' at column 17"),
])
def test_rule_errors_name_the_word_and_its_column(text, message):
    with pytest.raises(UserInputError) as info:
        parse_rule(text)
    assert str(info.value) == f"--rollback-on: {message}"


@pytest.mark.parametrize("value,expected", [
    (20, 20), ("5", 5), (1, 1), (0, None), (-3, None), (True, None), (2.5, None),
    ("lots", None), (10**7, None)])
def test_min_requests(value, expected):
    if expected is None:
        with pytest.raises(UserInputError, match=r"^--min-requests: expected a whole number "
                                                 r"within 1\.\.1,000,000, got "):
            check_min_requests(value)
    else:
        assert check_min_requests(value) == expected
