"""Async invocations: the enqueue rate alone, and end to end.

    python bench/async_events.py [--seconds 10] [--connections 32]

Side by side, same machine, same no-op handler:

1. baseline: bare uvicorn (Starlette), sync requests;
2. nimbus sync: the same handler through the gateway;
3. enqueue alone: ``X-Nimbus-Invocation-Type: Event`` requests to a
   function whose one instance is busy for the whole run (its consumer
   holds one message, so the figure is accept + durable write + 202);
4. end to end: async requests to a no-op function for ``--seconds``
   (accept -> queue -> dispatch -> run -> record), then the time until
   every accepted invocation is recorded succeeded. Reported: accepted/s,
   and completed/s over the whole span (first accept to last record).
   Goal (issue 4): >= 5,000 invocations/s end to end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import baseline_up, nimbus_up, wrk  # noqa: E402

APP = """\
name: asyncbench
functions:
  hello:
    handler: h.hello
    http: {method: POST, path: /hello}
    max_instances: 2
    retries: 0
  blocked:
    handler: h.blocked
    http: {method: POST, path: /blocked}
    max_instances: 1
    timeout_s: 900
"""

HANDLERS = """\
import time

def hello(event, context):
    return {"statusCode": 200, "body": "Hello, World!"}

def blocked(event, context):
    if event.get("body") == "block":
        time.sleep(600)
    return {"statusCode": 200, "body": "ok"}
"""

ASYNC_LUA = """\
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Nimbus-Invocation-Type"] = "Event"
"""

SYNC_LUA = """\
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
"""


def control(state: Path) -> httpx.Client:
    info = orjson.loads((state / "control.json").read_bytes())
    token = (state / "token").read_text().strip()
    return httpx.Client(base_url=info["control_url"], timeout=30.0,
                        headers={"authorization": f"Bearer {token}"})


def succeeded(ctl: httpx.Client, fn: str) -> dict[str, int]:
    for f in ctl.get("/v1/status").json()["functions"]:
        if f["name"] == fn:
            return f["async"]  # type: ignore[no-any-return]
    raise SystemExit(f"{fn} is not deployed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    secs, conns = args.seconds, args.connections

    with baseline_up() as base:
        b = wrk(base + "/hello", conns, secs)
    print(f"baseline uvicorn sync     {b['rps']:9.0f} req/s  p50 {b['p50_ms']:.2f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "asyncbench"
        app.mkdir()
        (app / "app.yaml").write_text(APP)
        (app / "h.py").write_text(HANDLERS)
        with nimbus_up(app, "/_nimbus/health", "--async-max-bytes", "65536") as (url, state, _):
            s = wrk(url + "/hello", conns, secs, SYNC_LUA)
            print(f"nimbus sync               {s['rps']:9.0f} req/s  p50 {s['p50_ms']:.2f} ms"
                  f"  ({s['rps'] / b['rps']:.2f}x baseline)")
            with control(state) as ctl:
                # Occupy 'blocked': its consumer then holds one message and
                # leaves the rest queued, so only accepting is measured.
                ctl.post("/v1/functions/blocked/invoke", content=b'{"body": "block"}',
                         headers={"X-Nimbus-Invocation-Type": "Event"})
                time.sleep(0.5)
                e = wrk(url + "/blocked", conns, secs, ASYNC_LUA)
                print(f"enqueue alone (202)       {e['rps']:9.0f} req/s  p50 {e['p50_ms']:.2f} ms"
                      f"  ({e['rps'] / b['rps']:.2f}x baseline, {e['errors']:.0f} errors)")

                t0 = time.monotonic()
                a = wrk(url + "/hello", conns, secs, ASYNC_LUA)
                accepted = int(a["requests"] - a["errors"])
                deadline = time.monotonic() + 300
                while (done := succeeded(ctl, "hello"))["succeeded"] < accepted:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"only {done} of {accepted} finished in 300 s")
                    time.sleep(0.05)
                span = time.monotonic() - t0
                print(f"end to end accepted       {a['rps']:9.0f} req/s  p50 {a['p50_ms']:.2f} ms"
                      f"  ({a['errors']:.0f} errors)")
                rate = done["succeeded"] / span
                print(f"end to end completed      {rate:9.0f} inv/s  ({done['succeeded']} in "
                      f"{span:.1f} s; {rate / b['rps']:.2f}x baseline sync; goal 5000)")


if __name__ == "__main__":
    main()
