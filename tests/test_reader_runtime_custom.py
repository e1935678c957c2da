"""Custom runtimes (`runtime: provided.al2023`, an executable `bootstrap`)
on a real ``nimbus up``, read from docs/aws.md ("Custom runtimes (the Lambda
Runtime API)") and AWS's custom-runtime tutorial: the tutorial's bash+curl
bootstrap serves; errors posted to `/invocation/{id}/error` come back in the
documented shape; the invocation headers are Lambda's; a runtime that
times out, exits or never answers behaves as a Python handler does; a
runtime that cannot start fails its deploy clearly; and a SAM template's
`Runtime: provided.al2023` function works the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

MANIFEST = """\
name: rt
functions:
  shell:
    runtime: provided.al2023
    handler: function.handler
    timeout_s: 1
    env: {COLOR: blue}
    http: [{method: ANY, path: "/rt/{what+}"}]
  big:
    runtime: provided.al2023
    handler: function.handler
    timeout_s: 10
    http: [{method: GET, path: "/big/{what+}"}]
  pyslow:
    handler: pyfuncs.slow
    timeout_s: 1
    http: [{method: GET, path: /py/slow}]
  pyboom:
    handler: pyfuncs.boom
    http: [{method: GET, path: /py/boom}]
  pyarn:
    handler: pyfuncs.arn
    http: [{method: GET, path: /py/arn}]
"""

PYFUNCS = """\
import time


def slow(event, context):
    time.sleep(30)


def boom(event, context):
    raise ValueError("kaboom")


def arn(event, context):
    return {"arn": context.invoked_function_arn}
"""

# AWS's tutorial bootstrap; the one change: an empty answer is not posted
# (the handler posted its own, or none at all).
BOOTSTRAP = """\
#!/bin/bash
set -euo pipefail

# Initialization - load function handler
source $LAMBDA_TASK_ROOT/"$(echo $_HANDLER | cut -d. -f1).sh"

# Processing
while true
do
  HEADERS="$(mktemp)"
  # Get an event. The HTTP request will block until one is received
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")

  # Extract request ID by scraping response headers received above
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)

  # Run the handler function from the script
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA" "$HEADERS" "$REQUEST_ID")

  # Send the response
  if [ -n "$RESPONSE" ]; then
    curl -sS \\
      "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" \\
      -d "$RESPONSE"
  fi
done
"""

FUNCTION_SH = """\
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"

function code () {
  curl -s -o /dev/null -w '%{http_code}' "$@"
}

function handler () {
  EVENT_DATA=$1
  HEADERS=$2
  REQUEST_ID=$3
  echo "got $REQUEST_ID" 1>&2
  case "$EVENT_DATA" in
    *'/error"'*)
      curl -sS "$API/invocation/$REQUEST_ID/error" \\
        -H "Lambda-Runtime-Function-Error-Type: Runtime.ShellError" \\
        -d '{"errorMessage": "shell says no", "errorType": "ShellError", "stackTrace": ["l1"]}' \\
        > /dev/null
      return;;
    *'/header-error"'*)
      curl -sS "$API/invocation/$REQUEST_ID/error" \\
        -H "Lambda-Runtime-Function-Error-Type: Runtime.HeaderOnly" -d 'not json' > /dev/null
      return;;
    *'/sleep"'*)
      sleep 30;;
    *'/exit"'*)
      exit 3;;
    *'/skip"'*)
      return;;
    *'/nap"'*)
      sleep 0.3
      echo "rested $REQUEST_ID"
      return;;
    *'/noerrtype"'*)
      curl -sS -X POST "$API/invocation/$REQUEST_ID/error" -d 'plain words' > /dev/null
      return;;
    *'/big"'*)
      BIG=$({ printf '"'; head -c 6500000 /dev/zero | tr '\\0' 'a'; printf '"'; } \\
        | code -X POST "$API/invocation/$REQUEST_ID/response" --data-binary @-)
      echo "BIG $BIG" 1>&2
      return;;
    *'/proxy"'*)
      printf '{"statusCode": 201, "headers": {"x-from": "%s"}, "body": "made"}' "$_HANDLER"
      return;;
    *'/proto"'*)
      BOGUS=$(code -X POST "$API/invocation/not-the-request/response" -d '{}')
      METHOD=$(code -X GET "$API/invocation/$REQUEST_ID/response")
      NOPATH=$(code -X POST "$API/invocation/$REQUEST_ID/nope" -d '{}')
      FIRST=$(code -X POST "$API/invocation/$REQUEST_ID/response" \\
        -d "{\\"bogus\\": $BOGUS, \\"method\\": $METHOD, \\"nopath\\": $NOPATH}")
      SECOND=$(code -X POST "$API/invocation/$REQUEST_ID/response" -d '{"second": true}')
      echo "FIRST $FIRST SECOND $SECOND" 1>&2
      return;;
    *'/headers"'*)
      printf '{"headers": "%s", "color": "%s", "handler": "%s", "fn": "%s", "root": "%s",' \\
        "$(tr -d '\\r' < "$HEADERS" | grep -i '^lambda-runtime' | tr '\\n' ';')" \\
        "$COLOR" "$_HANDLER" "$AWS_LAMBDA_FUNCTION_NAME" "$LAMBDA_TASK_ROOT"
      printf ' "pwd": "%s", "version": "%s", "memory": "%s"}' \\
        "$PWD" "$AWS_LAMBDA_FUNCTION_VERSION" "$AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
      return;;
  esac
  echo "Echoing request: '$EVENT_DATA'"
}
"""

SAM_TEMPLATE = """\
AWSTemplateFormatVersion: '2010-09-09'
Transform: AWS::Serverless-2016-10-31
Globals:
  Function:
    Timeout: 3
Resources:
  ShellFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: runtime/
      Handler: function.handler
      Runtime: provided.al2023
      Architectures: [x86_64]
      Environment:
        Variables:
          COLOR: green
      Events:
        Http:
          Type: HttpApi
          Properties:
            Path: /sam-rt/{what+}
            Method: any
        Rest:
          Type: Api
          Properties:
            Path: /sam-rest/{what+}
            Method: any
"""

INIT_ERROR_BOOTSTRAP = """\
#!/bin/sh
curl -sS -X POST "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/init/error" \\
  -H "Lambda-Runtime-Function-Error-Type: Runtime.ConfigError" \\
  -d '{"errorMessage": "DATABASE_URL is not set", "errorType": "ConfigError"}'
sleep 30
"""

EXIT_BOOTSTRAP = """\
#!/bin/sh
echo "cannot start: missing config" >&2
exit 1
"""


def one_function_app(root: Path, name: str, bootstrap: str) -> Path:
    app = root / name
    app.mkdir()
    (app / "app.yaml").write_text(
        f"name: {name}\nfunctions:\n  {name}:\n    runtime: provided.al2023\n"
        f"    handler: x.y\n    http: [{{method: GET, path: /{name}}}]\n")
    (app / "bootstrap").write_text(bootstrap)
    (app / "bootstrap").chmod(0o755)
    return app


def cli(n: Nimbus, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "nimbus.cli.main", *args, "--state-dir", str(n.state)],
        capture_output=True, text=True, timeout=120, cwd=n.state.parent, env=env,
        stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("reader-rt")
    app = root / "rt"
    app.mkdir()
    for rel, text in (("app.yaml", MANIFEST), ("pyfuncs.py", PYFUNCS),
                      ("bootstrap", BOOTSTRAP), ("function.sh", FUNCTION_SH)):
        (app / rel).write_text(text)
    (app / "bootstrap").chmod(0o755)
    sam = root / "samrt"
    (sam / "runtime").mkdir(parents=True)
    (sam / "template.yaml").write_text(SAM_TEMPLATE)
    (sam / "runtime" / "bootstrap").write_text(BOOTSTRAP)
    (sam / "runtime" / "bootstrap").chmod(0o755)
    (sam / "runtime" / "function.sh").write_text(FUNCTION_SH)
    n = Nimbus(app, root / "state", root / "state.out", "--trace", "file")
    try:
        yield {"n": n, "root": root, "sam": sam}
    finally:
        n.stop()


def runtime_headers(raw: str) -> dict[str, str]:
    """The Lambda-Runtime-* headers the bootstrap saw, joined with ';'."""
    headers = {}
    for i, part in enumerate(raw.rstrip(";").split(";Lambda-Runtime-")):
        name, value = (part if i == 0 else "Lambda-Runtime-" + part).split(": ", 1)
        headers[name.lower()] = value
    return headers


def test_the_tutorial_bootstrap_echoes_the_event(rt: dict[str, Any]) -> None:
    r = rt["n"].http.get("/rt/hello", params={"q": "1"})
    assert r.status_code == 200, r.text
    text = r.json()
    assert isinstance(text, str) and text.startswith("Echoing request: '"), text
    event = json.loads(text[len("Echoing request: '"):-1])
    assert (event["version"], event["rawPath"], event["rawQueryString"]) == \
        ("2.0", "/rt/hello", "q=1")
    assert event["pathParameters"] == {"what": "hello"}


def test_the_invocation_headers_and_environment_are_lambdas(rt: dict[str, Any]) -> None:
    n = rt["n"]
    t0 = time.time() * 1000
    r = n.http.get("/rt/headers", headers={"traceparent": TRACEPARENT})
    t1 = time.time() * 1000
    assert r.status_code == 200, r.text
    body = r.json()
    headers = runtime_headers(body.pop("headers"))
    assert headers["lambda-runtime-aws-request-id"] == r.headers["x-nimbus-request-id"]
    deadline = int(headers["lambda-runtime-deadline-ms"])
    assert t0 + 500 < deadline <= t1 + 1000 + 50, "now + timeout_s (1 s), in Unix ms"
    py_arn = n.http.get("/py/arn").json()["arn"]
    assert headers["lambda-runtime-invoked-function-arn"] == py_arn.replace(
        ":function:pyarn", ":function:shell"), "the same ARN a Python handler's context has"
    trace = headers["lambda-runtime-trace-id"]
    assert trace.startswith("Root=1-0af76519-16cd43dd8448eb211c80319c;"), trace
    assert body == {"color": "blue", "handler": "function.handler", "fn": "shell",
                    "root": body["root"], "pwd": body["root"], "version": "1",
                    "memory": "128"}


def test_an_error_posted_by_the_runtime_has_the_documented_shape(rt: dict[str, Any]) -> None:
    n = rt["n"]
    r = n.http.get("/rt/error")
    assert r.status_code == 500, r.text
    rid = r.headers["x-nimbus-request-id"]
    assert r.json() == {"errorMessage": "shell says no", "errorType": "ShellError",
                        "requestId": rid}
    r = n.http.get("/rt/header-error")
    assert r.status_code == 500, r.text
    assert r.json()["errorType"] == "Runtime.HeaderOnly", "no type in the body: the header's"
    py = n.http.get("/py/boom")
    assert py.status_code == 500 and set(py.json()) == set(r.json()), "a Python error's shape"


def test_an_error_without_a_type_is_unhandled(rt: dict[str, Any]) -> None:
    r = rt["n"].http.get("/rt/noerrtype")
    assert r.status_code == 500, r.text
    assert (r.json()["errorType"], r.json()["errorMessage"]) == ("Unhandled", "plain words")


def test_a_response_over_6_mb_is_refused_and_the_invocation_fails(rt: dict[str, Any]) -> None:
    n = rt["n"]
    t0 = time.monotonic()
    r = n.http.get("/big/big")
    print(f"the 6.5 MB answer took {time.monotonic() - t0:.2f} s")
    assert r.status_code == 500, r.text[:300]
    assert r.json()["errorType"] == "Function.ResponseSizeTooLarge", r.text[:300]
    logs = cli(n, "logs", "big", "--request-id", r.headers["x-nimbus-request-id"]).stdout
    assert "BIG 413" in logs, logs


def lambda_client(n: Nimbus) -> Any:
    boto3 = pytest.importorskip("boto3")
    creds = dict(line.removeprefix("export ").split("=", 1)
                 for line in cli(n, "aws-credentials").stdout.splitlines()
                 if line.startswith("export "))
    return boto3.client("lambda", endpoint_url=creds["AWS_ENDPOINT_URL_LAMBDA"],
                        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                        region_name="us-east-1")


def test_boto3_invokes_a_custom_runtime(rt: dict[str, Any]) -> None:
    lam = lambda_client(rt["n"])
    ok = lam.invoke(FunctionName="shell", Payload=json.dumps({"n": [1, 2]}))
    assert (ok["StatusCode"], ok.get("FunctionError")) == (200, None)
    assert json.loads(ok["Payload"].read()) == "Echoing request: '{\"n\":[1,2]}'"
    bad = lam.invoke(FunctionName="shell", Payload=json.dumps({"path": "/error"}))
    assert (bad["StatusCode"], bad.get("FunctionError")) == (200, "Unhandled")
    payload = json.loads(bad["Payload"].read())
    assert (payload["errorMessage"], payload["errorType"]) == ("shell says no", "ShellError")


def test_boto3_invoke_returns_the_stack_trace_the_runtime_posted(rt: dict[str, Any]) -> None:
    lam = lambda_client(rt["n"])
    bad = lam.invoke(FunctionName="shell", Payload=json.dumps({"path": "/error"}))
    assert json.loads(bad["Payload"].read())["stackTrace"] == ["l1"]


def test_a_slow_bootstrap_times_out_as_a_python_handler_does(rt: dict[str, Any]) -> None:
    n = rt["n"]
    with ThreadPoolExecutor(2) as pool:
        shell, py = pool.map(lambda p: httpx.get(n.url + p, timeout=30), ["/rt/sleep",
                                                                          "/py/slow"])
    assert (shell.status_code, py.status_code) == (504, 504), (shell.text, py.text)
    s, p = shell.json(), py.json()
    assert (s["errorType"], s["errorMessage"]) == (p["errorType"], p["errorMessage"])
    assert s["errorMessage"].startswith("Task timed out after 1"), s
    again = n.http.get("/rt/again")
    assert again.status_code == 200, "the instance was replaced"

    def sleepers() -> list[int]:
        found = []
        for pid in n.descendants():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:2] == [b"sleep", b"30"]:
                        found.append(pid)
            except OSError:
                pass
        return found
    deadline = time.monotonic() + 5
    while sleepers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sleepers() == [], "the bootstrap's children die with it"
    logs = cli(n, "logs", "shell", "--request-id", shell.headers["x-nimbus-request-id"])
    assert "Task timed out after" in logs.stdout, logs.stdout + logs.stderr


def test_a_bootstrap_that_exits_mid_invocation_is_an_exit_error(rt: dict[str, Any]) -> None:
    n = rt["n"]
    r = n.http.get("/rt/exit")
    assert r.status_code == 500, r.text
    assert r.json()["errorType"] == "Runtime.ExitError"
    assert n.http.get("/rt/after-exit").status_code == 200


def test_asking_for_the_next_event_without_answering_is_no_response(
        rt: dict[str, Any]) -> None:
    r = rt["n"].http.get("/rt/skip")
    assert r.status_code == 500, r.text
    assert r.json()["errorType"] == "Runtime.NoResponse"
    assert rt["n"].http.get("/rt/after-skip").status_code == 200


def test_concurrent_requests_each_get_their_own_answer(rt: dict[str, Any]) -> None:
    n = rt["n"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.get(n.url + "/rt/nap", timeout=30), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert [a.json() for a in answers] == [
        f"rested {a.headers['x-nimbus-request-id']}" for a in answers]


def test_the_runtime_api_refuses_bad_requests_as_documented(rt: dict[str, Any]) -> None:
    n = rt["n"]
    r = n.http.get("/rt/proto")
    assert r.status_code == 200, r.text
    assert r.json() == {"bogus": 400, "method": 405, "nopath": 404}

    def logged() -> str:
        p = cli(n, "logs", "shell", "--tail", "500")
        return next((ln for ln in p.stdout.splitlines() if "FIRST" in ln), "")
    line = ""
    deadline = time.monotonic() + 30  # the line comes after the answer: a busy machine
    while not line and time.monotonic() < deadline:
        line = logged()
        time.sleep(0.2)
    assert line.rstrip().endswith("FIRST 202 SECOND 400"), \
        f"a second answer to the same invocation is not the invocation in flight: {line!r}"


def test_a_runtime_that_posts_init_error_fails_its_deploy(rt: dict[str, Any]) -> None:
    n = rt["n"]
    app = one_function_app(rt["root"], "initerr", INIT_ERROR_BOOTSTRAP)
    p = cli(n, "deploy", str(app))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "nimbus: error: function initerr: custom runtime failed to start: "
        "ConfigError: DATABASE_URL is not set"), p.stderr
    assert n.http.get("/initerr").status_code == 404, "nothing of the failed deploy serves"


def test_a_runtime_that_exits_at_start_fails_its_deploy(rt: dict[str, Any]) -> None:
    n = rt["n"]
    app = one_function_app(rt["root"], "quits", EXIT_BOOTSTRAP)
    p = cli(n, "deploy", str(app))
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("nimbus: error: function quits: custom runtime failed to start: "
                           "Runtime.ExitError: bootstrap exited with status 1"), p.stderr
    # the log file is written every 100 ms: a few reads, within 5 s
    deadline = time.monotonic() + 5
    while True:
        logs = cli(n, "logs", "quits", "--tail", "20").stdout
        if "cannot start: missing config" in logs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "cannot start: missing config" in logs, "what the bootstrap wrote is in its logs"


def test_a_sam_template_with_a_provided_al2023_function_serves(rt: dict[str, Any]) -> None:
    n = rt["n"]
    p = cli(n, "deploy", str(rt["sam"]))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "deployed samrt/ShellFunction: version 1" in p.stdout
    r = n.http.post("/sam-rt/hello", content=b"hi")
    assert r.status_code == 200, r.text
    event = json.loads(r.json()[len("Echoing request: '"):-1])
    assert (event["version"], event["routeKey"], event["body"]) == \
        ("2.0", "ANY /sam-rt/{what+}", "hi"), "an HttpApi event"
    t0 = time.time() * 1000
    h = n.http.get("/sam-rt/headers")
    t1 = time.time() * 1000
    assert h.status_code == 200, h.text
    body = h.json()
    deadline = int(runtime_headers(body["headers"])["lambda-runtime-deadline-ms"])
    assert t0 + 2500 < deadline <= t1 + 3000, "Globals.Function.Timeout: 3"
    assert (body["color"], body["handler"], body["fn"]) == \
        ("green", "function.handler", "ShellFunction")
    assert body["root"].endswith("/runtime") and body["pwd"] == body["root"], "CodeUri"
    rest = n.http.put("/sam-rest/proxy")
    assert (rest.status_code, rest.headers.get("x-from"), rest.text) == \
        (201, "function.handler", "made"), "an Api event's proxy response"
    e = n.http.get("/sam-rest/error")
    assert e.status_code == 502 and e.json() == {"message": "Internal server error"}, \
        "an error on a REST route is API Gateway's 502"
    bare = n.http.get("/sam-rest/hello")
    assert bare.status_code == 502, "a bare string is a malformed REST proxy response"
