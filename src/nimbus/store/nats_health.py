"""The NATS servers of a region as ``nimbus status`` shows them: from the
cluster info of the region's store stream (which server leads it, which
replicas are current, how far behind the others are), each server's URL
matched to its name by the INFO line it sends to a new connection."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client

from nimbus.errors import NimbusError

HEALTH_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 1.0
_SEEN: dict[str, str] = {}  # server name by URL, as each last said it


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
    names = await _names_by_url(known_urls(nc))
    for url, name in names.items():  # a server that stops answering keeps its name
        if name is not None:
            _SEEN[url] = name
    urls = {name: url for url, name in names.items() if name}
    silent = [url for url, name in names.items() if name is None]
    known_silent = {_SEEN[u]: u for u in silent if u in _SEEN}
    for s in out:
        addr = urls.get(str(s["name"]))
        if addr is None:
            # the stream still lists it, but it does not answer
            s["health"] = "unreachable"
            addr = known_silent.pop(str(s["name"]), None) or (
                silent[0] if len(silent) == 1 and not known_silent else "-")
            if addr in silent:
                silent.remove(addr)
        s["url"] = addr
    listed = {s["name"] for s in out}
    for url, name in names.items():  # a server the store's stream does not name
        if name is not None and name not in listed:
            out.append({"name": name, "role": "-", "url": url, "health": "no store replica",
                        "connected": False})
    for url in silent:
        out.append({"name": _SEEN.get(url, "-"), "role": "-", "url": url,
                    "health": "unreachable", "connected": False})
    return out


async def _names_by_url(urls: list[str]) -> dict[str, str | None]:
    """Each server's name from the INFO line it sends first (no login
    needed), or None if it does not answer in time."""
    async def name_of(url: str) -> str | None:
        host, _, port = url.removeprefix("nats://").rpartition(":")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
                try:
                    line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError):
            return None
        if not line.startswith(b"INFO "):
            return None
        try:
            info = json.loads(line[5:])
        except ValueError:
            return None
        name = info.get("server_name") if isinstance(info, dict) else None
        return str(name) if name else None

    found = await asyncio.gather(*(name_of(u) for u in urls))
    return dict(zip(urls, found, strict=True))


def known_urls(nc: Client) -> list[str]:
    """Every server's client URL this client knows: the ones it was given and
    the ones the cluster told it about."""
    return sorted({f"{srv.uri.scheme}://{srv.uri.netloc}"
                   for srv in getattr(nc, "_server_pool", [])})
