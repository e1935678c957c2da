"""Prometheus metrics of ``nimbus up``: scraped from ``GET /metrics`` on the
control port with prometheus-client's parser; counters move by exactly the
invocations made. One ``nimbus up`` for the module."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from nimbus.errors import (
    ClosedError,
    HandlerError,
    InstanceDiedError,
    InvocationTimeoutError,
    ThrottledError,
    UnavailableError,
)
from nimbus.observe import metrics
from nimbus.observe.metrics import DURATION_BUCKETS, InvocationStats, outcome_of
from tests.conftest import Nimbus
from tests.region import wait_until

MANIFEST = """\
name: meter
functions:
  ok:
    handler: h.ok
    http: [{method: GET, path: /ok}, {method: POST, path: /ok}]
  boom:
    handler: h.boom
    http: [{method: GET, path: /boom}]
  slow:
    handler: h.slow
    timeout_s: 1
    http: [{method: GET, path: /slow}]
  die:
    handler: h.die
    http: [{method: GET, path: /die}]
  gate:
    handler: h.gate
    max_instances: 1
    max_queue: 0
    http: [{method: GET, path: /gate}]
  sour:
    handler: h.boom
    retries: 1
    retry_delay_s: 0.05
    http: [{method: POST, path: /sour}]
  tick:
    handler: h.ok
    schedule: rate(1 second)
"""

HANDLERS = """\
import os, time

def ok(event, context):
    return {"statusCode": 200, "body": "ok"}

def boom(event, context):
    raise ValueError("boom")

def slow(event, context):
    time.sleep(5)

def die(event, context):
    if (event.get("queryStringParameters") or {}).get("now"):
        os._exit(3)
    return "alive"

def gate(event, context):
    time.sleep(1.0)
    return "done"
"""


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("metrics")
    app = root / "meter"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLERS)
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits")
    yield n
    n.stop()


def web(up: Nimbus) -> httpx.Client:
    """The client of ``up``'s gateway."""
    assert up.http is not None
    return up.http


def scrape(up: Nimbus) -> Samples:
    r = httpx.get(up.control_url + "/metrics",
                  headers={"authorization": f"Bearer {up.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    return parse(r.text)


def inv(samples: Samples, fn: str, outcome: str) -> float:
    return value(samples, "nimbus_invocations_total", function=fn, version="1",
                 region="local", outcome=outcome)


def hist_count(samples: Samples, fn: str) -> float:
    return value(samples, "nimbus_invocation_duration_seconds_count", function=fn,
                 version="1", region="local")


def test_metrics_needs_the_token(up: Nimbus) -> None:
    url = up.control_url + "/metrics"
    assert httpx.get(url, timeout=30).status_code == 401
    wrong = httpx.get(url, headers={"authorization": "Bearer " + "x" * 43}, timeout=30)
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers={"authorization": f"bearer {up.token}"},
                     timeout=30).status_code == 200


def test_success_and_error_counts_are_exact(up: Nimbus) -> None:
    before = scrape(up)
    for _ in range(7):
        assert web(up).get("/ok").status_code == 200
    assert web(up).post("/ok", content=b"x" * 100).status_code == 200
    for _ in range(3):
        assert web(up).get("/boom").status_code == 500
    assert web(up).get("/nowhere").status_code == 404
    after = scrape(up)
    assert inv(after, "ok", "success") - inv(before, "ok", "success") == 8
    assert inv(after, "boom", "error") - inv(before, "boom", "error") == 3
    assert inv(after, "boom", "success") == 0
    # the histogram counts what an instance answered: successes and errors
    assert hist_count(after, "ok") - hist_count(before, "ok") == 8
    assert hist_count(after, "boom") - hist_count(before, "boom") == 3
    assert hist_count(after, "ok") == inv(after, "ok", "success") + inv(after, "ok", "error")
    inf = value(after, "nimbus_invocation_duration_seconds_bucket", function="ok",
                version="1", region="local", le="+Inf")
    assert inf == hist_count(after, "ok")

    def http(s: Samples, fn: str, code: str) -> float:
        return value(s, "nimbus_http_requests_total", function=fn, region="local", code=code)

    assert http(after, "ok", "200") - http(before, "ok", "200") == 8
    assert http(after, "boom", "500") - http(before, "boom", "500") == 3
    assert http(after, "", "404") - http(before, "", "404") == 1
    rx = "nimbus_http_received_bytes_total"
    assert value(after, rx, region="local") - value(before, rx, region="local") == 100
    tx = "nimbus_http_sent_bytes_total"
    assert value(after, tx, region="local") - value(before, tx, region="local") > 8 * 2


def test_timeouts_deaths_and_cold_starts(up: Nimbus) -> None:
    before = scrape(up)
    assert web(up).get("/slow").status_code == 504
    after = scrape(up)
    assert inv(after, "slow", "timeout") - inv(before, "slow", "timeout") == 1
    assert hist_count(after, "slow") == hist_count(before, "slow")  # no answer, no duration

    labels = {"function": "die", "version": "1", "region": "local"}
    # the deploy started one instance of each function: its cold start
    assert value(before, "nimbus_cold_starts_total", **labels) == 1
    assert web(up).get("/die?now=1").status_code == 502
    died = scrape(up)
    assert inv(died, "die", "instance_died") - inv(before, "die", "instance_died") == 1
    assert inv(died, "die", "error") == 0
    # one instance replaces the dead one (started by the next request, or by
    # the autoscaler first: then the request waits for it), once
    for _ in range(4):
        assert web(up).get("/die").status_code == 200
    after = scrape(up)
    assert value(after, "nimbus_cold_starts_total", **labels) == 2
    assert value(after, "nimbus_cold_start_duration_seconds_count", **labels) == 2
    assert value(after, "nimbus_instances_ready", **labels) == 1
    assert inv(after, "die", "success") - inv(before, "die", "success") == 4


def test_throttled_requests_are_counted(up: Nimbus) -> None:
    before = scrape(up)
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(web(up).get("/gate").status_code))
    first.start()
    labels = {"function": "gate", "version": "1", "region": "local"}
    wait_until(lambda: value(scrape(up), "nimbus_in_flight_requests", **labels) == 1, 10,
               "the first request in flight")
    busy = scrape(up)
    assert value(busy, "nimbus_instances", state="busy", **labels) == 1
    assert value(busy, "nimbus_instances", state="idle", **labels) == 0
    assert value(busy, "nimbus_instances_ready", **labels) == 1
    second = web(up).get("/gate")
    first.join(30)
    assert (sorted(codes), second.status_code) == ([200], 429)
    after = scrape(up)
    assert inv(after, "gate", "throttled") - inv(before, "gate", "throttled") == 1
    assert inv(after, "gate", "success") - inv(before, "gate", "success") == 1
    assert hist_count(after, "gate") - hist_count(before, "gate") == 1
    assert value(after, "nimbus_http_requests_total", function="gate", region="local",
                 code="429") == 1


def test_async_retries_dead_letters_and_schedules(up: Nimbus) -> None:
    r = web(up).post("/sour", content=b"{}", headers={"x-nimbus-invocation-type": "Event"})
    assert r.status_code == 202
    labels = {"function": "sour", "region": "local"}
    got = wait_until(lambda: (s := scrape(up)) and value(
        s, "nimbus_async_dead_letters_total", **labels) == 1 and s, 30, "a dead letter")
    assert value(got, "nimbus_async_retries_total", **labels) == 1
    assert inv(got, "sour", "error") == 2  # the first try and its retry
    # the backlog is read at scrape time (cached for a second)
    got = wait_until(lambda: (s := scrape(up)) and value(
        s, "nimbus_async_invocations", status="dead", **labels) == 1 and s, 10,
        "the dead letter in the backlog")
    assert value(got, "nimbus_async_invocations", status="queued", **labels) == 0
    assert ("nimbus_async_oldest_queued_age_seconds", frozenset(labels.items())) in got
    # rate(1 second): fires come, none missed while the platform keeps up
    tick = {"function": "tick", "schedule": "schedule-0", "region": "local"}
    got = wait_until(lambda: (s := scrape(up)) and value(
        s, "nimbus_schedule_fires_total", **tick) >= 1 and s, 15, "a schedule fire")
    assert value(got, "nimbus_schedule_misses_total", **tick) == 0


def test_platform_families(up: Nimbus) -> None:
    s = scrape(up)
    status = httpx.get(up.control_url + "/v1/status", timeout=30,
                       headers={"authorization": f"Bearer {up.token}"}).json()
    running = [z for z in status["zygotes"] if z["pid"]]
    assert running and value(s, "nimbus_zygotes", region="local") == len(running)
    for kind in ("platform", "zygote", "instances"):
        assert value(s, "nimbus_memory_pss_bytes", region="local", role="up", kind=kind) > 0
    ops = {dict(labels).get("op") for (name, labels) in s
           if name == "nimbus_store_operation_seconds_count"}
    assert {"get", "list"} <= ops
    assert any(name == "nimbus_queue_operation_seconds_count" for name, _ in s)
    assert any(name == "process_cpu_seconds_total" for name, _ in s)  # default collectors
    for name, labels in s:
        if name.startswith("nimbus_"):
            assert "region" in dict(labels), name


def test_open_metrics_refused_off_loopback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nimbus.cli.main import cli

    out = CliRunner().invoke(cli, [
        "up", str(tmp_path), "--control-host", "0.0.0.0", "--metrics-auth", "open",
        "--state-dir", str(tmp_path / "s")])
    assert out.exit_code == 2, out.output
    assert "--metrics-auth open" in out.output and "'0.0.0.0'" in out.output
    assert "Traceback" not in out.output
    assert not (tmp_path / "s").exists()  # refused before anything started


# -- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize("exc,outcome", [
    (HandlerError({"errorMessage": "x"}), "error"), (InvocationTimeoutError("t"), "timeout"),
    (ThrottledError("t"), "throttled"), (InstanceDiedError("d"), "instance_died"),
    (UnavailableError("gone"), "instance_died"), (ClosedError("retired"), None),
])
def test_outcome_of(exc: BaseException, outcome: str | None) -> None:
    assert outcome_of(exc) == outcome


def test_invocation_stats_buckets() -> None:
    s = InvocationStats("f", 1)
    s.succeeded(0.001)  # on a bound: that bucket (le is inclusive)
    s.succeeded(0.0011)
    s.succeeded(1000.0)  # past the last bound: +Inf
    s.failed(HandlerError({}), 0.2)
    s.failed(InvocationTimeoutError("t"), 1.0)  # no answer: not observed
    s.failed(ThrottledError("t"))
    assert s.counts() == {"success": 3, "error": 1, "timeout": 1, "throttled": 1,
                          "instance_died": 0}
    assert s.buckets[0] == 1 and s.buckets[1] == 1
    assert s.buckets[DURATION_BUCKETS.index(0.25)] == 1
    assert s.buckets[-1] == 1 and sum(s.buckets) == 4
    families = {f.name: f for f in metrics.invocation_families([s], "r")}
    hist = families["nimbus_invocation_duration_seconds"]
    by_le = {x.labels["le"]: x.value for x in hist.samples if x.name.endswith("_bucket")}
    assert (by_le["0.001"], by_le["0.0025"], by_le["900.0"], by_le["+Inf"]) == (1, 2, 3, 4)


def test_auth_and_loopback_rules() -> None:
    token = "t" * 40
    assert metrics.authorized({"authorization": f"Bearer {token}"}, token)
    assert metrics.authorized({"authorization": f"BEARER  {token} "}, token)
    assert not metrics.authorized({"authorization": f"Basic {token}"}, token)
    assert not metrics.authorized({}, token)
    assert not metrics.authorized({"authorization": "Bearer "}, "")
    assert metrics.authorized({}, None)  # open
    status, headers, body = metrics.metrics_response({}, token)
    assert status == 401 and ("www-authenticate", "Bearer") in headers
    for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        metrics.check_metrics_auth("open", host, "--control-host")
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            metrics.check_metrics_auth("open", host, "--control-host")
        metrics.check_metrics_auth("token", host, "--control-host")
    with pytest.raises(ValueError, match="expected token or open"):
        metrics.check_metrics_auth("none", "127.0.0.1", "--control-host")


def test_open_metrics_app_serves_without_a_token() -> None:
    from nimbus.roles.http import metrics_app

    async def get(app: Any, headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/metrics", headers=headers)

    import asyncio

    assert asyncio.run(get(metrics_app(None), {})).status_code == 200
    assert asyncio.run(get(metrics_app("k" * 40), {})).status_code == 401
    r = asyncio.run(get(metrics_app("k" * 40), {"authorization": "Bearer " + "k" * 40}))
    assert r.status_code == 200 and "nimbus_invocations_total" in r.text


def test_async_backlog_is_read_at_most_once_a_second() -> None:
    import asyncio

    reads: list[int] = []

    async def reader() -> dict[str, metrics.AsyncFigures]:
        reads.append(1)
        return {"f": metrics.AsyncFigures(queued=len(reads))}

    c = metrics.NimbusCollector()
    c.async_reader = reader
    for now in (100.0, 100.5, 100.99):
        asyncio.run(c.refresh(now))
    assert len(reads) == 1
    asyncio.run(c.refresh(101.0))
    assert len(reads) == 2 and c.async_figures["f"].queued == 2


def test_schedule_misses_are_the_ticks_skipped() -> None:
    from nimbus.events.schedule_expr import parse_schedule
    from nimbus.events.scheduler import LATE_S, tick_plan

    every_s = parse_schedule("rate(1 second)")
    last = 1_000_000.0
    now = last + LATE_S + 10  # 40 ticks due, the first 9 of them late
    for missed, fired, skipped in (("all", 40, 0), ("once", 31, 9), ("none", 31, 9)):
        fire, n_skipped, new_last = tick_plan(every_s, missed, last, now)
        assert (len(fire), n_skipped, new_last) == (fired, skipped, now), missed


def test_names_read_at_scrape_time_are_reserved_in_the_registry() -> None:
    from prometheus_client import Counter, Gauge

    with pytest.raises(ValueError, match="nimbus_instances"):
        Gauge("nimbus_instances", "another family by the same name")
    with pytest.raises(ValueError, match="nimbus_invocations"):
        Counter("nimbus_invocations", "another family by the same name")
