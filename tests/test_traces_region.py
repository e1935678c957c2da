"""Traces in a region: the gateway's and the worker's spans of one request
(and an async invocation's attempts) land in the region's trace stream, and
``nimbus trace`` through the controller shows them as one tree. One small
region (``--trace region``) for the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from nimbus.observe.natstraces import groups, request_token, subject_for
from tests.region import Region, small_region, wait_until

MANIFEST = """\
name: traced
functions:
  hi:
    handler: h.hi
    http: [{method: GET, path: /hi}, {method: POST, path: /hi}]
"""

HANDLERS = """\
def hi(event, context):
    return {"statusCode": 200, "body": "hi " + str(context.trace_id)}
"""

SPANS_S = 30.0


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    r = small_region(tmp_path_factory.mktemp("traces-region"), "traced", MANIFEST, HANDLERS,
                     extra=("--trace", "region"))
    yield r
    r.stop()


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def spans_of(region: Region, rid: str, want: dict[str, int]) -> list[dict[str, Any]]:
    """The controller's spans of ``rid`` once they hold ``want`` (name -> count)."""
    def got() -> list[dict[str, Any]] | None:
        r = region.control("GET", f"/v1/traces/{rid}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        spans: list[dict[str, Any]] = r.json()["spans"]
        counts = {name: len(by_name(spans, name)) for name in want}
        return spans if counts == want else None

    spans: list[dict[str, Any]] = wait_until(got, SPANS_S, f"spans {want} of {rid}")
    return spans


def node_ids(region: Region) -> dict[str, str]:
    return {n["role"]: n["id"] for n in region.status()["nodes"]}


def test_a_request_is_one_tree_across_gateway_and_worker(region: Region) -> None:
    r = httpx.get(region.gateway_urls[0] + "/hi", timeout=30)
    assert r.status_code == 200, r.text
    rid = r.headers["x-nimbus-request-id"]
    spans = spans_of(region, rid, {"nimbus.request": 1, "nimbus.invoke": 1})
    [gw] = by_name(spans, "nimbus.request")
    [call] = by_name(spans, "nimbus.invoke")
    nodes = node_ids(region)
    assert gw["node"] == nodes["gateway"]
    assert call["node"] == nodes["worker"]
    assert call["trace_id"] == gw["trace_id"]
    assert call["parent_id"] == gw["span_id"]
    assert {s["attributes"]["nimbus.request_id"] for s in spans} == {rid}
    # the handler saw the same trace (Lambda's X-Ray form of its id)
    t = gw["trace_id"]
    assert r.text == f"hi Root=1-{t[:8]}-{t[8:]};Parent={gw['span_id']};Sampled=1"

    out = region.cli("trace", rid)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"trace {gw['trace_id']}"
    assert lines[1].startswith("nimbus.request ")
    assert lines[2].startswith("└─ nimbus.invoke ")

    unknown = region.cli("trace", "no-such-request")
    assert unknown.returncode != 0
    assert "no spans of request 'no-such-request'" in unknown.stderr


def test_an_async_invocations_attempts_are_found_by_its_id(region: Region) -> None:
    r = httpx.post(region.gateway_urls[0] + "/hi", content=b"{}", timeout=30,
                   headers={"x-nimbus-invocation-type": "Event"})
    assert r.status_code == 202, r.text
    inv, rid = r.headers["x-nimbus-invocation-id"], r.headers["x-nimbus-request-id"]
    spans = spans_of(region, inv, {"nimbus.request": 1, "nimbus.async.attempt": 1,
                                   "nimbus.queue_wait": 1, "nimbus.invoke": 1})
    [gw] = by_name(spans, "nimbus.request")
    [attempt] = by_name(spans, "nimbus.async.attempt")
    [wait] = by_name(spans, "nimbus.queue_wait")
    [call] = by_name(spans, "nimbus.invoke")
    assert len({s["trace_id"] for s in spans}) == 1
    assert gw["attributes"]["nimbus.request_id"] == rid
    assert attempt["attributes"]["nimbus.request_id"] == inv
    assert attempt["parent_id"] == gw["span_id"]
    assert wait["parent_id"] == attempt["span_id"] == call["parent_id"]
    assert call["node"] == node_ids(region)["worker"]
    # the submitting request finds the same trace, attempts included
    by_request = spans_of(region, rid, {"nimbus.request": 1, "nimbus.async.attempt": 1,
                                        "nimbus.queue_wait": 1, "nimbus.invoke": 1})
    assert {s["span_id"] for s in by_request} == {s["span_id"] for s in spans}
    out = region.cli("trace", inv, "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["spans"]) == 4


# -- pure logic ---------------------------------------------------------------------


def test_a_batch_is_grouped_by_request_and_trace() -> None:
    def span(rid: str | None, trace: str, sid: str) -> dict[str, Any]:
        attrs = {"nimbus.request_id": rid} if rid is not None else {}
        return {"trace_id": trace, "span_id": sid, "attributes": attrs}

    t1, t2 = "a" * 32, "b" * 32
    batch = orjson.dumps([span("r1", t1, "1"), span("r1", t1, "2"), span("r2", t1, "3"),
                          span("r1", t2, "4"), span(None, t1, "5"), span("r1", "bad", "6")])
    got = {key: [s["span_id"] for s in spans] for key, spans in groups(batch).items()}
    assert got == {("r1", t1): ["1", "2"], ("r2", t1): ["3"], ("r1", t2): ["4"]}
    assert groups(b"not json") == {}
    token = request_token("r1")
    assert len(token) == 32 and token == request_token("r1") != request_token("r2")
    assert subject_for("eu-1", "a.b *>", t1) == f"nimbus.eu-1.traces.{request_token('a.b *>')}.{t1}"


def test_the_sink_keeps_its_bound_and_makes_one_message_per_group() -> None:
    from nats.aio.client import Client as NATS

    from nimbus.observe.natstraces import MAX_MSG_BYTES, NatsTraceSink

    sink = NatsTraceSink(NATS(), region="eu-1", node="w1", buffer_bytes=2 * MAX_MSG_BYTES)
    t1 = "c" * 32
    big = orjson.dumps([{"trace_id": t1, "span_id": f"{i:016x}", "name": "x" * 1100,
                         "attributes": {"nimbus.request_id": "old"}} for i in range(1000)])
    assert MAX_MSG_BYTES < len(big) < 2 * MAX_MSG_BYTES - 1000
    for _ in range(4):  # 4 x ~1.2 MiB into 2 MiB: the oldest three go
        sink(big)
    assert sink.dropped == 3000
    small = orjson.dumps([{"trace_id": t1, "span_id": "1", "attributes":
                           {"nimbus.request_id": "r1"}},
                          {"trace_id": t1, "span_id": "2", "attributes":
                           {"nimbus.request_id": "r2"}}])
    sink(small)
    assert sink.dropped == 3000
    sink._make_batches()
    subjects = [m.subject for m in sink._outbox]
    assert subjects.count(subject_for("eu-1", "r1", t1)) == 1
    assert subjects.count(subject_for("eu-1", "r2", t1)) == 1
    assert subjects.count(subject_for("eu-1", "old", t1)) == 5  # ~1.2 MiB in 256 KiB parts
    assert sum(m.count for m in sink._outbox) == 1002
    assert all(len(m.payload) <= MAX_MSG_BYTES for m in sink._outbox)
    assert all(orjson.loads(m.payload)[0]["node"] == "w1" for m in sink._outbox)
