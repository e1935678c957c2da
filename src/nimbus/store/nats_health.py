"""The NATS servers of a region as ``nimbus status`` shows them: from the
cluster info of the region's store stream (which server leads it, which
replicas are current, how far behind the others are), plus the server this
process is connected to."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client

from nimbus.errors import NimbusError

HEALTH_TIMEOUT_S = 2.0


async def servers_health(nc: Client, region: str) -> list[dict[str, Any]]:
    stream = f"KV_nimbus-{region}-store"
    # the connected server's INFO (nats-py keeps it, without a public accessor)
    info_of_server: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
    connected = info_of_server.get("server_name")
    try:
        js = nc.jetstream(timeout=HEALTH_TIMEOUT_S)
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            info = await js.stream_info(stream)
    except (TimeoutError, NimbusError, OSError, Exception) as exc:  # noqa: BLE001 - shown
        return [{"name": connected or "-", "url": "-",
                 "health": f"store stream unavailable: {type(exc).__name__}"}]
    cluster = info.cluster
    if cluster is None:
        return [{"name": connected or "-", "url": "-", "health": "single server"}]
    out = [{"name": cluster.leader or "-", "role": "leader", "health": "current",
            "connected": cluster.leader == connected}]
    for r in cluster.replicas or []:
        if r.offline:
            health = "offline"
        elif not r.current:
            health = f"catching up ({r.lag or 0} behind)"
        else:
            health = "current"
        out.append({"name": r.name, "role": "replica", "health": health,
                    "connected": r.name == connected})
    url = nc.connected_url
    here = f"{url.scheme}://{url.netloc}" if url is not None else "-"
    for s in out:
        s["url"] = here if s["connected"] else "-"
    return out
