"""Which apps each region serves, read from every region's control API
(`GET /v1/apps`) every few seconds.

A region's last good listing is kept while it does not answer: a region
that is down still "has" its apps (health decides whether it gets traffic),
and a region that comes back is listed again before its health has risen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile

log = logging.getLogger("nimbus.dns")


@dataclass(frozen=True)
class AppInfo:
    name: str
    regions: RegionsSpec | None    # the routing of the newest version any region has
    version: int
    hosted_by: frozenset[str]      # regions whose last listing has the app
    routes: tuple[tuple[str, str], ...] = ()   # (method, path) of that newest version


class AppDirectory:
    """The apps of every region of a cluster file."""

    def __init__(self, cluster: ClusterFile, log_errors: bool = True) -> None:
        self.cluster = cluster
        self.log_errors = log_errors    # a region that stops answering: one warning
        self.listings: dict[str, dict[str, dict[str, Any]]] = {}   # region -> app -> entry
        self.apps: dict[str, AppInfo] = {}
        self.errors: dict[str, str] = {}
        self.ready = asyncio.Event()     # set after the first round of asking

    def get(self, name: str) -> AppInfo | None:
        return self.apps.get(name)

    def update(self, region: str, listing: object) -> None:
        """Take one region's `GET /v1/apps` answer (checked here: a region
        answering nonsense keeps its previous listing)."""
        if not isinstance(listing, list):
            raise ValueError("GET /v1/apps did not answer a list")
        apps: dict[str, dict[str, Any]] = {}
        for entry in listing:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                raise ValueError("GET /v1/apps listed an entry without a name")
            apps[entry["name"]] = entry
        self.listings[region] = apps
        self.apps = merge(self.cluster.names, self.listings)

    async def refresh(self, client: httpx.AsyncClient) -> None:
        """Ask every region once, concurrently."""
        await asyncio.gather(*(self._refresh_region(client, name)
                               for name in self.cluster.names))

    async def _refresh_region(self, client: httpx.AsyncClient, name: str) -> None:
        entry = self.cluster.regions[name]
        try:
            response = await client.get(entry.control + "/v1/apps",
                                        headers={"authorization": f"Bearer {entry.token}"})
            if response.status_code != 200:
                raise ValueError(f"GET /v1/apps answered {response.status_code}")
            self.update(name, response.json())
        except (httpx.HTTPError, ValueError) as exc:
            message = str(exc) or type(exc).__name__
            if self.log_errors and self.errors.get(name) != message:
                log.warning("region %s: cannot list its apps: %s", name, message)
            self.errors[name] = message
        else:
            self.errors.pop(name, None)

    async def run(self, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        """Refresh every ``interval_s`` until cancelled."""
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            while True:
                await self.refresh(client)
                self.ready.set()
                await asyncio.sleep(interval_s)


def merge(order: tuple[str, ...],
          listings: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, AppInfo]:
    """One view of every app: who hosts it, and the routing of its newest
    version (the cluster file's first region wins a tie). Pure."""
    out: dict[str, AppInfo] = {}
    for region in order:
        for name, entry in listings.get(region, {}).items():
            version = entry.get("version")
            version = version if type(version) is int else 0
            spec = _spec(entry.get("regions"))
            routes = _routes(entry.get("routes"))
            known = out.get(name)
            if known is None:
                out[name] = AppInfo(name, spec, version, frozenset({region}), routes)
                continue
            hosts = known.hosted_by | {region}
            if version > known.version:
                out[name] = AppInfo(name, spec, version, hosts, routes)
            else:
                out[name] = AppInfo(name, known.regions, known.version, hosts, known.routes)
    return out


def _spec(raw: object) -> RegionsSpec | None:
    if not isinstance(raw, dict):
        return None
    try:
        return RegionsSpec.from_dict(raw)
    except ValueError:
        return None


def _routes(raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        return ()
    return tuple((r["method"], r["path"]) for r in raw
                 if isinstance(r, dict) and isinstance(r.get("method"), str)
                 and isinstance(r.get("path"), str))


def collect_apps(cluster: ClusterFile, timeout_s: float = 5.0) -> AppDirectory:
    """Ask every region once (for one-shot commands); the answer's
    ``errors`` names the regions that did not answer."""
    directory = AppDirectory(cluster, log_errors=False)

    async def ask() -> None:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            await directory.refresh(client)

    asyncio.run(ask())
    return directory
