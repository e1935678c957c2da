"""The dashboard's pure parts: frames from exposition text, rates and
percentiles between frames, the bounded history, sessions. ``now`` is
always given; nothing sleeps."""

from __future__ import annotations

import math

import pytest

from nimbus.ui import history as h
from nimbus.ui.auth import Sessions, cookie_header
from nimbus.ui.dashboard import function_detail, overview

BUCKETS = (0.01, 0.1, 1.0)


def text(fn: str = "hello", *, success: float = 0, error: float = 0, throttled: float = 0,
         version: str = "1", le: tuple[float, float, float, float] = (0, 0, 0, 0),
         idle: float = 0, busy: float = 0, in_flight: float = 0, dead: float = 0) -> str:
    """Exposition text of one process for one function version."""
    lab = f'function="{fn}",version="{version}",region="r"'
    lines = [
        "# TYPE nimbus_invocations_total counter",
        f'nimbus_invocations_total{{{lab},outcome="success"}} {success}',
        f'nimbus_invocations_total{{{lab},outcome="error"}} {error}',
        f'nimbus_invocations_total{{{lab},outcome="throttled"}} {throttled}',
        "# TYPE nimbus_invocation_duration_seconds histogram",
        *(f'nimbus_invocation_duration_seconds_bucket{{{lab},le="{b}"}} {c}'
          for b, c in zip((*map(str, BUCKETS), "+Inf"), le, strict=True)),
        f"nimbus_invocation_duration_seconds_count{{{lab}}} {le[3]}",
        f"nimbus_invocation_duration_seconds_sum{{{lab}}} 0",
        "# TYPE nimbus_instances gauge",
        f'nimbus_instances{{{lab},state="idle"}} {idle}',
        f'nimbus_instances{{{lab},state="busy"}} {busy}',
        "# TYPE nimbus_in_flight_requests gauge",
        f"nimbus_in_flight_requests{{{lab}}} {in_flight}",
        "# TYPE nimbus_async_invocations gauge",
        f'nimbus_async_invocations{{function="{fn}",region="r",status="dead"}} {dead}',
        "# TYPE process_cpu_seconds_total counter",
        "process_cpu_seconds_total 12.5",
    ]
    return "\n".join(lines) + "\n"


def test_a_frame_sums_versions_and_processes_and_skips_other_metrics() -> None:
    frame = h.frame_from_text(text(success=5, error=1, le=(1, 4, 5, 6), idle=2, dead=1), 10.0)
    h.frame_from_text(text(success=3, version="2", le=(0, 3, 3, 3), busy=1, dead=2), 10.0, frame)
    h.frame_from_text(text("other", success=1), 10.0, frame)
    p = frame.functions["hello"]
    assert p.outcomes == {"success": 8, "error": 1, "throttled": 0}
    assert p.invocations == 9 and p.errors == 1
    assert p.buckets == {0.01: 1, 0.1: 7, 1.0: 8, math.inf: 9}
    assert p.duration_count == 9
    assert p.instances == {"idle": 2, "busy": 1} and p.instance_count == 3
    assert p.async_status == {"dead": 2}  # the queue's state: the largest reading
    assert p.versions == {"1", "2"}
    assert set(frame.functions) == {"hello", "other"}


def test_increase_treats_a_reset_as_no_increase() -> None:
    assert h.increase(3, 10) == 7
    assert h.increase(10, 4) == 0


def test_quantile_interpolates_inside_the_bucket() -> None:
    before = {0.1: 0.0, 0.5: 0.0, 1.0: 0.0, math.inf: 0.0}
    after = {0.1: 10.0, 0.5: 20.0, 1.0: 20.0, math.inf: 20.0}
    assert h.quantile(0.5, before, after) == pytest.approx(0.1)
    assert h.quantile(0.75, before, after) == pytest.approx(0.3)
    assert h.quantile(0.99, before, after) == pytest.approx(0.492)
    # only what happened between the two readings counts
    later = {0.1: 10.0, 0.5: 20.0, 1.0: 30.0, math.inf: 30.0}
    assert h.quantile(0.5, after, later) == pytest.approx(0.75)
    assert h.quantile(0.5, after, after) is None
    # past the last finite bound: that bound
    assert h.quantile(0.99, {}, {0.1: 0.0, 1.0: 1.0, math.inf: 5.0}) == 1.0
    assert h.quantile(0.5, {}, {}) is None


def history_of(*frames: tuple[float, str]) -> h.History:
    hist = h.History()
    for t, body in frames:
        hist.add(h.frame_from_text(body, t))
    return hist


def test_window_rates_errors_and_percentiles_over_the_last_minute() -> None:
    hist = history_of(
        (1000.0, text(success=0)),
        (1030.0, text(success=100, le=(0, 50, 100, 100))),
        (1090.0, text(success=160, error=30, throttled=6, le=(0, 50, 220, 250))),
    )
    w = h.window(hist, "hello", 60.0, now=1090.5)  # from the frame at 1030 to 1090
    assert w.seconds == 60.0
    assert w.invocations == 96 and w.rate == pytest.approx(1.6)
    assert w.errors == 30 and w.error_rate == pytest.approx(0.5)
    assert w.throttled == 6
    assert w.p50 == pytest.approx(0.1 + 0.9 * 75 / 120)   # 150 new observations, 120 in (0.1, 1]
    # an unknown function is all zeros
    assert h.window(hist, "nope", 60.0, now=1090.5).invocations == 0
    # a window reaching before the first frame starts at the first frame
    assert h.window(hist, "hello", 900.0, now=1090.5).invocations == 196


def test_steps_are_aligned_and_none_before_the_first_frame() -> None:
    hist = h.History()
    for i in range(0, 31):  # a frame a second from t=2000: 2 invocations a second
        hist.add(h.frame_from_text(text(success=2 * i, idle=1), 2000.0 + i))
    series = list(h.steps(hist, "hello", now=2030.4, span_s=60.0, step_s=10.0))
    # intervals ending at 1980 .. 2030; the first three start before t=2000
    assert [t for t, _ in series] == [1970.0 + 10 * i for i in range(1, 7)]
    assert [s is None for _, s in series] == [True, True, True, False, False, False]
    assert [s.rate for _, s in series if s is not None] == [2.0, 2.0, 2.0]
    gauge = h.gauge_series(hist, "hello", 2030.4, "instance_count", 60.0, 10.0)
    assert gauge == [None, None, 1.0, 1.0, 1.0, 1.0]  # read at 1980 .. 2030


def test_history_is_bounded_in_time_and_count() -> None:
    hist = h.History(span_s=100.0, max_frames=50)
    for i in range(300):
        hist.add(h.Frame(float(i), {}))
    assert len(hist.frames) == 50 and hist.frames[0].t == 250.0
    hist = h.History(span_s=10.0, max_frames=1000)
    for i in range(300):
        hist.add(h.Frame(float(i), {}))
    assert [f.t for f in hist.frames] == [float(t) for t in range(289, 300)]
    hist.add(h.Frame(5.0, {}))  # the clock stepping back is ignored
    assert hist.frames[-1].t == 299.0


def test_overview_and_detail_numbers() -> None:
    hist = h.History()
    for i in range(0, 121):  # 120 s: 1 success/s, an error every 10 s, all under 10 ms
        hist.add(h.frame_from_text(text(success=i, error=i // 10, le=(i, i, i, i), busy=1),
                                   5000.0 + i))
    data = overview(hist, now=5120.0, region="r")
    [row] = data["functions"]
    assert row["name"] == "hello" and row["versions"] == ["1"]
    assert row["invocations"] == 132 and row["errors"] == 12
    assert row["rate"] == pytest.approx(1.1) and row["error_rate"] == pytest.approx(0.1)
    assert row["p99"] == pytest.approx(0.0099)
    assert row["instances"] == 1
    assert len(row["spark"]["rate"]) == len(data["times"]) == 90
    assert row["spark"]["rate"][-1] == pytest.approx(1.1)
    assert row["spark"]["rate"][0] is None
    detail = function_detail(hist, "hello", now=5120.0)
    assert detail["totals"]["outcomes"] == {"success": 120, "error": 12, "throttled": 0}
    assert len(detail["series"]["p99"]) == len(detail["times"]) == 180
    # (5115, 5120]: 5 successes and the error counted at 5120
    assert detail["series"]["invocations"][-1] == pytest.approx(1.2)
    assert detail["series"]["errors"][-1] == pytest.approx(0.2)


def test_sessions_expire_close_and_stay_bounded() -> None:
    s = Sessions("t" * 40, session_s=100.0, max_sessions=3)
    assert s.token_ok("t" * 40) and s.token_ok(" " + "t" * 40 + "\n")
    assert not s.token_ok("t" * 39) and not s.token_ok("") and not s.token_ok("é" * 40)
    assert not Sessions("").token_ok("")
    a = s.open(now=0.0)
    assert s.valid(a, 99.0) and not s.valid(a, 100.0) and not s.valid(a, 50.0)
    ids = [s.open(now=200.0) for _ in range(4)]
    assert len(s) == 3 and not s.valid(ids[0], 201.0) and s.valid(ids[3], 201.0)
    s.close(ids[3])
    assert not s.valid(ids[3], 201.0) and not s.valid(None, 201.0)
    assert cookie_header("abc", True, 60) == (
        "nimbus_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60; Secure")


def test_older_frames_are_thinned_and_histograms_packed() -> None:
    hist = h.History(span_s=300.0, fine_s=60.0, coarse_s=5.0)
    for i in range(400):  # a frame a second: 3 invocations a second
        hist.add(h.frame_from_text(text(success=3 * i, le=(0, 3 * i, 3 * i, 3 * i)),
                                   10_000.0 + i))
    frames = hist.frames
    times = [f.t for f in frames]
    assert times == sorted(times) and times[-1] == 10_399.0
    recent = [t for t in times if t >= 10_399.0 - 60.0]
    older = [t for t in times if t < 10_399.0 - 60.0]
    assert len(recent) == 61 and times[0] >= 10_399.0 - 300.0
    assert all(b - a == 5.0 for a, b in zip(older, older[1:], strict=False))
    assert len(older) == 48 and len(frames) == 109
    point = frames[0].functions["hello"]
    assert point.buckets == {} and point.counts is not None
    assert point.bounds is frames[-1].functions["hello"].bounds  # one tuple for all frames
    # answers are the same as from every frame
    w = h.window(hist, "hello", 200.0, now=10_399.0)
    assert w.rate == pytest.approx(3.0) and w.p50 == pytest.approx(0.055)
