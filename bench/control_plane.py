"""The region's control plane: handover, expiry and scale-from-zero latency.

    python bench/control_plane.py [--trials 10] [--ttl 1.0] [--tick 0.5] [--nats]

Every node has its own connection to one region store: a SQLite file in a
temp folder, or with ``--nats`` a local 3-server NATS cluster (replicas 3);
each connection is what a separate process would have.

1. Leader handover: two controllers; the leader stops renewing (frozen);
   time until the standby leads. Bound: ttl + ttl/6 plus store latency.
2. Registration expiry: a worker stops renewing; time until a watcher on
   another connection sees it go. Bound: ttl plus the sweep period.
3. Scale from zero, control side: a gateway holds a request for a target
   with no instance; time until the worker's placement (seen through a
   watch on the worker's connection) holds one instance. The path is
   demand report at once -> leader wakes -> placement written -> watch.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nimbus.aio import cancel_and_wait  # noqa: E402
from nimbus.cluster.demand import DemandReporter  # noqa: E402
from nimbus.cluster.keys import KeyWatch, placement_key  # noqa: E402
from nimbus.cluster.leader import ControlLoop, Leadership  # noqa: E402
from nimbus.cluster.nodes import NodeWatch, Registration  # noqa: E402
from nimbus.natsd import NatsCluster  # noqa: E402
from nimbus.store.base import Store  # noqa: E402
from nimbus.store.registry import open_backend  # noqa: E402
from nimbus.store.sqlite import open_sqlite_store  # noqa: E402


async def wait_for(predicate: Any, timeout_s: float = 30.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def report(name: str, xs: list[float]) -> None:
    xs = sorted(xs)
    p50 = statistics.median(xs)
    print(f"{name:<34} n={len(xs):<3} p50 {p50 * 1000:7.0f} ms   max {xs[-1] * 1000:7.0f} ms")


async def handover(stores: list[Store], ttl: float, trials: int) -> list[float]:
    out = []
    for i in range(trials):
        a = Leadership(stores[0], f"a{i}", key=f"leader/bench{i}", ttl_s=ttl)
        b = Leadership(stores[1], f"b{i}", key=f"leader/bench{i}", ttl_s=ttl)
        await a.start()
        await wait_for(lambda: a.is_leader)  # noqa: B023
        await b.start()
        await cancel_and_wait(a._task)  # frozen: no more renewals
        out.append(await wait_for(lambda: b.is_leader))  # noqa: B023
        await b.aclose()
        a._revision = a.term = None
        await a.aclose()
    return out


async def expiry(stores: list[Store], ttl: float, trials: int) -> list[float]:
    out = []
    watch = NodeWatch(stores[1], "bench")
    await watch.start()
    for i in range(trials):
        reg = Registration(stores[0], "bench", f"n{i}", ttl_s=ttl)
        await reg.start()
        await wait_for(lambda: f"n{i}" in watch.nodes)  # noqa: B023
        await cancel_and_wait(reg._task)
        out.append(await wait_for(lambda: f"n{i}" not in watch.nodes))  # noqa: B023
    await watch.aclose()
    return out


class Held:
    def __init__(self) -> None:
        self.in_flight = 0
        self.held = 0

    def take_arrivals(self) -> int:
        return self.held


async def scale_from_zero(stores: list[Store], ttl: float, tick: float,
                          trials: int) -> list[float]:
    ctl, gw, wk = stores[:3]
    spec = {"name": "f", "module": "h", "callable": "work", "handler": "h.work",
            "memory_mb": 128, "scale_to_zero_after_s": 0.0}
    await ctl.put("apps/bench", orjson.dumps({"name": "bench", "routes": [], "functions": {
        "f": {"version": 1, "spec": spec}}}))
    worker = Registration(wk, "worker", "w1", lambda: {
        "budget": {"max_instances": 8, "memory_mb": 4096}}, ttl_s=ttl)
    await worker.start()
    loop = ControlLoop(ctl, "c1", ttl_s=ttl, tick_s=tick)
    await loop.start()
    await wait_for(lambda: loop.is_leader)
    demand = Held()
    reporter = DemandReporter(gw, "g1", lambda: {"f@1": demand}, interval_s=min(0.5, ttl / 2),
                              ttl_s=ttl * 3)
    await reporter.start()
    placed = KeyWatch(wk, "placement/")
    await placed.start()

    def count() -> int:
        e = placed.entries.get(placement_key("w1"))
        return int(orjson.loads(e.value).get("f@1", 0)) if e is not None else 0

    out = []
    for _ in range(trials):
        demand.held = 0
        await wait_for(count_is(count, 0))  # idle: scaled to zero
        await asyncio.sleep(tick * 2)
        demand.held = 1
        out.append(await wait_for(lambda: count() >= 1))
    for x in (placed, reporter, loop, worker):
        await x.aclose()
    return out


def count_is(count: Any, n: int) -> Any:
    return lambda: count() == n


async def run(stores: list[Store], what: str, args: argparse.Namespace) -> None:
    print(f"region store: {what}, ttl {args.ttl} s, tick {args.tick} s")
    report("leader handover", await handover(stores, args.ttl, args.trials))
    report("registration expiry seen", await expiry(stores, args.ttl, args.trials))
    report("scale from zero: held -> placed",
           await scale_from_zero(stores, args.ttl, args.tick, args.trials))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.nats:
            cluster = NatsCluster(Path(tmp) / "nats", secrets.token_urlsafe(24), size=3)
            cluster.start()
            backends = []
            try:
                for _ in range(3):
                    backends.append(await open_backend(cluster.store_url, region="bench",
                                                       token=cluster.password))
                await run([b.store for b in backends], "NATS, 3 servers, replicas 3", args)
            finally:
                for b in backends:
                    await b.aclose()
                cluster.stop()
            return
        stores = [await open_sqlite_store(Path(tmp) / "region.db") for _ in range(3)]
        try:
            await run(stores, "SQLite file", args)
        finally:
            for s in stores:
                await s.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--ttl", type=float, default=1.0)
    p.add_argument("--tick", type=float, default=0.5)
    p.add_argument("--nats", action="store_true", help="a local 3-server NATS cluster")
    asyncio.run(main(p.parse_args()))
