"""The edge in front of two regions that each live in a network namespace
of their own (a veth pair to the host, ``tc netem`` on it): a region cut off
by a partition (every packet dropped, nothing refused) is found by timeout,
routed away, and the idempotent requests in flight to it are retried in the
other region; and the ``latency`` policy follows 20 ms of added delay
(``tc netem``, or a delaying relay on a kernel without netem: see
tests/netns.py).

Needs root (network namespaces): CI runs as root."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimbus.multiregion.clusterfile import load_cluster, write_cluster
from tests.edgeworld import EdgeProc, Load, comes_back, down_within, wait_for
from tests.multiregion import shared_file, write_app
from tests.netns import DelayRelay, Netns, NetnsRegion

pytestmark = pytest.mark.e2e

RISE_S = 2.0

SHOP = """\
name: shop
runtime: python3.11
regions: {names: [eu, us], policy: failover}
functions:
  hello:
    handler: shop.hello
    http: [{method: GET, path: /hello}]
"""
SHOP_CODE = """\
import os, time
STARTED = {started!r}
def hello(event, context):
    sleep = float((event.get("queryStringParameters") or {{}}).get("sleep", 0))
    if sleep:
        with open(STARTED, "a") as f:
            f.write(os.environ["AWS_REGION"] + "\\n")
    time.sleep(sleep)
    return {{"region": os.environ["AWS_REGION"]}}
"""
NEAR = """\
name: near
runtime: python3.11
regions: {policy: latency}
functions:
  near:
    handler: near.near
    http: [{method: GET, path: /near}]
"""
NEAR_CODE = """\
def near(event, context):
    return {"ok": True}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("netns")
    started_file = shared_file(root / "started.txt")
    shop = write_app(root / "shop", SHOP, "shop", SHOP_CODE.format(started=str(started_file)))
    near = write_app(root / "near", NEAR, "near", NEAR_CODE)
    spaces: list[Netns] = []
    started: list[NetnsRegion] = []
    relays: dict[str, DelayRelay] = {}
    edge: EdgeProc | None = None
    try:
        for i in range(2):
            spaces.append(Netns(i).create())
        for name, ns in zip(("eu", "us"), spaces, strict=True):
            started.append(NetnsRegion(name, ns, root, shop))
        for region in started:
            region.wait_serving()
        deployed: dict[str, Any] = {}
        deploys = [threading.Thread(target=lambda r=r: deployed.__setitem__(
            r.name, r.cli("deploy", str(near)))) for r in started]
        for t in deploys:
            t.start()
        for t in deploys:
            t.join(120)
        for region in started:
            out = deployed.get(region.name)
            assert out is not None and out.returncode == 0, out
        tokens = {}
        for region in started:
            token = root / f"{region.name}.token"
            token.write_text(region.token + "\n")
            token.chmod(0o600)
            tokens[region.name] = token.name
        if spaces[0].has_netem():
            def set_delay(region: NetnsRegion, ms: int) -> None:
                region.ns.delay(ms) if ms else region.ns.clear()
        else:
            for region in started:
                relays[region.name] = DelayRelay((region.ns.ns_ip, 8080))

            def set_delay(region: NetnsRegion, ms: int) -> None:
                relays[region.name].delay_s = ms / 1000
        cluster_path = root / "nimbus.cluster.yaml"
        write_cluster(cluster_path, [r.entry(relays[r.name].url if relays else None)
                                     for r in started], tokens)
        load_cluster(cluster_path)
        edge = EdgeProc(cluster_path, root / "edge.out", RISE_S)
        wait_for(lambda: all(r["up"] for r in edge.regions()["regions"].values()), 10,
                 "both regions up")
        wait_for(lambda: "near" in edge.regions()["apps"], 10, "the apps table")
        yield {"eu": started[0], "us": started[1], "edge": edge, "set_delay": set_delay,
               "started": started_file,
               "delay_by": "a relay" if relays else "netem"}
    finally:
        if edge is not None:
            edge.stop()
        for relay in relays.values():
            relay.close()
        for region in started:
            region.stop()
        for ns in spaces:
            ns.close()


def _latency_ms(edge: EdgeProc, region: str) -> float:
    value = edge.regions()["regions"][region]["latency_ms"]
    return float("inf") if value is None else float(value)


def _served_by(edge: EdgeProc, n: int) -> Counter[str]:
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        return Counter(client.get("/near").headers["x-nimbus-region"] for _ in range(n))


def test_latency_policy_prefers_the_region_without_added_delay(world: dict[str, Any]) -> None:
    """Measured latency includes this machine's own scheduling delays, which
    on a busy machine can swamp 20 ms for a while: a batch of requests
    counts only when the edge measured the delayed region at least 15 ms
    slower both before and after it (a batch spoiled by noise is sent again,
    up to 10 times); in a batch that counts, the other region serves 90%."""
    edge: EdgeProc = world["edge"]
    eu: NetnsRegion = world["eu"]
    us: NetnsRegion = world["us"]
    set_delay = world["set_delay"]

    def gap(slow: NetnsRegion, fast: NetnsRegion) -> float:
        return _latency_ms(edge, slow.name) - _latency_ms(edge, fast.name)

    try:
        for slow, fast in ((eu, us), (us, eu)):
            set_delay(fast, 0)
            set_delay(slow, 20)                    # 20 ms more per round trip
            for _batch in range(10):
                wait_for(lambda s=slow, f=fast: gap(s, f) >= 15, 15,
                         f"{slow.name}'s measured latency to rise over {fast.name}'s")
                served = _served_by(edge, 20)
                if gap(slow, fast) >= 15:
                    break
            else:
                pytest.fail(f"the measured gap never held through a batch: "
                            f"{ {r: _latency_ms(edge, r) for r in ('eu', 'us')} }")
            assert served[fast.name] >= 18, (served, world["delay_by"])
    finally:
        set_delay(eu, 0)
        set_delay(us, 0)
    print(f"netns: latency policy followed 20 ms of delay added by {world['delay_by']}")


def test_partitioned_region_is_found_by_timeout_and_in_flight_gets_are_retried(
        world: dict[str, Any]) -> None:
    edge: EdgeProc = world["edge"]
    eu: NetnsRegion = world["eu"]
    slow: list[httpx.Response] = []

    def slow_get() -> None:
        slow.append(httpx.get(edge.url + "/hello?sleep=0.5", timeout=15))

    marks: Path = world["started"]
    load = Load(edge.url)
    try:
        # Three slow GETs running in eu when it is cut off. (On a machine
        # so busy that eu's probes time out, eu may be down when they are
        # sent: then they ran in us, and the step is tried again.)
        for _attempt in range(3):
            wait_for(lambda: edge.regions()["regions"]["eu"]["up"], RISE_S + 10, "eu up")
            marks.write_text("")
            slow.clear()
            slow_threads = [threading.Thread(target=slow_get) for _ in range(3)]
            for t in slow_threads:
                t.start()
            wait_for(lambda: len(marks.read_text().split()) == 3, 20, "three slow GETs")
            if marks.read_text().split() == ["eu"] * 3:
                break
            for t in slow_threads:
                t.join(15)
        else:
            pytest.fail(f"eu never held the three slow GETs: {marks.read_text().split()}")
        eu.ns.cut()
        cut = time.monotonic()
        try:
            took = down_within(edge, "eu", cut, 3.0)
            time.sleep(1.0)
            for t in slow_threads:
                t.join(15)
        finally:
            eu.ns.heal()
        healed = time.monotonic()
        back = comes_back(load, "eu", healed, RISE_S)
    finally:
        load.stop()
    assert took <= 1.0 + 0.5, f"partition detected after {took:.2f} s"
    assert not load.errors, load.errors[:5]
    assert len(slow) == 3 and all(r.status_code == 200 for r in slow), [r.text for r in slow]
    assert {r.headers["x-nimbus-region"] for r in slow} == {"us"}
    assert {r.headers.get("x-nimbus-retried-from") for r in slow} == {"eu"}
    late = [r for r in load.results if cut + 1.0 < r[0] < healed]
    assert late and all(r[3] == "us" for r in late)
    assert back >= RISE_S - 0.3, f"eu took traffic back {back:.2f} s after the partition healed"
    print(f"netns: partition detected in {took:.3f} s; eu back {back:.3f} s after healing")
