"""The controller process's parts, wired (as ``Platform`` is for ``nimbus up``).

The control API (:func:`nimbus.control.api.create_control_app`) is given
this object: it answers deploys, invocations, records, logs and status for
the whole region.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from nimbus.roles.common import RoleConfig
from nimbus.roles.controller import ControllerOptions, node_summary

ROLES = ("controller", "worker", "gateway")


class Controller:
    def __init__(self, config: RoleConfig, options: ControllerOptions, backend: Any) -> None:
        from nimbus.clock import SystemClock
        from nimbus.cluster.leader import ControlLoop, Leadership
        from nimbus.cluster.nodes import NodeWatch
        from nimbus.control.deploy import Deployer
        from nimbus.control.routesync import RouteSync
        from nimbus.events.scheduler import Scheduler
        from nimbus.events.service import Events
        from nimbus.gateway.app import Gateway
        from nimbus.gateway.remote import WorkerDirectory
        from nimbus.roles.gateway import RemotePools, feed_directory

        self.config = config
        self.options = options
        self.backend = backend
        self.store = backend.store
        self.token = config.token
        self.state_dir = config.state_dir
        self.started_at = time.time()
        self.control_url = ""
        self.gateway_url = ""
        self.guards: dict[str, Any] = {}
        clock = SystemClock()
        self.directory = WorkerDirectory(config.token)
        self.nodes = {role: NodeWatch(backend.store, role) for role in ROLES}
        self.nodes["worker"].on_change = lambda n: feed_directory(self.directory, n)
        self.pools = RemotePools(self.directory)
        self.gateway = Gateway()  # the route table `nimbus invoke` uses; serves no port
        self.events = Events(backend.queue, clock, consume=False)
        self.gateway.events = self.events
        self.routes = RouteSync(backend.store, self.gateway, self.pools,  # type: ignore[arg-type]
                                on_change=self.events.sync)
        self.deployer = Deployer.for_region(backend.store, backend.blobs, config.state_dir)
        self.leadership = Leadership(backend.store, "leader/controller", config.node_id,
                                     ttl_s=options.leader_ttl_s)
        self.loop = ControlLoop(backend.store, self.leadership)
        self.scheduler = Scheduler(backend.store, backend.queue, clock, node=config.node_id)
        self.events.on_sync.append(self.scheduler.set_pools)
        self.registration: Any = None
        self.http: Any = None

    @classmethod
    async def open(cls, config: RoleConfig, options: ControllerOptions) -> Controller:
        from nimbus.store.registry import open_backend

        backend = await open_backend(config.store_url, region=config.region,
                                     token=config.token, state_dir=config.state_dir)
        return cls(config, options, backend)

    async def start(self) -> None:
        from nimbus.cluster.nodes import Registration
        from nimbus.control.api import create_control_app
        from nimbus.roles.http import HttpServer

        for watch in self.nodes.values():
            await watch.start()
        await self.routes.start()
        await self.leadership.start()
        await self.loop.start()
        self.scheduler.start()
        self.http = HttpServer.for_control(create_control_app(self), self.options.control_host,
                                           self.options.control_port, self.options.grace_s)
        await self.http.start()
        self.control_url = self.http.url
        self.guards = {"control": self.http.guard}
        self.registration = Registration(self.store, "controller", self.config.node_id,
                                         lambda: {"url": self.control_url})
        await self.registration.start()

    @property
    def config_max_bundle_bytes(self) -> int:
        return self.options.max_bundle_bytes

    async def deploy(self, bundle: bytes, progress: Any, name: str | None = None) -> Any:
        result = await self.deployer.deploy(bundle, progress, name)
        want = {f["name"]: f["version"] for f in result["functions"]}
        await self.routes.wait_for(lambda rs: all(
            n in rs.functions and rs.functions[n].target.version == v for n, v in want.items()))
        return result

    async def status(self) -> dict[str, Any]:
        now = time.time()
        nodes = [node_summary(info, now) for role in ROLES
                 for info in self.nodes[role].nodes.values()]
        functions = []
        for name, inv in sorted(self.routes.functions.items()):
            key = f"{name}@{inv.target.version}"
            per_worker = {n["id"]: n["ready"].get(key, 0) for n in nodes
                          if n["role"] == "worker"}
            functions.append({
                "name": name, "version": inv.target.version,
                "desired": self.loop.desired.get(key), "ready": sum(per_worker.values()),
                "starting": 0, "instances_per_worker": per_worker,
                "async": await self.events.stats(name)})
        return {
            "mode": "region", "region": self.config.region, "pid": os.getpid(),
            "node": self.config.node_id, "uptime_s": round(now - self.started_at, 1),
            "control_url": self.control_url, "leader": self.leadership.leader,
            "leading": self.leadership.is_leader, "nodes": nodes,
            "nats": await self.nats_health(), "functions": functions}

    async def nats_health(self) -> list[dict[str, Any]]:
        health = getattr(self.backend, "health", None)
        return await health() if health is not None else []

    async def aclose(self) -> None:
        for part in (self.registration, self.http):
            if part is not None:
                await part.aclose()
        await self.scheduler.aclose()
        await self.loop.aclose()
        await self.leadership.aclose()
        await self.routes.aclose()
        await self.events.aclose(grace_s=1.0)
        await self.deployer.aclose()
        for watch in self.nodes.values():
            await watch.aclose()
        await self.directory.aclose()
        await self.backend.aclose()
        await asyncio.sleep(0)
