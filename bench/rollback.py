"""A bad canary rolled back under steady load, again and again.

    python bench/rollback.py [--rounds 3] [--seconds 30] [--rate 100]

One ``nimbus up`` (containment ``rlimits``) serves ``svc``; an open-loop
load of GETs runs at ``--rate`` per second the whole time. Each round
deploys a new version that fails 30% of its requests (every 10 requests an
instance serves, the first 3 raise) with
``--strategy canary:10%:<seconds>s --rollback-on "error_rate > 2%"``; each
version answers its own body, so every response says which version served
it. Per round it prints:

- the time from the first failing request (sent) to the rollback taking
  effect: the first request sent after the last one the canary answered,
  or the moment the rollback was decided if that is later;
- when the rollout record says the rollback was decided, after that first
  failure;
- the requests that failed, of those sent during the round, and how many
  the canary served.

Then the medians over the rounds and the goal: at most the step's
evaluation window + 1 s, where the window is the time the canary needs to
see ``min_requests`` (20) requests at its share of the load, plus one
interval of the rollout runner (0.5 s): ``20 / (rate x 10%) + 0.5 s``
nominally. The canary's requests arrive at random (each request goes to it
with probability 10%), so each round's real window differs: the time from
the canary's 20th answer to the rollback taking effect is printed too
(goal: <= 0.5 s + 1 s).
Requests failed per rollback are about 30% of the canary's requests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import nimbus_up  # noqa: E402
from nimbus.chaos.httpclient import Client, ResponseError  # noqa: E402
from nimbus.rollout.policy import DEFAULT_MIN_REQUESTS  # noqa: E402
from nimbus.rollout.runner import DEFAULT_INTERVAL_S  # noqa: E402

SHARE = 10
RULE = "error_rate > 2%"

MANIFEST = """\
name: rollback-bench
functions:
  svc:
    handler: h.svc
    http: [{method: GET, path: /svc}]
"""

HANDLER = """\
import itertools

BODY = {body!r}
BAD = {bad!r}
_n = itertools.count()

def svc(event, context):
    if BAD and next(_n) % 10 < 3:
        raise RuntimeError("this release fails 30% of its requests")
    return {{"statusCode": 200, "body": BODY}}
"""


class Load(threading.Thread):
    """Open-loop GETs at ``rate``/s: (sent, status, body) per request."""

    def __init__(self, base: str, path: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.base, self.path, self.rate = base, path, rate
        self.records: list[tuple[float, int, str, float]] = []  # sent, status, body, done
        self.halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        inflight: set[asyncio.Task[None]] = set()
        client = Client(self.base)
        t0 = time.monotonic()
        i = 0
        while not self.halt.is_set():
            await asyncio.sleep(max(0.0, t0 + i / self.rate - time.monotonic()))
            i += 1
            if len(inflight) >= 500:
                continue
            task = asyncio.create_task(self._one(client))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight, timeout=10)
        client.close()

    async def _one(self, client: Client) -> None:
        sent = time.time()
        try:
            async with asyncio.timeout(5.0):
                r = await client.request("GET", self.path)
            status, body = r.status, r.body.decode(errors="replace")
        except (TimeoutError, ResponseError) as exc:
            status, body = 0, type(exc).__name__
        self.records.append((sent, status, body, time.time()))


def write_app(app: Path, body: str, bad: bool) -> None:
    (app / "h.py").write_text(HANDLER.format(body=body, bad=bad))


def deploy(app: Path, state: Path, *flags: str) -> None:
    out = subprocess.run([sys.executable, "-m", "nimbus.cli.main", "deploy", str(app),
                          "--state-dir", str(state), *flags],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"deploy failed: {out.stderr or out.stdout}")


def rollout(ctl: httpx.Client) -> dict[str, Any]:
    r = ctl.get("/v1/functions/svc/rollout")
    return dict(r.json()) if r.status_code == 200 else {}


def one_round(n: int, app: Path, state: Path, ctl: httpx.Client, load: Load,
              seconds: int) -> dict[str, Any]:
    bad = f"bad-{n}"
    write_app(app, bad, bad=True)
    start = time.time()
    deploy(app, state, "--strategy", f"canary:{SHARE}%:{seconds}s", "--rollback-on", RULE)
    deadline = time.monotonic() + seconds + 60
    while (rec := rollout(ctl)).get("state") == "running" or rec.get("to") is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"round {n}: no decision within {seconds + 60} s")
        time.sleep(0.05)
    if rec["state"] != "rolled_back":
        raise SystemExit(f"round {n}: the bad canary was {rec['state']}, not rolled back")
    time.sleep(2.0)  # load goes on: any canary answer still coming would show
    end = time.time()
    mine = [r for r in load.records if start <= r[0] <= end]
    canary = [r for r in mine if r[2] == bad or r[1] == 500]
    failed = [r for r in mine if r[1] != 200]
    if not canary or not any(r[1] == 500 for r in canary):
        raise SystemExit(f"round {n}: the canary served nothing that failed")
    first_fail = min(r[0] for r in canary if r[1] == 500)
    last_canary = max(r[0] for r in canary)
    after = [r[0] for r in mine if r[0] > last_canary]
    decided = next(d["at"] for d in reversed(rec["history"]) if d["action"] == "rollback")
    # no canary answer after it: the first request sent after the canary's last
    # one, but not before the rollout record says it was decided (the canary
    # gets only one request in ten: the gap alone would flatter the figure)
    effect = max(min(after) if after else end, decided)
    # the evidence: the canary's min_requests-th answer
    answered = sorted(r[3] for r in canary)
    evidence = answered[min(DEFAULT_MIN_REQUESTS, len(answered)) - 1]
    return {"round": n, "effect_s": effect - first_fail, "decided_s": decided - first_fail,
            "evidence_s": evidence - first_fail, "failed": len(failed), "sent": len(mine),
            "canary": len(canary), "reason": rec["reason"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=30,
                    help="the canary step's wait (canary:10%%:<seconds>s)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second")
    args = ap.parse_args()
    window = DEFAULT_MIN_REQUESTS / (args.rate * SHARE / 100) + DEFAULT_INTERVAL_S
    with tempfile.TemporaryDirectory(prefix="nimbus-rollback-") as tmp:
        app = Path(tmp) / "rollback-bench"
        app.mkdir()
        (app / "app.yaml").write_text(MANIFEST)
        write_app(app, "good", bad=False)
        with nimbus_up(app, "/svc", "--containment", "rlimits") as (url, state, _proc):
            info = orjson.loads((state / "control.json").read_bytes())
            token = (state / "token").read_text().strip()
            ctl = httpx.Client(base_url=info["control_url"], timeout=10.0,
                               headers={"authorization": f"Bearer {token}"})
            load = Load(url, "/svc", args.rate)
            load.start()
            rows = []
            try:
                time.sleep(2.0)  # warm: the good version serving the load
                for n in range(1, args.rounds + 1):
                    row = one_round(n, app, state, ctl, load, args.seconds)
                    rows.append(row)
                    print(f"round {n}: rollback took effect {row['effect_s']:.2f} s after the "
                          f"first failing request (the canary's {DEFAULT_MIN_REQUESTS}th answer "
                          f"at {row['evidence_s']:.2f} s, decided at {row['decided_s']:.2f} s); "
                          f"failed {row['failed']} of {row['sent']} requests, the canary "
                          f"served {row['canary']}; reason: {row['reason']}", flush=True)
            finally:
                load.halt.set()
                load.join(15)
                ctl.close()
    if not rows:
        return
    effect = statistics.median(r["effect_s"] for r in rows)
    decided = statistics.median(r["decided_s"] for r in rows)
    failed = statistics.median(r["failed"] for r in rows)
    print(f"\nmedian over {len(rows)} rounds at {args.rate:g} requests/s, canary "
          f"{SHARE}%: rollback took effect {effect:.2f} s after the first failing request "
          f"(decided at {decided:.2f} s; max {max(r['effect_s'] for r in rows):.2f} s); "
          f"{failed:g} requests failed per rollback")
    goal = window + 1.0
    print(f"goal: <= the step's evaluation window + 1 s = {DEFAULT_MIN_REQUESTS} requests at "
          f"{args.rate * SHARE / 100:g}/s + {DEFAULT_INTERVAL_S} s + 1 s = {goal:.2f} s: median "
          f"{'met' if effect <= goal else 'NOT met'}, in {sum(r['effect_s'] <= goal for r in rows)}"
          f" of {len(rows)} rounds")
    # the window as it was: the canary's requests arrive at random (one in ten)
    late = [r["effect_s"] - r["evidence_s"] for r in rows]
    met = sum(x <= DEFAULT_INTERVAL_S + 1.0 for x in late)
    print(f"after the canary's {DEFAULT_MIN_REQUESTS}th answer (the window each round really "
          f"had): median {statistics.median(late):.2f} s, max {max(late):.2f} s; goal <= "
          f"{DEFAULT_INTERVAL_S} s + 1 s: met in {met} of {len(rows)} rounds")


if __name__ == "__main__":
    main()
