"""A region losing a process, measured on a real ``nimbus cluster up``
(3 NATS servers, 2 controllers, 2 workers, 2 gateways on loopback).

    python bench/region_failover.py [--trials 3] [--seconds 4]

Per trial, under steady GET load through both gateways (4 threads):

1. Worker death: SIGKILL the worker holding instances; time until no
   request goes to it any more (the gateways see the connection drop) and
   until the function's instances are ready again on the other worker;
   requests failed during the run (idempotent ones are retried, so this
   should be 0).
2. Leader death: SIGKILL the controller leader; time until the standby
   says it leads.

Then the region is restarted for the next trial. Prints each trial and the
medians. Traffic goes to 127.0.0.1 only; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
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

ROOT = Path(__file__).resolve().parent.parent

APP = """\
name: failover
functions:
  slow:
    handler: h.slow
    min_instances: 2
    http: [{method: GET, path: /slow}]
"""

HANDLERS = """\
import time

def slow(event, context):
    time.sleep(0.05)
    return {"statusCode": 200, "body": context.aws_request_id}
"""


class Region:
    def __init__(self, app: Path, state: Path) -> None:
        self.state = state
        self.log = open(state.parent / "region.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nimbus", "cluster", "up", str(app), "--port", "0",
             "--control-port", "0", "--state-dir", str(state), "--containment", "rlimits"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while b"serving (state" not in (state.parent / "region.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nimbus cluster up did not start:\n" +
                                 (state.parent / "region.log").read_text())
            time.sleep(0.1)
        self.cluster = orjson.loads((state / "cluster.json").read_bytes())
        control = orjson.loads((state / "control.json").read_bytes())
        self.gateways: list[str] = control["gateway_urls"]
        self.controls: list[str] = control["control_urls"]
        self.token = (state / "token").read_text().strip()

    def status(self, url: str | None = None) -> dict[str, Any]:
        r = httpx.get((url or self.controls[0]) + "/v1/status", timeout=10,
                      headers={"authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def per_worker(self, url: str | None = None) -> dict[str, int]:
        for f in self.status(url)["functions"]:
            if f["name"] == "slow":
                return dict(f["instances_per_worker"])
        return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Load:
    def __init__(self, urls: list[str]) -> None:
        self.codes: collections.Counter[int] = collections.Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(urls[i % len(urls)],))
                        for i in range(4)]

    def run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=20) as c:
            while not self.stop.is_set():
                try:
                    r = c.get("/slow")
                    self.codes[r.status_code] += 1
                except httpx.HTTPError:
                    self.codes[0] += 1


def wait(predicate: Any, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            return float("nan")
        time.sleep(0.02)
    return time.monotonic() - t0


def trial(tmp: Path, seconds: float) -> dict[str, float]:
    app = tmp / "failover"
    app.mkdir()
    (app / "app.yaml").write_text(APP)
    (app / "h.py").write_text(HANDLERS)
    region = Region(app, tmp / "state")
    try:
        wait(lambda: len([n for n in region.per_worker().values() if n]) == 2, 30)
        workers = {p["id"]: p for p in region.cluster["processes"] if p["role"] == "worker"}
        victim_id = max(region.per_worker().items(), key=lambda kv: kv[1])[0]
        survivor = next(w for w in workers if w != victim_id)
        load = Load(region.gateways)
        for t in load.threads:
            t.start()
        time.sleep(seconds / 2)
        before = sum(load.codes.values())
        os.kill(workers[victim_id]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        # the gateways drop a dead worker's connection at once: requests keep
        # flowing; measure until the count moves again
        wait(lambda: sum(load.codes.values()) > before + 4, 10)
        unrouted = time.monotonic() - t0
        replaced = wait(lambda: region.per_worker().get(survivor, 0) >= 2
                        and victim_id not in region.per_worker(), 30) + unrouted
        time.sleep(seconds / 2)
        load.stop.set()
        for t in load.threads:
            t.join(30)
        total = sum(load.codes.values())
        failed = total - load.codes[200]
        leader = region.status()["leader"]
        ctl = next(p for p in region.cluster["processes"] if p["id"] == leader)
        other = next(p for p in region.cluster["processes"]
                     if p["role"] == "controller" and p["id"] != leader)
        os.kill(ctl["pid"], signal.SIGKILL)
        new_leader = wait(lambda: bool(region.status(other["url"])["leading"]), 15)
        return {"worker_unrouted_s": unrouted, "worker_replaced_s": replaced,
                "requests": total, "failed": failed, "leader_s": new_leader}
    finally:
        region.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    results = []
    for n in range(args.trials):
        with tempfile.TemporaryDirectory() as d:
            r = trial(Path(d), args.seconds)
        results.append(r)
        print(f"trial {n + 1}: worker death: traffic flowing again after "
              f"{r['worker_unrouted_s']:.2f}s, instances replaced after "
              f"{r['worker_replaced_s']:.2f}s, {r['failed']:.0f} of {r['requests']:.0f} "
              f"requests failed; leader death: new leader after {r['leader_s']:.2f}s",
              flush=True)
    for key, label in (("worker_unrouted_s", "worker death -> traffic flowing"),
                       ("worker_replaced_s", "worker death -> instances replaced"),
                       ("leader_s", "leader death -> new leader")):
        print(f"median {label}: {statistics.median(r[key] for r in results):.2f}s")
    print(f"failed requests: {sum(r['failed'] for r in results):.0f} of "
          f"{sum(r['requests'] for r in results):.0f}")


if __name__ == "__main__":
    main()
