"""The edge's pure decisions: health (hysteresis, passive signals), region
order by policy, the retry budget. No sleeping: ``now`` is passed in."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from nimbus.edge.budget import RetryBudget
from nimbus.edge.health import ERROR_BURST, HealthBook, HealthConfig
from nimbus.edge.policy import region_order
from nimbus.edge.prober import Prober


@dataclass(frozen=True)
class Region:
    name: str
    gateways: tuple[str, ...]


@dataclass(frozen=True)
class Cluster:
    regions: dict[str, Region]


@dataclass(frozen=True)
class Spec:
    names: tuple[str, ...] | None = None
    policy: str = "failover"
    weights: dict[str, int] = field(default_factory=dict)


EU1, EU2, US1 = "http://127.0.0.2:1", "http://127.0.0.2:2", "http://127.0.0.3:1"
CLUSTER = Cluster({"eu": Region("eu", (EU1, EU2)), "us": Region("us", (US1,))})
CFG = HealthConfig(interval_s=0.25, timeout_s=0.3, fall=2, rise_s=3.0)


def fresh(now: float = 0.0) -> HealthBook:
    book = HealthBook(CLUSTER, CFG, now)
    for gw in (EU1, EU2, US1):
        book.probe_ok(gw, 0.001, now)
    return book


def test_first_success_is_up_at_once_and_nothing_is_up_before() -> None:
    book = HealthBook(CLUSTER, CFG, 0.0)
    assert not book.region_up("eu", 0.0) and not book.gateway_up(EU1, 0.0)
    book.probe_ok(EU1, 0.002, 0.1)
    assert book.gateway_up(EU1, 0.1) and book.region_up("eu", 0.1)
    assert not book.region_up("us", 0.1)
    # past the start-up window, a region down from the start rises like any other
    book.probe_ok(US1, 0.002, 10.0)
    assert not book.region_up("us", 10.0)
    book.probe_ok(US1, 0.002, 13.0)
    assert book.region_up("us", 13.0)


def test_down_after_fall_consecutive_failures_only() -> None:
    book = fresh()
    book.probe_failed(US1, "timeout", 1.0)
    assert book.region_up("us", 1.0)
    book.probe_ok(US1, 0.001, 1.25)          # a success in between restarts the count
    book.probe_failed(US1, "timeout", 1.5)
    assert book.region_up("us", 1.5)
    book.probe_failed(US1, "timeout", 1.75)
    assert not book.region_up("us", 1.75)


def test_region_is_up_while_any_gateway_is() -> None:
    book = fresh()
    book.passive_failure(EU1, "refused", 1.0)
    assert not book.gateway_up(EU1, 1.0) and book.region_up("eu", 1.0)
    assert book.pick_gateway("eu", 1.0) == EU2
    book.passive_failure(EU2, "reset", 1.0)
    assert not book.region_up("eu", 1.0) and book.pick_gateway("eu", 1.0) is None
    assert book.up_regions(1.0) == {"us"}


def test_passive_failure_is_down_at_once_and_calls_back() -> None:
    book = fresh()
    downs: list[str] = []
    book.on_down.append(downs.append)
    book.passive_failure(US1, "connection refused", 2.0)
    assert not book.gateway_up(US1, 2.0) and downs == [US1]
    book.passive_failure(US1, "connection refused", 2.1)
    assert downs == [US1]                     # once per turn down


def test_rise_needs_continuous_health() -> None:
    book = fresh()
    book.passive_failure(US1, "refused", 10.0)
    t = 10.0
    while t < 12.9:                           # healthy for 2.9 s: not yet
        t += 0.25
        book.probe_ok(US1, 0.001, t)
        assert not book.gateway_up(US1, t) or t - 10.25 >= CFG.rise_s
    book.probe_ok(US1, 0.001, 13.25)          # 3 s since the first success
    assert book.gateway_up(US1, 13.25)


def test_flapping_every_two_seconds_never_comes_back() -> None:
    book = fresh()
    book.passive_failure(US1, "refused", 0.0)
    t = 0.0
    while t < 60.0:
        t = round(t + 0.25, 2)
        alive = int(t // 2) % 2 == 0          # 2 s up, 2 s down, ...
        if alive:
            book.probe_ok(US1, 0.001, t)
        else:
            book.probe_failed(US1, "refused", t)
        assert not book.region_up("us", t), t


def test_burst_of_gateway_errors_is_a_passive_failure() -> None:
    book = fresh()
    for i in range(ERROR_BURST - 1):
        book.gateway_error(US1, "503 Unavailable", 1.0 + i * 0.01)
    assert book.gateway_up(US1, 1.1)
    book.gateway_error(US1, "503 Unavailable", 3.0)   # the old ones aged out
    assert book.gateway_up(US1, 3.0)
    for i in range(ERROR_BURST):
        book.gateway_error(US1, "503 Unavailable", 5.0 + i * 0.01)
    assert not book.gateway_up(US1, 5.1)
    g = book.snapshot(5.1)["regions"]["us"]["gateways"][0]
    assert g["errors"] == 2 * ERROR_BURST and "gateway errors" in g["last_error"]


def test_latency_is_smoothed_and_least_in_flight_wins() -> None:
    book = fresh()
    for _ in range(30):
        book.probe_ok(US1, 0.020, 1.0)
    book.probe_ok(US1, 0.500, 1.1)            # one outlier moves it, not to 500 ms
    lat = book.latency("us")
    assert lat is not None and 0.020 < lat < 0.2
    book.begin(EU1)
    assert book.pick_gateway("eu", 1.0) == EU2
    book.end(EU1)
    assert book.pick_gateway("eu", 1.0) == EU1
    snap = book.snapshot(2.0)["regions"]
    assert snap["eu"]["up"] and [g["url"] for g in snap["eu"]["gateways"]] == [EU1, EU2]
    assert snap["us"]["gateways"][0]["requests"] == 0


def test_failover_order() -> None:
    rng = random.Random(1)
    order = ("eu", "us", "ap")
    assert region_order(None, order, {"eu", "us", "ap"}, {}, rng) == ["eu", "us", "ap"]
    assert region_order(None, order, {"us", "ap"}, {}, rng) == ["us", "ap", "eu"]
    spec = Spec(names=("us", "eu"))
    assert region_order(spec, order, {"eu", "us"}, {}, rng) == ["us", "eu"]
    assert region_order(spec, order, {"eu"}, {}, rng) == ["eu", "us"]
    assert region_order(spec, order, set(), {}, rng) == ["us", "eu"]       # last resort
    assert region_order(Spec(names=("xx", "eu")), order, {"eu"}, {}, rng) == ["eu"]


def test_weighted_splits_by_weight_among_healthy() -> None:
    rng = random.Random(7)
    spec = Spec(policy="weighted", weights={"eu": 80, "us": 20})
    firsts = Counter(region_order(spec, ("eu", "us"), {"eu", "us"}, {}, rng)[0]
                     for _ in range(10_000))
    assert 7700 <= firsts["eu"] <= 8300
    assert region_order(spec, ("eu", "us"), {"eu", "us"}, {}, rng) in (["eu", "us"], ["us", "eu"])
    assert region_order(spec, ("eu", "us"), {"us"}, {}, rng) == ["us", "eu"]
    zero = Spec(policy="weighted", weights={"eu": 0, "us": 5})
    assert {region_order(zero, ("eu", "us"), {"eu", "us"}, {}, rng)[0] for _ in range(50)} \
        == {"us"}
    assert region_order(zero, ("eu", "us"), {"eu"}, {}, rng) == ["eu", "us"]


def test_latency_policy_prefers_the_fastest_healthy_region() -> None:
    rng = random.Random(3)
    spec = Spec(policy="latency")
    lat: dict[str, float | None] = {"eu": 0.021, "us": 0.001, "ap": None}
    assert region_order(spec, ("eu", "us", "ap"), {"eu", "us", "ap"}, lat, rng) \
        == ["us", "eu", "ap"]
    assert region_order(spec, ("eu", "us", "ap"), {"eu", "ap"}, lat, rng) == ["eu", "ap", "us"]
    # noise is not a reason to move: within 2 ms (or 20%) keeps the app's order
    near: dict[str, float | None] = {"eu": 0.0012, "us": 0.0004}
    assert region_order(spec, ("eu", "us"), {"eu", "us"}, near, rng) == ["eu", "us"]
    far: dict[str, float | None] = {"eu": 0.100, "us": 0.079}
    assert region_order(spec, ("eu", "us"), {"eu", "us"}, far, rng) == ["us", "eu"]
    close: dict[str, float | None] = {"eu": 0.090, "us": 0.080}
    assert region_order(spec, ("eu", "us"), {"eu", "us"}, close, rng) == ["eu", "us"]


def test_retry_budget_ratio_and_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10)
    # quiet edge: the floor (1/s over 10 s) allows 10 retries
    assert sum(budget.try_spend(0.5) for _ in range(50)) == 10
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10)
    for _ in range(1000):
        budget.record_request(100.0)
    assert sum(budget.try_spend(100.5) for _ in range(1000)) == 200
    assert budget.denied == 800
    assert not budget.try_spend(105.0)
    # the window moves on: old requests and retries age out
    for _ in range(100):
        budget.record_request(120.0)
    assert sum(budget.try_spend(120.0) for _ in range(100)) == 20


def test_health_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="fall"):
        HealthConfig(fall=0)
    with pytest.raises(ValueError, match="timeout_s"):
        HealthConfig(timeout_s=0)


def test_prober_against_real_sockets() -> None:
    """A server that answers, one that refuses, one that hangs."""

    async def main() -> HealthBook:
        writers: list[asyncio.StreamWriter] = []

        async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await asyncio.sleep(5)

        s_ok = await asyncio.start_server(ok, "127.0.0.1", 0)
        s_hang = await asyncio.start_server(hang, "127.0.0.1", 0)
        import socket
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        refused = spare.getsockname()[1]
        spare.close()
        urls = {
            "a": f"http://127.0.0.1:{s_ok.sockets[0].getsockname()[1]}",
            "b": f"http://127.0.0.1:{refused}",
            "c": f"http://127.0.0.1:{s_hang.sockets[0].getsockname()[1]}",
        }
        cluster = Cluster({k: Region(k, (v,)) for k, v in urls.items()})
        cfg = HealthConfig(interval_s=0.05, timeout_s=0.1, fall=2, rise_s=1.0)
        loop = asyncio.get_running_loop()
        book = HealthBook(cluster, cfg, loop.time())
        prober = Prober(cluster, book, cfg, clock=loop.time)
        task = asyncio.create_task(prober.run())
        deadline = loop.time() + 3
        while loop.time() < deadline and prober.rounds < 12:
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for w in writers:
            w.close()
        s_ok.close()
        s_hang.close()
        await s_ok.wait_closed()
        await s_hang.wait_closed()
        return book

    book = asyncio.run(main())
    snap = book.snapshot(0.0)["regions"]
    assert snap["a"]["up"] and snap["a"]["latency_ms"] is not None
    assert not snap["b"]["up"] and "failed" in snap["b"]["gateways"][0]["last_error"]
    assert not snap["c"]["up"] and "timed out" in snap["c"]["gateways"][0]["last_error"]


def test_app_table_by_host_then_by_route() -> None:
    from nimbus.edge.apps import AppTable, EdgeSpec

    table = AppTable()
    table.load([
        {"name": "shop", "version": 3, "regions": {"names": ["us", "eu"], "policy": "failover",
                                                   "weights": {}},
         "routes": [{"method": "GET", "path": "/items/{id}"}, {"method": "POST", "path": "/buy"}]},
        {"name": "blog", "version": 1, "regions": None,
         "routes": [{"method": "GET", "path": "/posts"}, {"method": "POST", "path": "/buy"}]},
        {"name": 5}, "junk",
    ])
    shop = table.lookup(b"shop.example.com", "GET", "/anything")
    assert shop is not None and shop.name == "shop"
    assert shop.spec == EdgeSpec(names=("us", "eu"), policy="failover", weights={})
    by_route = table.lookup(b"127.0.0.1", "GET", "/items/42")
    assert by_route is not None and by_route.name == "shop"
    blog = table.lookup(None, "GET", "/posts")
    assert blog is not None and blog.name == "blog" and blog.spec is None
    buy = table.lookup(b"localhost", "POST", "/buy")      # two apps, one route: the first
    assert buy is not None and buy.name == "shop"
    assert table.lookup(b"localhost", "DELETE", "/posts") is None
    assert table.lookup(b"nope.example.com", "GET", "/nothing") is None
    weighted = EdgeSpec.from_dict({"names": None, "policy": "weighted",
                                   "weights": {"eu": 80, "us": 20}})
    assert weighted is not None and weighted.weights == {"eu": 80, "us": 20}
    assert EdgeSpec.from_dict(None) is None
