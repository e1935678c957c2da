"""``nimbus controller``: the region's control API, and (on the leader)
autoscaling, placement and schedules.

Any number run per region; each serves the control API (deploys go through
any of them: the bundle goes to the region's blobs, workers fetch it).
They campaign for ``leader/controller``; the leader runs the control loop
(aggregated demand -> ``Decider`` -> placements and concurrency shares) and
fires schedules. A standby takes over when the leader's key expires.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from nimbus.roles.common import RoleConfig, check_auth, remove_node_file, write_node_file

log = logging.getLogger("nimbus.controller")


@dataclass(frozen=True, slots=True)
class ControllerOptions:
    control_host: str = "127.0.0.1"
    control_port: int = 8081
    grace_s: float = 10.0
    max_bundle_bytes: int = 250 * 1024 * 1024
    leader_ttl_s: float = 1.5
    metrics_auth: str = "token"  # GET /metrics on the control API: region token, or "open"

    def __post_init__(self) -> None:
        check_auth(self.metrics_auth, self.control_host, "--control-host")


async def serve_controller(config: RoleConfig, options: ControllerOptions,
                           stop: asyncio.Event) -> None:
    from nimbus.roles.region import Controller

    controller = await Controller.open(config, options)
    try:
        await controller.start()
        write_node_file(config, {"url": controller.control_url,
                                 "metrics": controller.control_url})
        log.warning("controller %s: control API at %s", config.node_id,
                    controller.control_url)
        await stop.wait()
    finally:
        remove_node_file(config)
        await controller.aclose()


def node_summary(info: dict[str, Any], now: float) -> dict[str, Any]:
    """A node's registration as ``nimbus status`` shows it."""
    return {"role": info.get("role"), "id": info.get("id"), "pid": info.get("pid"),
            "host": info.get("host"), "url": info.get("url"), "metrics": info.get("metrics"),
            "uptime_s": round(now - float(info.get("started_at", now)), 1),
            "ready": info.get("ready", {}), "lease": "held"}

