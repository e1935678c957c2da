"""An exported template read back by nimbus: the same app, serving the same answers."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimbus.manifest.export_sam import export_sam
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import AppSpec, FunctionSpec
from nimbus.rollout.policy import parse_strategy
from tests.apps import write_seed
from tests.conftest import Nimbus
from tests.test_export_sam import CFN_LINT, rich_app

# What does not come back as it was, and why. Everything else must.
EXCEPTIONS = {
    # a bare python3 is exported as python3.11, the interpreter nimbus serves it with
    "runtime": lambda before, after: before == "python3" and after == "python3.11",
}


def _same_function(before: FunctionSpec, after: FunctionSpec) -> list[str]:
    a, b = before.to_dict(), after.to_dict()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        allowed = EXCEPTIONS.get(key)
        if allowed is not None and allowed(a.get(key), b.get(key)):
            continue
        diffs.append(f"{before.name}.{key}: {a.get(key)!r} became {b.get(key)!r}")
    return diffs


def _round_trip(app: AppSpec, app_dir: Path, out: Path) -> AppSpec:
    export_sam(app, app_dir, out)
    return load_app(out)


def _assert_same(app: AppSpec, back: AppSpec) -> None:
    assert back.name == app.name
    assert list(back.functions) == list(app.functions)
    diffs = [d for name, fn in app.functions.items()
             for d in _same_function(fn, back.functions[name])]
    assert diffs == []
    strategies = {name: parse_strategy(r.strategy).text
                  for name, r in app.rollouts.items() if r.strategy}
    assert {name: parse_strategy(r.strategy).text
            for name, r in back.rollouts.items() if r.strategy} == strategies


def test_the_seed_app_comes_back(tmp_path: Path) -> None:
    seed_dir = write_seed(tmp_path)
    app = load_app(seed_dir)
    _assert_same(app, _round_trip(app, seed_dir, tmp_path / "out" / "hello"))


def test_the_rich_app_comes_back(tmp_path: Path) -> None:
    app, app_dir = rich_app(tmp_path)
    back = _round_trip(app, app_dir, tmp_path / "out" / "rich")
    _assert_same(app, back)
    # and the fields that differ from nimbus's defaults are really there
    assert back.functions["legacy-api"].routes[0].payload == "1.0"
    assert back.functions["users"].code_dir == "src"
    assert back.functions["users"].layers == ("layers/common",)
    assert back.functions["welcome"].report_batch_failures is False
    assert back.functions["orders"].on_failure == "function:alerts"


def test_what_lambda_cannot_hold_comes_back_from_metadata(tmp_path: Path) -> None:
    app_dir = tmp_path / "limits"
    app_dir.mkdir()
    (app_dir / "jobs.py").write_text("def handler(event, context):\n    return 1\n")
    (app_dir / "app.yaml").write_text(textwrap.dedent("""\
        regions: {names: [eu, us], policy: weighted, weights: {eu: 3, us: 1}}
        functions:
          tight:
            handler: jobs.handler
            runtime: python3.7
            memory_mb: 64
            timeout_s: 2.5
            ephemeral_storage_mb: 64
            concurrency: 4
            max_instances: 8
            target_concurrency: 3
            stable_window_s: 20
            panic_window_s: 4
            scale_to_zero_after_s: 120
            max_queue: 7
            preload: [json]
            max_processes: 64
            cpu: 0.5
            retries: 5
            retry_delay_s: 3
            max_event_age_s: 30
            dead_letter: false
            trigger_alias: live
            log_level: ERROR
            env: {AWS_REGION: here, KEEP: "1"}
            http: [{method: GET, path: /t}, {method: GET, path: /b, alias: beta}]
            schedule:
              - rate(30 seconds)
              - {expression: "0 0 1 * 1", timezone: Europe/Paris, missed: all}
              - {expression: rate(1 hour), input: {k: 1}}
            rollout: {strategy: "linear:20%:1m", min_requests: 50, rollback_on: "error_rate > 5%"}
          batch:
            handler: jobs.handler
            queue: {name: work, batch_size: 20, max_batching_window_s: 0.5}
        """))
    app = load_app(app_dir)
    written = export_sam(app, app_dir, tmp_path / "out" / "limits")
    meta = yaml.safe_load(written.template.read_text().replace("!", ""))["Resources"]
    assert sorted(meta["tight"]["Metadata"]["nimbus"]) == sorted([
        "runtime", "memory_mb", "timeout_s", "ephemeral_storage_mb", "concurrency",
        "max_instances", "target_concurrency", "stable_window_s", "panic_window_s",
        "scale_to_zero_after_s", "max_queue", "preload", "max_processes", "cpu", "retries",
        "retry_delay_s", "max_event_age_s", "dead_letter", "trigger_alias", "log_level", "env",
        "schedules", "rollout", "route_aliases"])
    assert meta["batch"]["Metadata"]["nimbus"] == {"max_batching_window_s": 0.5}
    lint = subprocess.run([str(CFN_LINT), str(written.template)], capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr  # the clamped values are valid
    _assert_same(app, load_app(written.template.parent))
    back = load_app(written.template.parent)
    assert back.rollouts["tight"] == app.rollouts["tight"]
    assert back.regions == app.regions and app.regions is not None


SAM_APP = Path(__file__).resolve().parent / "apps" / "sam"


def test_a_sam_app_exported_and_loaded_again_is_the_same(tmp_path: Path) -> None:
    app_dir = shutil.copytree(SAM_APP, tmp_path / "shop")
    app = load_app(app_dir)
    written = export_sam(app, app_dir, tmp_path / "out" / "shop")
    _assert_same(app, load_app(written.template.parent))
    table = "arn:aws:dynamodb:local:000000000000:table/Orders"
    assert written.warnings == [  # Globals give every function TABLE: !GetAtt Orders.Arn
        f"function {name}: env TABLE holds an ARN in nimbus's account 000000000000 ({table}); "
        "on AWS, point it at the real resource (!GetAtt or !Ref in the template)"
        for name in app.functions] + [
        "app: AWS::DynamoDB::Table Orders (template.yaml:30) was not provided by nimbus, so it "
        "is not in the export; copy it from the original template"]


SMALL = """\
name: small
functions:
  greet:
    handler: greet.handler
    http: [{method: GET, path: /greet/{name}}, {method: ANY, path: /files/{key+}}]
    env: {GREETING: hi}
    memory_mb: 256
    timeout_s: 5
"""
GREET = '''\
import json, os

def handler(event, context):
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"greeting": os.environ["GREETING"],
                                "path": event["rawPath"], "params": event["pathParameters"],
                                "query": event.get("queryStringParameters"),
                                "method": event["requestContext"]["http"]["method"],
                                "memory": context.memory_limit_in_mb})}
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("served")
    app_dir = root / "small"
    app_dir.mkdir()
    (app_dir / "app.yaml").write_text(SMALL)
    (app_dir / "greet.py").write_text(textwrap.dedent(GREET))
    exported = root / "aws" / "small"
    export_sam(load_app(app_dir), app_dir, exported)
    n = Nimbus(app_dir, root / "state", root / "state.out")
    try:
        yield n, exported
    finally:
        n.stop()


REQUESTS = [("GET", "/greet/ada?x=1"), ("POST", "/files/a/b.txt"), ("GET", "/greet"),
            ("DELETE", "/greet/ada")]


@pytest.mark.e2e
def test_the_exported_template_serves_the_same_answers(served: Any) -> None:
    n, exported = served
    assert n.http is not None

    def answers() -> list[tuple[int, dict[str, Any]]]:
        out = []
        for method, path in REQUESTS:
            r = n.http.request(method, path)  # type: ignore[union-attr]
            body = r.json()
            body.pop("requestId", None)  # an error's: new for every request
            out.append((r.status_code, body))
        return out

    before = answers()
    assert [s for s, _ in before] == [200, 200, 404, 405]
    assert before[0][1] == {"greeting": "hi", "path": "/greet/ada", "params": {"name": "ada"},
                            "query": {"x": "1"}, "method": "GET", "memory": "256"}
    run = n.cli("deploy", str(exported))
    assert run.returncode == 0, run.stdout + run.stderr
    # a new version (its bundle holds template.yaml, not app.yaml) answers from now on
    assert "deployed small/greet: version 2" in run.stdout
    # the API URLs in Outputs are the only thing nimbus has no use for
    assert [line.split(" (")[0] for line in (run.stdout + run.stderr).splitlines()
            if "not provided by nimbus" in line] == ["not provided by nimbus: Outputs"]
    assert answers() == before
