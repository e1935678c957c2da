"""SAM templates read into the app model: each property and event mapped,
what nimbus does not provide listed, what it cannot honour refused at the
template's line and property."""

from __future__ import annotations

import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nimbus.cli.params import parameter_overrides_option, parse_overrides
from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import AppSpec, FunctionSpec

HEAD = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
"""
APP_PY = "def handler(event, context):\n    return event\n"


def write(root: Path, resources: str, *, head: str = HEAD,
          files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "template.yaml").write_text(head + textwrap.dedent(resources))
    for rel, text in (files if files is not None else {"app.py": APP_PY}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def load(tmp_path: Path, resources: str, **kw: object) -> AppSpec:
    files = kw.pop("files", None)
    head = kw.pop("head", HEAD)
    return load_app(write(tmp_path / "app", resources, head=head,  # type: ignore[arg-type]
                          files=files), **kw)  # type: ignore[arg-type]


def refused(tmp_path: Path, resources: str, **kw: object) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load(tmp_path, resources, **kw)
    return info.value


def fn_of(tmp_path: Path, props: str, events: str = "", **kw: object) -> FunctionSpec:
    body = textwrap.indent(textwrap.dedent(props), "      ")
    ev = ("      Events:\n" + textwrap.indent(textwrap.dedent(events), "        ")
          if events else "")
    app = load(tmp_path, "Resources:\n  F:\n    Type: AWS::Serverless::Function\n"
               "    Properties:\n      Handler: app.handler\n      Runtime: python3.11\n"
               + body + ev, **kw)
    return app.functions["F"]


def test_a_full_function_maps_onto_the_model(tmp_path: Path) -> None:
    app = load(tmp_path, """\
        Parameters:
          Mem: {Type: Number, Default: 256}
        Globals:
          Function:
            Runtime: python3.11
            Timeout: 7
            Environment: {Variables: {A: "1", B: global}}
        Resources:
          Shared:
            Type: AWS::Serverless::LayerVersion
            Properties: {ContentUri: layers/shared}
          Orders:
            Type: AWS::SQS::Queue
            Properties: {QueueName: orders}
          Failed:
            Type: AWS::SQS::Queue
          Done:
            Type: AWS::SNS::Topic
          Api:
            Type: AWS::Serverless::Function
            Properties:
              FunctionName: api-fn
              CodeUri: src/
              Handler: pkg/mod.handler
              MemorySize: !Ref Mem
              Environment: {Variables: {B: own, C: 3}}
              ReservedConcurrentExecutions: 5
              AutoPublishAlias: live
              ProvisionedConcurrencyConfig: {ProvisionedConcurrentExecutions: 6}
              DeploymentPreference: {Type: Linear10PercentEvery1Minute}
              Layers: [!Ref Shared]
              LoggingConfig: {LogFormat: JSON, ApplicationLogLevel: WARN}
              EventInvokeConfig:
                MaximumRetryAttempts: 1
                MaximumEventAgeInSeconds: 120
                DestinationConfig:
                  OnSuccess: {Type: Lambda, Destination: !GetAtt Sink.Arn}
                  OnFailure: {Type: SQS, Destination: !GetAtt Failed.Arn}
              Tracing: Active
              Tags: {team: a}
              Description: the API
              Architectures: [arm64]
          Sink:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              Events:
                Orders:
                  Type: SQS
                  Properties:
                    Queue: !GetAtt Orders.Arn
                    BatchSize: 7
                    MaximumBatchingWindowInSeconds: 2
                    FunctionResponseTypes: [ReportBatchItemFailures]
                Done: {Type: SNS, Properties: {Topic: !Ref Done}}
          Failures:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              Events:
                Failed: {Type: SQS, Properties: {Queue: !GetAtt Failed.Arn}}
        """, files={"app.py": APP_PY, "src/pkg/__init__.py": "", "src/pkg/mod.py": APP_PY,
                    "src/requirements.txt": "", "layers/shared/python/x.py": ""})
    api = app.functions["api-fn"]
    assert (api.module, api.callable, api.runtime) == ("pkg.mod", "handler", "python3.11")
    assert (api.code_dir, api.requirements, api.layers) == ("src", "src/requirements.txt",
                                                            ("layers/shared",))
    assert (api.memory_mb, api.timeout_s) == (256, 7.0)
    assert dict(api.env) == {"A": "1", "B": "own", "C": "3"}, "merged key by key, as SAM"
    assert (api.max_concurrency, api.min_instances, api.max_instances) == (5, 6, 6)
    assert (api.retries, api.max_event_age_s) == (1, 120.0)
    assert (api.on_success, api.on_failure) == ("function:Sink", "queue:Failed")
    assert (api.log_format, api.log_level) == ("JSON", "WARNING")
    assert app.rollouts["api-fn"].strategy == "Linear10PercentEvery1Minute"
    sink = app.functions["Sink"]
    assert (sink.queue, sink.batch_size, sink.max_batching_window_s) == ("orders", 7, 2.0)
    assert sink.report_batch_failures and sink.topics == ("Done",)
    assert sink.code_dir is None and sink.runtime == "python3.11", "Globals apply to all"
    assert not app.functions["Failures"].report_batch_failures
    assert app.notices == ()


def test_routes_take_their_payload_from_the_event_type(tmp_path: Path) -> None:
    f = fn_of(tmp_path, "", """\
        Rest: {Type: Api, Properties: {Path: "/items/{proxy+}", Method: post}}
        Http: {Type: HttpApi, Properties: {Path: /h, Method: get}}
        Old: {Type: HttpApi, Properties: {Path: /old, Method: GET, PayloadFormatVersion: "1.0"}}
        All: {Type: HttpApi}
        """)
    assert [(r.method, r.path, r.payload) for r in f.routes] == [
        ("POST", "/items/{proxy+}", "1.0"), ("GET", "/h", "2.0"), ("GET", "/old", "1.0"),
        ("ANY", "/{proxy+}", "2.0")]


def test_schedules(tmp_path: Path) -> None:
    app = load(tmp_path, """\
        Resources:
          F:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              Events:
                A: {Type: Schedule, Properties: {Schedule: rate(5 minutes), Input: '{"k": 1}'}}
                B:
                  Type: ScheduleV2
                  Properties:
                    ScheduleExpression: cron(0 9 * * ? *)
                    ScheduleExpressionTimezone: Europe/Paris
                Off: {Type: Schedule, Properties: {Schedule: rate(1 hour), Enabled: false}}
                Gone: {Type: ScheduleV2, Properties: {ScheduleExpression: rate(1 day),
                                                      State: DISABLED}}
        """)
    [a, b] = app.functions["F"].schedules
    assert (a.expression, dict(a.input), a.input_as_event) == ("rate(5 minutes)", {"k": 1},
                                                                True)
    assert not b.input_as_event, "no Input: the Scheduled Event, as on AWS"
    assert (b.expression, b.timezone) == ("cron(0 9 * * ? *)", "Europe/Paris")
    assert app.notices == (
        "F: schedule Off is disabled, so nimbus registers no schedule for it (template.yaml:15)",
        "F: schedule Gone is disabled, so nimbus registers no schedule for it "
        "(template.yaml:16)")


def test_what_nimbus_does_not_provide_is_listed_once(tmp_path: Path) -> None:
    app = load(tmp_path, """\
        Parameters:
          Make: {Type: String, Default: "no"}
        Conditions:
          Made: !Equals [!Ref Make, "yes"]
        Resources:
          Table:
            Type: AWS::DynamoDB::Table
          Bucket:
            Type: AWS::S3::Bucket
          Skipped:
            Type: AWS::S3::Bucket
            Condition: Made
          Role:
            Type: AWS::IAM::Role
          Idle:
            Type: AWS::SQS::Queue
          F:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              Policies: [S3ReadPolicy]
              AutoPublishAlias: prod
              DeadLetterQueue: {Type: SQS, TargetArn: !GetAtt Idle.Arn}
              Environment: {Variables: {T: !GetAtt Table.Arn, B: !Ref Bucket}}
        Outputs:
          Url: {Value: !Ref Bucket}
        """)
    assert app.notices == (
        "not provided by nimbus: AWS::DynamoDB::Table Table (template.yaml:8)",
        "not provided by nimbus: AWS::S3::Bucket Bucket (template.yaml:10)",
        "not provided by nimbus: AWS::IAM::Role Role (template.yaml:15)",
        "IAM is not enforced by nimbus: Policies and Role are accepted and ignored "
        "(template.yaml:23)",
        "F: failed events are kept in nimbus's dead letters (nimbus dead-letters), not sent "
        "to queue Idle (template.yaml:25)",
        "F: AutoPublishAlias prod is served by nimbus's live alias, which every deploy moves "
        "to the new version (template.yaml:24)",
        "AWS::SQS::Queue Idle has no SQS event consuming it: nimbus makes a queue for the "
        "function that consumes it (template.yaml:17)",
        "not provided by nimbus: Outputs (template.yaml:27)")
    f = app.functions["F"]
    assert dict(f.env) == {"T": "arn:aws:dynamodb:local:000000000000:table/Table",
                           "B": "Bucket"}
    assert f.dead_letter and f.on_failure is None and f.routes == ()


FN = """\
Resources:
  F:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.handler
"""


@pytest.mark.parametrize(("extra", "line", "field", "words"), [
    ("      Events:\n        E: {Type: Api, Properties: {Path: /x, Method: get, "
     "Auth: {Authorizer: MyAuth}}}\n", 9, "Resources.F.Properties.Events.E.Properties.Auth."
     "Authorizer", "authorizers"),
    ("      Events:\n        E: {Type: Api, Properties: {Path: /x, Method: get, "
     "Auth: {ApiKeyRequired: true}}}\n", 9, "Resources.F.Properties.Events.E.Properties.Auth."
     "ApiKeyRequired", "API keys"),
    ("      Events:\n        E:\n          Type: S3\n          Properties: {Bucket: b}\n",
     10, "Resources.F.Properties.Events.E.Type", "would never run"),
    ("      Events:\n        E: {Type: DynamoDB, Properties: {Stream: x}}\n", 9,
     "Resources.F.Properties.Events.E.Type", "event type DynamoDB is not provided"),
    ("      Events:\n        E: {Type: EventBridgeRule, Properties: {Pattern: {}}}\n", 9,
     "Resources.F.Properties.Events.E.Type", "never run"),
    ("      PackageType: Image\n", 8, "Resources.F.Properties.PackageType", "container image"),
    ("      CodeUri: s3://bucket/code.zip\n", 8, "Resources.F.Properties.CodeUri",
     "code in S3 would be missing"),
    ("      CodeUri: {Bucket: b, Key: k}\n", 8, "Resources.F.Properties.CodeUri", "folder"),
    ("      Layers: [arn:aws:lambda:us-east-1:1:layer:x:1]\n", 8,
     "Resources.F.Properties.Layers[0]", "its code would be missing"),
    ("      ReservedConcurrentExecutions: 0\n", 8,
     "Resources.F.Properties.ReservedConcurrentExecutions", "from ever running"),
    ("      ProvisionedConcurrencyConfig: {ProvisionedConcurrentExecutions: 2}\n", 8,
     "Resources.F.Properties.ProvisionedConcurrencyConfig", "needs AutoPublishAlias"),
    ("      MemorySize: 5\n", 8, "Resources.F.Properties.MemorySize", "from 16 to 10240"),
    ("      Runtime: nodejs20.x\n", 8, "Resources.F.Properties.Runtime", "not supported"),
    ("      Events:\n        E: {Type: SQS, Properties: {Queue: arn:aws:sqs:x:1:q}}\n", 9,
     "Resources.F.Properties.Events.E.Properties.Queue", "not an AWS::SQS::Queue"),
    ("      Events:\n        E: {Type: Api, Properties: {Path: /x, Method: get}}\n"
     "        G: {Type: HttpApi, Properties: {Path: /x, Method: GET}}\n", 10,
     "Resources.F.Properties.Events.G", "at Resources.F.Properties.Events.E (line 9)"),
    ("      InlineCode: 'def handler(e, c): pass'\n", 8, "Resources.F.Properties.InlineCode",
     "InlineCode"),
])
def test_refusals_name_file_line_and_property(tmp_path: Path, extra: str, line: int,
                                              field: str, words: str) -> None:
    err = refused(tmp_path, FN + extra)
    assert words in err.message, err
    assert (err.line, err.field) == (line, field), err
    assert err.file is not None and err.file.endswith("template.yaml")


def test_an_authorizer_on_an_api_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, """\
        Resources:
          Api:
            Type: AWS::Serverless::Api
            Properties:
              StageName: prod
              Auth: {DefaultAuthorizer: Cognito}
        """)
    assert (err.line, err.field) == (8, "Resources.Api.Properties.Auth.DefaultAuthorizer")


def test_a_missing_handler_module_names_the_template_line(tmp_path: Path) -> None:
    err = refused(tmp_path, FN.replace("app.handler", "nope.handler"))
    assert "handler module 'nope' not found" in err.message
    assert (err.line, err.field) == (7, "Resources.F.Properties.Handler")
    err = refused(tmp_path, FN + "      CodeUri: src\n", files={"app.py": APP_PY,
                                                               "src/x.py": ""})
    assert "looked for src/app.py" in err.message, "the module is looked for in CodeUri"


def test_a_template_without_the_sam_transform_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, FN, head="AWSTemplateFormatVersion: '2010-09-09'\n")
    assert "Transform: AWS::Serverless-2016-10-31" in err.message and err.line == 1


def test_a_custom_runtime_function(tmp_path: Path) -> None:
    resources = FN + "      CodeUri: rt\n      Runtime: provided.al2023\n"
    err = refused(tmp_path / "x", resources, files={"rt/bootstrap": "#!/bin/sh\n"})
    assert "rt/bootstrap is not executable" in err.message, err.message
    (tmp_path / "x" / "app" / "rt" / "bootstrap").chmod(0o755)
    app = load_app(tmp_path / "x" / "app")
    f = app.functions["F"]
    assert (f.runtime, f.module, f.callable, f.code_dir) == ("provided.al2023", "",
                                                             "app.handler", "rt")
    err = refused(tmp_path / "b", FN + "      Runtime: provided\n")
    assert "needs an executable file bootstrap" in err.message, err.message
    assert err.field == "Resources.F.Properties.Handler"


def test_a_folder_with_both_manifests_is_refused(tmp_path: Path) -> None:
    app = write(tmp_path / "app", FN)
    (app / "app.yaml").write_text("functions: {f: {handler: app.handler}}\n")
    with pytest.raises(ManifestError, match="both app.yaml and template.yaml exist; keep one"):
        load_app(app)
    (app / "template.yaml").unlink()
    with pytest.raises(ManifestError, match="parameter overrides apply to SAM templates"):
        load_app(app, parameters={"A": "1"})


def test_an_override_must_name_a_parameter_even_an_unused_one(tmp_path: Path) -> None:
    err = refused(tmp_path, FN, parameters={"Stage": "prod"})
    assert "names 'Stage', which is not a parameter of this template" in err.message


def test_parameter_overrides_parse_as_sam_deploy_takes_them() -> None:
    assert parse_overrides(("A=1 B=2", "C=x,y", "ParameterKey=D,ParameterValue=4", "E=5,F=6",
                            "T=rate(1 minute)", 'U="rate(2 hours)" V=')) == {
        "A": "1", "B": "2", "C": "x,y", "D": "4", "E": "5", "F": "6", "T": "rate(1 minute)",
        "U": "rate(2 hours)", "V": ""}
    with pytest.raises(click.BadParameter):
        parse_overrides(("novalue",))

    @click.command()
    @click.argument("app_dir", required=False)
    @parameter_overrides_option
    def cmd(app_dir: str | None, parameter_overrides: tuple[str, ...]) -> None:
        click.echo(f"{app_dir} {parse_overrides(parameter_overrides)}")
    out = CliRunner().invoke(cmd, ["--parameter-overrides", "A=1", "B=2", "dir"]).output
    assert out == "dir {'A': '1', 'B': '2'}\n", "one option, several values"


def test_cluster_deploys_carry_the_overrides(tmp_path: Path) -> None:
    """A cluster deploy's plan, its desired state (what converges regions
    later) and every push carry the overrides."""
    import asyncio
    import json
    from urllib.parse import parse_qs, urlsplit

    import httpx

    from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry
    from nimbus.multiregion.deploy import plan_deploy
    from nimbus.multiregion.push import push_bundle
    from nimbus.multiregion.state import Desired

    app = write(tmp_path / "app", "Parameters:\n  Stage: {Type: String}\n" + FN +
                "      Environment: {Variables: {S: !Ref Stage}}\n")
    cluster = ClusterFile(path=tmp_path / "nimbus.cluster.yaml", regions={
        "eu": RegionEntry("eu", "http://127.0.0.2:1", "t" * 40, ("http://127.0.0.2:2",))})
    with pytest.raises(ManifestError, match="Stage has no Default"):
        plan_deploy(app, cluster)
    plan = plan_deploy(app, cluster, parameters={"Stage": "prod"})
    assert plan.parameters == {"Stage": "prod"}
    desired = Desired("app", "d", ("eu",), parameters=plan.parameters)
    assert Desired.from_json(desired.to_json()).parameters == {"Stage": "prod"}
    assert "parameters" not in json.loads(Desired("app", "d", ("eu",)).to_json()), \
        "a deploy without overrides is recorded as before"

    seen: list[bytes] = []

    async def push() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b" ")[1])
            body = b'{"result": {"digest": "d", "functions": [{"version": 1}]}}\n'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        region = RegionEntry("eu", f"http://127.0.0.1:{port}", "t" * 40, ())
        try:
            async with httpx.AsyncClient() as client:
                result = await push_bundle(client, region, "app", b"zip", None, 5.0,
                                           parameters={"Stage": "prod"})
            assert result.outcome == "deployed"
        finally:
            server.close()
            await server.wait_closed()
    asyncio.run(push())
    [target] = seen
    query = parse_qs(urlsplit(target.decode()).query)
    assert json.loads(query["parameters"][0]) == {"Stage": "prod"}


def test_sns_destinations_and_dead_letter_topics(tmp_path: Path) -> None:
    app = load(tmp_path, """\
        Resources:
          News: {Type: AWS::SNS::Topic}
          Lonely: {Type: AWS::SNS::Topic}
          A:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              EventInvokeConfig:
                DestinationConfig:
                  OnSuccess: {Type: SNS, Destination: !Ref News}
                  OnFailure: {Type: SNS, Destination: !Ref Lonely}
          B:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              DeadLetterQueue: {Type: SNS, TargetArn: !Ref News}
              Events:
                News: {Type: SNS, Properties: {Topic: !Ref News}}
        """)
    a, b = app.functions["A"], app.functions["B"]
    assert (a.on_success, a.on_failure, a.dead_letter) == ("topic:News", None, True)
    assert (b.on_failure, b.dead_letter_to, b.topics) == (None, "topic:News", ("News",))
    assert app.notices == ("A: OnFailure to topic Lonely, which no function of the template "
                           "subscribes to, is kept in nimbus's dead letters instead "
                           "(template.yaml:13)",)


def test_an_app_yaml_destination_topic_needs_a_subscriber(tmp_path: Path) -> None:
    app = tmp_path / "y"
    app.mkdir()
    (app / "app.py").write_text(APP_PY)
    (app / "app.yaml").write_text(
        "functions:\n  a:\n    handler: app.handler\n"
        "    destinations: {on_failure: {topic: alerts}}\n"
        "  b:\n    handler: app.handler\n    topic: alerts\n")
    assert load_app(app).functions["a"].on_failure == "topic:alerts"
    (app / "app.yaml").write_text(
        "functions:\n  a:\n    handler: app.handler\n"
        "    destinations: {on_failure: {topic: alerts}}\n")
    with pytest.raises(ManifestError, match="destination topic 'alerts' has no subscriber"):
        load_app(app)


def test_an_app_yaml_dead_letter_queue_is_a_queue_or_topic(tmp_path: Path) -> None:
    app = tmp_path / "d"
    app.mkdir()
    (app / "app.py").write_text(APP_PY)
    (app / "app.yaml").write_text(
        "functions:\n  a:\n    handler: app.handler\n"
        "    destinations: {dead_letter_queue: {queue: dlq}}\n"
        "  b:\n    handler: app.handler\n    queue: dlq\n")
    a = load_app(app).functions["a"]
    assert (a.dead_letter_to, a.on_failure) == ("queue:dlq", None)
    (app / "app.yaml").write_text(
        "functions:\n  a:\n    handler: app.handler\n"
        "    destinations: {dead_letter_queue: {function: b}}\n"
        "  b:\n    handler: app.handler\n")
    with pytest.raises(ManifestError, match="a dead-letter queue is a queue or a topic") as e:
        load_app(app)
    assert e.value.line == 4, e.value


def test_unsupported_resources_are_not_evaluated_and_names_are_unique(tmp_path: Path) -> None:
    app = load(tmp_path, FN + """\
  Vpc:
    Type: AWS::EC2::Subnet
    Properties: {CidrBlock: !Select [0, !Cidr [10.0.0.0/16, 4, 8]],
                 Other: !ImportValue shared}
""")
    assert app.notices == ("not provided by nimbus: AWS::EC2::Subnet Vpc (template.yaml:8)",)
    err = refused(tmp_path / "b", FN + """\
  G:
    Type: AWS::Serverless::Function
    Properties: {Handler: app.handler, FunctionName: F}
""")
    assert (err.line, err.message) == (10, "function name 'F' is already the name of F")


def test_cors_is_listed_and_request_validation_refused(tmp_path: Path) -> None:
    app = load(tmp_path, """\
        Globals:
          Api:
            Cors: "'*'"
        Resources:
          F:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
        """)
    assert app.notices == ("not provided by nimbus: Cors (answer OPTIONS and add the CORS "
                           "headers in the handler) (template.yaml:5)",)
    err = refused(tmp_path / "b", FN + """\
      Events:
        E:
          Type: Api
          Properties: {Path: /x, Method: post, RequestModel: {Model: M, ValidateBody: true}}
""")
    assert err.field == "Resources.F.Properties.Events.E.Properties.RequestModel.ValidateBody"


def test_a_code_folder_module_may_not_shadow_the_standard_library(tmp_path: Path) -> None:
    err = refused(tmp_path, FN + "      CodeUri: src\n",
                  files={"src/app.py": APP_PY, "src/logging.py": ""})
    assert "logging.py has the name of the Python module 'logging'" in err.message


def test_new_fields_are_recorded_only_when_set() -> None:
    """Records (and config hashes) of apps that do not use them are unchanged."""
    from nimbus.manifest.model import Route, ScheduleSpec

    plain = FunctionSpec("f", "m", "h", routes=(Route("GET", "/x"),),
                         schedules=(ScheduleSpec("rate(1 hour)", input=(("a", 1),)),))
    d = plain.to_dict()
    for key in ("code_dir", "layers", "report_batch_failures"):
        assert key not in d
    assert d["routes"] == [{"method": "GET", "path": "/x"}]
    assert "input_as_event" not in d["schedules"][0]
    rich = FunctionSpec("f", "", "h.sh", runtime="provided.al2023", code_dir="rt",
                        layers=("l1", "l2"), report_batch_failures=False,
                        routes=(Route("GET", "/x", payload="1.0"),),
                        schedules=(ScheduleSpec("rate(1 hour)", input_as_event=True),))
    assert FunctionSpec.from_dict(rich.to_dict()) == rich
    assert FunctionSpec.from_dict(plain.to_dict()) == plain


def test_the_nimbus_metadata_block_holds_what_lambda_has_no_place_for(tmp_path: Path) -> None:
    app = load(tmp_path, """\
        Metadata:
          nimbus:
            app: shop
            regions: {names: [eu, us], policy: failover}
        Resources:
          Q: {Type: AWS::SQS::Queue, Properties: {QueueName: jobs}}
          F:
            Type: AWS::Serverless::Function
            Properties:
              Handler: app.handler
              Runtime: python3.11
              Events:
                A: {Type: HttpApi, Properties: {Path: /a, Method: GET}}
                Q: {Type: SQS, Properties: {Queue: !GetAtt Q.Arn}}
                S: {Type: Schedule, Properties: {Schedule: rate(1 minute)}}
            Metadata:
              nimbus:
                concurrency: 4
                max_instances: 8
                cpu: 0.5
                runtime: python3
                trigger_alias: beta
                route_aliases: {"GET /a": beta}
                max_batching_window_s: 0.5
                env: {AWS_REGION: here}
                schedules: [{expression: rate(30 seconds), missed: none, input: {k: 1}}]
                rollout: {strategy: "canary:25%:3m", bake_s: 120}
        """)
    assert (app.name, app.regions.names if app.regions else None) == ("shop", ("eu", "us"))
    f = app.functions["F"]
    assert (f.concurrency, f.max_instances, f.cpu, f.runtime) == (4, 8, 0.5, "python3")
    assert f.trigger_alias == "beta" and f.routes[0].alias == "beta"
    assert (f.queue, f.max_batching_window_s) == ("jobs", 0.5)
    assert dict(f.env) == {"AWS_REGION": "here"}
    [s] = f.schedules
    assert (s.expression, s.missed, dict(s.input), s.input_as_event) == (
        "rate(30 seconds)", "none", {"k": 1}, False)
    assert (app.rollouts["F"].strategy, app.rollouts["F"].bake_s) == ("canary:25%:3m", 120.0)
    err = refused(tmp_path / "b", FN + "    Metadata:\n      nimbus: {colour: red}\n")
    assert (err.line, err.field) == (9, "Resources.F.Metadata.nimbus.colour"), err
    err = refused(tmp_path / "c", FN + "    Metadata:\n      nimbus: {concurrency: 0}\n")
    assert (err.line, err.field) == (9, "Resources.F.Metadata.nimbus.concurrency"), err
    err = refused(tmp_path / "d", FN + "    Metadata:\n      nimbus:\n        route_aliases: "
                  "{GET /x: beta}\n")
    assert "'GET /x' is no route of F" in err.message and err.line == 10
