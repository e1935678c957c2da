"""``nimbus init [--template hello|api|queue|schedule] NAME``: a new app folder
that works as written: the manifest, a handler module, its pytest test (the
handler called with the event nimbus sends it) and a short README."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from nimbus.cli.main import cli, fail
from nimbus.manifest.schema import sanitise_app_name

TEMPLATES = ("hello", "api", "queue", "schedule")

# --- the test's stand-in for Lambda's context (the same in every template) ---

CONTEXT = '''\
class Context:
    """What a handler may read from Lambda's context object."""

    function_name = "{function}"
    function_version = "1"
    memory_limit_in_mb = 128
    aws_request_id = "test-request-id"
    invoked_function_arn = "arn:aws:lambda:local:000000000000:function:{function}"

    def get_remaining_time_in_millis(self):
        return 3000
'''

# --- hello --------------------------------------------------------------------

HELLO_YAML = """\
name: {app}
functions:
  hello:
    handler: hello.handler
    http: [{{method: GET, path: /hello}}]
"""

HELLO_PY = '''\
"""GET /hello: the smallest HTTP function (an API Gateway HTTP API payload 2.0 event in)."""


def handler(event, context):
    params = event.get("queryStringParameters") or {}
    name = params.get("name", "World")
    return {
        "statusCode": 200,
        "headers": {"content-type": "text/plain; charset=utf-8"},
        "body": f"Hello, {name}!",
    }
'''

HELLO_TEST = '''\
from hello import handler

{context}

def event(query=None):
    """An HTTP API (payload 2.0) event as nimbus sends it for GET /hello."""
    return {{
        "version": "2.0",
        "routeKey": "GET /hello",
        "rawPath": "/hello",
        "rawQueryString": "&".join(f"{{k}}={{v}}" for k, v in (query or {{}}).items()),
        "headers": {{"host": "127.0.0.1:8080", "user-agent": "curl/8.5.0"}},
        **({{"queryStringParameters": query}} if query else {{}}),
        "requestContext": {{
            "http": {{"method": "GET", "path": "/hello", "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "curl/8.5.0"}},
            "routeKey": "GET /hello",
            "stage": "$default",
        }},
        "isBase64Encoded": False,
    }}


def test_hello_world():
    result = handler(event(), Context())
    assert result["statusCode"] == 200
    assert result["body"] == "Hello, World!"


def test_hello_by_name():
    assert handler(event({{"name": "Ada"}}), Context())["body"] == "Hello, Ada!"
'''

HELLO_RUN = """\
curl http://127.0.0.1:8080/hello              # Hello, World!
curl 'http://127.0.0.1:8080/hello?name=Ada'   # Hello, Ada!"""

# --- api ------------------------------------------------------------------------

API_YAML = """\
name: {app}
functions:
  get_item:
    handler: api.get_item
    http: [{{method: GET, path: /items/{{id}}}}]
  create_item:
    handler: api.create_item
    http: [{{method: POST, path: /items}}]
"""

API_PY = '''\
"""A JSON API: GET /items/{id} and POST /items (API Gateway HTTP API payload 2.0 events)."""

import base64
import json


def _json(status, data):
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(data),
    }


def get_item(event, context):
    item_id = event["pathParameters"]["id"]
    if not item_id.isdigit():
        return _json(400, {"error": f"item id must be a number, got {item_id!r}"})
    return _json(200, {"id": int(item_id), "name": f"item {item_id}"})


def create_item(event, context):
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8")
    try:
        item = json.loads(body)
    except ValueError:
        return _json(400, {"error": "the body must be a JSON object"})
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return _json(400, {"error": "the body must be a JSON object with a 'name'"})
    return _json(201, {"created": item, "requestId": context.aws_request_id})
'''

API_TEST = '''\
import json

from api import create_item, get_item

{context}

def event(method, path, route, *, path_params=None, body=None):
    """An HTTP API (payload 2.0) event as nimbus sends it."""
    ev = {{
        "version": "2.0",
        "routeKey": f"{{method}} {{route}}",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {{"host": "127.0.0.1:8080", "content-type": "application/json"}},
        "requestContext": {{
            "http": {{"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "curl/8.5.0"}},
            "routeKey": f"{{method}} {{route}}",
            "stage": "$default",
        }},
        "isBase64Encoded": False,
    }}
    if path_params:
        ev["pathParameters"] = path_params
    if body is not None:
        ev["body"] = body
    return ev


def test_get_item_reads_the_path_parameter():
    result = get_item(event("GET", "/items/42", "/items/{{id}}", path_params={{"id": "42"}}),
                      Context())
    assert result["statusCode"] == 200
    assert json.loads(result["body"]) == {{"id": 42, "name": "item 42"}}


def test_get_item_refuses_a_bad_id():
    result = get_item(event("GET", "/items/x", "/items/{{id}}", path_params={{"id": "x"}}),
                      Context())
    assert result["statusCode"] == 400


def test_create_item():
    result = create_item(event("POST", "/items", "/items", body='{{"name": "lamp"}}'),
                         Context())
    assert result["statusCode"] == 201
    assert json.loads(result["body"]) == {{"created": {{"name": "lamp"}},
                                           "requestId": "test-request-id"}}


def test_create_item_refuses_a_body_that_is_not_json():
    assert create_item(event("POST", "/items", "/items", body="lamp"), Context())[
        "statusCode"] == 400
'''

API_RUN = """\
curl http://127.0.0.1:8080/items/42
curl -X POST http://127.0.0.1:8080/items -H 'content-type: application/json' \\
     -d '{"name": "lamp"}'"""

# --- queue ----------------------------------------------------------------------

QUEUE_YAML = """\
name: {app}
functions:
  jobs:
    handler: jobs.handler
    queue: {{name: jobs, batch_size: 10}}
"""

QUEUE_PY = '''\
"""Consumes the queue `jobs`: an SQS-shaped batch of messages per invocation.

A message it cannot handle is reported in ``batchItemFailures``: only those
are tried again (then kept as dead letters), the rest of the batch is done.
"""

import json


def handler(event, context):
    failures = []
    for record in event["Records"]:
        try:
            job = json.loads(record["body"])
            print(f"job {record['messageId']}: {job['task']}")
        except (ValueError, TypeError, KeyError):
            failures.append({"itemIdentifier": record["messageId"]})
    return {"batchItemFailures": failures}
'''

QUEUE_TEST = '''\
from jobs import handler

{context}

def record(message_id, body):
    """One message as nimbus hands it over: an SQS record."""
    return {{
        "messageId": message_id,
        "receiptHandle": f"{{message_id}}:1",
        "body": body,
        "attributes": {{
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1767225600000",
            "SenderId": "000000000000",
            "ApproximateFirstReceiveTimestamp": "1767225600100",
        }},
        "messageAttributes": {{}},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:local:000000000000:jobs",
        "awsRegion": "local",
    }}


def test_a_good_batch_has_no_failures():
    event = {{"Records": [record("m1", '{{"task": "resize"}}'),
                         record("m2", '{{"task": "mail"}}')]}}
    assert handler(event, Context()) == {{"batchItemFailures": []}}


def test_only_the_bad_message_is_reported():
    event = {{"Records": [record("m1", '{{"task": "resize"}}'), record("m2", "not json")]}}
    assert handler(event, Context()) == {{"batchItemFailures": [{{"itemIdentifier": "m2"}}]}}
'''

QUEUE_RUN = """\
nimbus publish jobs --data '{"task": "resize"}'
nimbus logs jobs      # job ...: resize"""

# --- schedule -------------------------------------------------------------------

SCHEDULE_YAML = """\
name: {app}
functions:
  tick:
    handler: tick.handler
    schedule: {{expression: rate(5 minutes), input: {{task: cleanup}}}}
"""

SCHEDULE_PY = '''\
"""Runs every 5 minutes: an EventBridge "Scheduled Event" per tick, the
schedule's `input` as its `detail`."""


def handler(event, context):
    task = event["detail"].get("task", "nothing")
    print(f"{event['time']}: running {task}")
    return {"task": task, "at": event["time"]}
'''

SCHEDULE_TEST = '''\
from tick import handler

{context}

def scheduled_event(detail):
    """One tick as nimbus sends it: an EventBridge Scheduled Event."""
    return {{
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": "2026-01-01T00:05:00Z",
        "region": "local",
        "resources": ["arn:aws:events:local:000000000000:rule/tick-0"],
        "detail": detail,
    }}


def test_a_tick_runs_the_task():
    result = handler(scheduled_event({{"task": "cleanup"}}), Context())
    assert result == {{"task": "cleanup", "at": "2026-01-01T00:05:00Z"}}


def test_a_tick_without_input():
    assert handler(scheduled_event({{}}), Context())["task"] == "nothing"
'''

SCHEDULE_RUN = """\
nimbus invoke tick --data '{"detail": {"task": "now"}, "time": "now"}'   # run it once, now
nimbus logs tick"""

README = """\
# {app}

A nimbus app made by `nimbus init --template {template}`: {what}.

- `app.yaml`: the manifest (functions, their triggers and limits)
- `{module}.py`: the handler code, plain Lambda-style functions `(event, context)`
- `test_{module}.py`: its test, calling the handler with the event nimbus sends

Run the tests (no server needed):

```sh
pytest
```

Serve it (gateway on :8080, control API on :8081), then in another shell:

```sh
nimbus up .
{run}
```

Deploy a change to the running nimbus with `nimbus deploy .`.
"""

# template -> (module, what it is, manifest, handler, test, first function, how to try it)
FILES: dict[str, tuple[str, str, str, str, str, str, str]] = {
    "hello": ("hello", "one HTTP function, GET /hello", HELLO_YAML, HELLO_PY, HELLO_TEST,
              "hello", HELLO_RUN),
    "api": ("api", "a JSON API, GET /items/{id} and POST /items", API_YAML, API_PY, API_TEST,
            "get_item", API_RUN),
    "queue": ("jobs", "a consumer of the queue `jobs`, reporting failed messages", QUEUE_YAML,
              QUEUE_PY, QUEUE_TEST, "jobs", QUEUE_RUN),
    "schedule": ("tick", "a function run every 5 minutes", SCHEDULE_YAML, SCHEDULE_PY,
                 SCHEDULE_TEST, "tick", SCHEDULE_RUN),
}


def render(template: str, app: str) -> dict[str, str]:
    """The files of a new app: relative name -> text."""
    module, what, manifest, code, test, function, run = FILES[template]
    return {
        # quoted: a name such as 123, true or 1e3 is a string, not a number
        "app.yaml": manifest.format(app=f'"{app}"'),
        f"{module}.py": code,
        f"test_{module}.py": test.format(context=CONTEXT.format(function=function)),
        "README.md": README.format(app=app, template=template, what=what, module=module,
                                   run=run),
    }


def init_app(folder: Path, template: str) -> str:
    """Write a new app into ``folder`` (made if missing); returns its app name.
    ValueError when ``folder`` is a file or a folder that is not empty."""
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder")
        if any(folder.iterdir()):
            raise ValueError(f"{folder} exists and is not empty; give a new folder name")
    app = sanitise_app_name(folder.resolve().name)
    files = render(template, app)
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (folder / rel).write_text(text)
    return app


@cli.command(name="init")
@click.argument("name", type=click.Path(path_type=Path))
@click.option("--template", "-t", type=click.Choice(TEMPLATES), default="hello",
              show_default=True, help="What the app starts as.")
def init_cmd(name: Path, template: str) -> None:
    """Make a new app in folder NAME: app.yaml, a handler, its pytest test and a README."""
    if not str(name).strip():
        fail("NAME must name a folder", 2)
    try:
        app = init_app(name, template)
    except ValueError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"cannot write {name}: {exc.strerror or exc}", 1)
    module = FILES[template][0]
    click.echo(f"created app {app!r} in {name} ({template}): app.yaml, {module}.py, "
               f"test_{module}.py, README.md")
    click.echo(f"next: cd {shlex.quote(str(name))} && pytest && nimbus up .")
