"""The region's control plane over a real store shared by several "nodes".

Each node gets its own store object (its own connection) on one region
store, as separate processes would: registrations expire when renewals
stop, a standby controller takes the lead when the leader freezes, a real
worker's pools follow its placement, and a deploy without a local worker
waits for the region to start the new version. Every test runs on a real
3-server NATS cluster (replicas 3) and on a SQLite file.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from nimbus.aio import cancel_and_wait
from nimbus.cluster.demand import Collector, DemandReporter, Shares
from nimbus.cluster.keys import placement_key, status_key
from nimbus.cluster.leader import ControlLoop, Leadership, current_leader
from nimbus.cluster.nodes import NodeWatch, Registration, live_nodes, worker_directory_watch
from nimbus.cluster.reconcile import Reconciler
from nimbus.cluster.roles import ControllerAgent, GatewayAgent, WorkerAgent
from nimbus.cluster.warm import ClusterWarmer
from nimbus.control.bundle import make_bundle
from nimbus.control.deploy import Deployer
from nimbus.errors import DeployError
from nimbus.natsd import NatsCluster
from nimbus.observe.logs import LogSink
from nimbus.store.base import Blobs, Store, WatchEvent
from nimbus.store.registry import Backend, open_backend, open_blobs
from nimbus.store.sqlite import open_sqlite_store
from nimbus.worker.worker import Worker

TTL_S = 1.0
TICK_S = 0.1
WAIT_S = 30.0

pytestmark = pytest.mark.timeout(180)
_regions = itertools.count()


@dataclass(frozen=True)
class RegionStore:
    kind: str
    cluster: NatsCluster | None = None


@pytest.fixture(params=["nats", "sqlite"])
def backend(request: pytest.FixtureRequest) -> RegionStore:
    if request.param == "nats":
        return RegionStore("nats", request.getfixturevalue("nats_cluster"))
    return RegionStore("sqlite")


@asynccontextmanager
async def region(where: RegionStore, tmp_path: Path, nodes: int
                 ) -> AsyncIterator[tuple[list[Store], Blobs]]:
    """``nodes`` connections to one fresh region store, and its blobs."""
    stores: list[Store] = []
    backends: list[Backend] = []
    blobs: Blobs | None = None
    try:
        if where.cluster is not None:
            name = f"c{next(_regions)}-{secrets.token_hex(3)}"
            for _ in range(nodes):
                b = await open_backend(where.cluster.store_url, region=name,
                                       token=where.cluster.password)
                backends.append(b)
                stores.append(b.store)
            blobs = backends[0].blobs
        else:
            blobs = await open_blobs(tmp_path / "blobs")
            for _ in range(nodes):
                stores.append(await open_sqlite_store(tmp_path / "region.db"))
        yield stores, blobs
    finally:
        if backends:
            for b in backends:
                await b.aclose()
        else:
            for s in stores:
                await s.aclose()
            if blobs is not None:
                await blobs.aclose()


async def until(what: str, predicate: Callable[[], Awaitable[bool] | bool],
                timeout_s: float = WAIT_S) -> float:
    """Wait for ``predicate``; returns how long it took."""
    start = time.monotonic()
    while True:
        ok = predicate()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.02)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 100))


# -- registrations ---------------------------------------------------------------------


def test_registration_is_seen_renewed_and_expires_when_renewals_stop(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((a, b), _blobs):
            seen: list[tuple[str, str]] = []
            watch = NodeWatch(b, "worker", on_update=lambda i, info: seen.append(("up", i)),
                              on_remove=lambda i: seen.append(("down", i)))
            await watch.start()
            n = 0

            def info() -> dict[str, Any]:
                nonlocal n
                n += 1
                return {"frames": "127.0.0.1:1", "renewals": n}

            reg = Registration(a, "worker", "w1", info, ttl_s=TTL_S)
            await reg.start()
            assert (await live_nodes(b, "worker"))["w1"]["frames"] == "127.0.0.1:1"
            await until("the watch sees w1", lambda: "w1" in watch.nodes)
            await until("renewals carry fresh info",
                        lambda: watch.nodes.get("w1", {}).get("renewals", 0) >= 3)
            # lost (deleted by someone) -> campaigned again
            await b.delete(reg.key)
            await until("w1 registers again", lambda: "w1" in watch.nodes
                        and ("down", "w1") in seen)
            # the process freezes: no renewals, no resign -> the key expires
            assert reg._task is not None
            await cancel_and_wait(reg._task)
            took = await until("w1 expires", lambda: "w1" not in watch.nodes)
            print(f"registration expiry seen {took:.2f} s after renewals stopped (ttl {TTL_S})")
            assert await live_nodes(b, "worker") == {}
            # a clean close resigns at once
            reg2 = Registration(a, "worker", "w2", ttl_s=60.0)
            await reg2.start()
            await until("w2 is seen", lambda: "w2" in watch.nodes)
            await reg2.aclose()
            await until("w2 is gone well before its ttl", lambda: "w2" not in watch.nodes,
                        timeout_s=10.0)
            await watch.aclose()
            await reg.aclose()

    run(main())


# -- leadership ------------------------------------------------------------------------


def test_standby_takes_the_lead_when_the_leader_stops_renewing(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((a, b), _blobs):
            events: list[str] = []
            la = Leadership(a, "c1", ttl_s=TTL_S, on_gain=lambda t: events.append("c1 gain"),
                            on_loss=lambda: events.append("c1 loss"))
            await la.start()
            await until("c1 leads", lambda: la.is_leader)
            lb = Leadership(b, "c2", ttl_s=TTL_S, on_gain=lambda t: events.append("c2 gain"))
            await lb.start()
            await asyncio.sleep(TTL_S * 2)
            assert la.is_leader and not lb.is_leader  # a renewing leader keeps the lead
            assert await current_leader(b) == "c1"
            # c1 freezes: renewals stop
            assert la._task is not None
            await cancel_and_wait(la._task)
            took = await until("c2 leads", lambda: lb.is_leader)
            print(f"handover {took:.2f} s after the leader's renewals stopped (ttl {TTL_S})")
            # frozen c1 still believes it leads, but knows its lead may have lapsed
            assert la.is_leader and not la.holds(asyncio.get_running_loop().time())
            assert await current_leader(a) == "c2"
            assert events == ["c1 gain", "c2 gain"]
            # c1 comes back: its renewal is refused and it steps down
            la._task = asyncio.get_running_loop().create_task(la._run())
            await until("c1 steps down", lambda: not la.is_leader)
            assert events[-1] == "c1 loss" and lb.is_leader
            await la.aclose()
            await lb.aclose()
            assert await current_leader(a) is None  # the leader resigned on close

    run(main())


# -- the control loop ------------------------------------------------------------------


@dataclass
class Demanding:
    """What a gateway's invoker shows the demand reporter."""

    in_flight: int = 0
    held: int = 0
    arrivals: int = 0

    def take_arrivals(self) -> int:
        n, self.arrivals = self.arrivals, 0
        return n


def app_record(name: str, fn: str, version: int, **spec: Any) -> bytes:
    s = {"name": fn, "handler": "h.work", "module": "h", "callable": "work",
         "memory_mb": 128, "concurrency": 1, "max_instances": 6, "target_concurrency": 1.0,
         **spec}
    rec = {"version": version, "app": name, "digest": "0" * 64, "requirements_hash": None,
           "spec": s, "config_hash": "x"}
    return orjson.dumps({"name": name, "functions": {fn: rec}, "routes": []})


@dataclass
class Budget:
    max_instances: int = 8
    memory_mb: int = 4096
    ready: dict[str, int] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        return {"budget": {"max_instances": self.max_instances, "memory_mb": self.memory_mb},
                "ready": self.ready}


def test_leader_places_demand_across_workers_and_a_new_leader_moves_nothing(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 4) as ((c1s, c2s, ws, gs), _blobs):
            await ws.put("apps/a", app_record("a", "f", 1, max_concurrency=5))
            workers = [Registration(ws, "worker", f"w{i}", Budget().info, ttl_s=TTL_S)
                       for i in (1, 2)]
            gateways = [Registration(gs, "gateway", f"g{i}", ttl_s=TTL_S) for i in (1, 2)]
            for r in (*workers, *gateways):
                await r.start()
            demand = Demanding()
            reporter = DemandReporter(gs, "g1", lambda: {"f@1": demand}, interval_s=0.2)
            await reporter.start()
            c1 = ControlLoop(c1s, "c1", ttl_s=TTL_S, tick_s=TICK_S)
            await c1.start()
            await until("c1 leads", lambda: c1.is_leader)

            async def placed() -> dict[str, dict[str, int]]:
                out = {}
                for e in await ws.list("placement/"):
                    out[e.key.split("/", 1)[1]] = orjson.loads(e.value)
                return out

            async def total() -> int:
                return sum(p.get("f@1", 0) for p in (await placed()).values())

            await until("shares written", lambda: _is_set(c1s.get("shares/f/1")))
            shares = await c1s.get("shares/f/1")
            assert shares is not None
            # the cap split between the two gateways, adding up to it exactly
            assert orjson.loads(shares.value)["shares"] == {"g1": 3, "g2": 2}

            # a held request for a target with no instance: scale from zero
            demand.held, demand.arrivals = 1, 1
            await until("one instance placed", lambda: _eq(total(), 1))
            demand.held = 0
            demand.in_flight, demand.arrivals = 4, 4
            await until("four instances placed, spread", lambda: _eq(total(), 4))
            p = await placed()
            assert p["w1"]["f@1"] == 2 and p["w2"]["f@1"] == 2

            # the leader freezes; a standby takes over from the placements in the store
            revisions = {e.key: e.revision for e in await ws.list("placement/")}
            c2 = ControlLoop(c2s, "c2", ttl_s=TTL_S, tick_s=TICK_S)
            await c2.start()
            await cancel_and_wait(c1.leadership._task)
            c1._loss()
            took = await until("c2 leads", lambda: c2.is_leader)
            print(f"controller handover in {took:.2f} s (ttl {TTL_S}, tick {TICK_S})")
            await until("c2 ticks", lambda: c2.ticks >= 5)
            after = {e.key: e.revision for e in await ws.list("placement/")}
            assert after == revisions, "the new leader rewrote placements"

            # a worker dies: its instances move to the other one
            await cancel_and_wait(workers[1]._task)
            await until("w2's instances move to w1",
                        lambda: _eq(_get(placed(), "w1"), {"f@1": 4}))

            for x in (reporter, c1, c2, *workers, *gateways):
                await x.aclose()

    run(main())


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _is_set(value: Awaitable[Any]) -> bool:
    return await value is not None


async def _get(value: Awaitable[dict[str, Any]], key: str) -> Any:
    return (await value).get(key)


# -- a real worker reconciling -------------------------------------------------------

HANDLER = "import os\n\ndef work(event, context):\n    return {'pid': os.getpid()}\n"
BROKEN = "raise RuntimeError('cannot import me')\n\ndef work(event, context):\n    return 1\n"


def write_app(folder: Path, source: str, name: str = "demo", fn: str = "hello") -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.yaml").write_text(
        f"name: {name}\nfunctions:\n  {fn}:\n    handler: h.work\n"
        f"    http: [{{method: GET, path: /{fn}}}]\n")
    (folder / "h.py").write_text(source)
    bundle: bytes = make_bundle(folder)
    return bundle


@asynccontextmanager
async def worker_node(tmp_path: Path, store: Store, blobs: Blobs, wid: str = "w1"
                      ) -> AsyncIterator[tuple[Worker, Reconciler, Registration]]:
    state = tmp_path / f"node-{wid}"
    state.mkdir()
    worker = Worker(state, LogSink(state / "logs"), autoscale=False)
    await worker.start()
    agent = WorkerAgent(store, blobs, worker, wid, state,
                        info=lambda: {"frames": "127.0.0.1:7000"}, ttl_s=TTL_S)
    await agent.start()
    try:
        yield worker, agent.reconciler, agent.registration
    finally:
        await agent.aclose()
        await worker.aclose(1.0)


def test_reconciler_scales_a_real_workers_pools_from_its_placement(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((ctl, node), blobs):
            deployer = Deployer(ctl, blobs, None, tmp_path / "controller",
                                warmer=ClusterWarmer(ctl, timeout_s=WAIT_S))
            result = await deployer.deploy(write_app(tmp_path / "app", HANDLER), print)
            assert result.get("pending") is True  # no worker registered yet
            await deployer.aclose()
            async with worker_node(tmp_path, node, blobs) as (worker, rec, _reg):
                await ctl.put(placement_key("w1"), orjson.dumps({"hello@1": 2}))
                await until("two instances ready", lambda: rec.ready() == {"hello@1": 2})
                pool = worker.pools[("hello", 1)]
                out = await pool.invoke("r1", {})
                assert isinstance(out, dict) and out["pid"] in {i.pid for i in pool.instances}
                await until("ready counts reach the registration", lambda: _eq(
                    _ready(ctl, "w1"), {"hello@1": 2}))
                # an instance dies: the placement brings it back, not a request
                pool.instances[0].kill()
                await until("the lost instance is replaced",
                            lambda: len(pool.instances) == 2 and pool.cold_starts == 3)
                await ctl.put(placement_key("w1"), orjson.dumps({"hello@1": 1}))
                await until("scaled to one", lambda: len(pool.instances) == 1)
                await ctl.put(placement_key("w1"), orjson.dumps({}))
                await until("drained", lambda: ("hello", 1) not in worker.pools
                            and rec.ready() == {})
                assert pool.retired

    run(main())


async def _ready(store: Store, wid: str) -> dict[str, int]:
    ready: dict[str, int] = (await live_nodes(store, "worker")).get(wid, {}).get("ready", {})
    return ready


def test_deploy_without_a_local_worker_waits_for_the_region_and_fails_on_import_errors(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((ctl, node), blobs):
            controller = ControllerAgent(ctl, "c1", ttl_s=TTL_S, tick_s=TICK_S)
            await controller.start()
            deployer = Deployer(ctl, blobs, None, tmp_path / "controller",
                                warmer=ClusterWarmer(ctl, timeout_s=WAIT_S))
            async with worker_node(tmp_path, node, blobs) as (worker, rec, _reg):
                lines: list[str] = []
                result = await deployer.deploy(write_app(tmp_path / "v1", HANDLER), lines.append)
                assert "pending" not in result
                assert result["functions"][0]["version"] == 1
                assert ("hello", 1) in worker.pools and worker.pools[("hello", 1)].instances
                app = await ctl.get("apps/demo")
                assert app is not None
                # the instance the deploy warmed stays placed once the version is live
                await asyncio.sleep(TTL_S * 3)
                assert rec.ready().get("hello@1") == 1
                # demand reported by a gateway grows the worker's pool through the leader
                demand = Demanding(in_flight=2, arrivals=2)
                directory = Directory()
                gateway = GatewayAgent(ctl, "g1", lambda: {"hello@1": demand}, directory,
                                       ttl_s=TTL_S, interval_s=0.2)
                await gateway.start()
                await until("the pool grows with the region's demand",
                            lambda: rec.ready().get("hello@1", 0) >= 3)  # ceil(2 / 0.7)
                await until("the gateway sees the ready instances", lambda: directory.workers.get(
                    "w1", (None, {}))[1].get("hello@1", 0) >= 3)
                assert directory.workers["w1"][0] == "127.0.0.1:7000"
                await until("its share", lambda: gateway.share("hello@1", 1000) < 1000)
                await gateway.aclose()

                with pytest.raises(DeployError, match="cannot import me"):
                    await deployer.deploy(write_app(tmp_path / "v2", BROKEN), lines.append)
                latest = await ctl.get("apps/demo")
                assert latest is not None and latest.revision == app.revision  # routes stay
                assert await ctl.get("functions/hello/versions/00000002") is None
                await until("the failed version is dropped", lambda: _eq(
                    ctl.get(status_key("w1", "hello@2")), None))
                assert set(rec.ready()) == {"hello@1"}  # the live version only
            await deployer.aclose()
            await controller.aclose()

    run(main())


# -- demand, shares and the gateway's view of workers ---------------------------------


def test_demand_reports_reach_the_collector_once_and_held_requests_at_once(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((gw, ctl), _blobs):
            urgent: list[str] = []
            collector = Collector(ctl, on_urgent=urgent.append)
            await collector.start()
            f = Demanding(in_flight=2, arrivals=3)
            # a period far longer than the test: only the immediate path can report
            reporter = DemandReporter(gw, "g1", lambda: {"f@1": f}, interval_s=300.0,
                                      ttl_s=600.0)
            await reporter.start()
            await until("first report", lambda: "demand/g1" in collector.latest)
            first = collector.take()
            assert first["f@1"].in_flight == 2 and first["f@1"].arrivals == 3
            assert collector.take()["f@1"].arrivals == 0  # counted once
            f.held, f.arrivals = 1, 1
            await until("a held request is reported at once", lambda: urgent == ["f@1"])
            d = collector.take()["f@1"]
            assert (d.in_flight, d.held, d.arrivals, d.concurrency) == (2, 1, 1, 3)
            assert reporter.reports == 2
            await reporter.aclose()
            await until("the gateway's report goes with it", lambda: not collector.latest)
            await collector.aclose()

    run(main())


class Directory:
    def __init__(self) -> None:
        self.workers: dict[str, tuple[Any, dict[str, int]]] = {}

    def update(self, worker_id: str, address: Any, ready: dict[str, int]) -> None:
        self.workers[worker_id] = (address, ready)

    def remove(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)


def test_gateway_views_shares_and_worker_directory(backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((gw, other), _blobs):
            directory = Directory()
            watch = worker_directory_watch(gw, directory)
            await watch.start()
            shares = Shares(gw, "g1")
            await shares.start()
            assert shares.share("f@1", 10) == 0  # nothing written yet: none of the cap
            await other.put("shares/f/1", orjson.dumps(
                {"shares": {"g1": 3, "g2": 7}, "cap": 10, "gateways": 2}))
            await until("share seen", lambda: shares.share("f@1", 10) == 3)
            b = Budget(ready={"f@1": 2})
            reg = Registration(other, "worker", "w1",
                               lambda: {**b.info(), "frames": "127.0.0.1:7000"}, ttl_s=TTL_S)
            await reg.start()
            await until("w1 in the directory", lambda: directory.workers.get("w1") == (
                "127.0.0.1:7000", {"f@1": 2}))
            b.ready = {"f@1": 3}
            reg.refresh()
            await until("ready counts follow", lambda: directory.workers["w1"][1] == {"f@1": 3})
            await reg.aclose()
            await until("w1 removed", lambda: "w1" not in directory.workers)
            await other.delete("shares/f/1")
            await until("share gone", lambda: shares.share("f@1", 10) == 0)
            await watch.aclose()
            await shares.aclose()

    run(main())


def test_deploy_with_workers_but_no_leader_fails_clearly_and_changes_nothing(
        backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((ctl, node), blobs):
            reg = Registration(node, "worker", "w1", Budget().info, ttl_s=TTL_S)
            await reg.start()
            deployer = Deployer(ctl, blobs, None, tmp_path / "controller",
                                warmer=ClusterWarmer(ctl, timeout_s=1.0))
            with pytest.raises(DeployError, match="no controller leads the region"):
                await deployer.deploy(write_app(tmp_path / "app", HANDLER), print)
            assert await ctl.get("apps/demo") is None
            assert await ctl.list("functions/hello/versions/") == []
            assert await ctl.list("warm/") == []  # given up at once
            await deployer.aclose()
            await reg.aclose()

    run(main())


class LossyWatch:
    """A real watch that loses delete events, then says ``reset`` once
    asked: what a consumer sees after a reconnect that missed history."""

    def __init__(self, inner: Any, lossy: LossyStore) -> None:
        self.inner = inner
        self.lossy = lossy

    def __aiter__(self) -> LossyWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self.lossy.reset_now.is_set():
                self.lossy.reset_now.clear()
                return WatchEvent("reset", "", b"", 0)
            nxt = asyncio.ensure_future(self.inner.__anext__())
            reset = asyncio.ensure_future(self.lossy.reset_now.wait())
            done, _ = await asyncio.wait({nxt, reset}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                continue
            reset.cancel()
            ev: WatchEvent = nxt.result()
            if ev.kind == "delete" and self.lossy.drop_deletes:
                self.lossy.dropped += 1
                continue
            return ev

    async def aclose(self) -> None:
        await self.inner.aclose()


class LossyStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.drop_deletes = True
        self.dropped = 0
        self.reset_now = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def watch(self, prefix: str, *, after: int = 0) -> LossyWatch:
        return LossyWatch(self.store.watch(prefix, after=after), self)


def test_node_watch_recovers_missed_events_on_reset(backend: RegionStore,
                                                    tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((a, b), _blobs):
            lossy = LossyStore(b)
            gone: list[str] = []
            watch = NodeWatch(lossy, "worker", on_remove=gone.append)
            await watch.start()
            regs = [Registration(a, "worker", f"w{i}", ttl_s=30.0) for i in (1, 2)]
            for r in regs:
                await r.start()
            await until("both seen", lambda: set(watch.nodes) == {"w1", "w2"})
            await regs[0].aclose()  # its delete event is lost
            await until("the delete was lost", lambda: lossy.dropped >= 1)
            assert "w1" in watch.nodes  # a ghost, for now
            lossy.reset_now.set()
            await until("the reset lists again", lambda: set(watch.nodes) == {"w2"})
            assert gone == ["w1"]
            await regs[1].aclose()
            await watch.aclose()

    run(main())


def test_leader_steps_down_when_it_cannot_renew(backend: RegionStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with region(backend, tmp_path, 2) as ((a, b), _blobs):
            lost: list[str] = []
            la = Leadership(a, "c1", ttl_s=TTL_S, on_loss=lambda: lost.append("c1"))
            await la.start()
            await until("c1 leads", lambda: la.is_leader)
            await a.aclose()  # its store is gone: every renewal fails
            await until("c1 steps down", lambda: not la.is_leader)
            assert lost == ["c1"]
            lb = Leadership(b, "c2", ttl_s=TTL_S)
            await lb.start()
            await until("c2 leads once the key expired", lambda: lb.is_leader)
            await la.aclose()
            await lb.aclose()

    run(main())
