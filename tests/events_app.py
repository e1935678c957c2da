"""An app that exercises async invocations, queues, topics, destinations and
schedules. Handlers leave evidence as files in $OUT (one file per event or
attempt), which the tests read."""

from __future__ import annotations

from pathlib import Path

MANIFEST = """\
name: events
functions:
  echo:
    handler: h.echo
    http: {{method: POST, path: /echo}}
    env: {{OUT: {out}}}
    destinations:
      on_success: {{queue: done}}
  flaky:
    handler: h.flaky
    env: {{OUT: {out}}}
    retries: 2
    retry_delay_s: 0.05
  doomed:
    handler: h.doomed
    env: {{OUT: {out}}}
    retries: 1
    retry_delay_s: 0.05
    destinations:
      on_failure: {{function: audit}}
  audit:
    handler: h.audit
    env: {{OUT: {out}}}
  collector:
    handler: h.collector
    env: {{OUT: {out}}}
    queue: done
  orders:
    handler: h.orders
    env: {{OUT: {out}}}
    retries: 1
    retry_delay_s: 0.05
    queue: {{name: orders, batch_size: 5, max_batching_window_s: 0.3}}
  sub_a:
    handler: h.sub
    env: {{OUT: {out}, WHO: a}}
    topic: signups
  sub_b:
    handler: h.sub
    env: {{OUT: {out}, WHO: b}}
    topic: [signups, other]
  ticker:
    handler: h.ticker
    env: {{OUT: {out}}}
    schedule:
      expression: rate(1 second)
      input: {{hello: world}}
  slowpoke:
    handler: h.slowpoke
    http: {{method: POST, path: /slow}}
    max_instances: 1
    max_queue: 0
    timeout_s: 5
"""

HANDLERS = '''\
import json, os, time, uuid

OUT = os.environ.get("OUT", "/tmp")


def _note(kind, data):
    path = os.path.join(OUT, f"{kind}-{uuid.uuid4().hex}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)


def echo(event, context):
    _note("echo", {"rid": context.aws_request_id, "event": event})
    return {"echoed": event.get("body", event)}


def flaky(event, context):
    # fails the first event["fail"] tries of this event (counted in files)
    _note("flaky-" + event["key"], {"rid": context.aws_request_id})
    tries = len([n for n in os.listdir(OUT) if n.startswith("flaky-" + event["key"] + "-")])
    if tries <= event["fail"]:
        raise RuntimeError(f"try {tries} fails")
    return {"tries": tries}


def doomed(event, context):
    _note("doomed", {"rid": context.aws_request_id})
    raise ValueError("never works")


def audit(event, context):
    _note("audit", event)


def collector(event, context):
    for r in event["Records"]:
        _note("collected", json.loads(r["body"]))


def orders(event, context):
    _note("batch", {"ids": [r["messageId"] for r in event["Records"]],
                    "bodies": [r["body"] for r in event["Records"]]})
    return {"batchItemFailures": [{"itemIdentifier": r["messageId"]}
                                  for r in event["Records"] if r["body"] == "bad"]}


def sub(event, context):
    _note("sub-" + os.environ["WHO"], event)


def ticker(event, context):
    _note("tick", event)


def slowpoke(event, context):
    time.sleep(float(json.loads(event.get("body") or "{}").get("sleep", 0)))
    return {"ok": True}
'''


def write_events_app(root: Path, out: Path) -> Path:
    app = root / "events"
    app.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (app / "app.yaml").write_text(MANIFEST.format(out=out))
    (app / "h.py").write_text(HANDLERS)
    return app
