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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nimbus.roles.common import RoleConfig, check_auth, remove_node_file, write_node_file
from nimbus.worker.target import Target

log = logging.getLogger("nimbus.gateway")


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    grace_s: float = 10.0
    max_body_bytes: int = 6 * 1024 * 1024
    metrics_host: str | None = None  # default: host
    metrics_port: int = 0
    metrics_auth: str = "token"

    def __post_init__(self) -> None:
        check_auth(self.metrics_auth, self.metrics_host or self.host, "--metrics-host")


SHARE_EVERY_S = 0.25


class RemotePools:
    """What route sync needs from "the worker" (``pool(target)`` and
    ``retire(keep)``), answered with remote invokers."""

    def __init__(self, directory: Any,
                 share: Callable[[str, int], int] | None = None) -> None:
        from nimbus.gateway.remote import RemoteInvoker

        self._make = RemoteInvoker
        self.directory = directory
        self.share = share  # this gateway's part of a region-wide cap, if it has parts
        self.pools: dict[tuple[str, int], Any] = {}
        self.full_caps: dict[tuple[str, int], int] = {}

    def pool(self, target: Target) -> Any:
        inv = self.pools.get(target.key)
        if inv is None or inv.target != target:
            if inv is not None:
                inv.close()
            inv = self.pools[target.key] = self._make(target, self.directory)
            self.full_caps[target.key] = inv.cap
            if self.share is not None:  # from its first request on, never the whole cap
                inv.cap = self.share(f"{target.function}@{target.version}", inv.cap)
        return inv

    def retire(self, keep: set[tuple[str, int]], grace_s: float = 1.0) -> None:
        for key in [k for k in self.pools if k not in keep]:
            self.pools.pop(key).close()
            self.full_caps.pop(key, None)

    def by_target(self) -> dict[str, Any]:
        """The invokers by target key (``"fn@version"``), for demand reports."""
        return {f"{fn}@{v}": inv for (fn, v), inv in self.pools.items()}

    def apply_shares(self) -> None:
        """Each invoker's cap: this gateway's part of the function's
        region-wide cap (0 until the leader has handed out the parts)."""
        if self.share is None:
            return
        for key, inv in self.pools.items():
            cap = self.share(f"{key[0]}@{key[1]}", self.full_caps[key])
            if inv.cap != cap:
                inv.cap = cap


async def serve_gateway(config: RoleConfig, options: GatewayOptions,
                        stop: asyncio.Event) -> None:
    from nimbus.clock import SystemClock
    from nimbus.cluster.demand import Shares
    from nimbus.cluster.roles import GatewayAgent
    from nimbus.control.routesync import RouteSync
    from nimbus.events.service import Events
    from nimbus.gateway.app import Gateway, GatewayConfig
    from nimbus.gateway.remote import WorkerDirectory
    from nimbus.observe import metrics, natstraces
    from nimbus.roles.http import HttpServer
    from nimbus.store.registry import open_backend

    backend = await open_backend(config.store_url, region=config.region, token=config.token,
                                 state_dir=config.state_dir)
    directory = WorkerDirectory(config.token)
    shares = Shares(backend.store, config.node_id)
    pools = RemotePools(directory, shares.share)
    gateway = Gateway(GatewayConfig(max_body_bytes=options.max_body_bytes))
    events = Events(backend.queue, SystemClock())
    gateway.events = events
    routes = RouteSync(backend.store, gateway, pools,  # type: ignore[arg-type]
                       on_change=events.sync)
    events.resolve = routes.invoker_for
    http = HttpServer.for_gateway(gateway, options.host, options.port, options.grace_s)
    metrics.set_role("gateway")
    metrics.watch_invokers(lambda: list(pools.pools.values()))
    metrics_http = HttpServer.for_metrics(
        options.metrics_host or options.host, options.metrics_port,
        None if options.metrics_auth == "open" else config.token)
    agent = GatewayAgent(backend.store, config.node_id, pools.by_target, directory,
                         info=lambda: {"url": http.url, "metrics": metrics_http.url},
                         shares=shares)
    sharing: asyncio.Task[None] | None = None
    traces = None
    try:
        traces = await natstraces.attach(backend.nc, region=config.region,
                                         node=config.node_id)
        await routes.start()
        events.start()
        await metrics_http.start()
        await http.start()
        await agent.start()  # the workers, shares, demand reports; registered with our URL
        sharing = asyncio.create_task(_keep_shares(pools))
        write_node_file(config, {"url": http.url, "metrics": metrics_http.url})
        log.info("gateway %s serving at %s", config.node_id, http.url)
        await stop.wait()
    finally:
        remove_node_file(config)
        # HTTP requests and async work in flight finish first, side by side,
        # while this gateway still reports demand and holds its parts of caps;
        # then it leaves the region.
        gateway.draining = True
        await asyncio.gather(http.aclose(), events.aclose(grace_s=min(options.grace_s, 5.0)))
        if sharing is not None:
            sharing.cancel()
        await agent.aclose()
        await routes.aclose()
        await directory.aclose()
        await metrics_http.aclose()
        await natstraces.detach(traces)
        await backend.aclose()


async def _keep_shares(pools: RemotePools) -> None:
    while True:
        pools.apply_shares()
        await asyncio.sleep(SHARE_EVERY_S)
