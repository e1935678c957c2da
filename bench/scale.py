"""Autoscaling: the first request after scale to zero, and a step in load.

    python bench/scale.py [--trials 50]

1. Scale from zero: a function with ``scale_to_zero_after_s: 0`` is left
   until it has no instance, then one request is timed, then one warm
   request right after; the extra latency of the first is reported as
   p50/p99 over the trials. Goal (issue 3): <= 5 ms.
2. Step: 1 -> 32 concurrent clients on a function that sleeps 50 ms
   (target concurrency 0.7 per instance, so 46 instances are needed, capped
   at max_instances 50). Reports the time from the step until ready
   instances reach the need, and any errors during the step. Goal: <= 2 s,
   0 errors.
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
from bench._harness import nimbus_up  # noqa: E402

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


def step(url: str, st: Status) -> tuple[float, int, int]:
    need = min(50, math.ceil(32 / 0.7))
    errors = 0
    ok = 0
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors, ok
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                code = c.get("/step").status_code
                with lock:
                    if code == 200:
                        ok += 1
                    else:
                        errors += 1

    one = threading.Thread(target=client)
    one.start()
    time.sleep(3)  # steady at 1 client
    threads = [threading.Thread(target=client) for _ in range(31)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    reached = None
    while time.monotonic() - t0 < 20:
        if st.fn("step")["ready"] >= need:
            reached = time.monotonic() - t0
            break
        time.sleep(0.02)
    time.sleep(2)
    stop.set()
    for t in [one, *threads]:
        t.join()
    return (reached if reached is not None else float("inf")), errors, ok


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
        cold, warm = from_zero(url, st, args.trials)
        extra = [c - w for c, w in zip(cold, warm)]
        print(f"first request after scale to zero ({args.trials} trials)")
        print(f"  cold  p50 {pct(cold, .5):7.2f} ms  p99 {pct(cold, .99):7.2f} ms")
        print(f"  warm  p50 {pct(warm, .5):7.2f} ms  p99 {pct(warm, .99):7.2f} ms")
        print(f"  extra p50 {pct(extra, .5):7.2f} ms  p99 {pct(extra, .99):7.2f} ms"
              f"  (mean {statistics.mean(extra):.2f})")
        took, errors, ok = step(url, st)
        print("step 1 -> 32 concurrent clients, 50 ms handler, need 46 instances")
        print(f"  time to reach the need: {took:.2f} s   errors: {errors}   ok: {ok}")


if __name__ == "__main__":
    main()
