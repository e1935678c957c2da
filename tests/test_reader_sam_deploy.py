"""SAM templates as AWS users write them, deployed to a real ``nimbus up``
and served as README.md ("SAM templates") and docs/aws.md promise:

- the `sam init` hello-world template, unchanged (`nimbus up sam-app`);
- an orders service with Parameters (AllowedValues, `--parameter-overrides`),
  Mappings, Conditions, Globals, a layer, an SQS queue with
  ReportBatchItemFailures, an SNS topic, a disabled schedule,
  EventInvokeConfig with an SQS destination, AutoPublishAlias and
  DeploymentPreference, and a DynamoDB table and an S3 bucket nimbus does
  not provide, referenced from the environment;
- CloudFormation's corner cases (long `Fn::` forms, `!Sub` with a variables
  map and `${!Literal}`, `!Join`/`!Select`/`!Split` of a list parameter,
  nested `!If` with `AWS::NoValue`, a resource `Condition`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Nimbus
from tests.events_client import control, record, wait_for

pytestmark = pytest.mark.e2e

# `sam init --runtime python3.11 --app-template hello-world`, as generated.
HELLO_TEMPLATE = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Description: >
  sam-app

  Sample SAM Template for sam-app

# More info about Globals: https://github.com/awslabs/serverless-application-model/blob/master/docs/globals.rst
Globals:
  Function:
    Timeout: 3
    MemorySize: 128

    # You can add LoggingConfig parameters such as the Logformat, Log Group, and SubSystem
    LoggingConfig:
      LogFormat: JSON
Resources:
  HelloWorldFunction:
    Type: AWS::Serverless::Function # More info about Function Resource: https://github.com/awslabs/serverless-application-model/blob/master/versions/2016-10-31.md#awsserverlessfunction
    Properties:
      CodeUri: hello_world/
      Handler: app.lambda_handler
      Runtime: python3.11
      Architectures:
      - x86_64
      Events:
        HelloWorld:
          Type: Api # More info about API Event Source: https://github.com/awslabs/serverless-application-model/blob/master/versions/2016-10-31.md#api
          Properties:
            Path: /hello
            Method: get

Outputs:
  # ServerlessRestApi is an implicit API created from Events key under Resources
  # Find out more about other implicit resources you can reference within SAM
  # https://github.com/awslabs/serverless-application-model/blob/master/docs/internals/generated_resources.rst#api
  HelloWorldApi:
    Description: API Gateway endpoint URL for Prod stage for Hello World function
    Value: !Sub "https://${ServerlessRestApi}.execute-api.${AWS::Region}.amazonaws.com/Prod/hello/"
  HelloWorldFunction:
    Description: Hello World Lambda Function ARN
    Value: !GetAtt HelloWorldFunction.Arn
  HelloWorldFunctionIamRole:
    Description: Implicit IAM Role created for Hello World function
    Value: !GetAtt HelloWorldFunctionRole.Arn
"""

HELLO_APP = '''\
import json

# import requests


def lambda_handler(event, context):
    """Sample pure Lambda function

    Parameters
    ----------
    event: dict, required
        API Gateway Lambda Proxy Input Format

    context: object, required
        Lambda Context runtime methods and attributes

    Returns
    ------
    API Gateway Lambda Proxy Output Format: dict
    """

    return {
        "statusCode": 200,
        "body": json.dumps({
            "message": "hello world",
            # "location": ip.text.replace("\\n", "")
        }),
    }
'''

ORDERS_TEMPLATE = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Description: Orders service

Parameters:
  Stage:
    Type: String
    Default: dev
    AllowedValues: [dev, staging, prod]
    Description: Deployment stage
  JobBatch:
    Type: Number
    Default: 5

Mappings:
  StageConfig:
    dev:
      Memory: 128
      LogLevel: DEBUG
    prod:
      Memory: 256
      LogLevel: WARNING

Conditions:
  IsProd: !Equals [!Ref Stage, prod]

Globals:
  Function:
    Runtime: python3.11
    CodeUri: src/
    Timeout: 5
    MemorySize: 128
    Layers:
      - !Ref CommonLayer
    Environment:
      Variables:
        STAGE: !Ref Stage
        TABLE_NAME: !Ref OrdersTable
        TABLE_ARN: !GetAtt OrdersTable.Arn
        BUCKET: !Ref UploadsBucket

Resources:
  OrdersTable:
    Type: AWS::DynamoDB::Table
    Properties:
      TableName: !Sub "${AWS::StackName}-orders"
      BillingMode: PAY_PER_REQUEST
      AttributeDefinitions:
        - AttributeName: id
          AttributeType: S
      KeySchema:
        - AttributeName: id
          KeyType: HASH

  UploadsBucket:
    Type: AWS::S3::Bucket

  CommonLayer:
    Type: AWS::Serverless::LayerVersion
    Properties:
      LayerName: common
      ContentUri: layers/common/
      CompatibleRuntimes:
        - python3.11

  JobsQueue:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: jobs
      VisibilityTimeout: 60

  NewsTopic:
    Type: AWS::SNS::Topic
    Properties:
      TopicName: news

  OrdersApiFunction:
    Type: AWS::Serverless::Function
    Properties:
      FunctionName: !If [IsProd, orders-api, orders-api-dev]
      Handler: app.api
      MemorySize: !FindInMap [StageConfig, !Ref Stage, Memory]
      AutoPublishAlias: live
      DeploymentPreference:
        Type: Canary10Percent5Minutes
      Policies:
        - DynamoDBCrudPolicy:
            TableName: !Ref OrdersTable
        - S3ReadPolicy:
            BucketName: !Ref UploadsBucket
      Environment:
        Variables:
          GREETING: !Sub
            - "Hello ${Who} from ${AWS::Region}"
            - Who: !Ref Stage
          PROD_ONLY: !If [IsProd, "yes", !Ref AWS::NoValue]
          LOG_LEVEL: !FindInMap [StageConfig, !Ref Stage, LogLevel]
          STACK: !Ref AWS::StackName
      Events:
        GetOrder:
          Type: Api
          Properties:
            Path: /orders/{id}
            Method: get
        PostOrder:
          Type: HttpApi
          Properties:
            Path: /v2/orders
            Method: POST

  JobsFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.work
      Policies:
        - SQSPollerPolicy:
            QueueName: !GetAtt JobsQueue.QueueName
      Events:
        Jobs:
          Type: SQS
          Properties:
            Queue: !GetAtt JobsQueue.Arn
            BatchSize: !Ref JobBatch
            FunctionResponseTypes:
              - ReportBatchItemFailures

  NewsFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.news
      Events:
        News:
          Type: SNS
          Properties:
            Topic: !Ref NewsTopic

  FailsFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.fail
      EventInvokeConfig:
        MaximumRetryAttempts: 1
        MaximumEventAgeInSeconds: 120
        DestinationConfig:
          OnFailure:
            Type: SQS
            Destination: !GetAtt JobsQueue.Arn

  DeadOrdersQueue:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: dead-orders

  DeadOrdersFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.work
      Events:
        Dead:
          Type: SQS
          Properties:
            Queue: !GetAtt DeadOrdersQueue.Arn

  CheckoutFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.fail
      DeadLetterQueue:
        Type: SQS
        TargetArn: !GetAtt DeadOrdersQueue.Arn
      EventInvokeConfig:
        MaximumRetryAttempts: 0

  NightlyFunction:
    Type: AWS::Serverless::Function
    Properties:
      Handler: app.tick
      Events:
        Nightly:
          Type: Schedule
          Properties:
            Schedule: rate(1 second)
            Input: '{"kind": "nightly"}'
            Enabled: false

Outputs:
  OrdersApi:
    Value: !Sub "https://${ServerlessRestApi}.execute-api.${AWS::Region}.amazonaws.com/Prod/orders/"
  OrdersTableArn:
    Value: !GetAtt OrdersTable.Arn
"""

ORDERS_APP = """\
import json
import os

import common

KEYS = ("STAGE", "TABLE_NAME", "TABLE_ARN", "BUCKET", "GREETING", "PROD_ONLY", "LOG_LEVEL",
        "STACK")


def api(event, context):
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({
                "function": context.function_name, "memory": context.memory_limit_in_mb,
                "env": {k: os.environ.get(k) for k in KEYS}, "layer": common.NAME,
                "task_root": os.environ.get("LAMBDA_TASK_ROOT"), "cwd": os.getcwd(),
                "version": event.get("version"), "resource": event.get("resource"),
                "routeKey": event.get("routeKey"),
                "pathParameters": event.get("pathParameters")})}


def work(event, context):
    for r in event["Records"]:
        print("BODY", r["body"])
    return {"batchItemFailures": [
        {"itemIdentifier": r["messageId"]} for r in event["Records"]
        if r["body"].startswith("fail")]}


def news(event, context):
    return {"messages": [r["Sns"]["Message"] for r in event["Records"]]}


def fail(event, context):
    raise RuntimeError("no luck")


def tick(event, context):
    return {"event": event}
"""

CORNERS_TEMPLATE = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Parameters:
  Stage:
    Type: String
    Default: dev
  Sizes:
    Type: CommaDelimitedList
    Default: "small,medium,large"
  Seconds:
    Type: Number
    Default: 7
Conditions:
  IsProd: !Equals [!Ref Stage, prod]
  IsDev: {"Fn::Equals": [{"Ref": "Stage"}, "dev"]}
  DevOrProd: !Or [!Condition IsProd, !Condition IsDev]
Resources:
  ProdOnly:
    Type: AWS::Serverless::Function
    Condition: IsProd
    Properties:
      CodeUri: fn/
      Handler: app.handler
      Runtime: python3.11
  Echo:
    Type: AWS::Serverless::Function
    DependsOn: Other
    Metadata:
      BuildMethod: python3.11
    Properties:
      CodeUri: ./fn
      Handler: app.handler
      Runtime: python3.11
      Timeout: !Ref Seconds
      MemorySize: "256"
      Environment:
        Variables:
          LONG_SUB: {"Fn::Sub": "x-${Stage}-${AWS::AccountId}"}
          LONG_JOIN: {"Fn::Join": ["-", ["p", {"Ref": "Stage"}]]}
          LONG_IF: {"Fn::If": ["IsDev", "d", "p"]}
          LONG_SELECT: {"Fn::Select": ["1", {"Fn::Split": [",", "q,r,s"]}]}
          LONG_GETATT: {"Fn::GetAtt": ["Other", "Arn"]}
          SUB_MAP: !Sub
            - "${Name}.${Domain}/${AWS::Partition}/${AWS::URLSuffix}"
            - Name: !Ref Stage
              Domain: !Join [".", [example, com]]
          SUB_ESCAPE: !Sub "literal ${!NotAVar} and ${Stage}"
          SUB_ATTR: !Sub "${Other.Arn}"
          NESTED: !If [IsProd, p, !If [IsDev, !Ref AWS::NoValue, other]]
          NESTED2: !If [IsProd, !Ref AWS::NoValue, !If [IsDev, dev-value, other]]
          JOIN_LIST: !Join ["|", !Ref Sizes]
          SELECT_LIST: !Select [2, !Ref Sizes]
          B64: !Base64 hi
          NUMBER: 8080
          BOOL: true
          "ON": On
          OR: !If [DevOrProd, yes-or, no-or]
  Other:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: fn/
      Handler: app.handler
      Runtime: python3.11
      Events:
        Echo:
          Type: Api
          Properties:
            Path: /echo/{proxy+}
            Method: any
            Auth:
              Authorizer: NONE
              ApiKeyRequired: false
"""

CORNERS_APP = """\
import json
import os

LAMBDA = ("AWS_", "LAMBDA_", "_")


def handler(event, context):
    return {"statusCode": 200, "body": json.dumps({
        "env": dict(os.environ), "function": context.function_name,
        "memory": context.memory_limit_in_mb,
        "remaining": context.get_remaining_time_in_millis(),
        "keys": sorted(event) if isinstance(event, dict) else None,
        "resource": event.get("resource"), "httpMethod": event.get("httpMethod"),
        "pathParameters": event.get("pathParameters"),
        "stage": (event.get("requestContext") or {}).get("stage")})}
"""


def line_of(template: str, text: str) -> int:
    [n] = [i for i, line in enumerate(template.splitlines(), 1) if text in line]
    return n


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def cli(n: Nimbus, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user's shell runs it, output to a pipe (no terminal width)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "nimbus.cli.main", *args, "--state-dir", str(n.state)],
        capture_output=True, text=True, timeout=120, cwd=n.state.parent, env=env,
        stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("reader-sam")
    hello = write(root / "sam-app", {"template.yaml": HELLO_TEMPLATE,
                                     "hello_world/__init__.py": "",
                                     "hello_world/app.py": HELLO_APP})
    orders = write(root / "orders", {"template.yaml": ORDERS_TEMPLATE, "src/app.py": ORDERS_APP,
                                     "layers/common/python/common.py": "NAME = 'common'\n"})
    corners = write(root / "corners", {"template.yaml": CORNERS_TEMPLATE,
                                       "fn/app.py": CORNERS_APP})
    n = Nimbus(hello, root / "state", root / "state.out")
    ctl = control(n)
    try:
        deployed = cli(n, "deploy", str(orders), "--parameter-overrides", "Stage=prod",
                       "JobBatch=3")
        deployed_at = time.monotonic()
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        c = cli(n, "deploy", str(corners))
        assert c.returncode == 0, c.stdout + c.stderr
        yield {"n": n, "ctl": ctl, "orders": orders, "deployed": deployed,
               "deployed_at": deployed_at}
    finally:
        ctl.close()
        n.stop()


# -- the sam init hello world ------------------------------------------------

def test_sam_init_hello_world_serves_as_is(sam: dict[str, Any]) -> None:
    r = sam["n"].http.get("/hello")
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "hello world"}
    assert r.headers["content-type"] == "application/json", "API Gateway's default"


def test_hello_world_deploy_lists_outputs_once_and_nothing_else(sam: dict[str, Any]) -> None:
    out = sam["n"].output()
    line = line_of(HELLO_TEMPLATE, "Outputs:")
    assert out.count(f"not provided by nimbus: Outputs (template.yaml:{line})") == 1, out
    assert out.count("not provided by nimbus") == 1, out
    assert "deployed sam-app/HelloWorldFunction: version 1" in out
    assert re.search(r"GET +http://127\.0\.0\.1:\d+/hello\n", out), out


# -- the orders service --------------------------------------------------------

def test_unsupported_resources_are_listed_once_with_logical_id_and_line(
        sam: dict[str, Any]) -> None:
    d = sam["deployed"]
    out = d.stdout + d.stderr
    for kind, logical in (("AWS::DynamoDB::Table", "OrdersTable"),
                          ("AWS::S3::Bucket", "UploadsBucket")):
        line = line_of(ORDERS_TEMPLATE, f"  {logical}:")
        assert out.count(f"not provided by nimbus: {kind} {logical} (template.yaml:{line})") \
            == 1, out
        assert out.count(f" {logical} ") == 1, "listed once, however often it is referenced"
    assert out.count("IAM is not enforced by nimbus") == 1, out
    assert out.count("not provided by nimbus: Outputs") == 1, out


def test_every_notice_is_one_line_with_its_template_line(sam: dict[str, Any]) -> None:
    d = sam["deployed"]
    line = line_of(ORDERS_TEMPLATE, "        Nightly:")  # the event's own line
    [notice] = [ln for ln in (d.stdout + d.stderr).splitlines() if "schedule Nightly" in ln]
    assert "disabled" in notice and notice.endswith(f"(template.yaml:{line})"), notice


def test_parameters_mappings_conditions_and_globals_reach_the_function(
        sam: dict[str, Any]) -> None:
    r = sam["n"].http.get("/orders/42")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["function"] == "orders-api", "FunctionName: !If [IsProd, ...] with Stage=prod"
    assert body["memory"] == "256", "MemorySize: !FindInMap [StageConfig, prod, Memory]"
    assert body["env"] == {
        "STAGE": "prod",
        "TABLE_NAME": "OrdersTable",
        "TABLE_ARN": "arn:aws:dynamodb:local:000000000000:table/OrdersTable",
        "BUCKET": "UploadsBucket",
        "GREETING": "Hello prod from local",
        "PROD_ONLY": "yes",
        "LOG_LEVEL": "WARNING",
        "STACK": "orders",
    }
    assert body["layer"] == "common"
    assert body["cwd"] == body["task_root"] and body["task_root"].endswith("/src")


def test_api_event_is_rest_and_http_api_event_is_2_0(sam: dict[str, Any]) -> None:
    rest = sam["n"].http.get("/orders/42").json()
    assert (rest["version"], rest["routeKey"]) == (None, None)
    assert (rest["resource"], rest["pathParameters"]) == ("/orders/{id}", {"id": "42"})
    r = sam["n"].http.post("/v2/orders", json={"sku": "x"})
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["routeKey"]) == ("2.0", "POST /v2/orders")
    assert sam["n"].http.get("/v2/orders").status_code == 405


def test_sqs_event_with_report_batch_item_failures_retries_only_the_reported(
        sam: dict[str, Any]) -> None:
    ctl = sam["ctl"]
    ids = {}
    for body in ("ok-1", "fail-1"):
        r = ctl.post("/v1/publish/jobs", content=body.encode())
        assert r.status_code == 202, r.text
        ids[body] = r.json()["messageId"]
    ok = wait_for("ok-1 settled", lambda: (rec := record(ctl, ids["ok-1"]))["status"]
                  in ("succeeded", "dead", "failed") and rec)
    assert (ok["status"], ok["attempts"], ok["function"]) == ("succeeded", 1, "JobsFunction")
    failed = wait_for("fail-1 tried again",
                      lambda: (rec := record(ctl, ids["fail-1"]))["attempts"] >= 2 and rec)
    assert failed["status"] != "succeeded"
    assert failed["error"]["errorType"] == "BatchItemFailure", failed


def test_sns_event_delivers_to_its_subscriber(sam: dict[str, Any]) -> None:
    ctl = sam["ctl"]
    r = ctl.post("/v1/publish/news", content=b"extra extra")
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "topic" and len(r.json()["deliveries"]) == 1
    [iid] = [d["id"] for d in r.json()["deliveries"]]
    rec = wait_for("the delivery", lambda: (x := record(ctl, iid))["status"] == "succeeded" and x)
    assert rec["result"] == {"messages": ["extra extra"]}


def test_event_invoke_config_retries_then_sends_to_the_sqs_destination(
        sam: dict[str, Any]) -> None:
    n, ctl = sam["n"], sam["ctl"]
    r = ctl.post("/v1/functions/FailsFunction/invoke", json={"order": "o-9"},
                 headers={"X-Amz-Invocation-Type": "Event"})
    assert r.status_code == 202, r.text
    iid = r.json()["invocationId"]
    rec = wait_for("the invocation dead", lambda: (x := record(ctl, iid))["status"]
                   in ("dead", "failed", "succeeded") and x)
    assert (rec["status"], rec["attempts"]) == ("dead", 2), "MaximumRetryAttempts: 1"

    def delivered() -> Any:
        p = cli(n, "logs", "JobsFunction", "--tail", "200")
        return [ln for ln in p.stdout.splitlines() if "BODY" in ln and iid in ln]
    [line] = wait_for("the destination record at the queue's consumer", delivered)
    body = json.loads(line.split("BODY ", 1)[1])
    assert body["requestContext"]["condition"] == "RetriesExhausted"
    assert body["requestPayload"] == {"order": "o-9"}


def test_a_dead_letter_queue_receives_the_failed_event_itself(sam: dict[str, Any]) -> None:
    n, ctl = sam["n"], sam["ctl"]
    r = ctl.post("/v1/functions/CheckoutFunction/invoke", json={"order": "o-3"},
                 headers={"X-Amz-Invocation-Type": "Event"})
    assert r.status_code == 202, r.text
    iid = r.json()["invocationId"]
    wait_for("the invocation dead", lambda: record(ctl, iid)["status"] == "dead")

    def delivered() -> Any:
        p = cli(n, "logs", "DeadOrdersFunction", "--tail", "50")
        return [ln.split("BODY ", 1)[1] for ln in p.stdout.splitlines() if "BODY " in ln]
    [body] = wait_for("the dead letter at the queue's consumer", delivered)
    assert json.loads(body) == {"order": "o-3"}


def test_a_disabled_schedule_never_runs(sam: dict[str, Any]) -> None:
    d = sam["deployed"]
    assert "schedule Nightly is disabled" in d.stdout + d.stderr
    # rate(1 second): had it been registered it would have run by now
    time.sleep(max(0.0, sam["deployed_at"] + 3.0 - time.monotonic()))
    r = sam["ctl"].get("/v1/functions/NightlyFunction/invocations")
    assert r.status_code == 200 and r.json() == [], r.text


def test_deployment_preference_rolls_a_new_version_out_as_a_canary(
        sam: dict[str, Any]) -> None:
    n, orders = sam["n"], sam["orders"]
    app = orders / "src" / "app.py"
    app.write_text(app.read_text() + "\n# v2\n")
    p = cli(n, "deploy", str(orders), "--parameter-overrides", "Stage=prod", "JobBatch=3")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "orders-api version 2" in out and "canary:10%:5m" in out, out
    assert out.count("not provided by nimbus: AWS::DynamoDB::Table OrdersTable") == 1
    s = cli(n, "rollout", "status", "orders-api", "--json")
    assert s.returncode == 0, s.stderr
    status = json.loads(s.stdout)
    assert (status["from"], status["to"], status["strategy"], status["state"], status["share"]) \
        == (1, 2, "canary:10%:5m", "running", 10)


# -- CloudFormation's corner cases ----------------------------------------------

def _echo(sam: dict[str, Any]) -> dict[str, Any]:
    p = cli(sam["n"], "invoke", "Echo")
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(json.loads(p.stdout)["body"])  # type: ignore[no-any-return]


def test_intrinsics_long_forms_and_nested_if_resolve_as_cloudformation_does(
        sam: dict[str, Any]) -> None:
    body = _echo(sam)
    env = body["env"]
    want = {
        "LONG_SUB": "x-dev-000000000000",
        "LONG_JOIN": "p-dev",
        "LONG_IF": "d",
        "LONG_SELECT": "r",
        "LONG_GETATT": "arn:aws:lambda:local:000000000000:function:Other",
        "SUB_MAP": "dev.example.com/aws/amazonaws.com",
        "SUB_ESCAPE": "literal ${NotAVar} and dev",
        "SUB_ATTR": "arn:aws:lambda:local:000000000000:function:Other",
        "NESTED2": "dev-value",
        "JOIN_LIST": "small|medium|large",
        "SELECT_LIST": "large",
        "B64": "aGk=",
        "NUMBER": "8080",
        "BOOL": "true",
        "ON": "On",
        "OR": "yes-or",
    }
    assert {k: env.get(k) for k in want} == want
    assert "NESTED" not in env, "!If [.., !If [IsDev, !Ref AWS::NoValue, ..]] drops the key"
    assert body["memory"] == "256", "MemorySize given as a string"
    assert 5000 < body["remaining"] <= 7000, "Timeout: !Ref Seconds (a Number parameter)"


def test_a_resource_whose_condition_is_false_is_left_out(sam: dict[str, Any]) -> None:
    p = cli(sam["n"], "ls")
    assert p.returncode == 0, p.stderr
    names = {ln.split()[0] for ln in p.stdout.splitlines()[1:] if ln.strip()}
    assert {"Echo", "Other"} <= names and "ProdOnly" not in names, p.stdout


def test_an_api_event_with_auth_none_serves_rest_events(sam: dict[str, Any]) -> None:
    r = sam["n"].http.post("/echo/a/b", content=b"{}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["resource"], body["httpMethod"], body["pathParameters"], body["stage"]) == \
        ("/echo/{proxy+}", "POST", {"proxy": "a/b"}, "Prod")


def test_the_environment_holds_nothing_of_nimbus(sam: dict[str, Any]) -> None:
    env = _echo(sam)["env"]
    assert [k for k in env if k.startswith("NIMBUS")] == []
