"""Autoscaling end to end: real bursts against a real ``nimbus up``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e

SCALING_APP = """\
name: scaling
functions:
  sleepy:
    handler: h.sleepy
    max_instances: 10
    stable_window_s: 4
    panic_window_s: 1
    scale_to_zero_after_s: 2
    http: [{method: GET, path: /sleepy}]
  capped:
    handler: h.sleepy
    max_concurrency: 2
    max_queue: 0
    max_instances: 10
    http: [{method: GET, path: /capped}]
"""

HANDLERS = """\
import time

def sleepy(event, context):
    time.sleep(0.2)
    return {"statusCode": 200, "body": context.aws_request_id}
"""


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    """One ``nimbus up`` for the tests below, in order: the burst ends with
    ``sleepy`` at zero, the next scales it up and down again, the last only
    uses ``capped``."""
    root = tmp_path_factory.mktemp("scaling")
    app = root / "scaling"
    app.mkdir()
    (app / "app.yaml").write_text(SCALING_APP)
    (app / "h.py").write_text(HANDLERS)
    n = Nimbus(app, root / "state", root / "state.out")
    yield n
    n.stop()


def status(n) -> dict:
    r = httpx.get(n.control_url + "/v1/status",
                  headers={"authorization": f"Bearer {n.token}"}, timeout=10)
    r.raise_for_status()
    return {f["name"]: f for f in r.json()["functions"]}


@contextlib.contextmanager
def sampling(n, figure) -> Iterator[list]:
    """Samples ``figure(status)`` every 20 ms in a thread while the block runs."""
    samples: list = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            samples.append(figure(status(n)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield samples
    finally:
        stop.set()
        watcher.join(timeout=10)


def test_burst_scales_up_to_the_cap_then_down_to_zero(scaling):
    with sampling(scaling, lambda s: s["sleepy"]["ready"]) as readies:
        with httpx.Client(base_url=scaling.url, timeout=30,
                          limits=httpx.Limits(max_connections=60)) as c:
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                results = list(pool.map(lambda _: c.get("/sleepy"), range(50)))
    peak = max(readies)
    assert [r.status_code for r in results] == [200] * 50
    assert len({r.text for r in results}) == 50  # 50 distinct invocations
    assert peak == 10  # rose to max_instances, never past it

    # Quiet now: instances step down and reach zero after the idle grace.
    deadline = time.monotonic() + 30
    while status(scaling)["sleepy"]["ready"] > 0:
        assert time.monotonic() < deadline, status(scaling)["sleepy"]
        time.sleep(0.1)
    # ... and the first request after zero is served (a cold start, not an error)
    r = httpx.get(scaling.url + "/sleepy", timeout=30)
    assert r.status_code == 200


def test_requests_during_scale_down_are_never_dropped(scaling):
    with httpx.Client(base_url=scaling.url, timeout=30,
                      limits=httpx.Limits(max_connections=40)) as c:
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda _: c.get("/sleepy"),
                                                              range(30)))
        # a steady trickle while the autoscaler takes instances away
        codes = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            codes.append(c.get("/sleepy").status_code)
    assert codes and set(codes) == {200}
    s = status(scaling)["sleepy"]
    assert s["ready"] < 10  # it did scale down meanwhile


def test_max_concurrency_answers_429_with_retry_after(scaling):
    with httpx.Client(base_url=scaling.url, timeout=30,
                      limits=httpx.Limits(max_connections=20)) as c:
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: c.get("/capped"), range(10)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429}, codes  # never a 5xx
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["requestId"] == r.headers["x-nimbus-request-id"]
    assert status(scaling)["capped"]["throttles"] == codes.count(429)
    assert status(scaling)["capped"]["ready"] <= 2  # the cap bounds the instances too


BUDGET_APP = """\
name: budget
functions:
  a:
    handler: h.sleepy
    max_instances: 4
    http: [{method: GET, path: /a}]
  b:
    handler: h.sleepy
    max_instances: 4
    http: [{method: GET, path: /b}]
"""


def test_node_budget_is_never_exceeded_and_shared(start_nimbus, tmp_path):
    app = tmp_path / "budget"
    app.mkdir()
    (app / "app.yaml").write_text(BUDGET_APP)
    (app / "h.py").write_text(HANDLERS)
    n = start_nimbus(app, "--max-instances", "2")
    total = lambda s: sum(f["ready"] + f["starting"] for f in s.values())  # noqa: E731
    with sampling(n, total) as totals:
        with httpx.Client(base_url=n.url, timeout=30,
                          limits=httpx.Limits(max_connections=20)) as c:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                burst = [pool.submit(c.get, "/a") for _ in range(6)]
                other = [pool.submit(c.get, "/b") for _ in range(2)]
                codes = [f.result().status_code for f in burst + other]
    assert codes == [200] * 8  # held until a slot freed, never refused or failed
    assert totals and max(totals) <= 2  # the node never ran more than its budget
    s = status(n)
    assert s["b"]["ready"] >= 1  # a's burst did not take b's fair share
