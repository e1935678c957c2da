"""Traces: spans of a real ``nimbus up`` received over OTLP/HTTP, the file
exporter, ``nimbus trace`` and ``--trace off``; the W3C <-> X-Ray mapping."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from nimbus.observe.traceids import (
    format_traceparent,
    parse_traceparent,
    traceparent_from_xray,
    xray_from_ids,
    xray_from_traceparent,
)
from nimbus.observe.tracetree import format_tree
from nimbus.observe.tracing import otlp_traces_url, select, trace_config
from tests.conftest import Nimbus

MANIFEST = """\
name: traced
functions:
  echo:
    handler: handlers.echo
    http: [{method: GET, path: /echo}, {method: POST, path: /echo}]
  grow:
    handler: handlers.sleepy
    max_instances: 2
    min_instances: 0
    http: [{method: GET, path: /grow}]
  busy:
    handler: handlers.sleepy
    max_instances: 1
    http: [{method: GET, path: /busy}]
  flaky:
    handler: handlers.flaky
    retries: 1
    retry_delay_s: 0.05
    http: [{method: POST, path: /flaky}]
  otel:
    handler: handlers.otel
    memory_mb: 512
    env: {OTLP_URL: "%(otlp)s"}
    http: [{method: GET, path: /otel}]
"""

HANDLERS = '''\
import json, os, time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_provider = None


def echo(event, context):
    return {"statusCode": 200, "body": json.dumps({
        "headers": event.get("headers", {}), "xray": os.environ.get("_X_AMZN_TRACE_ID"),
        "ctx_trace_id": context.trace_id, "ctx_traceparent": context.traceparent})}


def sleepy(event, context):
    # ?started=FILE: made on arrival; ?until=FILE: answer once it exists (<= 20 s)
    q = event.get("queryStringParameters") or {}
    if "started" in q:
        open(q["started"], "w").close()
    end = time.monotonic() + 20
    while "until" in q and not os.path.exists(q["until"]) and time.monotonic() < end:
        time.sleep(0.01)
    return {"statusCode": 200, "body": "ok"}


def flaky(event, context):
    # fails its first try: the marker file (named in the body) is made then
    mark = json.loads(event["body"])["mark"]
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise RuntimeError("first try fails")
    return "ok"


def otel(event, context):
    global _provider
    if _provider is None:
        _provider = TracerProvider()
        _provider.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=os.environ["OTLP_URL"])))
    parent = TraceContextTextMapPropagator().extract(event["headers"])
    with _provider.get_tracer("handler").start_as_current_span("handler.work", context=parent):
        pass
    return {"statusCode": 200, "body": "ok"}
'''

CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1, port 0: every span it got."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                got = []
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            got.append({
                                "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                "parent_id": s.parent_span_id.hex() or None, "name": s.name,
                                "start_ns": s.start_time_unix_nano,
                                "end_ns": s.end_time_unix_nano,
                                "attributes": {a.key: getattr(a.value, a.value.WhichOneof(
                                    "value")) for a in s.attributes}})
                with outer.lock:
                    outer.spans.extend(got)
                data = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def trace_of(self, rid: str, names: set[str], timeout_s: float = 15.0
                 ) -> list[dict[str, Any]]:
        """The spans of ``rid``'s trace, once every name in ``names`` is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                spans = select(self.spans, rid)
            if names <= {s["name"] for s in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("traced")
    app = root / "app"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST % {"otlp": receiver.url + "/v1/traces"})
    (app / "handlers.py").write_text(HANDLERS)
    # containment rlimits: the test and the handlers meet through files
    n = Nimbus(app, root / "state", root / "state.out", "--otlp-endpoint", receiver.url,
               "--containment", "rlimits")
    yield n
    n.stop()


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def test_a_request_is_a_gateway_span_with_the_instance_call_under_it(
        traced: Nimbus, receiver: Receiver) -> None:
    r = traced.http.get("/echo")
    assert r.status_code == 200
    rid = r.headers["x-nimbus-request-id"]
    spans = receiver.trace_of(rid, {"nimbus.request", "nimbus.invoke"})
    [gw] = by_name(spans, "nimbus.request")
    [call] = by_name(spans, "nimbus.invoke")
    assert gw["parent_id"] is None
    assert call["parent_id"] == gw["span_id"] and call["trace_id"] == gw["trace_id"]
    assert gw["attributes"]["nimbus.request_id"] == rid
    assert gw["attributes"]["http.response.status_code"] == 200
    assert gw["attributes"]["nimbus.function"] == "echo"
    assert gw["start_ns"] <= call["start_ns"] <= call["end_ns"] <= gw["end_ns"]
    assert by_name(spans, "nimbus.hold") == []  # a warm, free instance: no wait
    # the handler sees the gateway's span as its parent, and the same trace as X-Ray
    seen = r.json()
    want = format_traceparent(int(gw["trace_id"], 16), int(gw["span_id"], 16))
    assert seen["headers"]["traceparent"] == want
    assert seen["ctx_traceparent"] == want
    t = gw["trace_id"]
    assert seen["xray"] == f"Root=1-{t[:8]}-{t[8:]};Parent={gw['span_id']};Sampled=1"
    assert seen["ctx_trace_id"] == seen["xray"]


def test_client_traceparent_is_honoured(traced: Nimbus, receiver: Receiver) -> None:
    tp = format_traceparent(CLIENT_TRACE, CLIENT_SPAN)
    r = traced.http.get("/echo", headers={"traceparent": tp, "tracestate": "vendor=abc"})
    rid = r.headers["x-nimbus-request-id"]
    spans = receiver.trace_of(rid, {"nimbus.request", "nimbus.invoke"})
    [gw] = by_name(spans, "nimbus.request")
    assert gw["trace_id"] == f"{CLIENT_TRACE:032x}"
    assert gw["parent_id"] == f"{CLIENT_SPAN:016x}"
    headers = r.json()["headers"]
    assert headers["traceparent"] == format_traceparent(CLIENT_TRACE, int(gw["span_id"], 16))
    assert headers["tracestate"] == "vendor=abc"
    # an invalid one starts a new trace instead
    r = traced.http.get("/echo", headers={"traceparent": "00-zz-00-01"})
    spans = receiver.trace_of(r.headers["x-nimbus-request-id"], {"nimbus.request"})
    [gw] = by_name(spans, "nimbus.request")
    assert gw["parent_id"] is None and gw["trace_id"] != f"{CLIENT_TRACE:032x}"


def wait_for(check: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"no {what} before the deadline"
        time.sleep(0.02)


def traces_api(n: Nimbus, rid: str) -> httpx.Response:
    return httpx.get(f"{n.control_url}/v1/traces/{rid}", timeout=10,
                     headers={"authorization": f"Bearer {n.token}"})


def held(n: Nimbus, function: str) -> int:
    r = httpx.get(n.control_url + "/v1/status", timeout=10,
                  headers={"authorization": f"Bearer {n.token}"})
    return int(next(f["held"] for f in r.json()["functions"] if f["name"] == function))


def test_hold_when_busy_and_cold_start_when_the_pool_grows(
        traced: Nimbus, receiver: Receiver, tmp_path: Path) -> None:
    for path, want_cold in (("/busy", 0), ("/grow", 1)):
        started, release = tmp_path / f"{path[1:]}-started", tmp_path / f"{path[1:]}-release"
        with ThreadPoolExecutor(2) as ex:
            # the first takes the only warm instance and keeps it until released
            first = ex.submit(traced.http.get, path,
                              params={"started": str(started), "until": str(release)})
            wait_for(started.exists, "first request at its instance")
            second = ex.submit(traced.http.get, path)  # held: busy, or until one starts
            # held until released (busy), or only while an instance starts
            # for it (grow: milliseconds, so it may be answered first)
            wait_for(lambda: held(traced, path[1:]) == 1  # noqa: B023
                     or (want_cold and second.done()), "held request")  # noqa: B023
            if want_cold:  # the second is answered by the instance started for it
                r2 = second.result()
            release.touch()
            r1 = first.result()
            r2 = second.result()
        assert (r1.status_code, r2.status_code) == (200, 200)
        names = {"nimbus.request", "nimbus.hold", "nimbus.invoke"}
        if want_cold:
            names.add("nimbus.cold_start")
        spans = receiver.trace_of(r2.headers["x-nimbus-request-id"], names)
        [gw] = by_name(spans, "nimbus.request")
        [hold] = by_name(spans, "nimbus.hold")
        [call] = by_name(spans, "nimbus.invoke")
        assert hold["parent_id"] == gw["span_id"] == call["parent_id"]
        assert hold["end_ns"] <= call["start_ns"]
        colds = by_name(spans, "nimbus.cold_start")
        assert len(colds) == want_cold, path
        for c in colds:
            assert c["parent_id"] == gw["span_id"]
            assert c["attributes"]["nimbus.instance"] == call["attributes"]["nimbus.instance"]
            assert hold["start_ns"] <= c["start_ns"] <= c["end_ns"] <= hold["end_ns"]
        spans1 = receiver.trace_of(r1.headers["x-nimbus-request-id"],
                                   {"nimbus.request", "nimbus.invoke"})
        assert by_name(spans1, "nimbus.hold") == []


def test_a_handlers_own_opentelemetry_span_joins_the_trace(
        traced: Nimbus, receiver: Receiver) -> None:
    r = traced.http.get("/otel")
    assert r.status_code == 200, r.text
    rid = r.headers["x-nimbus-request-id"]
    spans = receiver.trace_of(rid, {"nimbus.request", "handler.work"})
    [gw] = by_name(spans, "nimbus.request")
    [work] = by_name(spans, "handler.work")
    assert work["trace_id"] == gw["trace_id"]
    assert work["parent_id"] == gw["span_id"]


def test_async_work_keeps_the_submitting_requests_trace(
        traced: Nimbus, receiver: Receiver) -> None:
    r = traced.http.post("/echo", content=b"{}", headers={"x-nimbus-invocation-type": "Event"})
    assert r.status_code == 202
    inv = r.headers["x-nimbus-invocation-id"]
    spans = receiver.trace_of(inv, {"nimbus.request", "nimbus.async.attempt",
                                    "nimbus.queue_wait", "nimbus.invoke"})
    [gw] = by_name(spans, "nimbus.request")
    [attempt] = by_name(spans, "nimbus.async.attempt")
    [wait] = by_name(spans, "nimbus.queue_wait")
    [call] = by_name(spans, "nimbus.invoke")
    assert gw["attributes"]["nimbus.request_id"] == r.headers["x-nimbus-request-id"]
    assert attempt["parent_id"] == gw["span_id"]
    assert wait["parent_id"] == attempt["span_id"] == call["parent_id"]
    assert attempt["attributes"]["nimbus.attempt"] == 1
    assert attempt["attributes"]["nimbus.retry"] is False


def test_an_async_retry_is_a_second_attempt_in_the_same_trace(
        traced: Nimbus, receiver: Receiver, tmp_path: Path) -> None:
    r = traced.http.post("/flaky", json={"mark": str(tmp_path / "tried")},
                         headers={"x-nimbus-invocation-type": "Event"})
    assert r.status_code == 202
    inv = r.headers["x-nimbus-invocation-id"]
    wait_for(lambda: len(by_name(receiver.trace_of(inv, set(), 0), "nimbus.async.attempt"))
             == 2, "second attempt")
    spans = receiver.trace_of(inv, set(), 0)
    [gw] = by_name(spans, "nimbus.request")
    attempts = sorted(by_name(spans, "nimbus.async.attempt"), key=lambda s: s["start_ns"])
    assert [(a["attributes"]["nimbus.attempt"], a["attributes"]["nimbus.retry"],
             a["parent_id"]) for a in attempts] == [(1, False, gw["span_id"]),
                                                    (2, True, gw["span_id"])]
    [wait] = by_name(spans, "nimbus.queue_wait")  # the first try's only
    assert wait["parent_id"] == attempts[0]["span_id"]
    calls = by_name(spans, "nimbus.invoke")
    assert sorted(c["parent_id"] for c in calls) == sorted(a["span_id"] for a in attempts)


def test_nimbus_trace_prints_the_tree(traced: Nimbus, receiver: Receiver) -> None:
    r = traced.http.get("/echo")
    rid = r.headers["x-nimbus-request-id"]
    receiver.trace_of(rid, {"nimbus.request", "nimbus.invoke"})
    out = traced.cli("trace", rid)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("trace ")
    assert lines[1].startswith("nimbus.request ") and "GET /echo 200 echo" in lines[1]
    assert lines[2].startswith("└─ nimbus.invoke ") and " ms " in lines[2]
    bad = traces_api(traced, "nosuchrequest")
    assert bad.status_code == 404
    assert bad.json()["errorMessage"] == "no spans of request 'nosuchrequest'"


def test_off_by_default_writes_nothing_and_the_file_exporter(
        tmp_path: Path, start_nimbus: Any) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.yaml").write_text("name: f\nfunctions:\n  echo:\n    handler: h.echo\n"
                                  "    http: [{method: GET, path: /echo}]\n")
    (app / "h.py").write_text("def echo(event, context):\n    return 'ok'\n")
    off = start_nimbus(app, name="off")  # the default
    r = off.http.get("/echo")
    assert r.status_code == 200
    out = traces_api(off, r.headers["x-nimbus-request-id"])
    assert out.status_code == 404
    assert "tracing is off here: start nimbus up with --trace file" in out.json()["errorMessage"]
    assert off.stop() == 0
    assert not (off.state / "traces").exists()
    on = start_nimbus(app, "--trace", "file", name="on")
    r = on.http.get("/echo")
    rid = r.headers["x-nimbus-request-id"]
    got = traces_api(on, rid).json()["spans"]  # what `nimbus trace` prints
    assert sorted(x["name"] for x in got) == ["nimbus.invoke", "nimbus.request"]
    assert on.stop() == 0
    lines = (on.state / "traces" / "traces.jsonl").read_bytes().splitlines()
    spans = select([span for x in lines for span in json.loads(x)], rid)  # a batch a line
    assert sorted(s["name"] for s in spans) == ["nimbus.invoke", "nimbus.request"]


def test_bad_trace_options_are_usage_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "nimbus.cli.main", "up", str(tmp_path),
                          "--otlp-endpoint", "collector:4318"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "OTLP endpoint must be an http:// or https:// URL" in out.stderr
    assert "Traceback" not in out.stderr


# -- pure logic ------------------------------------------------------------------


def test_w3c_and_xray_map_one_to_one() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    xray = "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
    assert xray_from_traceparent(tp) == xray
    assert traceparent_from_xray(xray) == tp
    assert xray_from_ids(CLIENT_TRACE, CLIENT_SPAN, sampled=False).endswith(";Sampled=0")
    assert traceparent_from_xray(
        "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7").endswith("-00")
    assert parse_traceparent(tp.upper()) == (CLIENT_TRACE, CLIENT_SPAN, 1)


@pytest.mark.parametrize("bad", [
    "", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01"])
def test_invalid_traceparents_map_to_nothing(bad: str) -> None:
    assert parse_traceparent(bad) is None
    assert xray_from_traceparent(bad) is None


def test_invalid_xray_headers_map_to_nothing() -> None:
    for bad in ("", "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736",
                "Root=2-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7",
                "Root=1-4bf92f35-77b34da6;Parent=00f067aa0ba902b7"):
        assert traceparent_from_xray(bad) is None


def test_options_and_urls() -> None:
    assert trace_config(None, None).mode == "off"
    assert trace_config("file", None).mode == "file"
    assert trace_config(None, "http://c:4318").mode == "otlp"
    assert trace_config("off", None).mode == "off"
    with pytest.raises(ValueError, match="needs an OTLP endpoint"):
        trace_config("otlp", None)
    assert otlp_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert otlp_traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert otlp_traces_url("http://c:4318/custom/path") == "http://c:4318/custom/path"


def test_tree_nests_children_and_keeps_foreign_parents_as_roots() -> None:
    def span(sid: str, parent: str | None, name: str, start: int, end: int) -> dict[str, Any]:
        return {"trace_id": "t" * 32, "span_id": sid, "parent_id": parent, "name": name,
                "start_ns": start, "end_ns": end, "attributes": {}, "status": "ok"}
    tree = format_tree([span("b", "a", "nimbus.hold", 1_000_000, 3_000_000),
                        span("a", "client", "nimbus.request", 0, 9_000_000),
                        span("c", "b", "nimbus.cold_start", 1_500_000, 2_500_000),
                        span("d", "a", "nimbus.invoke", 3_000_000, 8_000_000)])
    assert tree.splitlines() == [
        f"trace {'t' * 32}",
        "nimbus.request  9.0 ms  (at +0.0 ms)",
        "├─ nimbus.hold  2.0 ms  (at +1.0 ms)",
        "│  └─ nimbus.cold_start  1.0 ms  (at +1.5 ms)",
        "└─ nimbus.invoke  5.0 ms  (at +3.0 ms)"]


def test_receiver_helper_is_reachable(receiver: Receiver) -> None:
    # guards the module's fixtures: the receiver answers OTLP with 200
    r = httpx.post(receiver.url + "/v1/traces",
                   content=ExportTraceServiceRequest().SerializeToString())
    assert r.status_code == 200


def test_edge_spans_a_request_and_each_try_of_a_region(tmp_path: Path) -> None:
    import asyncio

    import orjson

    from nimbus.edge.server import Edge
    from nimbus.observe import tracing
    from tests.test_edge_proxy import GATEWAY_503, GW_MARK, StubGateway, run_edge

    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return 503, [("content-type", "application/json"), GW_MARK], GATEWAY_503

    def us(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return 200, [("x-nimbus-request-id", "gw-rid-1")], orjson.dumps({"ok": 1})

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.get("/x", headers={
                "traceparent": format_traceparent(CLIENT_TRACE, CLIENT_SPAN)})
            assert r.status_code == 200 and r.headers["x-nimbus-retried-from"] == "eu"
        await asyncio.sleep(0)

    exporter = tracing.setup(tracing.TraceConfig("file"), tmp_path, role="edge")
    assert exporter is not None
    try:
        run_edge({"eu": eu, "us": us}, test)
        spans = exporter.find("gw-rid-1")
    finally:
        tracing.shutdown()
    [req] = by_name(spans, "nimbus.edge.request")
    tries = sorted(by_name(spans, "nimbus.edge.try"), key=lambda s: s["start_ns"])
    assert req["trace_id"] == f"{CLIENT_TRACE:032x}"
    assert req["parent_id"] == f"{CLIENT_SPAN:016x}"
    assert req["attributes"]["nimbus.region"] == "us"
    assert [(t["attributes"]["nimbus.region"], t["attributes"]["nimbus.attempt"],
             t["attributes"]["nimbus.retry"], t["status"]) for t in tries] == [
        ("eu", 1, False, "error"), ("us", 2, True, "ok")]
    assert {t["parent_id"] for t in tries} == {req["span_id"]}
    assert len(spans) == 3


def test_a_worker_serving_remote_gateways_records_its_steps_under_their_span(
        tmp_path: Path, receiver: Receiver) -> None:
    """A region's worker: the gateway's span goes with the call (the INVOKE
    frame's sixth field); hold, cold start and instance call are the worker's."""
    import asyncio

    from nimbus.gateway.remote import RemoteInvoker
    from nimbus.observe import tracing
    from tests.test_remote import directory_with, http, run, target
    from tests.workers import TOKEN, WorkerProcess

    app = tmp_path / "app"
    app.mkdir()
    (app / "app.yaml").write_text("name: remote\nfunctions:\n  work:\n    handler: h.work\n"
                                  "    min_instances: 0\n    max_instances: 2\n")
    (app / "h.py").write_text("import time\n\ndef work(event, context):\n"
                              "    time.sleep(event.get('s', 0))\n    return 'ok'\n")
    w = WorkerProcess(app, tmp_path, "w-traced", TOKEN, "--warm", "1",
                      "--otlp-endpoint", receiver.url)
    spans: dict[str, tracing.Span] = {}

    async def call(inv: RemoteInvoker, rid: str, s: float) -> Any:
        # what the gateway does around a call when tracing is on
        span = spans[rid] = tracing.start("nimbus.request", rid)
        tracing.active[rid] = span
        try:
            return await inv.invoke(rid, http(s=s))
        finally:
            tracing.active.pop(rid)
    tracing.setup(tracing.TraceConfig("off"), None)  # on in this process, nothing exported
    tracing.on = True
    try:
        async def scenario() -> None:
            d = await directory_with(w)
            inv = RemoteInvoker(target(app, "work"), d)
            try:
                first = asyncio.ensure_future(call(inv, "remote-1", 0.4))
                await asyncio.sleep(0.15)
                assert await call(inv, "remote-2", 0) == "ok"
                assert await first == "ok"
            finally:
                await d.aclose()
        run(scenario)
    finally:
        tracing.shutdown()
        w.stop()
    one = receiver.trace_of("remote-1", {"nimbus.invoke"})
    assert [(s["name"], s["trace_id"], s["parent_id"]) for s in one] == [
        ("nimbus.invoke", spans["remote-1"].trace_id, spans["remote-1"].span_id)]
    two = receiver.trace_of("remote-2", {"nimbus.hold", "nimbus.cold_start", "nimbus.invoke"})
    assert sorted(s["name"] for s in two) == ["nimbus.cold_start", "nimbus.hold",
                                              "nimbus.invoke"]
    assert {(s["trace_id"], s["parent_id"]) for s in two} == {
        (spans["remote-2"].trace_id, spans["remote-2"].span_id)}
