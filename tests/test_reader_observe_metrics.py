"""A second reader's checks of metrics, traces and monitoring files, written
from the README and docs/monitoring.md: exact counters under concurrency,
histogram consistency, label hygiene, auth of /metrics, W3C traceparent
edge cases, ``nimbus metrics targets`` and the shipped rules. One
``nimbus up`` (trace file on) for the module."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Nimbus
from tests.region import wait_until

MANIFEST = """\
name: reader
functions:
  ok:
    handler: h.ok
    max_instances: 8
    http: [{method: GET, path: /ok}]
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
  tr:
    handler: h.tr
    http: [{method: GET, path: /tr}]
  sour:
    handler: h.boom
    retries: 1
    retry_delay_s: 0.05
"""

HANDLERS = """\
import os, time

def ok(event, context):
    time.sleep(0.002)
    return {"statusCode": 200, "body": "ok"}

def boom(event, context):
    raise ValueError("boom")

def slow(event, context):
    time.sleep(5)

def die(event, context):
    os._exit(3)

def gate(event, context):
    # held until the test releases it (a file), at most 10 s
    deadline = time.monotonic() + 10
    while not os.path.exists(RELEASE) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "done"

def tr(event, context):
    h = event.get("headers") or {}
    return {"traceparent": h.get("traceparent"), "tracestate": h.get("tracestate"),
            "env": os.environ.get("_X_AMZN_TRACE_ID"),
            "ctx_trace_id": getattr(context, "trace_id", None),
            "ctx_traceparent": getattr(context, "traceparent", None),
            "rid": context.aws_request_id}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TP_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("reader-observe")
    app = root / "reader"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(f"RELEASE = {str(root / 'release')!r}\n" + HANDLERS)
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits",
               "--trace", "file")
    yield n
    n.stop()


def cli(up: Nimbus, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``nimbus`` command as users run it (``python -m nimbus``)."""
    return subprocess.run([sys.executable, "-m", "nimbus", *args, "--state-dir", str(up.state)],
                          capture_output=True, text=True, timeout=60, cwd=up.state.parent)


def raw_metrics(up: Nimbus, **kw: Any) -> httpx.Response:
    return httpx.get(up.control_url + "/metrics", timeout=30, **kw)


def scrape_text(up: Nimbus) -> str:
    r = raw_metrics(up, headers={"authorization": f"Bearer {up.token}"})
    assert r.status_code == 200, r.text
    return r.text


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


def inv(s: Samples, fn: str, outcome: str) -> float:
    return val(s, "nimbus_invocations_total", function=fn, version="1", region="local",
               outcome=outcome)


def hcount(s: Samples, fn: str) -> float:
    return val(s, "nimbus_invocation_duration_seconds_count", function=fn, version="1",
               region="local")


def http_code(s: Samples, fn: str, code: str) -> float:
    return val(s, "nimbus_http_requests_total", function=fn, region="local", code=code)


def buckets(s: Samples, fn: str) -> list[tuple[float, float]]:
    out = []
    for (name, labels), v in s.items():
        d = dict(labels)
        if (name == "nimbus_invocation_duration_seconds_bucket" and d.get("function") == fn
                and d.get("version") == "1"):
            out.append((float(d["le"]), v))
    return sorted(out)


# -- auth ---------------------------------------------------------------------------


def test_metrics_refuses_every_way_but_the_bearer_token(up: Nimbus) -> None:
    t = up.token
    refused = {
        "no token": raw_metrics(up),
        "wrong token": raw_metrics(up, headers={"authorization": "Bearer " + "x" * len(t)}),
        "token prefix": raw_metrics(up, headers={"authorization": "Bearer " + t[:-1]}),
        "query token": raw_metrics(up, params={"token": t}),
        "query access_token": raw_metrics(up, params={"access_token": t}),
        "basic": raw_metrics(up, auth=("nimbus", t)),
        "bare token": raw_metrics(up, headers={"authorization": t}),
        "cookie": raw_metrics(up, cookies={"token": t}),
    }
    for what, r in refused.items():
        assert r.status_code in (401, 403), (what, r.status_code)
        assert "nimbus_invocations" not in r.text, what
    ok = raw_metrics(up, headers={"authorization": f"bearer {t}"})
    assert ok.status_code == 200, "the scheme is case-insensitive per the README"


def test_open_metrics_off_loopback_is_refused(tmp_path: Path) -> None:
    # 0.0.0.0 has its test in test_metrics.py; an empty host binds every interface too
    for host in ("",):
        state = tmp_path / f"s{host.replace(':', '_')}"
        r = subprocess.run(
            [sys.executable, "-m", "nimbus.cli.main", "up", "--port", "0", "--control-port",
             "0", "--state-dir", str(state), "--control-host", host, "--metrics-auth", "open"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
        out = r.stdout + r.stderr
        assert r.returncode == 2, (host, r.returncode, out[-800:])
        assert "Traceback" not in out
        assert "nimbus: error:" in out and "loopback" in out, out


# -- exposition hygiene ------------------------------------------------------------------


def test_exposition_follows_prometheus_conventions(up: Nimbus) -> None:
    assert httpx.get(up.url + "/ok", timeout=30).status_code == 200
    text = scrape_text(up)
    helps = set(re.findall(r"^# HELP (nimbus_\w+) \S", text, re.M))
    types = dict(re.findall(r"^# TYPE (nimbus_\w+) (\w+)$", text, re.M))
    assert types, "no nimbus families"
    assert set(types) <= helps, f"families without HELP: {set(types) - helps}"
    rid_like = re.compile(r"^[0-9a-f]{16,}$|^[0-9a-f-]{36}$|^[0-9A-Za-z_-]{20,}$")
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("nimbus_"):
            continue
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples
                       if not s.name.endswith("_created")), fam.name
        if fam.type == "histogram" and ("duration" in fam.name or "operation" in fam.name
                                        or "detection" in fam.name):
            assert fam.name.endswith("_seconds"), fam.name
        if "memory" in fam.name or "bytes" in fam.name:
            assert fam.name.endswith("_bytes") or fam.name.endswith("_bytes_total") \
                or fam.name.endswith("_bytes"), fam.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|count)$", fam.name), fam.name
        for s in fam.samples:
            assert "region" in s.labels, (s.name, s.labels)
            for k, v in s.labels.items():
                assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) and not k.startswith("__")
                assert k not in ("request_id", "rid", "requestId", "trace_id", "instance_id")
                assert not rid_like.match(v), f"high-cardinality label {s.name} {k}={v}"


# -- exact counting ------------------------------------------------------------------------


def test_fifty_parallel_requests_count_exactly_fifty(up: Nimbus) -> None:
    before = parse(scrape_text(up))

    def one(_: int) -> int:
        return httpx.get(up.url + "/ok", timeout=30).status_code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(50)))
    assert codes == [200] * 50
    after = parse(scrape_text(up))
    assert inv(after, "ok", "success") - inv(before, "ok", "success") == 50
    assert hcount(after, "ok") - hcount(before, "ok") == 50
    assert http_code(after, "ok", "200") - http_code(before, "ok", "200") == 50
    for outcome in ("error", "timeout", "throttled", "instance_died"):
        assert inv(after, "ok", outcome) == inv(before, "ok", outcome), outcome
    # the histogram: cumulative, +Inf == count, from 1 ms, sum plausible
    b = buckets(after, "ok")
    assert b[0][0] == 0.001, b[:3]
    assert b[-1][0] == float("inf")
    values = [v for _, v in b]
    assert values == sorted(values), "buckets are not cumulative"
    assert b[-1][1] == hcount(after, "ok")
    s = val(after, "nimbus_invocation_duration_seconds_sum", function="ok", version="1",
            region="local")
    s0 = val(before, "nimbus_invocation_duration_seconds_sum", function="ok", version="1",
             region="local")
    # each handler sleeps 2 ms: 50 of them took at least 0.1 s and (warm) far below 50 s
    assert 0.1 <= s - s0 < 50, s - s0
    # nothing at or below 1 ms: every invocation slept 2 ms
    assert dict(b)[0.001] == 0
    les = [le for le, _ in b[:-1]]
    assert les == sorted(set(les))
    # bytes: each answer's body is "ok"; the GETs had no body
    sent = (val(after, "nimbus_http_sent_bytes_total", region="local")
            - val(before, "nimbus_http_sent_bytes_total", region="local"))
    received = (val(after, "nimbus_http_received_bytes_total", region="local")
                - val(before, "nimbus_http_received_bytes_total", region="local"))
    assert (sent, received) == (100, 0)
    # levels settle back: nothing in flight, held or busy
    lab = {"function": "ok", "version": "1", "region": "local"}
    assert val(after, "nimbus_in_flight_requests", **lab) == 0
    assert val(after, "nimbus_held_requests", **lab) == 0
    assert val(after, "nimbus_instances", state="busy", **lab) == 0
    ready = val(after, "nimbus_instances_ready", **lab)
    assert ready == val(after, "nimbus_instances", state="idle", **lab) >= 1
    # every cold start has its duration
    assert (val(after, "nimbus_cold_starts_total", **lab)
            == val(after, "nimbus_cold_start_duration_seconds_count", **lab) >= ready)


def test_each_outcome_is_counted_once(up: Nimbus) -> None:
    before = parse(scrape_text(up))
    with httpx.Client(base_url=up.url, timeout=30) as web:
        outcomes(up, web, before)


def outcomes(up: Nimbus, web: httpx.Client, before: Samples) -> None:
    assert [web.get("/boom").status_code for _ in range(3)] == [500] * 3
    assert web.get("/slow").status_code == 504
    assert web.get("/die").status_code == 502
    assert web.get("/nowhere").status_code == 404
    # throttled: one request running on the only instance, queue 0
    holder = threading.Thread(target=lambda: web.get("/gate"))
    holder.start()
    wait_until(lambda: val(parse(scrape_text(up)), "nimbus_in_flight_requests", function="gate",
                           version="1", region="local") == 1, 20, "gate in flight")
    extra = [web.get("/gate").status_code for _ in range(3)]
    (up.state.parent / "release").touch()
    holder.join(20)
    assert extra == [429] * 3
    after = parse(scrape_text(up))

    def d(fn: str, outcome: str) -> float:
        return inv(after, fn, outcome) - inv(before, fn, outcome)

    assert d("boom", "error") == 3
    assert hcount(after, "boom") - hcount(before, "boom") == 3
    assert d("slow", "timeout") == 1
    assert hcount(after, "slow") == hcount(before, "slow"), "a timeout did not answer"
    assert d("die", "instance_died") == 1
    assert hcount(after, "die") == hcount(before, "die")
    assert d("gate", "throttled") == 3
    assert d("gate", "success") == 1
    assert http_code(after, "gate", "429") - http_code(before, "gate", "429") == 3
    assert http_code(after, "", "404") - http_code(before, "", "404") == 1
    assert http_code(after, "boom", "500") - http_code(before, "boom", "500") == 3
    assert http_code(after, "slow", "504") - http_code(before, "slow", "504") == 1
    assert http_code(after, "die", "502") - http_code(before, "die", "502") == 1
    for fn, only in (("boom", "error"), ("slow", "timeout"), ("die", "instance_died")):
        for o in ("success", "error", "timeout", "throttled", "instance_died"):
            if o != only:
                assert d(fn, o) == 0, (fn, o)


def test_async_counters_exist_at_zero_before_their_first_event(up: Nimbus) -> None:
    """``increase(nimbus_async_dead_letters_total[15m]) > 0`` (the shipped
    NimbusDeadLettersGrowing alert) only sees an increment if the series
    existed before it: a series born at 1 shows no increase, so a function's
    first dead letter would never alert. Counters of a known function must
    be exported at 0 from the start (as Prometheus advises)."""
    before = parse(scrape_text(up))
    lab = {"function": "sour", "region": "local"}
    key_dl = ("nimbus_async_dead_letters_total", frozenset(lab.items()))
    key_rt = ("nimbus_async_retries_total", frozenset(lab.items()))
    key_err = ("nimbus_invocations_total", frozenset({**lab, "version": "1",
                                                     "outcome": "error"}.items()))
    missing = [k[0] for k in (key_dl, key_rt, key_err) if k not in before]
    r = httpx.post(f"{up.control_url}/v1/functions/sour/invoke?async=1", content=b"{}",
                   headers={"authorization": f"Bearer {up.token}"}, timeout=30)
    assert r.status_code == 202, r.text
    after = wait_until(lambda: (lambda s: s if val(s, *key_dl[:1], **lab) == 1 else None)(
        parse(scrape_text(up))), 20, "the dead letter")
    assert val(after, "nimbus_async_retries_total", **lab) == 1
    assert inv(after, "sour", "error") == 2
    assert not missing, f"absent until their first event: {missing}"


def test_parallel_async_invocations_count_exactly(up: Nimbus) -> None:
    before = parse(scrape_text(up))

    def submit(_: int) -> int:
        return httpx.post(f"{up.control_url}/v1/functions/ok/invoke?async=1", content=b"{}",
                          headers={"authorization": f"Bearer {up.token}"},
                          timeout=30).status_code

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(submit, range(20))) == [202] * 20
    after = wait_until(lambda: (lambda s: s if inv(s, "ok", "success")
                                - inv(before, "ok", "success") >= 20 else None)(
        parse(scrape_text(up))), 20, "20 async successes")
    lab = {"function": "ok", "region": "local"}

    def settled() -> Samples | None:
        s = parse(scrape_text(up))
        busy = sum(val(s, "nimbus_async_invocations", status=st, **lab)
                   for st in ("queued", "running", "retrying"))
        return s if busy == 0 else None

    after = wait_until(settled, 10, "the async backlog to drain")
    assert inv(after, "ok", "success") - inv(before, "ok", "success") == 20
    assert hcount(after, "ok") - hcount(before, "ok") == 20
    assert val(after, "nimbus_async_oldest_queued_age_seconds", **lab) == 0
    # async work is not an HTTP answer of the gateway
    assert http_code(after, "ok", "200") == http_code(before, "ok", "200")


def logs_of(up: Nimbus, fn: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{up.control_url}/v1/functions/{fn}/logs", params={"tail": "1000"},
                  headers={"authorization": f"Bearer {up.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def platform_line(up: Nimbus, fn: str, needle: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for rec in logs_of(up, fn):
            if rec["stream"] == "platform" and needle in rec["text"]:
                return rec
        return None
    try:
        found: dict[str, Any] = wait_until(find, 10, f"{needle!r} in {fn}'s logs")
    except AssertionError:
        raise AssertionError(f"no platform line {needle!r} in {fn}'s logs: "
                             f"{[r['text'] for r in logs_of(up, fn)][-15:]}") from None
    return found


def test_every_outcome_left_its_platform_line(up: Nimbus) -> None:
    """After test_each_outcome_is_counted_once and the async test: the lines
    the README's table promises, at their levels."""
    assert platform_line(up, "gate", "throttled 3 requests in the last 1 s")["level"] == \
        "WARNING"
    assert platform_line(up, "slow", "Task timed out after 1.00 seconds")["level"] == "ERROR"
    assert platform_line(up, "die", "instance exited during the invocation")["level"] == \
        "ERROR"
    retry = platform_line(up, "sour", "failed on try 1 (ValueError: boom); retrying in")
    assert retry["level"] == "WARNING"
    dead = platform_line(up, "sour", "dead-lettered after 2 tries (ValueError: boom)")
    assert dead["level"] == "ERROR"
    # the exception a handler raised: [ERROR] Type: message and its traceback, at ERROR
    boom = [r for r in logs_of(up, "boom") if "ValueError: boom" in r["text"]]
    assert boom and all(r.get("level") == "ERROR" for r in boom), boom
    text = "\n".join(r["text"] for r in logs_of(up, "boom"))
    assert "[ERROR] ValueError: boom" in text and "Traceback (most recent call last)" in text


def test_nimbus_trace_of_an_unknown_id_is_a_clear_error(up: Nimbus) -> None:
    r = cli(up, "trace", "no-such-request-id")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("nimbus: error:") and "no-such-request-id" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# -- traces ----------------------------------------------------------------------------------

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


def traced(up: Nimbus, traceparent: str | None, **extra: str) -> dict[str, Any]:
    headers = dict(extra)
    if traceparent is not None:
        headers["traceparent"] = traceparent
    r = httpx.get(up.url + "/tr", headers=headers, timeout=30)
    assert r.status_code == 200, (traceparent, r.status_code, r.text)
    out: dict[str, Any] = r.json()
    assert out["rid"] == r.headers["x-nimbus-request-id"]
    return out


def xray_root(trace_id: str) -> str:
    return f"Root=1-{trace_id[:8]}-{trace_id[8:]}"


def test_a_higher_version_traceparent_is_parsed_as_version_00(up: Nimbus) -> None:
    """W3C trace-context: a traceparent of a version above 00 must be parsed
    for its first four fields (and the extra ones ignored), not dropped."""
    seen = traced(up, f"01-{TID}-{SID}-01-future-stuff")
    assert (seen["traceparent"] or "").startswith(f"00-{TID}-"), seen


def test_two_traceparent_headers_are_ignored(up: Nimbus) -> None:
    other = "a" * 32
    r = httpx.get(up.url + "/tr", headers=[("traceparent", f"00-{TID}-{SID}-01"),
                                           ("traceparent", f"00-{other}-{SID}-01")],
                  timeout=30)
    assert r.status_code == 200
    m = TP_RE.match(r.json()["traceparent"] or "")
    assert m and m.group(1) not in (TID, other), r.json()


def test_tracestate_split_over_two_headers_is_kept_whole(up: Nimbus) -> None:
    """RFC 9110 and W3C: several tracestate headers are one list."""
    r = httpx.get(up.url + "/tr", headers=[("traceparent", f"00-{TID}-{SID}-01"),
                                           ("tracestate", "a=1"), ("tracestate", "b=2")],
                  timeout=30)
    seen = r.json()
    assert (seen["traceparent"] or "").startswith(f"00-{TID}-"), seen
    members = [m.strip() for m in (seen["tracestate"] or "").split(",")]
    assert members == ["a=1", "b=2"], seen


def test_handler_sees_its_trace_in_every_form(up: Nimbus) -> None:
    # a trace of its own: nimbus trace shows every request of the trace a
    # request belongs to, and other tests send TID too
    tid = secrets.token_hex(16)
    seen = traced(up, f"00-{tid}-{SID}-01", tracestate="vendor=abc")
    m = TP_RE.match(seen["traceparent"] or "")
    assert m, seen
    assert m.group(1) == tid, "the client's trace was not joined"
    assert m.group(2) != SID, "the handler should see the gateway's span as parent"
    assert seen["ctx_traceparent"] == seen["traceparent"]
    env = seen["env"] or ""
    assert env.startswith(xray_root(tid) + f";Parent={m.group(2)};"), env
    assert env.endswith("Sampled=1"), env
    assert seen["ctx_trace_id"] == env
    assert "vendor=abc" in (seen["tracestate"] or ""), seen
    # the next invocation on the same instance gets its own trace, not the last one's
    nxt = traced(up, None)
    m2 = TP_RE.match(nxt["traceparent"] or "")
    assert m2 and m2.group(1) != tid, nxt
    assert (nxt["env"] or "").startswith(xray_root(m2.group(1))), nxt
    # nimbus trace finds the request and names the same trace id
    wait_until(lambda: httpx.get(f"{up.control_url}/v1/traces/{seen['rid']}",
                                 headers={"authorization": f"Bearer {up.token}"},
                                 timeout=30).status_code == 200, 10, "the trace")
    shown = cli(up, "trace", seen["rid"])
    assert shown.returncode == 0, shown.stderr
    assert tid in shown.stdout, shown.stdout
    assert "nimbus.request" in shown.stdout and "nimbus.invoke" in shown.stdout, shown.stdout
    js = cli(up, "trace", seen["rid"], "--json")
    assert js.returncode == 0, js.stderr
    spans = {sp["span_id"]: sp for sp in json.loads(js.stdout)["spans"]}
    roots = [sp for sp in spans.values() if sp["parent_id"] not in spans]
    assert [r["parent_id"] for r in roots] == [SID], "one root, under the client's span"
    for sp in spans.values():
        assert sp["trace_id"] == tid and sp["end_ns"] >= sp["start_ns"], sp
        parent = spans.get(sp["parent_id"])
        if parent is not None:
            assert parent["start_ns"] <= sp["start_ns"] <= sp["end_ns"] <= parent["end_ns"], \
                (parent, sp)
    invoke = next(sp for sp in spans.values() if sp["name"] == "nimbus.invoke")
    assert m.group(2) == invoke["span_id"] or m.group(2) in spans, \
        "the handler's parent span is one of the request's spans"


@pytest.mark.parametrize("bad", [
    f"00-{TID.upper()}-{SID}-01",               # uppercase hex is invalid
    f"00-{TID}-{SID.upper()}-01",
    f"ff-{TID}-{SID}-01",                      # version ff is forbidden
    f"00-{'0' * 32}-{SID}-01",                 # all-zero trace id
    f"00-{TID}-{'0' * 16}-01",                 # all-zero parent id
    f"00-{TID}-{SID}-1",                        # short flags
    f"00-{TID[:-1]}-{SID}-01",                  # short trace id
    f"00_{TID}_{SID}_01",
    f"00-{TID}-{SID}-01-extra",                 # version 00 has exactly 4 fields
    "garbage",
    "",
])
def test_invalid_traceparent_is_ignored(up: Nimbus, bad: str) -> None:
    seen = traced(up, bad, tracestate="vendor=abc")
    m = TP_RE.match(seen["traceparent"] or "")
    assert m, f"the handler should still get a fresh valid traceparent: {seen}"
    assert m.group(1) != TID and m.group(1) != TID.upper().lower() and m.group(1) != "0" * 32, \
        f"{bad!r} was accepted: {seen['traceparent']}"
    assert (seen["env"] or "").startswith(xray_root(m.group(1))), seen
    # W3C: with an invalid traceparent, the tracestate is discarded too
    assert "vendor=abc" not in (seen["tracestate"] or ""), seen


# -- monitoring files and targets ------------------------------------------------------------


def test_metrics_targets_is_a_valid_file_sd(up: Nimbus, tmp_path: Path) -> None:
    r = cli(up, "metrics", "targets")
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)
    assert isinstance(groups, list) and groups
    control = up.control_url.split("://", 1)[1].rstrip("/")
    seen = []
    for g in groups:
        assert set(g) <= {"targets", "labels"}, g
        assert isinstance(g["targets"], list) and g["targets"]
        for t in g["targets"]:
            assert isinstance(t, str) and re.fullmatch(r"[^/\s]+:\d+", t), t
            seen.append(t)
        for k, v in g.get("labels", {}).items():
            assert isinstance(v, str)
            assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k), k
    assert control in seen, (control, groups)
    g = next(g for g in groups if control in g["targets"])
    assert g["labels"].get("role") == "up" and g["labels"].get("region") == "local", g
    out = tmp_path / "sd.json"
    r2 = cli(up, "metrics", "targets", "--out", str(out))
    assert r2.returncode == 0, r2.stderr
    assert json.loads(out.read_text()) == groups
    assert out.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("args", [
    ("--edge", "not a url"),
    ("--watch", "abc", "--out", "x.json"),
])
def test_metrics_targets_bad_options_are_usage_errors(up: Nimbus, args: tuple[str, ...]) -> None:
    r = cli(up, "metrics", "targets", *args)
    assert r.returncode == 2, (args, r.returncode, r.stdout[-300:], r.stderr[-500:])
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("nimbus: error:") or "error:" in r.stderr, r.stderr


EDGE_FAMILIES = {"nimbus_edge_region_up", "nimbus_edge_requests_total",
                 "nimbus_edge_failovers_total", "nimbus_edge_retries_total",
                 "nimbus_edge_detection_seconds"}


def test_rules_and_dashboard_name_only_metrics_that_exist(up: Nimbus) -> None:
    assert httpx.get(up.url + "/ok", timeout=30).status_code == 200  # HTTP families exist
    text = scrape_text(up)
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names.add(fam.name)
    for e in EDGE_FAMILIES:
        names |= {e, e + "_bucket", e + "_count", e + "_sum"}
    d = ROOT / "docs" / "monitoring"
    grafana = json.loads((d / "grafana-nimbus.json").read_text())
    exprs = [t.get("expr", "") for p in _panels(grafana) for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    rules = (d / "nimbus-rules.yml").read_text()
    used = set(re.findall(r"\bnimbus_[a-z_]+", rules + "\n".join(exprs)))
    # families only some processes serve: the async age (SQLite queue), schedules
    # (the async counters: see test_async_counters_exist_at_zero_before_their_first_event)
    # and rollout decisions (a series per function, from its first decision)
    optional = {"nimbus_schedule_fires_total", "nimbus_schedule_misses_total",
                "nimbus_async_dead_letters_total", "nimbus_async_retries_total",
                "nimbus_rollout_decisions_total"}
    missing = sorted(u for u in used - names - optional if not u.endswith("_"))
    assert not missing, f"named in rules/dashboard but not served: {missing}"


def _panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d.get("panels", []):
        out.append(p)
        out += _panels(p)
    return out
