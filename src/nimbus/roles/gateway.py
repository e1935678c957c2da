"""``nimbus gateway``: the region's HTTP front door.

Holds each live function version's invoker (holding, throttling at its
share of ``max_concurrency``, counting demand) and calls instances on the
workers over authenticated frame connections. Reports its demand to the
controller leader, follows the live workers and the route table through
the store, and runs async work (competing consumers of the region's
queues) through the same invokers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from nimbus.roles.common import RoleConfig, remove_node_file, write_node_file
from nimbus.worker.target import Target

log = logging.getLogger("nimbus.gateway")


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    grace_s: float = 10.0
    max_body_bytes: int = 6 * 1024 * 1024


class RemotePools:
    """What route sync needs from "the worker" (``pool(target)`` and
    ``retire(keep)``), answered with remote invokers."""

    def __init__(self, directory: Any) -> None:
        from nimbus.gateway.remote import RemoteInvoker

        self._make = RemoteInvoker
        self.directory = directory
        self.pools: dict[tuple[str, int], Any] = {}

    def pool(self, target: Target) -> Any:
        inv = self.pools.get(target.key)
        if inv is None or inv.target != target:
            inv = self.pools[target.key] = self._make(target, self.directory)
        return inv

    def retire(self, keep: set[tuple[str, int]], grace_s: float = 1.0) -> None:
        for key in [k for k in self.pools if k not in keep]:
            self.pools.pop(key).close()


async def serve_gateway(config: RoleConfig, options: GatewayOptions,
                        stop: asyncio.Event) -> None:
    from nimbus.clock import SystemClock
    from nimbus.cluster.demand import DemandReporter
    from nimbus.cluster.nodes import NodeWatch, Registration
    from nimbus.cluster.shares import ShareWatch
    from nimbus.control.routesync import RouteSync
    from nimbus.roles.http import HttpServer
    from nimbus.events.service import Events
    from nimbus.gateway.app import Gateway, GatewayConfig
    from nimbus.gateway.remote import WorkerDirectory
    from nimbus.store.registry import open_backend

    backend = await open_backend(config.store_url, region=config.region, token=config.token,
                                 state_dir=config.state_dir)
    closers: list[Any] = []
    try:
        directory = WorkerDirectory(config.token)
        closers.append(directory)
        workers = NodeWatch(backend.store, "worker", on_change=lambda nodes: feed_directory(
            directory, nodes))
        await workers.start()
        closers.append(workers)
        pools = RemotePools(directory)
        gateway = Gateway(GatewayConfig(max_body_bytes=options.max_body_bytes))
        events = Events(backend.queue, SystemClock())
        gateway.events = events
        routes = RouteSync(backend.store, gateway, pools,  # type: ignore[arg-type]
                           on_change=events.sync)
        await routes.start()
        closers.append(routes)
        shares = ShareWatch(backend.store, pools)
        await shares.start()
        closers.append(shares)
        reporter = DemandReporter(backend.store, config.node_id, lambda: pools.pools)
        await reporter.start()
        closers.append(reporter)
        http = HttpServer.for_gateway(gateway, options.host, options.port, options.grace_s)
        await http.start()
        registration = Registration(backend.store, "gateway", config.node_id,
                                    lambda: {"url": http.url})
        await registration.start()
        closers.append(registration)
        events.start()
        write_node_file(config, {"url": http.url})
        log.warning("gateway %s serving at %s", config.node_id, http.url)
        await stop.wait()
        remove_node_file(config)
        await registration.aclose()
        closers.remove(registration)
        await http.aclose()
        await events.aclose(grace_s=min(options.grace_s, 5.0))
    finally:
        remove_node_file(config)
        for c in reversed(closers):
            await c.aclose()
        await backend.aclose()


def feed_directory(directory: Any, nodes: dict[str, dict[str, Any]]) -> None:
    for node_id, info in nodes.items():
        directory.update(node_id, info["frames"], info.get("ready", {}))
    for node_id in [n for n in directory.workers if n not in nodes]:
        directory.remove(node_id)
