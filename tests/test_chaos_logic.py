"""The pure parts of ``nimbus chaos``: options, the schedule of events, the
edge's view, detection and recovery times, the report and its goals."""

from __future__ import annotations

import pytest

from nimbus.chaos import plan, procs
from nimbus.chaos.report import (
    AsyncStats,
    EventResult,
    LoadStats,
    Report,
    back_up_s,
    detection_s,
    edge_view,
    error_type,
    failure_cause,
    last_served_s,
    percentile,
    served_again_s,
)
from nimbus.errors import UserInputError


@pytest.mark.parametrize(("text", "seconds"), [
    ("120s", 120.0), ("2m", 120.0), ("500ms", 0.5), ("1.5h", 5400.0), ("7", 7.0),
    (" 3 s ", 3.0)])
def test_durations(text: str, seconds: float) -> None:
    assert plan.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-1s", "0s", "5 minutes", "1e3s"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(UserInputError, match="--duration"):
        plan.parse_duration(text)


def test_events_come_in_run_order_once() -> None:
    assert plan.parse_events("region, instance,region") == ("instance", "region")
    assert plan.parse_events("REGION") == ("region",)
    with pytest.raises(UserInputError, match="unknown event 'zone'"):
        plan.parse_events("instance,zone")
    with pytest.raises(UserInputError, match="at least one"):
        plan.parse_events(" , ")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000", "http://127.9.8.7", "http://localhost:1/", "http://[::1]:80",
    "https://api.localhost"])
def test_loopback_urls_pass(url: str) -> None:
    assert plan.require_loopback(url, "--edge") == url.rstrip("/")


@pytest.mark.parametrize("url", [
    "http://10.0.0.1:8000", "http://example.com", "http://128.0.0.1", "http://0.0.0.0:80",
    "http://127.0.0.1.example.com", "ftp://127.0.0.1", "127.0.0.1:8000", "http://[::2]"])
def test_other_urls_are_refused_naming_the_option(url: str) -> None:
    with pytest.raises(UserInputError, match="--edge"):
        plan.require_loopback(url, "--edge")


def test_schedule_spaces_events_and_leaves_the_region_time_to_recover() -> None:
    events = plan.schedule(plan.EVENT_KINDS, 120.0)
    assert [e.kind for e in events] == list(plan.EVENT_KINDS)
    times = [e.at_s for e in events]
    assert times == sorted(times) and times[0] > 0
    for a, b in zip(times, times[1:], strict=False):
        assert b - a == pytest.approx(120 / 7, abs=0.002)
    assert 120.0 - times[-1] >= 2 * (times[1] - times[0]) - 0.01
    one = plan.schedule(("region",), 6.0)
    assert [(e.at_s, e.kind) for e in one] == [(2.0, "region")]


def test_default_concurrency_covers_one_deadline() -> None:
    assert plan.default_concurrency(200, 5.0) == 1000
    assert plan.default_concurrency(40, 2.0) == 80
    assert plan.default_concurrency(1, 1.0) == 16
    assert plan.default_concurrency(5000, 5.0) == 1000


def test_request_count() -> None:
    assert plan.request_times(200, 120) == 24_000
    assert plan.request_times(0.1, 1) == 1


def test_failure_causes() -> None:
    assert failure_cause(200) is None and failure_cause(302) is None
    assert failure_cause(502) == "http_502" and failure_cause(429) == "http_429"
    assert failure_cause(None, "timeout") == "timeout"
    assert failure_cause(None) == "no_response"


def test_error_types_name_the_cause() -> None:
    assert error_type(b'{"errorType": "RegionFailed", "errorMessage": "eu"}') == "RegionFailed"
    assert error_type(b'{"errorType": "Runtime.ExitError"}') == "Runtime.ExitError"
    assert error_type(b"Bad Gateway") is None and error_type(b"{") is None
    assert error_type(b'{"errorType": "a b\\nc"}') is None  # not a name: not printed
    assert error_type(b'[1]') is None


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_edge_view_shapes() -> None:
    assert edge_view({"regions": {"eu": {"up": False}, "us": {"up": True}}}) == {
        "eu": False, "us": True}
    assert edge_view({"regions": [{"name": "eu", "healthy": True},
                                  {"name": "us", "status": "down"}]}) == {
        "eu": True, "us": False}
    assert edge_view({"regions": {"eu": {"state": "UP"}, "x": 3}}) == {"eu": True}
    assert edge_view({"regions": {"eu": True}}) == {"eu": True}
    assert edge_view([1, 2]) == {} and edge_view({"nope": 1}) == {}


POLLS = [(0.9, {"eu": True, "us": True}), (1.05, {"eu": True, "us": True}),
         (1.4, {"eu": False, "us": True}), (2.0, {"eu": False, "us": True}),
         (5.0, {"eu": True, "us": True}), (5.2, {"eu": False, "us": True}),
         (6.0, {"eu": True, "us": True}), (7.0, {"eu": True, "us": True})]


def test_detection_is_the_first_down_poll_after_the_kill() -> None:
    assert detection_s(POLLS, "eu", 1.0) == pytest.approx(0.4)
    assert detection_s(POLLS, "us", 1.0) is None
    assert detection_s(POLLS, "eu", 10.0) is None


def test_recovery_waits_for_sustained_health() -> None:
    # up at 5.0 but down again at 5.2: back for good from 6.0
    assert back_up_s(POLLS, "eu", 1.0) == pytest.approx(5.0)
    assert back_up_s(POLLS, "us", 1.0) is None  # never down, so never "back"
    assert back_up_s(POLLS[:4], "eu", 1.0) is None


def test_served_again_and_last_served() -> None:
    served = [(0.5, 0.51, "eu"), (1.01, 1.02, "eu"), (1.03, 1.2, "us"), (4.0, 4.01, "eu"),
              (4.5, 4.51, "eu")]
    assert last_served_s(served, "eu", 1.0) == pytest.approx(0.02)  # then a gap
    assert served_again_s(served, "eu", 3.0, 1.0) == pytest.approx(3.01)
    assert served_again_s(served, "us", 3.0, 1.0) is None


def report(load: LoadStats, lost: int = 0, unverified: int = 0) -> Report:
    a = AsyncStats(accepted=5, found=5 - lost - unverified,
                   lost=[f"l{i}" for i in range(lost)],
                   unverified=[f"u{i}" for i in range(unverified)])
    ev = EventResult("region", 2.0, region="eu", at_s=2.01, target="nimbus up pid 7",
                     pids=[7, 8], detection_s=0.31, recovery_s=4.2, restarted_pids=[9])
    skipped = EventResult("worker", 1.0, region="eu", skipped="no separate worker")
    return Report("http://127.0.0.1:1", "app", "/hello", 100.0, 6.0, 0.99, load,
                  [skipped, ev], a)


def test_report_goals_and_exit_status() -> None:
    load = LoadStats()
    for i in range(99):
        load.record(i * 0.01, i * 0.01 + 0.002, 200, "eu" if i < 50 else "us")
    load.record(1.0, 1.5, None, None, "timeout")
    r = report(load)
    assert load.success_ratio == pytest.approx(0.99)
    assert r.goals() == [] and r.exit_code == 0
    load.not_sent("not_sent_concurrency_cap", 2.5)  # a request not sent counts against
    assert r.exit_code == 1 and "below the goal" in r.goals()[0]
    d = r.to_dict()
    assert d["requests"]["failed_by_cause"] == {"not_sent_concurrency_cap": 1, "timeout": 1}
    assert d["requests"]["by_region"] == {"eu": 50, "us": 49}
    assert d["requests"]["scheduled"] == 101 and d["requests"]["sent"] == 100
    assert d["requests"]["failed_per_second"] == {"1": 1, "2": 1}
    assert d["exit_code"] == 1


def test_lost_or_unchecked_async_invocations_miss_the_goal() -> None:
    load = LoadStats()
    load.record(0.0, 0.001, 200, "eu")
    assert report(load).exit_code == 0
    lost = report(load, lost=1)
    assert lost.exit_code == 1 and "lost" in lost.goals()[0]
    assert "could not be checked" in report(load, unverified=2).goals()[0]


def test_render_names_every_event_and_the_result() -> None:
    load = LoadStats()
    load.record(0.0, 0.001, 200, "eu")
    load.record(0.0, 0.001, 502, None)
    text = report(load, lost=1).render()
    assert "failed by cause  http_502 1" in text and "failed when      0s-1s 1" in text
    assert "skipped: no separate worker" in text
    assert "0.31s" in text and "4.20s" in text and "back as pid 9" in text
    assert "1 lost" in text and "GOALS MISSED" in text


def test_command_line_options_are_replaced_or_added() -> None:
    cmd = procs.CommandLine(("nimbus", "up", "--port", "0", "--control-port=0"), "/", {})
    out = cmd.with_option("--port", "8080").with_option("--control-port", "8081")
    assert out.argv == ("nimbus", "up", "--port", "8080", "--control-port=8081")
    assert out.with_option("--host", "127.0.0.2").argv[-2:] == ("--host", "127.0.0.2")
    assert out.option("--control-port") == "8081" and out.option("--nope") is None
