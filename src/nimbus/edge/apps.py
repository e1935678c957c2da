"""Which app a request is for, and so which regions and policy route it.

The table is refreshed every ``interval_s`` from the control API of the
first region that answers (``GET /v1/apps``, the region's bearer token), and
swapped whole. A request maps to an app by its Host (``<app>.<anything>``
where ``<app>`` is a deployed app's name) or else by method and path against
the apps' routes (the gateway's own router). Nothing matches: ``None``, and
the edge routes by failover over the cluster file's order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from nimbus.errors import InvocationError
from nimbus.gateway.router import Router

log = logging.getLogger("nimbus.edge")


class ControlRegion(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def control(self) -> str: ...
    @property
    def token(self) -> str: ...


@dataclass(frozen=True)
class EdgeSpec:
    """An app's ``regions:`` as the control API reports it."""
    names: tuple[str, ...] | None = None
    policy: str = "failover"
    weights: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> EdgeSpec | None:
        if not isinstance(d, dict):
            return None
        names = d.get("names")
        weights = d.get("weights") or {}
        policy = d.get("policy") or "failover"
        return cls(
            names=tuple(str(n) for n in names) if isinstance(names, list) else None,
            policy=policy if policy in ("failover", "weighted", "latency") else "failover",
            weights={str(k): int(v) for k, v in weights.items()
                     if isinstance(v, int)} if isinstance(weights, dict) else {},
        )


@dataclass(frozen=True)
class App:
    name: str
    spec: EdgeSpec | None
    version: int = 0


class AppTable:
    def __init__(self, apps: Iterable[App] = ()) -> None:
        self.by_name: dict[str, App] = {}
        routes: list[tuple[str, str, App]] = []
        self._set(list(apps), routes)

    def _set(self, apps: list[App], routes: list[tuple[str, str, App]]) -> None:
        self.by_name = {a.name.lower(): a for a in apps}
        self.router: Router[App] = Router(routes)
        self._host_cache: dict[bytes, App | None] = {}

    def load(self, listing: Any) -> None:
        """Replace the table with a ``GET /v1/apps`` answer (bad entries skipped)."""
        apps: list[App] = []
        routes: list[tuple[str, str, App]] = []
        seen: set[tuple[str, str]] = set()
        for item in listing if isinstance(listing, list) else ():
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            version = item.get("version")
            app = App(item["name"], EdgeSpec.from_dict(item.get("regions")),
                      version if isinstance(version, int) else 0)
            apps.append(app)
            for r in item.get("routes") or ():
                if isinstance(r, dict) and isinstance(r.get("method"), str) \
                        and isinstance(r.get("path"), str):
                    key = (r["method"].upper(), r["path"])
                    if key not in seen:  # two apps with one route: the first listed wins
                        seen.add(key)
                        routes.append((*key, app))
        self._set(apps, routes)

    def lookup(self, host: bytes | None, method: str, path: str) -> App | None:
        if host is not None and self.by_name:
            cached = self._host_cache.get(host, False)
            if cached is not False:
                if cached is not None:
                    return cached  # type: ignore[return-value]
            else:
                label = host.split(b".", 1)[0] if b"." in host else b""
                app = self.by_name.get(label.decode("latin-1").lower()) if label else None
                if len(self._host_cache) < 4096:
                    self._host_cache[host] = app
                if app is not None:
                    return app
        try:
            return self.router.match(method, path).target
        except InvocationError:
            return None


class AppRefresher:
    """Keeps an AppTable fresh from the regions' control APIs."""

    def __init__(self, regions: Mapping[str, ControlRegion], table: AppTable,
                 interval_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.regions = regions
        self.table = table
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.loaded_from: str | None = None
        self.refreshes = 0

    async def _list(self, client: httpx.AsyncClient, region: ControlRegion) -> list[Any] | None:
        try:
            r = await client.get(f"{region.control}/v1/apps",
                                 headers={"authorization": f"Bearer {region.token}"})
            data = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, list) else None

    async def refresh_once(self, client: httpx.AsyncClient) -> bool:
        """Ask every region at once; the table is the union of what they run
        (per app, the entry with the highest version: a region that missed a
        deploy does not roll the routing back). False when none answered."""
        names = list(self.regions)
        answers = await asyncio.gather(*(self._list(client, self.regions[n]) for n in names))
        merged: dict[str, Any] = {}
        for listing in answers:
            for item in listing or ():
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    continue
                have = merged.get(item["name"])
                version = item.get("version") if isinstance(item.get("version"), int) else 0
                if have is None or version > have[0]:
                    merged[item["name"]] = (version, item)
        answered = [n for n, a in zip(names, answers, strict=True) if a is not None]
        if not answered:
            return False
        self.table.load([item for _, item in merged.values()])
        self.loaded_from = ",".join(answered)
        self.refreshes += 1
        return True

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            while True:
                ok = await self.refresh_once(client)
                if not ok:
                    log.debug("no region's control API answered /v1/apps")
                await asyncio.sleep(self.interval_s)
