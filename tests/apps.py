"""Test apps written into temporary folders."""

from __future__ import annotations

import base64
import hashlib
import textwrap
import zipfile
from pathlib import Path

KITCHEN_MANIFEST = """\
name: kitchen
functions:
  echo:
    handler: handlers.echo
    http:
      - {method: GET, path: /echo}
      - {method: POST, path: /echo}
      - {method: GET, path: /users/{id}}
      - {method: ANY, path: /files/{key+}}
  boom:
    handler: handlers.boom
    http: [{method: GET, path: /boom}]
  slow:
    handler: handlers.slow
    timeout_s: 1
    http: [{method: GET, path: /slow}]
  die:
    handler: handlers.die
    http: [{method: GET, path: /die}]
  printer:
    handler: handlers.printer
    http: [{method: GET, path: /print}]
  hog:
    handler: handlers.hog
    memory_mb: 64
    http: [{method: GET, path: /hog}]
  ctx:
    handler: handlers.ctx
    memory_mb: 256
    env: {GREETING: hi}
    http: [{method: GET, path: /ctx}]
  nap:
    handler: handlers.nap
    timeout_s: 10
    http: [{method: GET, path: /nap}]
  plain:
    handler: handlers.plain
  badb64:
    handler: handlers.badb64
    http: [{method: GET, path: /badb64}]
"""

KITCHEN_HANDLERS = '''\
import base64, os, sys, time

def echo(event, context):
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": __import__("json").dumps(event)}

def boom(event, context):
    raise ValueError("kaboom")

def slow(event, context):
    time.sleep(30)

def die(event, context):
    os._exit(7)

def printer(event, context):
    print("hello from", context.aws_request_id)
    print("to stderr", file=sys.stderr)
    return {"statusCode": 200, "body": context.aws_request_id}

def hog(event, context):
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(8 * 1024 * 1024))
    return {"statusCode": 200, "body": "survived"}

def ctx(event, context):
    return {
        "aws_request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "invoked_function_arn": context.invoked_function_arn,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining": context.get_remaining_time_in_millis(),
        "env": {k: os.environ.get(k) for k in (
            "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "LAMBDA_TASK_ROOT",
            "GREETING", "_HANDLER")},
        "tmp_writable": _write_tmp(),
        "cwd": os.getcwd(),
    }

def _write_tmp():
    import tempfile
    with tempfile.NamedTemporaryFile(dir=os.environ["TMPDIR"]) as f:
        f.write(b"x")
    return True

def nap(event, context):
    time.sleep(float((event.get("queryStringParameters") or {}).get("s", "1")))
    return {"statusCode": 200, "body": "rested"}

def plain(event, context):
    return {"got": event}

def badb64(event, context):
    return {"statusCode": 200, "body": "not base64!", "isBase64Encoded": True}
'''


def write_kitchen(root: Path) -> Path:
    app = root / "kitchen"
    app.mkdir()
    (app / "app.yaml").write_text(KITCHEN_MANIFEST)
    (app / "handlers.py").write_text(KITCHEN_HANDLERS)
    return app


def write_seed(root: Path, body: str = "Hello, World!") -> Path:
    app = root / "hello"
    app.mkdir()
    (app / "app.yaml").write_text(textwrap.dedent("""\
        runtime: python3.8
        handlers:
          - function: hello
            event: http
            method: get
        """))
    (app / "hello.py").write_text(
        f"def hello(event, context):\n    return {{'statusCode': 200, 'body': {body!r}}}\n")
    return app


def make_wheel(dest: Path, name: str = "nimbusdemo", version: str = "1.0",
               code: str = "VALUE = 'from the wheel'\n") -> Path:
    """A minimal pure-Python wheel, built by hand so no network is needed."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": code.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: nimbus-tests\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


# Custom runtimes (runtime: provided.al2023): a shell bootstrap that uses curl
# as AWS's custom-runtime tutorial does, and awslambdaric running a Python
# handler (two apps: each runtime's code folder holds its own bootstrap).
# RIC_MANIFEST takes the Python that has awslambdaric installed.
SHELL_MANIFEST = """\
name: custom
functions:
  shell:
    runtime: provided.al2023
    handler: function.handler
    timeout_s: 1
    http: [{method: ANY, path: "/sh/{what+}"}]
"""

RIC_MANIFEST = """\
name: ric
runtime: provided.al2023
functions:
  ric:
    handler: app.handler
    memory_mb: 128
    env: {{RIC_PYTHON: "{python}"}}
    http: [{{method: ANY, path: "/ric/{{what+}}"}}]
"""

# The tutorial's loop, plus a route that posts an error instead of a response.
SHELL_BOOTSTRAP = """\
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

  if [[ "$EVENT_DATA" == *'"rawPath":"/sh/error"'* ]]; then
    curl -sS "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/error" \\
      -H "Lambda-Runtime-Function-Error-Type: Unhandled" \\
      -d '{"errorMessage": "shell says no", "errorType": "ShellError", "stackTrace": []}'
    continue
  fi

  # Run the handler function from the script
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA" "$HEADERS")

  # Send the response
  curl -sS "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" \\
    -d "$RESPONSE"
done
"""

SHELL_FUNCTION = """\
function handler () {
  EVENT_DATA=$1
  echo "$EVENT_DATA" 1>&2;
  if [[ "$EVENT_DATA" == *'"rawPath":"/sh/sleep"'* ]]; then
    sleep 30.123
  fi
  if [[ "$EVENT_DATA" == *'"rawPath":"/sh/env"'* ]]; then
    ARN=$(grep -Fi Lambda-Runtime-Invoked-Function-Arn "$2" | tr -d '[:space:]' | cut -d: -f2-)
    DEADLINE=$(grep -Fi Lambda-Runtime-Deadline-Ms "$2" | tr -d '[:space:]' | cut -d: -f2)
    echo "$AWS_LAMBDA_FUNCTION_NAME $_HANDLER $LAMBDA_TASK_ROOT $PWD" \\
      "$AWS_LAMBDA_FUNCTION_MEMORY_SIZE $AWS_LAMBDA_FUNCTION_VERSION $ARN $DEADLINE"
    return
  fi
  RESPONSE="Echoing request: '$EVENT_DATA'"
  echo $RESPONSE
}
"""

RIC_BOOTSTRAP = """\
#!/bin/sh
exec "$RIC_PYTHON" -m awslambdaric "$_HANDLER"
"""

RIC_HANDLER = '''\
import os

def handler(event, context):
    print("hello from", context.aws_request_id)
    if event["rawPath"] == "/ric/boom":
        raise ValueError("kaboom")
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": __import__("json").dumps({
                "request_id": context.aws_request_id, "function": context.function_name,
                "arn": context.invoked_function_arn, "cwd": os.getcwd(),
                "remaining_ms": context.get_remaining_time_in_millis()})}
'''


def write_custom_runtimes(root: Path, python: str) -> tuple[Path, Path]:
    """The shell runtime's app and awslambdaric's (``python`` runs it)."""
    shell, ric = root / "custom", root / "ric"
    shell.mkdir()
    ric.mkdir()
    for path, text in ((shell / "app.yaml", SHELL_MANIFEST),
                       (shell / "bootstrap", SHELL_BOOTSTRAP),
                       (shell / "function.sh", SHELL_FUNCTION),
                       (ric / "app.yaml", RIC_MANIFEST.format(python=python)),
                       (ric / "bootstrap", RIC_BOOTSTRAP), (ric / "app.py", RIC_HANDLER)):
        path.write_text(text)
    (shell / "bootstrap").chmod(0o755)
    (ric / "bootstrap").chmod(0o755)
    return shell, ric
