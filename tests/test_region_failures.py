"""A region on several processes survives the loss of any one of them:
real ``nimbus cluster up`` (3 NATS servers, controllers, workers, gateways
on loopback), SIGKILL by PID, bounded load."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import alive
from tests.region import Region, app_with_runs, wait_until

pytestmark = pytest.mark.e2e

HANDLERS_WRITE_HOST_FILES = True

APP = """\
name: steady
functions:
  hello:
    handler: h.hello
    min_instances: 2
    http: [{method: GET, path: /hello}]
  slow:
    handler: h.slow
    min_instances: 2
    http: [{method: GET, path: /slow}]
  write:
    handler: h.write
    min_instances: 2
    http: [{method: POST, path: /write}]
  burst:
    handler: h.slow
    min_instances: 2
    http: [{method: GET, path: /burst}]
  ticker:
    handler: h.tick
    schedule: rate(1 second)
"""

HANDLERS = """\
import json, os, time

RUNS = os.environ.get("RUNS_FILE", "{runs}")

def _note(kind, value):
    with open(RUNS, "a") as f:
        f.write(json.dumps({{"kind": kind, "value": value}}) + "\\n")

def hello(event, context):
    return {{"statusCode": 200, "body": context.aws_request_id}}

def slow(event, context):
    time.sleep(0.3)
    return {{"statusCode": 200, "body": "slow"}}

def write(event, context):
    _note("write", event["body"])
    time.sleep(0.3)
    return {{"statusCode": 200, "body": event["body"]}}

def tick(event, context):
    _note("tick", event["time"])
    return {{}}
"""


def make_app(tmp_path: Path, manifest: str = APP, handlers: str = HANDLERS) -> tuple[Path, Path]:
    return app_with_runs(tmp_path, "steady", manifest, handlers)


def notes(runs: Path, kind: str) -> list[Any]:
    import json

    return [n["value"] for n in map(json.loads, runs.read_text().splitlines())
            if n["kind"] == kind]


def ready_by_worker(region: Region, fn: str, url: str | None = None) -> dict[str, int]:
    for f in region.status(url)["functions"]:
        if f["name"] == fn:
            return dict(f["instances_per_worker"])
    return {}


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """One region for the module: each test kills a different process (a
    worker, then a gateway, then the leading controller) and checks what the
    survivors do, so no test needs what an earlier one took away."""
    tmp_path = tmp_path_factory.mktemp("failures")
    app, runs = make_app(tmp_path)
    r = Region(app, tmp_path / "state")
    r.runs = runs  # type: ignore[attr-defined]
    yield r
    r.stop()


def live_gateways(region: Region) -> list[str]:
    """The URLs of the gateways not killed by an earlier test."""
    return [p["url"] for p in region.processes("gateway") if alive(p["pid"])]


class Load:
    """Steady GETs through every gateway from a few threads, until stopped."""

    def __init__(self, urls: list[str], path: str, threads: int = 6) -> None:
        self.codes: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(urls[i % len(urls)], path))
                         for i in range(threads)]

    def _run(self, url: str, path: str) -> None:
        with httpx.Client(base_url=url, timeout=20) as c:
            while not self._stop.is_set():
                try:
                    self.codes[c.get(path).status_code] += 1
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_worker_sigkill_under_load_loses_nothing_idempotent(region: Region) -> None:
    wait_until(lambda: all(v >= 1 for v in ready_by_worker(region, "slow").values())
               and len(ready_by_worker(region, "slow")) == 2, 30,
               "slow spread over both workers")
    victim = region.processes("worker")[0]
    with Load(region.gateway_urls, "/slow") as load:
        time.sleep(1.5)
        # non-idempotent requests in flight on every worker when one dies
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            posts = [pool.submit(httpx.post, region.gateway_urls[i % 2] + "/write",
                                 content=f"w{i}", timeout=20) for i in range(8)]
            time.sleep(0.1)
            killed_at = time.monotonic()
            region.kill(victim["pid"])
            results = [(f"w{i}", p.result().status_code) for i, p in enumerate(posts)]
        time.sleep(3)
    total = sum(load.codes.values()) + len(load.errors)
    ok = load.codes[200]
    assert total >= 20, (load.codes, load.errors)
    assert ok / total >= 0.999, (load.codes, load.errors[:5])
    runs = collections.Counter(notes(region.runs, "write"))  # type: ignore[attr-defined]
    for body, code in results:
        assert code in (200, 502), (body, code)
        assert runs[body] <= 1, f"{body} ran {runs[body]} times"  # never twice
        if code == 200:
            assert runs[body] == 1
    # its instances come back on the surviving worker
    survivor = region.processes("worker")[1]["id"]
    wait_until(lambda: ready_by_worker(region, "slow").get(survivor, 0) >= 2
               and victim["id"] not in ready_by_worker(region, "slow"), 20,
               "the dead worker's instances replaced on the other")
    print(f"worker death: replaced within {time.monotonic() - killed_at:.2f}s")


def test_gateway_sigkill_the_other_serves(region: Region) -> None:
    before = {n["id"] for n in region.status()["nodes"]}
    dead, other = region.processes("gateway")
    region.kill(dead["pid"])
    with httpx.Client(base_url=other["url"], timeout=10) as c:
        codes = [c.get("/hello").status_code for _ in range(50)]
    assert codes == [200] * 50
    after = wait_until(lambda: (ids := {n["id"] for n in region.status()["nodes"]})
                       and dead["id"] not in ids and ids, 15, "the gateway's key expiring")
    assert after == before - {dead["id"]}  # nothing else changed


def test_leader_sigkill_standby_leads_and_schedules_go_on(region: Region) -> None:
    runs = region.runs  # type: ignore[attr-defined]
    first = len(notes(runs, "tick"))  # the ticks before this test are not its own
    wait_until(lambda: len(notes(runs, "tick")) >= first + 3, 30, "three ticks")
    leader = region.status()["leader"]
    victim = next(p for p in region.processes("controller") if p["id"] == leader)
    other = next(p for p in region.processes("controller") if p["id"] != leader)
    region.kill(victim["pid"])
    t0 = time.monotonic()
    wait_until(lambda: region.status(other["url"])["leading"], 10, "a new leader",
               step_s=0.05)
    took = time.monotonic() - t0
    print(f"leader death: new leader after {took:.2f}s")
    assert took < 5.0
    seen = len(notes(runs, "tick"))
    wait_until(lambda: len(notes(runs, "tick")) >= seen + 3, 20, "ticks after the handover")
    from datetime import datetime

    def at(tick: str) -> float:
        return datetime.fromisoformat(tick.replace("Z", "+00:00")).timestamp()

    start = at(notes(runs, "tick")[first])

    def gaps() -> list[float]:
        times = sorted(at(t) for t in notes(runs, "tick") if at(t) >= start)
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    # A tick runs through the durable queue: under load one may run a few
    # seconds after later ones. None is missed: every second gets its run.
    try:
        wait_until(lambda: all(abs(g - 1.0) < 0.01 for g in gaps()), 20,
                   "every tick since the test began to have run")
    except AssertionError:
        raise AssertionError(f"ticks missed: gaps {gaps()}") from None
    ticks = notes(runs, "tick")[first:]
    counts = collections.Counter(ticks)
    assert max(counts.values()) == 1, [t for t, n in counts.items() if n > 1]  # none doubled
    # autoscaling goes on under the new leader: a burst grows `burst` (a
    # function no other test loads) past its 2 instances
    with Load(live_gateways(region), "/burst", threads=8):
        wait_until(lambda: sum(ready_by_worker(region, "burst", other["url"]).values()) > 2,
                   20, "burst scaled up by the new leader")
