"""Autoscaling: the first request after scale to zero, and a step in load.

    python bench/scale.py [--trials 50]

1. Scale from zero: a function with ``scale_to_zero_after_s: 0`` is left
   until it has no instance, then one request is timed, then one warm
   request right after; the extra latency of the first is reported as
   p50/p99 over the trials. Goal: <= 5 ms.
2. Step: 1 -> 32 connections (wrk) on a function that sleeps 50 ms.
   Reports when ready instances reached 32 (one per concurrent request, so
   no request waits: held requests start instances themselves) and 46
   (32 / 0.7, the autoscaler's target utilisation, reached as the stable
   window fills, or at once in a panic), and errors during the step.
   Goal: <= 2 s, 0 errors.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import nimbus_up, wrk  # noqa: E402

APP = """\
name: scalebench
functions:
  hello:
    handler: h.hello
    scale_to_zero_after_s: 0
    stable_window_s: 2
    panic_window_s: 1
    http: [{method: GET, path: /hello}]
  step:
    handler: h.step
    max_instances: 50
    stable_window_s: 10
    panic_window_s: 1
    http: [{method: GET, path: /step}]
"""
HANDLERS = """\
import time

def hello(event, context):
    return {"statusCode": 200, "body": "Hello, World!"}

def step(event, context):
    time.sleep(0.05)
    return {"statusCode": 200, "body": "ok"}
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


class Status:
    def __init__(self, state: Path) -> None:
        import orjson
        info = orjson.loads((state / "control.json").read_bytes())
        token = (state / "token").read_text().strip()
        self.http = httpx.Client(base_url=info["control_url"],
                                 headers={"authorization": f"Bearer {token}"})

    def fn(self, name: str) -> dict:
        return next(f for f in self.http.get("/v1/status").json()["functions"]
                    if f["name"] == name)


def from_zero(url: str, st: Status, trials: int) -> tuple[list[float], list[float]]:
    cold, warm = [], []
    with httpx.Client(base_url=url) as c:
        for _ in range(trials):
            deadline = time.monotonic() + 30
            while st.fn("hello")["ready"] or st.fn("hello")["starting"]:
                if time.monotonic() > deadline:
                    raise SystemExit("hello never scaled to zero")
                time.sleep(0.05)
            t0 = time.perf_counter()
            assert c.get("/hello").status_code == 200
            cold.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            assert c.get("/hello").status_code == 200
            warm.append((time.perf_counter() - t0) * 1000)
    return cold, warm


def step(url: str, st: Status) -> dict[str, float]:
    """wrk with 1 connection for 3 s, then 32 for 10 s (wrk keeps every
    connection busy, so the demand really is 32). Reports when ready
    instances reached 32 (one per concurrent request: nobody waits) and 46
    (32 / 0.7, the autoscaler's target utilisation), errors and requests."""
    wrk(url + "/step", 1, 3)
    result: dict[str, float] = {}
    loader = threading.Thread(target=lambda: result.update(wrk(url + "/step", 32, 10)))
    t0 = time.monotonic()
    loader.start()
    reached: dict[int, float] = {}
    while loader.is_alive():
        ready = st.fn("step")["ready"]
        for need in (32, math.ceil(32 / 0.7)):
            if need not in reached and ready >= need:
                reached[need] = time.monotonic() - t0
        time.sleep(0.02)
    loader.join()
    return {"to_32": reached.get(32, math.inf), "to_46": reached.get(46, math.inf),
            "errors": result["errors"], "requests": result["rps"] * 10,
            "p99_ms": result["p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()
    app = Path(tempfile.mkdtemp(prefix="nimbus-scale-")) / "scalebench"
    app.mkdir()
    (app / "app.yaml").write_text(APP)
    (app / "h.py").write_text(HANDLERS)
    with nimbus_up(app, probe="/hello") as (url, state, _proc):
        st = Status(state)
        cold, warm = from_zero(url, st, args.trials) if args.trials else ([0.0], [0.0])
        extra = [c - w for c, w in zip(cold, warm, strict=False)]
        print(f"first request after scale to zero ({args.trials} trials)")
        print(f"  cold  p50 {pct(cold, .5):7.2f} ms  p99 {pct(cold, .99):7.2f} ms")
        print(f"  warm  p50 {pct(warm, .5):7.2f} ms  p99 {pct(warm, .99):7.2f} ms")
        print(f"  extra p50 {pct(extra, .5):7.2f} ms  p99 {pct(extra, .99):7.2f} ms"
              f"  (mean {statistics.mean(extra):.2f})")
        r = step(url, st)
        print("step 1 -> 32 connections (wrk), 50 ms handler")
        print(f"  ready >= 32 (no request waits) after {r['to_32']:.2f} s; "
              f"ready >= 46 (target utilisation 0.7) after {r['to_46']:.2f} s")
        print(f"  errors during the step: {r['errors']:.0f} of {r['requests']:.0f} requests; "
              f"p99 {r['p99_ms']:.1f} ms (handler: 50 ms)")

if __name__ == "__main__":
    main()
