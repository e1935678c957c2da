"""The controller process's parts, wired (as ``Platform`` is for ``nimbus up``).

The control API (:func:`nimbus.control.api.create_control_app`) is given
this object: it answers deploys, invocations, records, logs and status for
the whole region.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from nimbus.manifest.model import RegionsSpec
from nimbus.observe import metrics
from nimbus.roles.common import RoleConfig
from nimbus.roles.controller import ControllerOptions, node_summary

ROLES = ("controller", "worker", "gateway")


class Controller:
    def __init__(self, config: RoleConfig, options: ControllerOptions, backend: Any) -> None:
        from nimbus.clock import SystemClock
        from nimbus.cluster.nodes import NodeWatch
        from nimbus.cluster.roles import ControllerAgent
        from nimbus.cluster.warm import ClusterWarmer
        from nimbus.control.deploy import Deployer
        from nimbus.control.routesync import RouteSync
        from nimbus.events.scheduler import Scheduler
        from nimbus.events.service import Events
        from nimbus.gateway.app import Gateway
        from nimbus.gateway.remote import WorkerDirectory
        from nimbus.roles.gateway import RemotePools
        from nimbus.rollout.runner import RolloutRunner
        from nimbus.rollout.sampler import ScrapeSampler

        self.config = config
        self.options = options
        self.backend = backend
        self.store = backend.store
        self.token = config.token
        self.metrics_token: str | None = None if options.metrics_auth == "open" \
            else config.token
        self.state_dir = config.state_dir
        self.started_at = time.time()
        self.control_url = ""
        self.guards: dict[str, Any] = {}
        clock = SystemClock()
        self.directory = WorkerDirectory(config.token)
        self.nodes = {role: NodeWatch(backend.store, role) for role in ROLES}
        self.pools = RemotePools(self.directory)  # for `nimbus invoke`
        self.gateway = Gateway()  # the route table `nimbus invoke` uses; serves no port
        self.events = Events(backend.queue, clock, consume=False)
        self.gateway.events = self.events
        self.routes = RouteSync(backend.store, self.gateway, self.pools,  # type: ignore[arg-type]
                                on_change=self.events.sync)
        self.events.resolve = self.routes.invoker_for
        self.deployer = Deployer(backend.store, backend.blobs, None, config.state_dir,
                                 warmer=ClusterWarmer(backend.store))
        # Schedules fire on one controller at a time: the scheduler holds its
        # own key, with the same short lifetime as the leader's.
        self.scheduler = Scheduler(backend.store, backend.queue, clock, node=config.node_id,
                                   lease_ttl_s=max(2.0, options.leader_ttl_s))
        self.events.on_sync.append(self.scheduler.set_pools)
        # Rollouts move on the leader only: started and stopped with the lead.
        self.rollouts = RolloutRunner(backend.store, ScrapeSampler(backend.store, config.token),
                                      clock, note=self._note, publish=True)
        self.deployer.traffic = self._traffic
        self._log_sink: Any = None
        self._stopping: set[Any] = set()
        metrics.watch_rollouts(self.rollouts.shares)
        self.agent = ControllerAgent(backend.store, config.node_id,
                                     info=lambda: {"url": self.control_url,
                                                   "metrics": self.control_url},
                                     ttl_s=options.leader_ttl_s,
                                     on_gain=self._lead, on_loss=self._unlead)
        self.http: Any = None
        self._workers_watch: Any = None
        self.dashboard: Any = None
        self._scraper: Any = None
        self._traces: Any = None  # this process's spans to the region's stream
        metrics.set_role("controller")
        metrics.watch_async(self._async_figures)

    def _lead(self, term: int) -> None:
        self.rollouts.start()

    def _unlead(self) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(self.rollouts.aclose())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _note(self, fn: str, text: str, level: str) -> None:
        """A rollout decision as a platform line in ``fn``'s logs (the region's stream)."""
        if self._log_sink is not None:
            self._log_sink.write(fn, None, "platform", text, level)

    async def _traffic(self, fn: str, version: int) -> int | None:
        from nimbus.rollout.runner import published_traffic

        now = time.time()
        if self.rollouts.active:
            return self.rollouts.traffic_of(fn, version, now)
        return await published_traffic(self.store, fn, version, now)

    async def _async_figures(self) -> dict[str, Any]:
        """The region's async backlog per function, for the metrics scrape."""
        return {name: await self.events.backlog(name) for name in list(self.routes.functions)}

    @classmethod
    async def open(cls, config: RoleConfig, options: ControllerOptions) -> Controller:
        from nimbus.store.registry import open_backend

        backend = await open_backend(config.store_url, region=config.region,
                                     token=config.token, state_dir=config.state_dir)
        return cls(config, options, backend)

    async def start(self) -> None:
        from nimbus.cluster.nodes import worker_directory_watch
        from nimbus.control.api import create_control_app
        from nimbus.observe import natstraces
        from nimbus.observe.natslogs import open_region_logs
        from nimbus.roles.http import HttpServer

        for watch in self.nodes.values():
            await watch.start()
        self._workers_watch = worker_directory_watch(self.store, self.directory)
        await self._workers_watch.start()
        await self.routes.start()
        self.scheduler.start()
        source = traces = None
        if self.backend.nc is not None:
            self._log_sink, source = await open_region_logs(
                self.backend.nc, region=self.config.region, worker=self.config.node_id)
            traces = await natstraces.open_source(self.backend.nc, self.config.region)
        self._traces = await natstraces.attach(self.backend.nc, region=self.config.region,
                                               node=self.config.node_id)
        self.dashboard = self._dashboard()
        self.http = HttpServer.for_control(
            create_control_app(self, log_source=source,  # type: ignore[arg-type]
                               dashboard=self.dashboard, trace_source=traces),
            self.options.control_host, self.options.control_port, self.options.grace_s)
        await self.http.start()
        self.control_url = self.http.url
        self.guards = {"control": self.http.guard}
        await self.agent.start()
        with contextlib.suppress(Exception):  # learn the servers' names while all answer
            await self.nats_health()

    def _dashboard(self) -> Any:
        """``/ui``: its history from this process's metrics and every worker's
        and gateway's ``metrics`` URL (their node records), scraped with the
        region token."""
        from nimbus.ui.collector import SCRAPE_INTERVAL_S, Scraper
        from nimbus.ui.dashboard import Dashboard

        self._scraper = scraper = Scraper(self.metrics_urls, self.token)
        dashboard = Dashboard(self.token, scraper.read, versions=self.versions,
                              store=self.store, region=self.config.region,
                              scrapes=lambda: dict(scraper.last), interval_s=SCRAPE_INTERVAL_S)
        dashboard.start()
        return dashboard

    def metrics_urls(self) -> list[str]:
        return [str(info["metrics"]) for role in ("worker", "gateway")
                for info in self.nodes[role].nodes.values()
                if isinstance(info.get("metrics"), str) and info["metrics"]]

    async def versions(self, fn: str) -> list[dict[str, Any]]:
        from nimbus.ui.dashboard import function_versions

        return await function_versions(self.store, fn, self.routes.functions.get(fn))

    @property
    def max_bundle_bytes(self) -> int:
        return self.options.max_bundle_bytes

    async def deploy(self, bundle: bytes, progress: Any, name: str | None = None,
                     regions: RegionsSpec | None = None, rollout: Any = None,
                     parameters: dict[str, str] | None = None) -> Any:
        result = await self.deployer.deploy(bundle, progress, name, regions, rollout,
                                            parameters=parameters)
        want = {f["name"]: f.get("serving", f["version"]) for f in result["functions"]}
        await self.routes.wait_for(lambda rs: all(
            n in rs.functions and rs.functions[n].target.version == v for n, v in want.items()))
        return result

    async def region_status(self) -> dict[str, Any]:
        now = time.time()
        nodes = [node_summary(info, now) for role in ROLES
                 for info in self.nodes[role].nodes.values()]
        desired = await self.placed()
        functions = []
        for name, inv in sorted(self.routes.functions.items()):
            key = f"{name}@{inv.target.version}"
            per_worker = {n["id"]: int(n["ready"].get(key, 0)) for n in nodes
                          if n["role"] == "worker"}
            functions.append({
                "name": name, "version": inv.target.version,
                "desired": desired.get(key, 0),
                "ready": sum(per_worker.values()), "held": inv.held,
                "instances_per_worker": per_worker,
                "async": await self.events.stats(name)})
        return {
            "mode": "region", "region": self.config.region, "pid": os.getpid(),
            "node": self.config.node_id, "uptime_s": round(now - self.started_at, 1),
            "control_url": self.control_url, "leader": await self.leader_id(),
            "leading": self.agent.is_leader, "nodes": nodes,
            "nats": await self.nats_health(), "nats_urls": self.nats_urls(),
            "functions": functions}

    async def placed(self) -> dict[str, int]:
        """Instances placed per target, over every worker's placement."""
        import orjson

        from nimbus.cluster.keys import PLACEMENT

        out: dict[str, int] = {}
        for e in await self.store.list(PLACEMENT):
            try:
                for target, n in orjson.loads(e.value).items():
                    out[target] = out.get(target, 0) + int(n)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
        return out

    async def leader_id(self) -> str | None:
        import orjson

        from nimbus.cluster.keys import LEADER

        entry = await self.store.get(LEADER)
        if entry is None:
            return None
        try:
            data = orjson.loads(entry.value)
        except orjson.JSONDecodeError:
            return None
        return str(data["id"]) if isinstance(data, dict) and "id" in data else None

    async def nats_health(self) -> list[dict[str, Any]]:
        from nimbus.store.nats_health import servers_health

        if self.backend.nc is None:
            return []
        return await servers_health(self.backend.nc, self.config.region)

    def nats_urls(self) -> list[str]:
        from nimbus.store.nats_health import known_urls

        return known_urls(self.backend.nc) if self.backend.nc is not None else []

    async def aclose(self) -> None:
        await self.agent.aclose()  # resigns the lead: a standby takes over at once
        await self.rollouts.aclose()
        if self._log_sink is not None:
            await self._log_sink.aclose()
        if self.http is not None:
            await self.http.aclose()
        if self.dashboard is not None:
            await self.dashboard.aclose()
        if self._scraper is not None:
            await self._scraper.aclose()
        await self.scheduler.aclose()
        await self.routes.aclose()
        if self._workers_watch is not None:
            await self._workers_watch.aclose()
        await self.events.aclose(grace_s=1.0)
        await self.deployer.aclose()
        for watch in self.nodes.values():
            await watch.aclose()
        await self.directory.aclose()
        from nimbus.observe import natstraces

        await natstraces.detach(self._traces)
        await self.backend.aclose()
