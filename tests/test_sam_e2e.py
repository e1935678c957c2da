"""A SAM template app (tests/apps/sam) on a real ``nimbus up``: it deploys,
serves its REST and HTTP API routes, and its queue, topic and schedule run
its functions; the DynamoDB table it declares is listed as not provided."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Nimbus
from tests.events_client import control, record, wait_for

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "apps" / "sam"


@pytest.fixture(scope="module")
def sam(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("sam")
    app = shutil.copytree(APP, root / "shop")  # the app is named after its folder
    # Full containment when the machine allows it (root): the function reads
    # its code folder and its layer from its own view of the bundle.
    n = Nimbus(app, root / "state", root / "state.out",
               "--parameter-overrides", "Stage=prod", "TickRate=rate(1 second)")
    ctl = control(n)
    yield n, ctl
    ctl.close()
    n.stop()


def test_deploy_lists_what_nimbus_does_not_provide_once(sam: Any) -> None:
    n, _ = sam
    out = n.output()
    assert out.count("not provided by nimbus: AWS::DynamoDB::Table Orders (template.yaml:30)") \
        == 1, out
    assert out.count("not provided by nimbus: Outputs (template.yaml:121)") == 1
    assert out.count("IAM is not enforced by nimbus") == 1
    for fn in ("Web", "Worker", "Fails", "Ticker"):
        assert f"deployed shop/{fn}: version 1" in out


def test_http_api_route_serves_a_payload_2_event(sam: Any) -> None:
    n, _ = sam
    r = n.http.get("/http/ada")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["payload"] == "2.0"
    assert body["stage"] == "prod", "the overridden parameter reaches Globals' environment"
    assert body["table"] == "arn:aws:dynamodb:local:000000000000:table/Orders"
    assert body["greeting"] == "hello from local"
    assert (body["helper"], body["layer"]) == ("helper", "shared-layer")
    assert body["task_root"].endswith("/src") and body["cwd"] == body["task_root"]


def test_rest_api_route_serves(sam: Any) -> None:
    n, _ = sam
    r = n.http.get("/rest/a/b")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["helper"], body["layer"], body["stage"]) == ("helper", "shared-layer", "prod")
    assert body["payload"] == "1.0", "an Api event's route gets REST (payload 1.0) events"
    assert {"resource", "httpMethod", "multiValueHeaders",
            "multiValueQueryStringParameters", "requestContext"} <= set(body["keys"])
    assert body["resource_path"] == "/rest/{proxy+}"
    assert body["path_parameters"] == {"proxy": "a/b"}


def test_a_get_route_beside_any_on_one_path_wins_for_get(sam: Any) -> None:
    n, _ = sam
    r = n.http.get("/orders")
    assert r.status_code == 200, r.text
    assert r.json() == {"listed_by": "Ticker"}
    for method in ("POST", "DELETE"):
        r = n.http.request(method, "/orders")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["payload"] == "1.0" and body["resource_path"] == "/orders", body


def _other_app(root: Path, name: str, method: str, path: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "app.yaml").write_text(
        f"name: {name}\nfunctions:\n  {name}fn:\n    handler: h.handler\n"
        f"    http: [{{method: {method}, path: '{path}'}}]\n")
    (folder / "h.py").write_text(
        "def handler(event, context):\n    return {'app': context.function_name}\n")
    return folder


def test_other_apps_routes_follow_the_same_overlap_rules(
        sam: Any, tmp_path: Path) -> None:
    n, _ = sam
    # the same path, spelled with another parameter name: refused
    out = n.cli("deploy", str(_other_app(tmp_path, "clash", "GET", "/rest/{rest+}")))
    assert out.returncode != 0
    assert ("route GET /rest/{rest+} of clashfn overlaps GET /rest/{proxy+}, "
            "served by shop/Web") in out.stdout + out.stderr, out
    # ANY on a path another app serves with ANY: refused
    out = n.cli("deploy", str(_other_app(tmp_path, "twice", "ANY", "/orders")))
    assert out.returncode != 0 and "overlaps ANY /orders, served by shop/Web" \
        in out.stdout + out.stderr, out
    # a named method beside another app's ANY: served, and wins for its method
    out = n.cli("deploy", str(_other_app(tmp_path, "beside", "PUT", "/orders")))
    assert out.returncode == 0, out
    assert n.http.put("/orders").json() == {"app": "besidefn"}
    assert n.http.post("/orders").json()["resource_path"] == "/orders"
    assert n.http.get("/orders").json() == {"listed_by": "Ticker"}


def test_queue_delivers_and_unreported_batch_failures_are_ignored(sam: Any) -> None:
    _, ctl = sam
    ids = {}
    for body in ("job-1", "report-me"):
        r = ctl.post("/v1/publish/shop-jobs", content=body.encode())
        assert r.status_code == 202, r.text
        ids[body] = r.json()["messageId"]
    wait_for("both messages settled", lambda: all(
        record(ctl, i)["status"] in ("succeeded", "dead", "failed") for i in ids.values()))
    for i in ids.values():
        rec = record(ctl, i)
        # the handler named report-me in batchItemFailures; without
        # ReportBatchItemFailures that is not read, so it succeeded at once
        assert (rec["status"], rec["attempts"], rec["function"]) == ("succeeded", 1, "Worker")


def test_topic_delivers(sam: Any) -> None:
    n, ctl = sam
    p = n.cli("publish", "news", "--data", "extra extra")
    assert p.returncode == 0 and "1 subscriber" in p.stdout, p.stdout + p.stderr

    def delivered() -> Any:
        recs = ctl.get("/v1/functions/Worker/invocations").json()
        return [r for r in recs if r.get("result") == {
            "seen": [{"sns": "extra extra"}], "batchItemFailures": []}]
    [rec] = wait_for("the topic's message", delivered)
    assert rec["status"] == "succeeded"


def test_an_on_failure_destination_to_a_topic_reaches_its_subscriber(sam: Any) -> None:
    _, ctl = sam
    r = ctl.post("/v1/functions/Fails/invoke", json={"order": "o-7"},
                 headers={"X-Amz-Invocation-Type": "Event"})
    assert r.status_code == 202, r.text
    iid = r.json()["invocationId"]

    def delivered() -> Any:
        recs = ctl.get("/v1/functions/Worker/invocations").json()
        return [json.loads(seen["sns"]) for r in recs if r["status"] == "succeeded"
                for seen in (r.get("result") or {}).get("seen", [])
                if "requestContext" in seen.get("sns", "")]
    [dest] = wait_for("the destination record", delivered)
    assert dest["requestContext"]["requestId"] == iid
    assert dest["requestContext"]["condition"] == "RetriesExhausted"
    assert dest["requestPayload"] == {"order": "o-7"}
    assert dest["responsePayload"]["errorMessage"] == "no luck: o-7"
    assert record(ctl, iid)["attempts"] == 1, "MaximumRetryAttempts: 0"


def test_schedule_runs_with_its_input(sam: Any) -> None:
    _, ctl = sam

    def ticks() -> Any:
        return [r for r in ctl.get("/v1/functions/Ticker/invocations").json()
                if r["status"] == "succeeded"]
    rec = wait_for("a tick", ticks)[0]
    assert rec["result"] == {"event": {"from": "schedule"}}, "Input is the whole event"


def test_deploy_sends_parameter_overrides_to_the_control_api(sam: Any) -> None:
    n, ctl = sam
    r = ctl.post("/v1/deploy", params={"parameters": '["Stage"]'}, content=b"")
    assert r.status_code == 400 and "JSON object of strings" in r.text, r.text
    app = n.state.parent / "shop"
    p = n.cli("deploy", str(app), "--parameter-overrides", "Stage=dev",
              "TickRate=rate(1 second)")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr.count("not provided by nimbus: AWS::DynamoDB::Table Orders") == 1
    assert "deployed shop/Web: version 2" in p.stdout
    assert n.http.get("/http/ada").json()["stage"] == "dev"
    p = n.cli("deploy", str(app), "--parameter-overrides", "Stage=qa")
    assert p.returncode == 2 and "'qa' is not one of the AllowedValues" in p.stderr
