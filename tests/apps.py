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
