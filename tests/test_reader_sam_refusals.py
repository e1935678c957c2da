"""SAM templates nimbus must refuse, read from docs/aws.md ("What is refused,
and why", "What is read") and from how CloudFormation and SAM treat the same
templates: `nimbus deploy DIR` stops before it talks to any server, with one
line `nimbus: error: <file>:<line>: <property>: ...` and exit status 2, never
a traceback.

Every template here is a small variation of the `sam init` hello-world
template; the cases run through the CLI's entry point in one process, so the module
costs one interpreter start."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HEAD = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Description: >
  sam-app

  Sample SAM Template for sam-app
"""

FN = """\
  HelloWorldFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: hello_world/
      Handler: app.lambda_handler
      Runtime: python3.11
"""

APP_PY = """\
import json


def lambda_handler(event, context):
    return {"statusCode": 200, "body": json.dumps({"message": "hello world"})}
"""


@dataclass(frozen=True)
class Case:
    template: str
    marker: str            # the text of the line the error must point at
    prop: str              # the property path the error must name
    says: str              # a phrase the message must hold
    overrides: tuple[str, ...] = ()
    files: tuple[tuple[str, str, int], ...] = ()   # (path, text, mode) beside the template

    def line(self) -> int | None:
        if not self.marker:
            return None
        [n] = [i for i, text in enumerate(self.template.splitlines(), 1) if self.marker in text]
        return n


def api_event(extra: str = "") -> str:
    return ("      Events:\n        HelloWorld:\n          Type: Api\n          Properties:\n"
            "            Path: /hello\n            Method: get\n" + extra)


CASES: dict[str, Case] = {
    # An authorizer: serving the route without it would let every request in.
    "api-event-authorizer": Case(
        HEAD + "Resources:\n" + FN + api_event(
            "            Auth:\n              Authorizer: MyCognitoAuthorizer\n"),
        "Authorizer: MyCognitoAuthorizer",
        "Resources.HelloWorldFunction.Properties.Events.HelloWorld.Properties.Auth.Authorizer",
        "authorizer"),
    "api-default-authorizer": Case(
        HEAD + """\
Resources:
  MyApi:
    Type: AWS::Serverless::Api
    Properties:
      StageName: Prod
      Auth:
        DefaultAuthorizer: MyLambdaTokenAuth
        Authorizers:
          MyLambdaTokenAuth:
            FunctionArn: !GetAtt HelloWorldFunction.Arn
""" + FN + """\
      Events:
        HelloWorld:
          Type: Api
          Properties:
            RestApiId: !Ref MyApi
            Path: /hello
            Method: get
""",
        "DefaultAuthorizer: MyLambdaTokenAuth", "Resources.MyApi.Properties.Auth.DefaultAuthorizer",
        "authorizer"),
    "globals-api-key-required": Case(
        HEAD + "Globals:\n  Api:\n    Auth:\n      ApiKeyRequired: true\nResources:\n" + FN
        + api_event(),
        "ApiKeyRequired: true", "Globals.Api.Auth.ApiKeyRequired", "API keys"),
    # Event sources nimbus cannot trigger: the function would silently never run.
    "s3-event": Case(
        HEAD + """\
Resources:
  UploadsBucket:
    Type: AWS::S3::Bucket
""" + FN + """\
      Events:
        Upload:
          Type: S3
          Properties:
            Bucket: !Ref UploadsBucket
            Events: s3:ObjectCreated:*
""",
        "Type: S3", "Resources.HelloWorldFunction.Properties.Events.Upload.Type", "S3"),
    "dynamodb-stream-event": Case(
        HEAD + """\
Resources:
  Orders:
    Type: AWS::DynamoDB::Table
    Properties:
      StreamSpecification: {StreamViewType: NEW_IMAGE}
""" + FN + """\
      Events:
        Stream:
          Type: DynamoDB
          Properties:
            Stream: !GetAtt Orders.StreamArn
            StartingPosition: LATEST
""",
        "Type: DynamoDB", "Resources.HelloWorldFunction.Properties.Events.Stream.Type",
        "DynamoDB"),
    # Code nimbus does not have.
    "arn-layer": Case(
        HEAD + "Resources:\n" + FN + """\
      Layers:
        - !Sub arn:aws:lambda:${AWS::Region}:017000801446:layer:AWSLambdaPowertoolsPythonV2:59
""",
        "AWSLambdaPowertoolsPythonV2", "Resources.HelloWorldFunction.Properties.Layers[0]",
        "layer"),
    "code-in-s3": Case(
        HEAD + """\
Resources:
  HelloWorldFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: s3://my-bucket/hello_world.zip
      Handler: app.lambda_handler
      Runtime: python3.11
""",
        "CodeUri: s3://", "Resources.HelloWorldFunction.Properties.CodeUri", "s3://"),
    "sqs-event-on-an-arn": Case(
        HEAD + "Resources:\n" + FN + """\
      Events:
        Orders:
          Type: SQS
          Properties:
            Queue: arn:aws:sqs:us-east-1:123456789012:orders
            BatchSize: 10
""",
        "Queue: arn:aws:sqs",
        "Resources.HelloWorldFunction.Properties.Events.Orders.Properties.Queue",
        "arn:aws:sqs:us-east-1:123456789012:orders"),
    "sqs-filter-criteria": Case(
        HEAD + """\
Resources:
  Jobs:
    Type: AWS::SQS::Queue
""" + FN + """\
      Events:
        Jobs:
          Type: SQS
          Properties:
            Queue: !GetAtt Jobs.Arn
            FilterCriteria:
              Filters:
                - Pattern: '{"body": {"kind": ["urgent"]}}'
""",
        "FilterCriteria:",
        "Resources.HelloWorldFunction.Properties.Events.Jobs.Properties.FilterCriteria",
        "FilterCriteria"),
    "deployment-preference-without-alias": Case(
        HEAD + "Resources:\n" + FN + """\
      DeploymentPreference:
        Type: Canary10Percent5Minutes
""",
        "DeploymentPreference:", "Resources.HelloWorldFunction.Properties.DeploymentPreference",
        "AutoPublishAlias"),
    "import-value": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          VPC_ID: !ImportValue network-VpcId
""",
        "!ImportValue", "Resources.HelloWorldFunction.Properties.Environment.Variables.VPC_ID",
        "ImportValue"),
    # CloudFormation corner cases.
    "ref-to-nothing": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          TABLE: !Ref OrdersTabel
""",
        "!Ref OrdersTabel", "Resources.HelloWorldFunction.Properties.Environment.Variables.TABLE",
        "OrdersTabel"),
    "getatt-to-nothing": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          QUEUE_ARN: !GetAtt JobsQueue.Arn
""",
        "!GetAtt JobsQueue.Arn",
        "Resources.HelloWorldFunction.Properties.Environment.Variables.QUEUE_ARN", "JobsQueue"),
    "sub-variables-not-a-map": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          URL: !Sub ["https://${Host}/", [example.com]]
""",
        "!Sub [", "Resources.HelloWorldFunction.Properties.Environment.Variables.URL", "Sub"),
    "select-out-of-range": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          THIRD: !Select [2, !Split [",", "a,b"]]
""",
        "!Select [2", "Resources.HelloWorldFunction.Properties.Environment.Variables.THIRD",
        "Select"),
    "parameter-without-default": Case(
        HEAD + """\
Parameters:
  TableName:
    Type: String
Resources:
""" + FN + """\
      Environment:
        Variables:
          TABLE: !Ref TableName
""",
        "  TableName:", "Parameters.TableName", "--parameter-overrides"),
    "override-outside-allowed-values": Case(
        HEAD + """\
Parameters:
  Stage:
    Type: String
    Default: dev
    AllowedValues: [dev, staging, prod]
Resources:
""" + FN,
        "AllowedValues:", "Parameters.Stage.AllowedValues", "'qa'", ("Stage=qa",)),
    "number-parameter-given-text": Case(
        HEAD + """\
Parameters:
  Seconds:
    Type: Number
    Default: 3
Resources:
""" + FN + "      Timeout: !Ref Seconds\n",
        "  Seconds:", "Parameters.Seconds", "'soon'", ("Seconds=soon",)),
    "unknown-condition": Case(
        HEAD + "Resources:\n" + FN + """\
      MemorySize: !If [IsProd, 1024, 128]
""",
        "!If [IsProd", "Resources.HelloWorldFunction.Properties.MemorySize", "IsProd"),
    "malformed-yaml": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables: {STAGE: dev
      Timeout: 3
""",
        "      Timeout: 3", "", "YAML"),
    "duplicate-key": Case(
        HEAD + "Resources:\n" + FN + "      Timeout: 3\n      Timeout: 30\n",
        "Timeout: 30", "Resources.HelloWorldFunction.Properties.Timeout", "duplicate"),
    "plain-cloudformation": Case(
        "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n" + FN,
        "AWSTemplateFormatVersion", "Transform", "AWS::Serverless-2016-10-31"),
    "handler-without-a-dot": Case(
        HEAD + """\
Resources:
  HelloWorldFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: hello_world/
      Handler: lambda_handler
      Runtime: python3.11
""",
        "Handler: lambda_handler", "Resources.HelloWorldFunction.Properties.Handler",
        "lambda_handler"),
    "unknown-override": Case(
        HEAD + """\
Parameters:
  Stage:
    Type: String
    Default: dev
Resources:
""" + FN,
        "Parameters:", "--parameter-overrides", "'Stge'", ("Stge=prod",)),
    "allowed-pattern": Case(
        HEAD + """\
Parameters:
  Env:
    Type: String
    Default: dev
    AllowedPattern: "[a-z]+"
Resources:
""" + FN,
        "AllowedPattern:", "Parameters.Env.AllowedPattern", "'Prod-1'", ("Env=Prod-1",)),
    "circular-conditions": Case(
        HEAD + """\
Conditions:
  IsProd: !And [!Condition IsLive, !Equals [a, a]]
  IsLive: !Condition IsProd
Resources:
""" + FN + "      MemorySize: !If [IsProd, 1024, 128]\n",
        "IsProd: !And", "Conditions.IsProd", "itself"),
    "findinmap-missing-key": Case(
        HEAD + """\
Mappings:
  StageConfig:
    dev: {Memory: 128}
Resources:
""" + FN + "      MemorySize: !FindInMap [StageConfig, prod, Memory]\n",
        "!FindInMap", "Resources.HelloWorldFunction.Properties.MemorySize", "StageConfig"),
    "sub-unknown-variable": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          URL: !Sub "https://${ApiDomain}/v1"
""",
        "!Sub \"https", "Resources.HelloWorldFunction.Properties.Environment.Variables.URL",
        "ApiDomain"),
    "fn-length": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          COUNT: {"Fn::Length": [a, b]}
""",
        "Fn::Length", "Resources.HelloWorldFunction.Properties.Environment.Variables.COUNT",
        "Fn::Length"),
    "reserved-concurrency-zero": Case(
        HEAD + "Resources:\n" + FN + "      ReservedConcurrentExecutions: 0\n",
        "ReservedConcurrentExecutions: 0",
        "Resources.HelloWorldFunction.Properties.ReservedConcurrentExecutions", "0"),
    "container-image": Case(
        HEAD + """\
Resources:
  HelloWorldFunction:
    Type: AWS::Serverless::Function
    Properties:
      PackageType: Image
      ImageUri: 123456789012.dkr.ecr.us-east-1.amazonaws.com/hello:latest
    Metadata:
      Dockerfile: Dockerfile
      DockerContext: ./hello_world
""",
        "PackageType: Image", "Resources.HelloWorldFunction.Properties.PackageType", "image"),
    "nodejs-runtime": Case(
        HEAD + "Resources:\n" + FN.replace("python3.11", "nodejs20.x"),
        "Runtime: nodejs20.x", "Resources.HelloWorldFunction.Properties.Runtime", "nodejs20.x"),
    "httpapi-iam-auth": Case(
        HEAD + "Resources:\n" + FN + """\
      Events:
        HelloWorld:
          Type: HttpApi
          Properties:
            Path: /hello
            Method: get
            Auth:
              Authorizer: AWS_IAM
""",
        "Authorizer: AWS_IAM",
        "Resources.HelloWorldFunction.Properties.Events.HelloWorld.Properties.Auth.Authorizer",
        "authorizer"),
    "sns-filter-policy": Case(
        HEAD + """\
Resources:
  News:
    Type: AWS::SNS::Topic
""" + FN + """\
      Events:
        News:
          Type: SNS
          Properties:
            Topic: !Ref News
            FilterPolicy:
              kind: [breaking]
""",
        "FilterPolicy:",
        "Resources.HelloWorldFunction.Properties.Events.News.Properties.FilterPolicy",
        "FilterPolicy"),
    "dead-letter-queue-arn": Case(
        HEAD + "Resources:\n" + FN + """\
      DeadLetterQueue:
        Type: SQS
        TargetArn: arn:aws:sqs:us-east-1:123456789012:hello-dlq
""",
        "TargetArn:", "Resources.HelloWorldFunction.Properties.DeadLetterQueue.TargetArn",
        "hello-dlq"),
    "two-consumers-of-one-queue": Case(
        HEAD + """\
Resources:
  Jobs:
    Type: AWS::SQS::Queue
""" + FN + """\
      Events:
        Jobs:
          Type: SQS
          Properties: {Queue: !GetAtt Jobs.Arn}
  AuditFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: hello_world/
      Handler: app.lambda_handler
      Runtime: python3.11
      Events:
        AuditJobs:
          Type: SQS
          Properties: {Queue: !GetAtt Jobs.Arn}
""",
        "AuditJobs:", "Resources.AuditFunction.Properties.Events.AuditJobs", "consumer"),
    "app-yaml-beside-template": Case(
        HEAD + "Resources:\n" + FN, "", "", "keep one",
        files=(("app.yaml", "functions:\n  hello:\n    handler: hello_world.app.lambda_handler\n",
                0o644),)),
    "custom-runtime-without-executable-bootstrap": Case(
        HEAD + """\
Resources:
  ShellFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: runtime/
      Handler: function.handler
      Runtime: provided.al2023
""",
        "", "", "bootstrap",
        files=(("runtime/bootstrap", "#!/bin/sh\nexit 0\n", 0o644),)),
    # Fn::Join takes a list of strings; CloudFormation refuses a nested list.
    "join-of-a-nested-list": Case(
        HEAD + "Resources:\n" + FN + """\
      Environment:
        Variables:
          HOSTS: !Join [",", [a.example.com, [b.example.com]]]
""",
        "!Join", "Resources.HelloWorldFunction.Properties.Environment.Variables.HOSTS",
        "Join"),
    "api-event-method-null": Case(
        HEAD + "Resources:\n" + FN + """\
      Events:
        HelloWorld:
          Type: Api
          Properties:
            Path: /hello
            Method: null
""",
        "Method: null",
        "Resources.HelloWorldFunction.Properties.Events.HelloWorld.Properties.Method",
        "got null"),
    # README: paths under /_nimbus/ are reserved; a route there is never served.
    "api-event-on-a-reserved-path": Case(
        HEAD + "Resources:\n" + FN + """\
      Events:
        Health:
          Type: Api
          Properties:
            Path: /_nimbus/status
            Method: get
""",
        "Path: /_nimbus/status",
        "Resources.HelloWorldFunction.Properties.Events.Health.Properties.Path", "reserved"),
    # Lambda's MaximumRetryAttempts is 0 to 2: CloudFormation refuses 5.
    "event-invoke-config-five-retries": Case(
        HEAD + "Resources:\n" + FN + """\
      EventInvokeConfig:
        MaximumRetryAttempts: 5
""",
        "MaximumRetryAttempts: 5",
        "Resources.HelloWorldFunction.Properties.EventInvokeConfig.MaximumRetryAttempts", "2"),
    # CloudFormation refuses a Number parameter's value outside MinValue/MaxValue.
    "number-above-max-value": Case(
        HEAD + """\
Parameters:
  Workers:
    Type: Number
    Default: 1
    MinValue: 1
    MaxValue: 3
Resources:
""" + FN + "      ReservedConcurrentExecutions: !Ref Workers\n",
        "MaxValue: 3", "Parameters.Workers.MaxValue", "'7'", ("Workers=7",)),
    # SAM itself refuses a property it does not know ("property Timout not
    # defined for resource of type AWS::Serverless::Function"): the function
    # would run with the default timeout.
    "misspelt-function-property": Case(
        HEAD + "Resources:\n" + FN + "      Timout: 30\n",
        "Timout: 30", "Resources.HelloWorldFunction.Properties.Timout", "Timout"),
}

# Templates AWS deploys that nimbus must load too (the driver's deploy then
# fails only because no nimbus listens: exit 1, "cannot reach nimbus").
LOADS: dict[str, str] = {
    "json-template": """\
{"AWSTemplateFormatVersion": "2010-09-09", "Transform": "AWS::Serverless-2016-10-31",
 "Resources": {"HelloWorldFunction": {"Type": "AWS::Serverless::Function",
   "Properties": {"CodeUri": "hello_world/", "Handler": "app.lambda_handler",
                  "Runtime": "python3.11",
                  "Events": {"HelloWorld": {"Type": "Api",
                                            "Properties": {"Path": "/hello", "Method": "get"}}}}}}}
""",
    "transform-as-a-list": HEAD.replace("Transform: AWS::Serverless-2016-10-31",
                                        "Transform: [AWS::Serverless-2016-10-31]")
    + "Resources:\n" + FN,
    "handler-with-its-folder": HEAD + "Resources:\n" + FN.replace(
        "CodeUri: hello_world/", "CodeUri: .").replace(
        "Handler: app.lambda_handler", "Handler: hello_world/app.lambda_handler"),
    "unknown-resource-types": HEAD + """\
Resources:
  Workflow:
    Type: AWS::Serverless::StateMachine
    Properties:
      Definition: {StartAt: A, States: {A: {Type: Pass, End: true}}}
  Alarm:
    Type: AWS::CloudWatch::Alarm
    Properties:
      MetricName: Errors
      Dimensions: [{Name: FunctionName, Value: !Ref HelloWorldFunction}]
""" + FN,
    # Every deployment preference type SAM documents.
    "every-deployment-preference-type": HEAD + "Resources:\n" + "".join(
        FN.replace("HelloWorldFunction", f"F{i}")
        + f"      AutoPublishAlias: live\n      DeploymentPreference:\n        Type: {kind}\n"
        for i, kind in enumerate((
            "Canary10Percent30Minutes", "Canary10Percent5Minutes", "Canary10Percent10Minutes",
            "Canary10Percent15Minutes", "Linear10PercentEvery10Minutes",
            "Linear10PercentEvery1Minute", "Linear10PercentEvery2Minutes",
            "Linear10PercentEvery3Minutes", "AllAtOnce"))),
    # API Gateway serves both: GET /orders to one function, every other
    # method to the other (the more specific method wins).
    "any-and-get-on-one-path": HEAD + "Resources:\n" + FN + """\
      Events:
        All:
          Type: Api
          Properties: {Path: /orders, Method: any}
  ListOrdersFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: hello_world/
      Handler: app.lambda_handler
      Runtime: python3.11
      Events:
        List:
          Type: Api
          Properties: {Path: /orders, Method: get}
""",
}

# Cases that document a defect: what is wrong, precisely.
XFAIL: dict[str, str] = {}


# One process runs every case through the CLI's entry point (the
# `nimbus` console script's `main`), as the shell would, one after the other:
# its exit status, what it printed, and a traceback if one escaped.
DRIVER = """\
import contextlib, io, json, sys, traceback
from nimbus.cli.main import main

out = {}
for name, argv in json.loads(sys.stdin.read()).items():
    sys.argv = ["nimbus", *argv]
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            e.write(traceback.format_exc())
            code = 1
    out[name] = {"code": code, "stdout": o.getvalue(), "stderr": e.getvalue()}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def write_app(root: Path, name: str, case: Case) -> list[str]:
    app = root / name
    (app / "hello_world").mkdir(parents=True)
    (app / "hello_world" / "__init__.py").write_text("")
    (app / "hello_world" / "app.py").write_text(APP_PY)
    (app / "template.yaml").write_text(case.template)
    for rel, text, mode in case.files:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
        (app / rel).chmod(mode)
    argv = ["deploy", str(app),
            # nothing listens there: a template that loads would fail later,
            # with exit 1 and "cannot reach nimbus"
            "--url", "http://127.0.0.1:9", "--token", "t" * 40,
            "--state-dir", str(root / "no-state")]
    if case.overrides:
        argv += ["--parameter-overrides", *case.overrides]
    return argv


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("refusals")
    argvs = {name: write_app(root, name, case) for name, case in CASES.items()}
    argvs |= {name: write_app(root, name, Case(text, "", "", "")) for name, text in LOADS.items()}
    p = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(argvs),
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert p.returncode == 0, p.stderr
    return {name: Result(r["code"], r["stdout"], r["stderr"])
            for name, r in json.loads(p.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n])) if n in XFAIL else n
    for n in CASES])
def test_refused_with_file_line_and_property(
        name: str, results: dict[str, Result]) -> None:
    case = CASES[name]
    p = results[name]
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out
    assert p.returncode == 2, out
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"one line, got {out!r}"
    assert lines[0].startswith("nimbus: error: "), lines[0]
    line = case.line()
    if line is not None:
        want = f"/{name}/template.yaml:{line}: {case.prop}"
        assert want in lines[0], f"{want!r} not in {lines[0]!r}"
    message = lines[0].split(f"/{name}", 1)[1]  # the case's folder name is not evidence
    assert case.says in message, lines[0]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n])) if n in XFAIL else n
    for n in LOADS])
def test_templates_aws_deploys_load(name: str, results: dict[str, Result]) -> None:
    p = results[name]
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("nimbus: error: cannot reach nimbus at "), out


def test_nimbus_up_refuses_before_anything_starts(tmp_path: Path) -> None:
    """`nimbus up` reads the template the same way: exit 2, one line, and no
    server started (no control.json in the state folder)."""
    case = CASES["override-outside-allowed-values"]
    argv = write_app(tmp_path, "shop", case)
    state = tmp_path / "state"
    p = subprocess.run(
        [sys.executable, "-m", "nimbus.cli.main", "up", argv[1], "--port", "0",
         "--control-port", "0", "--state-dir", str(state), "--parameter-overrides", "Stage=qa"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("nimbus: error: ")]
    assert len(errors) == 1 and f"/shop/template.yaml:{case.line()}: {case.prop}" in errors[0], out
    assert not (state / "control.json").exists()
