"""The Lambda Invoke API with boto3 itself, against one ``nimbus up``:
sync, async, DryRun, tail logs, a handler error, version and alias
qualifiers, AWS's errors, a bad signature, and the environment
``nimbus aws-credentials`` prints."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import orjson
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from nimbus.control.sigv4 import credentials_for
from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e

MANIFEST = """\
name: lam
functions:
  echo:
    handler: handlers.echo
  boom:
    handler: handlers.boom
"""

HANDLERS = '''\
CODE = "{code}"

def echo(event, context):
    print("echo got", event.get("n"), "in", context.aws_request_id)
    return {{"code": CODE, "version": context.function_version, "event": event}}

def boom(event, context):
    raise ValueError("kaboom " + str(event.get("n")))
'''

CONFIG = Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30)


def write_app(folder: Path, code: str) -> None:
    (folder / "app.yaml").write_text(MANIFEST)
    (folder / "handlers.py").write_text(HANDLERS.format(code=code))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nimbus, httpx.Client]]:
    root = tmp_path_factory.mktemp("lambda")
    app = root / "lam"
    app.mkdir()
    write_app(app, "one")
    n = Nimbus(app, root / "state", root / "state.out")
    ctl = httpx.Client(base_url=n.control_url, timeout=30.0,
                       headers={"authorization": f"Bearer {n.token}"})
    try:
        write_app(app, "two")
        p = n.cli("deploy", str(app), "--strategy", "all-at-once")
        assert p.returncode == 0, p.stderr
        r = ctl.put("/v1/functions/echo/aliases/beta", json={"weights": {"1": 100}})
        assert r.status_code == 200, r.text
        yield n, ctl
    finally:
        ctl.close()
        n.stop()


def client(n: Nimbus, secret: str | None = None, key_id: str | None = None) -> Any:
    kid, real = credentials_for(n.token)
    return boto3.client("lambda", endpoint_url=n.control_url, region_name="us-east-1",
                        aws_access_key_id=key_id or kid, aws_secret_access_key=secret or real,
                        config=CONFIG)


def payload(answer: dict[str, Any]) -> Any:
    return orjson.loads(answer["Payload"].read())


def test_a_sync_invoke_returns_the_handlers_result(env):
    n, _ = env
    answer = client(n).invoke(FunctionName="echo", Payload=b'{"n": 1}')
    assert answer["StatusCode"] == 200
    assert "FunctionError" not in answer
    assert answer["ExecutedVersion"] == "2"
    assert payload(answer) == {"code": "two", "version": "2", "event": {"n": 1}}


def test_tail_returns_this_invocations_lines_in_base64(env):
    n, _ = env
    answer = client(n).invoke(FunctionName="echo", Payload=b'{"n": 5}', LogType="Tail")
    rid = answer["ResponseMetadata"]["RequestId"]
    text = base64.b64decode(answer["LogResult"]).decode()
    lines = text.splitlines()
    assert lines[0] == f"START RequestId: {rid} Version: 2"
    assert lines[1:3] == [f"echo got 5 in {rid}", f"END RequestId: {rid}"]
    assert lines[3].startswith(f"REPORT RequestId: {rid}\tDuration: ")
    assert "Memory Size: 128 MB" in lines[3] and len(lines) == 4


def test_a_raising_handler_is_an_unhandled_function_error(env):
    n, _ = env
    lam = client(n)
    answer = lam.invoke(FunctionName="boom", Payload=b'{"n": 3}')
    assert answer["StatusCode"] == 200
    assert answer["FunctionError"] == "Unhandled"
    body = payload(answer)
    assert set(body) == {"errorType", "errorMessage", "requestId", "stackTrace"}
    assert body["errorType"] == "ValueError" and body["errorMessage"] == "kaboom 3"
    assert body["requestId"] == answer["ResponseMetadata"]["RequestId"]
    [frame] = body["stackTrace"]  # the handler's own frame only
    assert "handlers.py" in frame and 'raise ValueError("kaboom "' in frame
    answer = lam.invoke(FunctionName="boom", Payload=b'{"n": 4}', LogType="Tail")
    assert answer["FunctionError"] == "Unhandled"
    assert "[ERROR] ValueError: kaboom 4" in base64.b64decode(answer["LogResult"]).decode()


def test_qualifiers_pick_versions_and_aliases(env):
    n, _ = env
    lam = client(n)
    for kwargs, code, version in [
        ({"FunctionName": "echo", "Qualifier": "beta"}, "one", "1"),
        ({"FunctionName": "echo:beta"}, "one", "1"),
        ({"FunctionName": "echo", "Qualifier": "1"}, "one", "1"),
        ({"FunctionName": "arn:aws:lambda:us-east-1:000000000000:function:echo:2"}, "two", "2"),
        ({"FunctionName": "echo", "Qualifier": "$LATEST"}, "two", "2"),
    ]:
        answer = lam.invoke(Payload=b"{}", **kwargs)
        assert answer["ExecutedVersion"] == version, kwargs
        assert payload(answer)["code"] == code, kwargs


def test_an_event_invocation_is_queued_and_runs_pinned_to_its_qualifier(env):
    n, ctl = env
    lam = client(n)
    ids = []
    for qualifier in ("beta", "$LATEST"):
        answer = lam.invoke(FunctionName="echo", InvocationType="Event", Qualifier=qualifier,
                            Payload=b'{"n": 7}')
        assert answer["StatusCode"] == 202
        assert answer["Payload"].read() == b""
        ids.append(answer["ResponseMetadata"]["RequestId"])
    results = []
    for rid in ids:
        deadline = time.monotonic() + 15
        while (rec := ctl.get(f"/v1/invocations/{rid}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)
        results.append(rec["result"])
    assert results == [{"code": "one", "version": "1", "event": {"n": 7}},
                       {"code": "two", "version": "2", "event": {"n": 7}}]


def test_dry_run_checks_the_function_and_qualifier_only(env):
    n, _ = env
    lam = client(n)
    answer = lam.invoke(FunctionName="echo", InvocationType="DryRun", Qualifier="beta")
    assert answer["StatusCode"] == 204
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="echo", InvocationType="DryRun", Qualifier="nope")


def test_aws_errors_are_raised_as_boto3_exceptions(env):
    n, _ = env
    lam = client(n)
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as err:
        lam.invoke(FunctionName="missing", Payload=b"{}")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName="echo", Payload=b"{not json")
    with pytest.raises(lam.exceptions.RequestTooLargeException):
        lam.invoke(FunctionName="echo", InvocationType="Event",
                   Payload=b'{"x": "' + b"a" * 300_000 + b'"}')
    with pytest.raises(lam.exceptions.RequestTooLargeException) as err:
        lam.invoke(FunctionName="echo", Payload=b'{"x": "' + b"a" * 6 * 1024 * 1024 + b'"}')
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke(FunctionName="echo:beta", Qualifier="1", Payload=b"{}")


def test_a_wrong_secret_or_an_unknown_key_is_refused_with_403(env):
    n, _ = env
    for lam, code in [(client(n, secret="x" * 40), "InvalidSignatureException"),
                      (client(n, key_id="AKIAIOSFODNN7EXAMPLE"), "UnrecognizedClientException")]:
        with pytest.raises(ClientError) as err:
            lam.invoke(FunctionName="echo", Payload=b"{}")
        assert err.value.response["Error"]["Code"] == code
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # the bearer token is not a signature
    r = httpx.post(f"{n.control_url}/2015-03-31/functions/echo/invocations", content=b"{}",
                   headers={"authorization": f"Bearer {n.token}"})
    assert r.status_code == 403 and r.headers["x-amzn-errortype"] == \
        "IncompleteSignatureException" and "message" in r.json()


def test_the_printed_environment_is_all_plain_boto3_needs(env, tmp_path):
    n, _ = env
    p = n.cli("aws-credentials")
    assert p.returncode == 0, p.stderr
    kid, secret = credentials_for(n.token)
    assert p.stdout.splitlines() == [
        f"export AWS_ACCESS_KEY_ID={kid}", f"export AWS_SECRET_ACCESS_KEY={secret}",
        "export AWS_DEFAULT_REGION=local", f"export AWS_ENDPOINT_URL_LAMBDA={n.control_url}"]
    script = ('import boto3, json; r = boto3.client("lambda").invoke(FunctionName="echo", '
              'Payload=b\'{"n": 9}\'); print(json.loads(r["Payload"].read())["event"]["n"])')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    clean["HOME"] = str(tmp_path)  # no ~/.aws of anyone's
    out = subprocess.run(["sh", "-c", 'eval "$1" && exec "$2" -c "$3"', "sh", p.stdout,
                          sys.executable, script], env=clean, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "9\n"
