"""``nimbus export sam``: the mapping, cfn-lint on real exports, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimbus.events.schedule_expr import parse_schedule
from nimbus.manifest.export_sam import (
    Ref,
    aws_schedule,
    codedeploy_type,
    dump,
    export_sam,
    template_for,
)
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import AppSpec, FunctionSpec, RolloutSpec, Route, ScheduleSpec
from tests.apps import write_seed

ROOT = Path(__file__).resolve().parent.parent
CFN_LINT = Path(sys.executable).parent / "cfn-lint"

HANDLER = "def handler(event, context):\n    return {'statusCode': 200, 'body': 'ok'}\n"
BOOTSTRAP = "#!/bin/sh\nexit 0\n"


def rich_app(root: Path) -> tuple[AppSpec, Path]:
    """An app with every kind of trigger, a code folder, a layer and destinations,
    its files written under ``root/rich``."""
    app_dir = root / "rich"
    for rel in ("src/users.py", "legacy.py", "jobs.py", "orders.py", "alerts.py", "mail.py"):
        (app_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (app_dir / rel).write_text(HANDLER)
    (app_dir / "layers/common/python").mkdir(parents=True)
    (app_dir / "layers/common/python/common.py").write_text("VALUE = 1\n")
    (app_dir / "custom").mkdir()
    (app_dir / "custom/bootstrap").write_text(BOOTSTRAP)
    (app_dir / "custom/bootstrap").chmod(0o755)
    # never copied: state, caches, virtual environments, the manifest
    for junk in (".nimbus/token", "__pycache__/users.cpython-311.pyc", ".venv/pyvenv.cfg",
                 "src/__pycache__/x.pyc"):
        (app_dir / junk).parent.mkdir(parents=True, exist_ok=True)
        (app_dir / junk).write_text("x")
    (app_dir / "app.yaml").write_text("functions: {}\n")
    fns = [
        FunctionSpec("users", "users", "handler", runtime="python3.11", code_dir="src",
                     routes=(Route("GET", "/users/{id}"), Route("POST", "/users")),
                     memory_mb=256, timeout_s=10, env=(("GREETING", "hi"),),
                     layers=("layers/common",), max_concurrency=5, min_instances=1,
                     log_format="JSON", log_level="INFO"),
        FunctionSpec("legacy-api", "legacy", "handler", runtime="python3.12",
                     routes=(Route("ANY", "/legacy/{proxy+}", payload="1.0"),
                             Route("GET", "/", payload="1.0"))),
        FunctionSpec("nightly", "jobs", "handler", schedules=(
            ScheduleSpec("rate(5 minutes)"),
            ScheduleSpec("cron(0 2 * * ? *)", input=(("kind", "nightly"),),
                         input_as_event=True),
            ScheduleSpec("cron(0 9 ? * MON-FRI *)", timezone="Europe/Paris"))),
        FunctionSpec("orders", "orders", "handler", queue="orders", batch_size=5,
                     max_batching_window_s=2, timeout_s=20, retries=1, max_event_age_s=3600,
                     on_success="queue:plain", on_failure="function:alerts"),
        FunctionSpec("alerts", "alerts", "handler", topics=("signups",),
                     dead_letter_to="queue:plain"),
        FunctionSpec("welcome", "mail", "handler", topics=("signups",), queue="plain",
                     report_batch_failures=False),
        FunctionSpec("shell", "", "handler.sh", runtime="provided.al2023", code_dir="custom"),
    ]
    app = AppSpec("rich", str(app_dir / "app.yaml"), {f.name: f for f in fns},
                  rollouts={"users": RolloutSpec(strategy="canary:10%:5m")})
    return app, app_dir


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The seed app, the rich app and a SAM app exported, each with its warnings."""
    root = tmp_path_factory.mktemp("export")
    seed_dir = write_seed(root)
    seed = load_app(seed_dir)
    rich, rich_dir = rich_app(root)
    sam_dir = shutil.copytree(ROOT / "tests" / "apps" / "sam", root / "shop")
    sam = load_app(sam_dir)
    return {
        "seed": (seed, export_sam(seed, seed_dir, root / "out-seed" / "hello")),
        "rich": (rich, export_sam(rich, rich_dir, root / "out-rich" / "rich")),
        "sam": (sam, export_sam(sam, sam_dir, root / "out-sam" / "shop")),
    }


def _template(exports: dict[str, Any], key: str) -> dict[str, Any]:
    text = exports[key][1].template.read_text()
    return yaml.load(text, Loader=_CfnLoader)  # noqa: S506 - our own loader, safe


class _CfnLoader(yaml.SafeLoader):
    pass


for _tag in ("!Ref", "!GetAtt", "!Sub"):
    _CfnLoader.add_constructor(
        _tag, lambda loader, node, t=_tag: {t[1:]: loader.construct_scalar(node)})


# -- cfn-lint on the exports ------------------------------------------------------------

def test_cfn_lint_passes_on_the_exports(exports: dict[str, Any]) -> None:
    paths = [str(w.template) for _, w in exports.values()]
    run = subprocess.run([str(CFN_LINT), "--format", "parseable", *paths],
                         capture_output=True, text=True, timeout=60)
    # 0: clean; 4: warnings only (a deprecated runtime, say). 2/6/...: errors.
    assert run.returncode & 2 == 0 and run.returncode & 1 == 0, run.stdout + run.stderr
    errors = [line for line in run.stdout.splitlines() if ":E" in line]
    assert errors == []


# -- the mapping ------------------------------------------------------------------------

def test_template_layout_and_tags(exports: dict[str, Any]) -> None:
    text = exports["rich"][1].template.read_text()
    assert list(_template(exports, "rich")) == [
        "AWSTemplateFormatVersion", "Transform", "Description", "Metadata", "Resources",
        "Outputs"]
    assert "Transform: AWS::Serverless-2016-10-31" in text
    assert "Queue: !GetAtt OrdersQueue.Arn" in text
    assert "Topic: !Ref SignupsTopic" in text
    assert "- !Ref LayersCommonLayer" in text
    assert "Value: !Sub https://${ServerlessRestApi}.execute-api" in text


def test_functions_map_to_sam(exports: dict[str, Any]) -> None:
    res = _template(exports, "rich")["Resources"]
    users = res["users"]["Properties"]
    assert users == {
        "CodeUri": "src", "Handler": "users.handler", "Runtime": "python3.11",
        "MemorySize": 256, "Timeout": 10, "ReservedConcurrentExecutions": 5,
        "Environment": {"Variables": {"GREETING": "hi"}},
        "Layers": [{"Ref": "LayersCommonLayer"}],
        "LoggingConfig": {"LogFormat": "JSON", "ApplicationLogLevel": "INFO"},
        "AutoPublishAlias": "live",
        "ProvisionedConcurrencyConfig": {"ProvisionedConcurrentExecutions": 1},
        "DeploymentPreference": {"Type": "Canary10Percent5Minutes"},
        "Events": {
            "HttpGetUsersId": {"Type": "HttpApi",
                               "Properties": {"Path": "/users/{id}", "Method": "GET"}},
            "HttpPostUsers": {"Type": "HttpApi",
                              "Properties": {"Path": "/users", "Method": "POST"}}},
    }
    assert "Metadata" not in res["users"]
    legacy = res["LegacyApi"]["Properties"]
    assert legacy["FunctionName"] == "legacy-api"
    assert legacy["CodeUri"] == "."
    assert legacy["Events"] == {
        "RestAnyLegacyProxy": {"Type": "Api",
                               "Properties": {"Path": "/legacy/{proxy+}", "Method": "any"}},
        "RestGetRoot": {"Type": "Api", "Properties": {"Path": "/", "Method": "get"}}}
    shell = res["shell"]["Properties"]
    assert (shell["Runtime"], shell["Handler"], shell["CodeUri"]) == (
        "provided.al2023", "handler.sh", "custom")
    assert res["LayersCommonLayer"] == {"Type": "AWS::Serverless::LayerVersion", "Properties": {
        "LayerName": "rich-LayersCommon", "ContentUri": "layers/common",
        "CompatibleRuntimes": ["python3.11"]}}


def test_events_queues_topics_destinations(exports: dict[str, Any]) -> None:
    res = _template(exports, "rich")["Resources"]
    assert res["alerts"]["Properties"]["DeadLetterQueue"] == {
        "Type": "SQS", "TargetArn": {"GetAtt": "PlainQueue.Arn"}}
    assert res["nightly"]["Properties"]["Events"] == {
        "Schedule1": {"Type": "Schedule", "Properties": {"Schedule": "rate(5 minutes)"}},
        "Schedule2": {"Type": "Schedule", "Properties": {
            "Schedule": "cron(0 2 * * ? *)", "Input": '{"kind":"nightly"}'}},
        "Schedule3": {"Type": "ScheduleV2", "Properties": {
            "ScheduleExpression": "cron(0 9 ? * MON-FRI *)",
            "ScheduleExpressionTimezone": "Europe/Paris"}},
    }
    orders = res["orders"]["Properties"]
    assert orders["Events"] == {"OrdersMessages": {"Type": "SQS", "Properties": {
        "Queue": {"GetAtt": "OrdersQueue.Arn"}, "BatchSize": 5,
        "MaximumBatchingWindowInSeconds": 2,
        "FunctionResponseTypes": ["ReportBatchItemFailures"]}}}
    assert orders["EventInvokeConfig"] == {
        "MaximumRetryAttempts": 1, "MaximumEventAgeInSeconds": 3600,
        "DestinationConfig": {
            "OnSuccess": {"Type": "SQS", "Destination": {"GetAtt": "PlainQueue.Arn"}},
            "OnFailure": {"Type": "Lambda", "Destination": {"GetAtt": "alerts.Arn"}}}}
    # six times the consumer's timeout (20 s), and at least SQS's default of 30 s
    assert res["OrdersQueue"] == {"Type": "AWS::SQS::Queue", "Properties": {
        "QueueName": "orders", "VisibilityTimeout": 120}}
    assert res["PlainQueue"]["Properties"] == {"QueueName": "plain", "VisibilityTimeout": 30}
    assert res["SignupsTopic"] == {"Type": "AWS::SNS::Topic",
                                   "Properties": {"TopicName": "signups"}}
    welcome = res["welcome"]["Properties"]["Events"]
    assert welcome["PlainMessages"]["Properties"] == {
        "Queue": {"GetAtt": "PlainQueue.Arn"}, "BatchSize": 10}  # no ReportBatchItemFailures
    assert welcome["SignupsMessages"] == {"Type": "SNS",
                                          "Properties": {"Topic": {"Ref": "SignupsTopic"}}}


def test_rich_export_has_no_warnings_and_copies_code(exports: dict[str, Any]) -> None:
    written = exports["rich"][1]
    assert written.warnings == []
    out = written.template.parent
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["alerts.py", "custom/bootstrap", "jobs.py",
                     "layers/common/python/common.py", "legacy.py", "mail.py", "orders.py",
                     "src/users.py", "template.yaml"]
    assert os.access(out / "custom/bootstrap", os.X_OK)
    assert written.files == 8


def _fn(**kw: Any) -> FunctionSpec:
    return FunctionSpec(**({"name": "f", "module": "m", "callable": "h"} | kw))


def _one(fn: FunctionSpec, rollout: RolloutSpec | None = None) -> tuple[dict[str, Any],
                                                                         list[str]]:
    app = AppSpec("a", "app.yaml", {fn.name: fn}, rollouts={fn.name: rollout} if rollout else {})
    out = template_for(app)
    return out.template["Resources"][next(iter(out.template["Resources"]))], out.warnings


def test_what_lambda_cannot_hold_is_warned_and_kept_in_metadata() -> None:
    res, warnings = _one(_fn(memory_mb=64, timeout_s=2.5, retries=5, max_event_age_s=30,
                             concurrency=4, max_instances=8, cpu=0.5, runtime="python3",
                             retry_delay_s=3, trigger_alias="beta",
                             routes=(Route("GET", "/b", alias="beta"),)),
                         RolloutSpec(strategy="canary:20%:5m", min_requests=50))
    props = res["Properties"]
    assert (props["MemorySize"], props["Timeout"], props["Runtime"]) == (128, 3, "python3.11")
    assert props["EventInvokeConfig"] == {"MaximumRetryAttempts": 2,
                                          "MaximumEventAgeInSeconds": 60}
    assert "DeploymentPreference" not in props and "AutoPublishAlias" not in props
    assert res["Metadata"]["nimbus"] == {
        "memory_mb": 64, "timeout_s": 2.5, "retries": 5,
        "max_event_age_s": 30, "rollout": {"strategy": "canary:20%:5m", "min_requests": 50},
        "route_aliases": {"GET /b": "beta"}, "concurrency": 4, "max_instances": 8,
        "cpu": 0.5, "retry_delay_s": 3, "trigger_alias": "beta"}
    kept = set(res["Metadata"]["nimbus"])  # target_concurrency: 4 x 0.7, derived, not kept
    # one warning per key kept, each naming the function; the rollout two (strategy, rest)
    assert len(warnings) == len(kept - {"rollout"}) + 2, warnings
    assert all(w.startswith("function f: ") for w in warnings)
    assert any("canary:20%:5m is none of CodeDeploy's predefined" in w for w in warnings)


def test_reserved_env_and_log_levels() -> None:
    res, warnings = _one(_fn(env=(("AWS_REGION", "x"), ("KEEP", "1")), log_format="JSON",
                             log_level="WARNING"))
    props = res["Properties"]
    assert props["Environment"] == {"Variables": {"KEEP": "1"}}
    assert props["LoggingConfig"] == {"LogFormat": "JSON", "ApplicationLogLevel": "WARN"}
    assert res["Metadata"]["nimbus"] == {"env": {"AWS_REGION": "x"}}
    assert warnings == ["function f: env AWS_REGION: Lambda sets this itself and refuses it "
                        "in Environment.Variables; kept in Metadata.nimbus.env"]
    res, warnings = _one(_fn(log_level="ERROR"))
    assert "LoggingConfig" not in res["Properties"]
    assert res["Metadata"]["nimbus"] == {"log_level": "ERROR"}
    assert len(warnings) == 1 and "LogFormat JSON" in warnings[0]


def test_logical_ids_are_unique_and_names_survive() -> None:
    fns = {n: _fn(name=n) for n in ("send-mail", "send_mail", "SendMail2x", "ok1")}
    res = template_for(AppSpec("a", "app.yaml", fns)).template["Resources"]
    assert {k: v["Properties"].get("FunctionName") for k, v in res.items()} == {
        "SendMail": "send-mail", "SendMail2": "send_mail", "SendMail2x": None, "ok1": None}


@pytest.mark.parametrize(("strategy", "expected"), [
    ("canary:10%:5m", "Canary10Percent5Minutes"), ("canary:10%:30m", "Canary10Percent30Minutes"),
    ("Linear10PercentEvery1Minute", "Linear10PercentEvery1Minute"),
    ("linear:10%:10m", "Linear10PercentEvery10Minutes"), ("all-at-once", "AllAtOnce"),
    ("canary:10%:6m", None), ("linear:20%:1m", None), ("canary:10%:300s", None),
])
def test_codedeploy_types(strategy: str, expected: str | None) -> None:
    # canary:10%:300s is 5 minutes: the canonical form is what counts
    want = "Canary10Percent5Minutes" if strategy == "canary:10%:300s" else expected
    assert codedeploy_type(strategy) == want


@pytest.mark.parametrize(("expr", "aws"), [
    ("rate(5 minutes)", "rate(5 minutes)"), ("rate(120 seconds)", "rate(2 minutes)"),
    ("rate(1 hour)", "rate(1 hour)"), ("rate(3600 seconds)", "rate(1 hour)"),
    ("rate(48 hours)", "rate(2 days)"),
    ("cron(0 12 * * ? *)", "cron(0 12 * * ? *)"),
    ("0 12 * * MON-FRI", "cron(0 12 ? * MON,TUE,WED,THU,FRI *)"),
    ("*/15 * * * *", "cron(0/15 * * * ? *)"),
    ("30 6 1,15 * *", "cron(30 6 1,15 * ? *)"),
    ("0 9 * * 0,7", "cron(0 9 ? * SUN *)"),
    ("0 9 * * 5-7", "cron(0 9 ? * SUN,FRI,SAT *)"),
    ("@daily", "cron(0 0 * * ? *)"), ("@hourly", "cron(0 * * * ? *)"),
])
def test_schedule_expressions_convert_exactly(expr: str, aws: str) -> None:
    got, why = aws_schedule(expr)
    assert (got, why) == (aws, None)
    # the same ticks, by nimbus's own scheduler, over a stretch of the year
    start = datetime(2026, 3, 1, tzinfo=UTC)
    a, b = parse_schedule(expr), parse_schedule(aws)
    ta, tb = start, start
    for _ in range(40):
        ta, tb = a.next_after(ta), b.next_after(tb)  # type: ignore[assignment]
        assert ta == tb


@pytest.mark.parametrize("expr", ["rate(30 seconds)", "rate(90 seconds)", "0 0 1 * 1"])
def test_schedules_without_an_aws_form_are_kept(expr: str) -> None:
    assert aws_schedule(expr)[0] is None
    res, warnings = _one(_fn(schedules=(ScheduleSpec(expr), ScheduleSpec("rate(1 hour)"))))
    assert list(res["Properties"]["Events"]) == ["Schedule2"]
    assert res["Metadata"]["nimbus"]["schedules"][0]["expression"] == expr
    assert len(warnings) == 2 and expr in warnings[0]


def test_dump_uses_short_tags_and_quotes_what_yaml_would_retype() -> None:
    from nimbus.manifest.export_sam import GetAtt, Ref, Sub

    text = dump({"A": Ref("X"), "B": GetAtt("Q.Arn"), "C": Sub("${AWS::Region}"),
                 "D": "2.0", "E": "yes", "F": ["1"]})
    assert text == ("A: !Ref X\nB: !GetAtt Q.Arn\nC: !Sub ${AWS::Region}\nD: '2.0'\n"
                    "E: 'yes'\nF:\n  - '1'\n")


# -- the output folder and the CLI ------------------------------------------------------

def test_export_refuses_a_folder_with_something_in_it(tmp_path: Path) -> None:
    seed_dir = write_seed(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    nimbus = [sys.executable, "-m", "nimbus.cli.main", "export", "sam"]
    run = subprocess.run([*nimbus, str(seed_dir), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == (f"nimbus: error: {out}: the folder is not empty "
                          "(use --force to write into it anyway)\n")
    assert not (out / "template.yaml").exists()
    run = subprocess.run([*nimbus, str(seed_dir), "--out", str(out), "--force"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {out / 'template.yaml'} (1 function(s)) and 1 file(s)")
    assert "function hello: runtime python3.8 is deprecated on Lambda" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["hello.py", "keep.txt", "template.yaml"]
    (seed_dir / "app.yaml").write_text("handlers: [{function: 1hello}]\n")
    run = subprocess.run([*nimbus, str(seed_dir), "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("nimbus: error: ") and "app.yaml:1" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_output_folder_inside_the_app_is_not_copied_into_itself(tmp_path: Path) -> None:
    seed_dir = write_seed(tmp_path)
    (seed_dir / ".nimbus").mkdir()
    (seed_dir / ".nimbus" / "token").write_text("secret")
    (seed_dir / "state2").mkdir()
    (seed_dir / "state2" / "control.json").write_text("{}")
    (seed_dir / "lib").mkdir()
    (seed_dir / "lib" / "util.py").write_text("X = 1\n")
    out = seed_dir / "aws"
    written = export_sam(load_app(seed_dir), seed_dir, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["hello.py", "lib/util.py", "template.yaml"]
    assert written.files == 2
    export_sam(load_app(seed_dir), seed_dir, out, force=True)  # again, over its own output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == files


def test_links_are_exported_as_a_deploy_bundles_them(tmp_path: Path) -> None:
    seed_dir = write_seed(tmp_path)
    (seed_dir / "shared").mkdir()
    (seed_dir / "shared" / "common.py").write_text("X = 1\n")
    (seed_dir / "common.py").symlink_to("shared/common.py")  # inside: copied as a file
    outside = tmp_path / "elsewhere.py"
    outside.write_text("SECRET = 1\n")
    (seed_dir / "leak.py").symlink_to(outside)  # outside: left out, with a warning
    (seed_dir / "linked").symlink_to(seed_dir / "shared")  # a folder: left out
    out = tmp_path / "out"
    written = export_sam(load_app(seed_dir), seed_dir, out)
    assert (out / "common.py").read_text() == "X = 1\n" and not (out / "common.py").is_symlink()
    assert not (out / "leak.py").exists() and not (out / "linked").exists()
    left = [w for w in written.warnings if "is not exported" in w]
    assert [w.split(":")[0] for w in left] == ["leak.py", "linked"], written.warnings


def test_what_nimbus_did_not_provide_is_named_as_missing() -> None:
    app = AppSpec("a", "template.yaml", {"f": _fn()}, notices=(
        "not provided by nimbus: AWS::DynamoDB::Table Orders (template.yaml:30)",
        "runtime python3.8 is served by Python 3.11"))
    assert template_for(app).warnings == [
        "app: AWS::DynamoDB::Table Orders (template.yaml:30) was not provided by nimbus, so "
        "it is not in the export; copy it from the original template"]


def test_requirements_where_sam_build_looks_need_no_metadata() -> None:
    res, warnings = _one(_fn(requirements="requirements.txt"))
    assert "Metadata" not in res and warnings == []
    res, warnings = _one(_fn(requirements="deps/prod.txt", code_dir="src"))
    assert res["Metadata"]["nimbus"] == {"requirements": "deps/prod.txt"}
    assert warnings == ["function f: requirements deps/prod.txt: 'sam build' installs "
                        "src/requirements.txt (the CodeUri folder's requirements.txt) instead; "
                        "kept in Metadata.nimbus.requirements"]


def test_a_topic_destination_is_an_sns_destination_and_a_topic() -> None:
    app = AppSpec("a", "app.yaml", {"f": _fn(on_failure="topic:alarms")})
    res = template_for(app).template["Resources"]
    assert res["f"]["Properties"]["EventInvokeConfig"] == {"DestinationConfig": {
        "OnFailure": {"Type": "SNS", "Destination": "AlarmsTopic"}}}
    assert isinstance(res["f"]["Properties"]["EventInvokeConfig"]["DestinationConfig"][
        "OnFailure"]["Destination"], Ref)
    assert res["AlarmsTopic"] == {"Type": "AWS::SNS::Topic",
                                  "Properties": {"TopicName": "alarms"}}


def test_schedule_input_given_as_detail_has_no_aws_form() -> None:
    spec = ScheduleSpec("rate(1 hour)", input=(("k", 1),))
    res, warnings = _one(_fn(schedules=(spec,)))
    assert res["Properties"]["Events"] == {"Schedule1": {"Type": "Schedule", "Properties": {
        "Schedule": "rate(1 hour)", "Input": '{"k":1}'}}}
    assert res["Metadata"]["nimbus"] == {"schedules": [spec.to_dict()]}
    assert warnings == [
        "function f: schedule 'rate(1 hour)': on AWS the function receives Input as its whole "
        "event, where this schedule gives it as the Scheduled Event's detail; read both in the "
        "handler (event.get('detail', event)), or set input_as_event: true",
        "function f: the schedules as nimbus runs them are kept in Metadata.nimbus.schedules"]


def test_regions_go_in_the_template_metadata() -> None:
    from nimbus.manifest.model import RegionsSpec

    app = AppSpec("a", "app.yaml", {"f": _fn()},
                  regions=RegionsSpec(("eu", "us"), "weighted", {"eu": 3, "us": 1}))
    out = template_for(app)
    assert out.template["Metadata"] == {"nimbus": {"app": "a", "regions": {
        "names": ["eu", "us"], "policy": "weighted", "weights": {"eu": 3, "us": 1}}}}
    assert out.warnings == ["app: regions have no place in a SAM template (one stack is one "
                            "region); kept in Metadata.nimbus.regions"]
