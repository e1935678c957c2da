"""Async invocations: the enqueue rate alone, and end to end.

    python bench/async_events.py [--seconds 10] [--connections 32]
                                 [--queue-only] [--nats-sync always|2m]

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
   Goal: >= 5,000 invocations/s end to end.

Then the queue path alone, side by side on both backends, in one process
(no HTTP, a no-op function with 64 slots): ``Events.submit`` from 256
concurrent callers for ``--seconds`` -> dispatcher -> run -> record, and
the time until every accepted invocation is recorded succeeded:

5. SQLite (the embedded queue of ``nimbus up``);
6. NATS: a local 3-server cluster, replicas 3, JetStream ``sync_interval``
   as given (``always``: every write is fsynced on every server before it
   is acknowledged). Goal: >= 2,000 invocations/s.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


class NoopPool:
    """What the dispatcher needs of a pool, running nothing: the queue path alone."""

    def __init__(self, cap: int) -> None:
        from nimbus.manifest.model import FunctionSpec
        from nimbus.worker.target import Target
        self.target = Target("bench", 1, FunctionSpec("hello", "h", "hello", retries=0,
                                                      max_instances=cap), "0" * 64, None)
        self.cap = cap

    async def invoke(self, rid: str, event: Any) -> Any:
        return {"statusCode": 200}


async def queue_path(queue: Any, seconds: float, callers: int = 256) -> tuple[float, float, int]:
    """(accepted/s, completed/s, completed) through ``Events`` over ``queue``."""
    from nimbus.clock import SystemClock
    from nimbus.events.service import Events
    events = Events(queue, SystemClock())
    events.sync({"hello": NoopPool(64)})  # type: ignore[dict-item]
    loop = asyncio.get_running_loop()
    accepted = 0
    t0 = loop.time()
    stop_at = t0 + seconds

    async def caller() -> None:
        nonlocal accepted
        while loop.time() < stop_at:
            await events.submit("hello", b"{}")
            accepted += 1
    await asyncio.gather(*(caller() for _ in range(callers)))
    accept_s = loop.time() - t0
    deadline = loop.time() + 300
    while (done := (await events.stats("hello"))["succeeded"]) < accepted:
        if loop.time() > deadline:
            raise SystemExit(f"only {done} of {accepted} finished in 300 s")
        await asyncio.sleep(0.05)
    span = loop.time() - t0
    await events.aclose()
    return accepted / accept_s, done / span, done


async def bench_sqlite(seconds: float) -> tuple[float, float, int]:
    from nimbus.store.sqlite_queue import open_sqlite_queue
    with tempfile.TemporaryDirectory() as tmp:
        q = await open_sqlite_queue(Path(tmp) / "queue.db")
        try:
            return await queue_path(q, seconds)
        finally:
            await q.aclose()


async def bench_nats(seconds: float, sync: str) -> tuple[float, float, int]:
    import nats

    from nimbus.natsd import NATS_USER, NatsCluster
    from nimbus.store.nats_queue import open_nats_queue
    with tempfile.TemporaryDirectory() as tmp:
        cluster = NatsCluster(Path(tmp), secrets.token_urlsafe(32), size=3, sync=sync)
        cluster.start()
        try:
            nc = await nats.connect(servers=cluster.urls.split(","), user=NATS_USER,
                                    password=cluster.password)
            try:
                q = await open_nats_queue(nc, region="bench", replicas=3)
                try:
                    return await queue_path(q, seconds)
                finally:
                    await q.aclose()
            finally:
                await nc.close()
        finally:
            cluster.stop()


def queue_paths(secs: int, sync: str) -> None:
    print("queue path in one process (Events.submit -> dispatch -> no-op run -> record):")
    a, c, n = asyncio.run(bench_sqlite(secs))
    print(f"  sqlite                  accepted {a:7.0f}/s  completed {c:7.0f} inv/s "
          f"({n} invocations; goal 5000)")
    a, c, n = asyncio.run(bench_nats(secs, sync))
    print(f"  nats 3x R3 sync={sync:<7} accepted {a:7.0f}/s  completed {c:7.0f} inv/s "
          f"({n} invocations; goal 2000)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--queue-only", action="store_true",
                    help="only the queue path on both backends (no HTTP)")
    ap.add_argument("--nats-sync", default="always",
                    help="JetStream sync_interval of the bench cluster (always, or e.g. 2m)")
    args = ap.parse_args()
    secs, conns = args.seconds, args.connections
    if args.queue_only:
        queue_paths(secs, args.nats_sync)
        return

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
    queue_paths(secs, args.nats_sync)


if __name__ == "__main__":
    main()
