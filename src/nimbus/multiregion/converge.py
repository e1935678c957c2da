"""Bringing every region to the cluster's desired state.

A :class:`Converger` compares what each region runs (``GET /v1/apps``)
with the desired state beside the cluster file
(:mod:`nimbus.multiregion.state`) and pushes the desired bundle to a region
whose app is pending, missing or at another digest or routing. A region that
cannot be reached is asked again later, with exponential backoff per region
(from ``retry_min_s``, 1 s, to ``retry_max_s``, 10 s); one that refuses an
app is asked again for that app with a slower backoff (from ``retry_max_s``
to 5 minutes): a refusal needs someone to act, and must not cost the region
a deploy attempt, or the log a warning, every round.

``nimbus status --cluster FILE --wait-all`` drives it until nothing is left
to do; ``nimbus edge`` runs it in the background, so a region that returns
is brought up to date with no one typing. Several convergers (two edges)
may run at once: pushing a bundle a region already runs is a no-op there.

An app whose desired digest is being rolled out region by region (or whose
rollout stopped) is left alone: the deploy drives its waves, and a stopped
rollout must not be completed by anyone but the operator deploying again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry
from nimbus.multiregion.push import (
    BUSY,
    DEPLOYED,
    REFUSED,
    PushResult,
    RegionApps,
    list_apps,
    push_bundle,
)
from nimbus.multiregion.state import ClusterState, Desired, Snapshot

log = logging.getLogger("nimbus.converge")
REFUSED_RETRY_MAX_S = 300.0


class Backoff:
    """When a key (a region, or a region's app) may be tried again. Pure: the
    caller gives ``now`` (any monotonic clock)."""

    def __init__(self, min_s: float = 1.0, max_s: float = 30.0) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._next: dict[str, float] = {}
        self._delay: dict[str, float] = {}

    def due(self, key: str, now: float) -> bool:
        return now >= self._next.get(key, float("-inf"))

    def failed(self, key: str, now: float) -> float:
        """Records a failure; returns the seconds until the next try."""
        delay = min(self.max_s, self._delay.get(key, self.min_s / 2) * 2)
        self._delay[key] = delay
        self._next[key] = now + delay
        return delay

    def succeeded(self, key: str) -> None:
        self._next.pop(key, None)
        self._delay.pop(key, None)


def wanted_by_region(desired: dict[str, Desired], names: tuple[str, ...]) -> dict[str, list[str]]:
    """Region -> the apps it should run, for the regions of the cluster file."""
    out: dict[str, list[str]] = {}
    for app, d in sorted(desired.items()):
        for region in d.regions:
            if region in names:
                out.setdefault(region, []).append(app)
    return out


def differs(desired: Desired, running: dict[str, Any] | None) -> str | None:
    """Why a region's app (``GET /v1/apps`` entry, or None) is not the desired
    one, or None when it is."""
    if running is None:
        return "missing"
    if running.get("digest") != desired.digest:
        have = str(running.get("digest") or "?")[:12]
        return f"runs {have}, not {desired.digest[:12]}"
    if "regions" in running and _routing(running["regions"]) != _routing(desired.routing):
        return "routing differs"
    return None


def _routing(d: Any) -> Any:
    """A routing as one canonical dict, so that two spellings of the same
    routing never look like drift (which would push the app every round)."""
    if d is None:
        return None
    try:
        return RegionsSpec.from_dict(d).to_dict()
    except (ValueError, TypeError, AttributeError):
        return d


@dataclass(frozen=True, slots=True)
class Outcome:
    """One thing a round did (or found) for a region."""

    region: str
    app: str | None       # None: about the region itself
    what: str             # "deployed", "refused", "unreachable", "busy", "in sync"
    message: str = ""
    version: int | None = None


@dataclass
class RoundReport:
    outcomes: list[Outcome] = field(default_factory=list)
    regions_apps: dict[str, RegionApps] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return all(o.what == "in sync" for o in self.outcomes)


class Converger:
    """Pushes pending and drifted apps to the regions of ``cluster``."""

    def __init__(self, cluster: ClusterFile, state_dir: Path, *, interval_s: float = 5.0,
                 push_timeout_s: float = 120.0, probe_timeout_s: float = 3.0,
                 retry_min_s: float = 1.0, retry_max_s: float = 10.0) -> None:
        self.cluster = cluster
        self.state = ClusterState(state_dir)
        self.interval_s = interval_s
        self.push_timeout_s = push_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.backoff = Backoff(retry_min_s, retry_max_s)
        self.refusals = Backoff(retry_max_s, max(retry_max_s, REFUSED_RETRY_MAX_S))

    async def run(self) -> None:
        """Converge every ``interval_s`` until cancelled."""
        async with self._client() as client:
            while True:
                try:
                    report = await self.converge_once(time.monotonic(), client=client)
                    for o in report.outcomes:
                        if o.what == "deployed":
                            log.info("converged %s in region %s: %s", o.app, o.region,
                                     o.message)
                        elif o.what == "refused":
                            log.warning("region %s refused %s: %s", o.region, o.app, o.message)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - one bad round must not stop the loop
                    log.exception("converge round failed")
                await asyncio.sleep(self.interval_s)

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=httpx.Timeout(
            self.push_timeout_s, connect=min(5.0, self.push_timeout_s)))

    async def converge_once(self, now: float, *,
                            client: httpx.AsyncClient | None = None) -> RoundReport:
        """One round over every region that should run an app and is due."""
        snap = self.state.snapshot()
        wanted = wanted_by_region(snap.desired, self.cluster.names)
        report = RoundReport()
        if not wanted:
            return report
        if client is None:
            async with self._client() as own:
                return await self.converge_once(now, client=own)
        regions = [self.cluster.regions[r] for r in wanted]
        results = await asyncio.gather(*(
            self._region(client, region, wanted[region.name], snap, now, report)
            for region in regions))
        for outcomes in results:
            report.outcomes.extend(outcomes)
        return report

    async def _region(self, client: httpx.AsyncClient, region: RegionEntry, apps: list[str],
                      snap: Snapshot, now: float, report: RoundReport) -> list[Outcome]:
        name = region.name
        if not self.backoff.due(name, now):
            return [Outcome(name, None, "unreachable", "waiting to retry")]
        listed = await list_apps(client, region, self.probe_timeout_s)
        report.regions_apps[name] = listed
        if listed.apps is None:
            delay = self.backoff.failed(name, now)
            for app in apps:
                if (name, app) in snap.pending:
                    self.state.failed(name, app, snap.desired[app].digest, listed.error)
            return [Outcome(name, None, "unreachable",
                            f"{listed.error}; next try in {delay:g} s")]
        self.backoff.succeeded(name)
        outcomes = []
        for app in apps:
            desired = snap.desired[app]
            held = snap.held(app)
            if held is not None:
                what = ("rollout stopped: " + held.reason if held.state == "stopped"
                        else "a rollout by waves is under way")
                outcomes.append(Outcome(name, app, "held", what))
                continue
            why = differs(desired, listed.apps.get(app))
            if why is None:
                self.state.done(name, app, desired.digest)
                self.backoff.succeeded(f"{name}/{app}")
                self.refusals.succeeded(f"{name}/{app}")
                outcomes.append(Outcome(name, app, "in sync"))
                continue
            key = f"{name}/{app}"
            if not (self.backoff.due(key, now) and self.refusals.due(key, now)):
                pend = snap.pending.get((name, app))
                outcomes.append(Outcome(name, app, "refused",
                                        pend.last_error if pend else why))
                continue
            until = time.time() + self.push_timeout_s + 5.0
            if not self.state.claim(name, app, desired.digest, until):
                outcomes.append(Outcome(name, app, "busy", "another deploy is pushing it"))
                continue
            result = await self._push(client, region, desired)
            outcomes.append(self._record(result, desired, key, now))
            if result.outcome not in (DEPLOYED, REFUSED, BUSY):
                break  # the region stopped answering: its other apps wait for the next round
        return outcomes

    async def _push(self, client: httpx.AsyncClient, region: RegionEntry,
                    desired: Desired) -> PushResult:
        bundle = self.state.bundle(desired.digest)
        if bundle is None:
            return PushResult(region.name, REFUSED,
                              message=f"the bundle {desired.digest[:12]} is missing from "
                                      f"{self.state.root}; deploy the app again")
        return await push_bundle(client, region, desired.app, bundle, desired.override,
                                 self.push_timeout_s, parameters=desired.parameters)

    def _record(self, result: PushResult, desired: Desired, key: str, now: float) -> Outcome:
        region, app = result.region, desired.app
        if result.outcome == DEPLOYED:
            self.state.done(region, app, desired.digest)
            self.backoff.succeeded(key)
            self.refusals.succeeded(key)
            return Outcome(region, app, "deployed", f"version {result.version}",
                           result.version)
        refused = result.outcome == REFUSED
        self.state.failed(region, app, desired.digest, result.message, refused=refused)
        if refused:
            self.refusals.failed(key, now)
        elif result.outcome == BUSY:
            self.backoff.failed(key, now)
        else:
            self.backoff.failed(region, now)
        return Outcome(region, app, result.outcome, result.message)
