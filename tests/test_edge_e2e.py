"""The edge in front of two real regions (``nimbus up --region eu|us`` on
127.0.0.2 and 127.0.0.3): failover order, weights, bodies, async
invocations, and a region that hangs, dies and comes back under load."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.edgeworld import EdgeProc, Load, comes_back, down_within, wait_for
from tests.multiregion import (
    RegionProc,
    regions,
    shared_file,
    write_app,
    write_cluster_file,
)

pytestmark = pytest.mark.e2e

RISE_S = 2.0

APP = """\
runtime: python3.8
handlers:
  - {function: hello, handler: shop.hello, event: http, method: get, path: /hello}
  - {function: run, handler: shop.run, event: http, method: post, path: /run}
  - {function: echo, handler: shop.echo, event: http, method: put, path: /echo}
  - {function: big, handler: shop.big, event: http, method: get, path: /big}
"""
CODE = """\
import hashlib, os, time, base64
RUNS = {runs!r}

def _qs(event):
    return event.get("queryStringParameters") or {{}}

def hello(event, context):
    time.sleep(float(_qs(event).get("sleep", 0)))
    return {{"region": os.environ["AWS_REGION"]}}

def run(event, context):
    with open(RUNS, "a") as f:
        f.write(os.environ["AWS_REGION"] + " " + (event.get("body") or "") + "\\n")
    time.sleep(float(_qs(event).get("sleep", 0)))
    return {{"ran": os.environ["AWS_REGION"]}}

def echo(event, context):
    body = event.get("body") or ""
    data = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()
    return {{"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}

def big(event, context):
    n = int(_qs(event).get("n", 0))
    return {{"statusCode": 200, "headers": {{"content-type": "text/plain"}},
            "body": "x" * n}}
"""
WEIGHTED_APP = """\
runtime: python3.8
regions: {policy: weighted, weights: {eu: 80, us: 20}}
handlers:
  - {function: w, handler: split.w, event: http, method: get, path: /w}
"""
WEIGHTED_CODE = """\
def w(event, context):
    return {"ok": True}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("edge")
    runs = shared_file(root / "runs.txt")
    app = write_app(root / "shop", APP, "shop", CODE.format(runs=str(runs)))
    weighted = write_app(root / "split", WEIGHTED_APP, "split", WEIGHTED_CODE)
    with regions(root, app) as (eu, us):
        for r in (eu, us):
            out = r.cli("deploy", str(weighted))
            assert out.returncode == 0, out.stderr
        cluster = write_cluster_file(root, [eu, us])
        edge = EdgeProc(cluster.path, root / "edge.out", RISE_S)
        try:
            wait_for(lambda: all(r["up"] for r in edge.regions()["regions"].values()), 10,
                     "both regions up")
            wait_for(lambda: "split" in edge.regions()["apps"], 10, "the apps table")
            yield {"eu": eu, "us": us, "edge": edge, "runs": runs, "root": root}
        finally:
            edge.stop()


def region_of(r: httpx.Response) -> str:
    return r.headers["x-nimbus-region"]


def test_failover_sends_everything_to_the_first_region_with_keep_alive(
        world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    with httpx.Client(base_url=edge.url, timeout=10) as c:
        seen = Counter()
        for _ in range(50):
            r = c.get("/hello")
            assert r.status_code == 200, r.text
            assert r.json() == {"region": "eu"}
            seen[region_of(r)] += 1
        assert seen == {"eu": 50}
        health = c.get("/_nimbus/health")
        assert health.status_code == 200 and health.json()["regions_up"] == ["eu", "us"]
    snap = edge.regions()["regions"]
    assert snap["eu"]["gateways"][0]["requests"] >= 50
    assert snap["us"]["gateways"][0]["requests"] == 0


def test_weighted_splits_requests_by_weight(world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=edge.url, timeout=10) as c:
            for _ in range(n):
                r = c.get("/w")
                assert r.status_code == 200, r.text
                with lock:
                    counts[region_of(r)] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, [250] * 8))
    assert sum(counts.values()) == 2000
    assert 0.75 <= counts["eu"] / 2000 <= 0.85, counts


def test_large_bodies_stream_both_ways(world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    data = os.urandom(3 * 1024 * 1024)
    with httpx.Client(base_url=edge.url, timeout=30) as c:
        r = c.put("/echo", content=data)          # content-length, replayable size limit passed
        assert r.status_code == 200, r.text
        assert r.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(data), 100_000):
                yield data[i:i + 100_000]

        r = c.put("/echo", content=chunks())      # chunked request body
        assert r.status_code == 200, r.text
        assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
        n = 5 * 1024 * 1024
        with c.stream("GET", f"/big?n={n}") as resp:
            assert resp.status_code == 200 and region_of(resp) == "eu"
            got = sum(len(b) for b in resp.iter_bytes())
        assert got == n
        assert c.get("/hello").json() == {"region": "eu"}   # the connection goes on


def test_async_event_with_idempotency_key_passes_through(world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    headers = {"x-nimbus-invocation-type": "Event", "idempotency-key": "edge-evt-1"}
    with httpx.Client(base_url=edge.url, timeout=10) as c:
        first = c.post("/run", content=b"evt", headers=headers)
        assert first.status_code == 202, first.text
        again = c.post("/run", content=b"evt", headers=headers)
        assert again.status_code == 202
    assert again.json()["invocationId"] == first.json()["invocationId"]
    assert again.json()["duplicate"] is True and region_of(first) == "eu"
    runs: Path = world["runs"]
    wait_for(lambda: "eu evt" in runs.read_text(), 20, "the async run")
    time.sleep(0.5)
    assert runs.read_text().count(" evt\n") == 1


def test_hung_region_is_routed_away_and_in_flight_gets_retried(world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    eu: RegionProc = world["eu"]
    slow: list[httpx.Response] = []

    posted: list[httpx.Response] = []
    runs: Path = world["runs"]

    def slow_get() -> None:
        slow.append(httpx.get(edge.url + "/hello?sleep=1", timeout=15))

    def slow_post() -> None:
        posted.append(httpx.post(edge.url + "/run?sleep=0.3", content=b"hang-me", timeout=15))

    load = Load(edge.url)
    try:
        time.sleep(0.5)
        slow_threads = [threading.Thread(target=slow_get) for _ in range(3)]
        slow_threads.append(threading.Thread(target=slow_post))
        for t in slow_threads:
            t.start()
        wait_for(lambda: "eu hang-me" in runs.read_text(), 10, "the POST to start in eu")
        eu.pause()
        hung = time.monotonic()
        try:
            took = down_within(edge, "eu", hung, 3.0)
            assert took <= 1.0 + 0.5, f"hang detected after {took:.2f} s"
            time.sleep(1.0)
            for t in slow_threads:
                t.join(15)
        finally:
            eu.resume()
        resumed = time.monotonic()
        back = comes_back(load, "eu", resumed, RISE_S)
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    assert len(slow) == 3 and all(r.status_code == 200 for r in slow), [r.text for r in slow]
    # the POST was in flight in the hung region: 502 naming it, and it never ran again
    assert len(posted) == 1 and posted[0].status_code == 502, posted[0].text
    assert posted[0].json()["region"] == "eu"
    assert runs.read_text().count("hang-me") == 1
    # the slow ones were sent to eu, then answered by us
    assert {region_of(r) for r in slow} == {"us"}
    assert {r.headers.get("x-nimbus-retried-from") for r in slow} == {"eu"}
    # no request started a second after the hang went to eu until it returned
    late = [r for r in load.results if hung + 1.0 < r[0] < resumed]
    assert late and all(r[3] == "us" for r in late)
    # and it returned only after the rise time (hysteresis)
    assert back >= RISE_S - 0.3, f"eu took traffic back {back:.2f} s after resuming"


def test_a_flapping_region_never_takes_traffic_back(world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    eu: RegionProc = world["eu"]
    wait_for(lambda: edge.regions()["regions"]["eu"]["up"], RISE_S + 10, "eu up again")
    load = Load(edge.url)
    try:
        time.sleep(0.3)
        first_stop = time.monotonic()
        for _ in range(3):          # down 1 s, up 1 s: never the 2 s of health it needs
            eu.pause()
            try:
                time.sleep(1.0)
            finally:
                eu.resume()
            time.sleep(1.0)
        end = time.monotonic()
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    # from its first outage on (detection is the hang test's business), never eu
    late = [r for r in load.results if first_stop + 1.5 < r[0] < end]
    assert late and all(r[3] == "us" for r in late), Counter(r[3] for r in late)


def test_killed_region_fails_over_with_no_failed_request_and_post_is_not_rerun(
        world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    eu: RegionProc = world["eu"]
    runs: Path = world["runs"]
    wait_for(lambda: edge.regions()["regions"]["eu"]["up"], RISE_S + 10, "eu up again")
    post: list[httpx.Response] = []

    def slow_post() -> None:
        post.append(httpx.post(edge.url + "/run?sleep=2", content=b"kill-me", timeout=15))

    load = Load(edge.url)
    try:
        time.sleep(0.5)
        t = threading.Thread(target=slow_post)
        t.start()
        wait_for(lambda: "eu kill-me" in runs.read_text(), 10, "the POST to start in eu")
        eu.kill()
        killed = time.monotonic()
        took = down_within(edge, "eu", killed, 3.0)
        t.join(15)
        time.sleep(1.5)
        eu.start()
        restarted = time.monotonic()
        back = comes_back(load, "eu", restarted, RISE_S)
    finally:
        load.stop()
    assert took <= 1.0, f"death detected after {took:.2f} s"
    assert not load.errors, load.errors[:5]
    late = [r for r in load.results if killed + 1.0 < r[0] < restarted]
    assert late and all(r[3] == "us" for r in late)
    assert back >= RISE_S - 0.3
    assert len(post) == 1 and post[0].status_code == 502, post[0].text
    body = post[0].json()
    assert body["errorType"] == "RegionFailed" and body["region"] == "eu"
    assert "region eu failed" in body["errorMessage"]
    assert runs.read_text().count("kill-me") == 1      # never run a second time
    assert orjson.loads(httpx.get(edge.url + "/_nimbus/health").content)["status"] == "ok"


def test_a_region_down_at_deploy_time_is_brought_up_to_date_by_the_edge(
        world: dict[str, Any]) -> None:
    eu: RegionProc = world["eu"]
    us: RegionProc = world["us"]
    root: Path = world["root"]
    split = root / "split"
    eu.kill()
    try:
        (split / "split.py").write_text(WEIGHTED_CODE.replace("True", "2"))
        # all at once: the earlier tests' load makes the regions' default a canary
        out = subprocess.run([sys.executable, "-m", "nimbus", "deploy", str(split), "--cluster",
                              str(root / "nimbus.cluster.yaml"), "--strategy", "all-at-once"],
                             capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "eu: pending" in out.stdout, out.stdout
        assert us.get("/w").json() == {"ok": 2}
    finally:
        eu.start()   # it comes back with the old version of split
    wait_for(lambda: eu.get("/w").json() == {"ok": 2}, 30, "the edge to converge eu")


def test_sigterm_drains_requests_in_flight(world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    wait_for(lambda: edge.regions()["regions"]["eu"]["up"], RISE_S + 10, "eu up again")
    got: list[httpx.Response] = []
    t = threading.Thread(target=lambda: got.append(
        httpx.get(edge.url + "/hello?sleep=1", timeout=15)))
    t.start()
    time.sleep(0.3)
    edge.proc.send_signal(signal.SIGTERM)
    t.join(15)
    assert edge.proc.wait(10) == 0
    assert got and got[0].status_code == 200 and got[0].headers["connection"] == "close"
    with pytest.raises(httpx.ConnectError):
        httpx.get(edge.url + "/hello", timeout=2)
