"""Async invocations, queues, topics, destinations and schedules on a real
``nimbus up``: real processes, real sockets, evidence written by handlers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HOST_FILES, Nimbus
from tests.events_app import write_events_app
from tests.events_client import record, settled, wait_for

HANDLERS_WRITE_HOST_FILES = True  # see conftest.start_nimbus

pytestmark = pytest.mark.e2e



def notes(out: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{kind}-*.json"))]


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One ``nimbus up`` for the tests whose evidence (notes, records) no
    other of them touches: each drives its own functions, queue or topic."""
    root = tmp_path_factory.mktemp("events")
    out = root / "out"
    n = Nimbus(write_events_app(root, out), root / "state", root / "state.out", *HOST_FILES)
    ctl = httpx.Client(base_url=n.control_url, timeout=30.0,
                       headers={"authorization": f"Bearer {n.token}"})
    yield n, ctl, out
    ctl.close()
    n.stop()


@pytest.fixture
def env(tmp_path: Path, start_nimbus: Any) -> Any:
    """A ``nimbus up`` of the test's own, for tests that count what echo's
    destination or flaky's records hold in all."""
    out = tmp_path / "out"
    app = write_events_app(tmp_path, out)
    n = start_nimbus(app)
    ctl = httpx.Client(base_url=n.control_url, timeout=30.0,
                       headers={"authorization": f"Bearer {n.token}"})
    yield n, ctl, out
    ctl.close()


def test_http_event_header_answers_202_then_runs_and_records(shared_env: Any) -> None:
    n, ctl, out = shared_env
    r = n.http.post("/echo", content=b"hello", headers={"X-Nimbus-Invocation-Type": "Event"})
    assert r.status_code == 202, r.text
    iid = r.json()["invocationId"]
    assert r.headers["x-nimbus-invocation-id"] == iid
    rec = settled(ctl, iid)
    assert rec["result"] == {"echoed": "hello"} and rec["attempts"] == 1
    assert rec["source"] == "http" and rec["function"] == "echo"
    [note] = wait_for("the handler's note", lambda: notes(out, "echo"))
    assert note["rid"] == iid, "the request id of an async invocation is its invocation id"
    assert note["event"]["requestContext"]["http"]["method"] == "POST"
    # Lambda's header works too, and a normal request still waits for the result.
    r = n.http.post("/echo", content=b"x", headers={"X-Amz-Invocation-Type": "Event"})
    assert r.status_code == 202
    assert n.http.post("/echo", content=b"sync").json() == {"echoed": "sync"}
    r = n.http.post("/echo", content=b"rr", headers={"X-Amz-Invocation-Type": "RequestResponse"})
    assert r.json() == {"echoed": "rr"}, "an explicit RequestResponse waits, as Lambda"
    r = ctl.post("/v1/functions/echo/invoke", content=b"{}",
                 headers={"X-Nimbus-Invocation-Type": "event"})  # any case
    assert r.status_code == 202
    r = n.http.post("/echo", content=b"x", headers={"X-Nimbus-Invocation-Type": "Later"})
    assert r.status_code == 400 and "Later" in r.json()["errorMessage"]


def test_cli_async_invoke_idempotency_and_invocation_views(shared_env: Any) -> None:
    n, ctl, out = shared_env
    p = n.cli("invoke", "flaky", "--async", "--data", '{"key": "k1", "fail": 1}',
              "--idempotency-key", "order-1")
    assert p.returncode == 0, p.stderr
    iid = p.stdout.strip()
    again = n.cli("invoke", "flaky", "--async", "--data", '{"key": "k1", "fail": 1}',
                  "--idempotency-key", "order-1")
    assert again.returncode == 0 and again.stdout.startswith(iid) and "duplicate" in again.stdout
    rec = settled(ctl, iid)
    assert rec["attempts"] == 2 and rec["result"] == {"tries": 2}
    assert len(notes(out, "flaky-k1")) == 2, "the duplicate submission did not run again"
    shown = n.cli("invocation", iid)
    assert shown.returncode == 0
    assert "succeeded after 2 tries" in shown.stdout and f"--request-id {iid}" in shown.stdout
    listed = n.cli("invocations", "flaky")
    assert iid in listed.stdout and "succeeded" in listed.stdout
    logs = n.cli("logs", "flaky", "--request-id", iid)
    assert "try 1 fails" in logs.stdout, logs.stdout


def test_retries_exhausted_dead_letter_destination_and_redrive(shared_env: Any) -> None:
    n, ctl, out = shared_env
    r = ctl.post("/v1/functions/doomed/invoke", content=b'{"order": 7}',
                 headers={"X-Nimbus-Invocation-Type": "Event"})
    assert r.status_code == 202
    iid = r.json()["invocationId"]
    rec = settled(ctl, iid, "dead")
    assert rec["attempts"] == 2 and rec["error"]["errorType"] == "ValueError"
    assert "failed after 2 tries" in rec["error"]["nimbusReason"]
    [dest] = wait_for("the on_failure destination", lambda: notes(out, "audit"))
    assert dest["requestContext"]["condition"] == "RetriesExhausted"
    assert dest["requestContext"]["requestId"] == iid
    assert dest["requestPayload"] == {"order": 7}
    assert dest["responsePayload"]["errorMessage"] == "never works"
    ls = n.cli("dlq", "ls", "doomed")
    assert iid in ls.stdout and "ValueError" in ls.stdout
    red = n.cli("dlq", "redrive", "doomed", "--id", iid)
    assert red.returncode == 0 and "redriven: 1" in red.stdout
    wait_for("the redriven event to run twice more", lambda: len(notes(out, "doomed")) == 4)
    settled(ctl, iid, "dead")
    wait_for("a second on_failure record: a redrive starts over",
             lambda: len(notes(out, "audit")) == 2)
    missing = n.cli("dlq", "redrive", "doomed", "--id", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_success_destination_to_a_queue(env: Any) -> None:
    n, ctl, out = env
    r = n.http.post("/echo", content=b"ping", headers={"X-Nimbus-Invocation-Type": "Event"})
    iid = r.json()["invocationId"]
    [got] = wait_for("the on_success record", lambda: notes(out, "collected"))
    assert got["requestContext"]["condition"] == "Success"
    assert got["requestContext"]["requestId"] == iid
    assert got["responsePayload"] == {"echoed": "ping"}


def test_queue_trigger_batches_and_partial_failures(shared_env: Any) -> None:
    n, ctl, out = shared_env
    ids = {}
    for body in ("a", "b", "bad", "c", "d"):  # together: well inside the batching window
        r = ctl.post("/v1/publish/orders", content=body.encode())
        assert r.status_code == 202, r.text
        ids[body] = r.json()["messageId"]
    wait_for("every message settled", lambda: all(
        record(ctl, i)["status"] in ("succeeded", "dead") for i in ids.values()))
    for body, i in ids.items():
        rec = record(ctl, i)
        if body == "bad":
            assert rec["status"] == "dead" and rec["attempts"] == 2
            assert rec["error"]["errorType"] == "BatchItemFailure"
        else:
            assert rec["status"] == "succeeded" and rec["attempts"] == 1, rec
    batches = notes(out, "batch")
    assert max(len(b["ids"]) for b in batches) > 1, "messages published together are batched"
    ran = [body for b in batches for body in b["bodies"]]
    assert sorted(ran) == ["a", "b", "bad", "bad", "c", "d"], "only the failed one ran again"
    rec = record(ctl, ids["a"])
    assert rec["function"] == "orders" and rec["trigger"] == "queue"


def test_topic_fans_out_to_every_subscriber(shared_env: Any) -> None:
    n, ctl, out = shared_env
    p = n.cli("publish", "signups", "--data", '{"user": "ada"}', "-a", "plan=pro",
              "--subject", "welcome", "--idempotency-key", "signup-ada")
    assert p.returncode == 0 and "2 subscribers" in p.stdout, p.stdout + p.stderr
    wait_for("both subscribers", lambda: notes(out, "sub-a") and notes(out, "sub-b"))
    [a], [b] = notes(out, "sub-a"), notes(out, "sub-b")
    for ev in (a, b):
        sns = ev["Records"][0]["Sns"]
        assert sns["Message"] == '{"user": "ada"}' and sns["TopicArn"].endswith(":signups")
        assert sns["MessageAttributes"] == {"plan": {"Type": "String", "Value": "pro"}}
    assert a["Records"][0]["Sns"]["MessageId"] == b["Records"][0]["Sns"]["MessageId"]
    assert a["Records"][0]["Sns"]["Subject"] == "welcome"
    again = n.cli("publish", "signups", "--data", '{"user": "ada"}', "--idempotency-key",
                  "signup-ada")
    assert again.stdout.split()[0] == p.stdout.split()[0], "a repeat answers the first id"
    one = n.cli("publish", "other", "--data", "x")
    assert "1 subscriber" in one.stdout


def test_schedule_fires_eventbridge_events(shared_env: Any) -> None:
    n, ctl, out = shared_env
    ticks = wait_for("two schedule ticks", lambda: len(notes(out, "tick")) >= 2 and
                     notes(out, "tick"))
    ev = ticks[0]
    assert ev["detail-type"] == "Scheduled Event" and ev["source"] == "aws.events"
    assert ev["detail"] == {"hello": "world"}
    assert ev["resources"][0].endswith("rule/ticker-schedule-0")
    times = sorted(t["time"] for t in ticks)
    assert len(set(times)) == len(times), "a tick fires once"
    recs = ctl.get("/v1/functions/ticker/invocations").json()
    assert {r["source"] for r in recs} == {"schedule"}


def test_throttled_async_work_waits_and_is_not_counted_as_a_try(shared_env: Any) -> None:
    n, ctl, out = shared_env
    busy = threading.Thread(target=lambda: n.http.post("/slow", json={"sleep": 1.0}))
    busy.start()
    try:
        time.sleep(0.2)  # the one slot is taken (max_instances 1, max_queue 0)
        r = ctl.post("/v1/functions/slowpoke/invoke?async=1", content=b"{}")
        assert r.status_code == 202
        iid = r.json()["invocationId"]
        rec = settled(ctl, iid)
        assert rec["attempts"] == 1, "throttled tries are not counted"
        [fn] = [f for f in ctl.get("/v1/status").json()["functions"]
                if f["name"] == "slowpoke"]
        assert fn["throttles"] >= 1, "the async try really was throttled first"
    finally:
        busy.join(timeout=30)


def test_bad_async_input_is_refused_clearly(env: Any, tmp_path: Path) -> None:
    n, ctl, out = env
    r = ctl.post("/v1/functions/nope/invoke", content=b"{}",
                 headers={"X-Nimbus-Invocation-Type": "Event"})
    assert r.status_code == 404 and "'nope' is not deployed" in r.json()["errorMessage"]
    big = b'{"x": "' + b"a" * (256 * 1024) + b'"}'
    r = ctl.post("/v1/functions/flaky/invoke", content=big,
                 headers={"X-Nimbus-Invocation-Type": "Event"})
    assert r.status_code == 413 and "async limit of 262144" in r.json()["errorMessage"]
    p = n.cli("publish", "nowhere", "--data", "x")
    assert p.returncode == 1 and "no queue or topic 'nowhere'" in p.stderr
    p = n.cli("invoke", "flaky", "--async", "--data", "{not json")
    assert p.returncode == 2 and "not valid JSON" in p.stderr
    assert ctl.get("/v1/invocations/unknown-id").status_code == 404
    r = ctl.get("/v1/functions/flaky/invocations?limit=%C2%B2")  # a superscript two
    assert r.status_code == 400 and "limit must be an integer" in r.json()["errorMessage"]
    p = n.cli("publish", "orders", "--data", "x", "-a", "nimbus.source=forged")
    assert p.returncode == 1 and "nimbus's own" in p.stderr, p.stderr
    r = ctl.post("/v1/functions/flaky/dlq/redrive", content=b'{"id": "typo"}')
    assert r.status_code == 400 and '{"ids"' in r.json()["errorMessage"]
    r = ctl.post("/v1/functions/flaky/invoke", content=b"{}",
                 headers={"X-Amz-Invocation-Type": "dryrun"})
    assert r.status_code == 204
    r = ctl.get("/v1/functions/flaky/invocations?status=lost")
    assert r.status_code == 400 and "unknown status" in r.json()["errorMessage"]
    assert ctl.get("/v1/functions/flaky/invocations").json() == [], "nothing half-written"
    # A malformed schedule in a deploy: file and line, and nothing deployed.
    bad = tmp_path / "badcron"
    bad.mkdir()
    (bad / "app.yaml").write_text("functions:\n  t:\n    handler: h.t\n"
                                  "    schedule: cron(0 12 * * * *)\n")
    (bad / "h.py").write_text("def t(event, context):\n    pass\n")
    p = n.cli("deploy", str(bad))
    assert p.returncode == 2
    assert "app.yaml:4: functions.t.schedule" in p.stderr and "'?'" in p.stderr, p.stderr
    assert "t" not in {f["name"] for f in ctl.get("/v1/functions").json()}
