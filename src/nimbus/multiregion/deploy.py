"""One deploy to every region of an app.

The app is validated and bundled once, locally; the desired state (digest,
regions, routing, the bundle) is written beside the cluster file *before*
any region is asked, every region of the app being pending until its push
answers; then the same bytes go to every region in parallel, each with its
own deadline. A region that runs the bundle is done; one that refuses it
(4xx, or a manifest or deploy error) is an error the operator must fix; one
that cannot be reached stays pending and is brought up to date when it
returns (:mod:`nimbus.multiregion.converge`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from nimbus.control.bundle import make_bundle
from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import AppSpec, RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile
from nimbus.multiregion.push import BUSY, DEPLOYED, REFUSED, PushResult, push_bundle
from nimbus.multiregion.state import ClusterState, Desired, state_dir_for

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class DeployPlan:
    app: str
    app_dir: Path
    digest: str
    bundle: bytes
    regions: tuple[str, ...]
    routing: dict[str, Any] | None     # what the regions will report
    override: dict[str, Any] | None    # the deploy's ``regions`` parameter
    policy: str
    # the manifest's app-level ``rollout:`` block (strategy, rollback_on,
    # min_requests, bake, waves, on_region_failure), as a dict
    rollout: dict[str, Any] | None = None
    manifest: str = ""                 # the manifest file, for errors about it
    parameters: dict[str, str] | None = None  # a SAM template's parameter overrides

    def describe(self) -> list[str]:
        lines = [f"app {self.app} ({self.app_dir}), bundle {self.digest[:12]} "
                 f"({len(self.bundle)} bytes)",
                 f"regions {', '.join(self.regions)}; policy {self.policy}"]
        weights = (self.routing or {}).get("weights") or {}
        if self.policy == "weighted" and weights:
            lines.append("weights " + ", ".join(f"{k} {v}" for k, v in weights.items()))
        return lines


def app_regions(spec: RegionsSpec | None, cluster: ClusterFile) -> tuple[str, ...]:
    """Where an app with routing ``spec`` runs: its names, else its weights'
    names, else every region of the cluster file in its order."""
    if spec is None:
        return cluster.names
    if spec.names is not None:
        return tuple(spec.names)
    if spec.weights:
        return tuple(spec.weights)
    return cluster.names


def plan_deploy(app_dir: Path, cluster: ClusterFile, *, name: str | None = None,
                override: RegionsSpec | None = None,
                parameters: dict[str, str] | None = None) -> DeployPlan:
    """Validate the app (file + line errors) and bundle it; check that every
    region it names is in the cluster file. ``parameters``: a SAM template's
    parameter overrides, sent with every push."""
    spec = load_app(app_dir, default_name=name, parameters=parameters or None)
    routing_spec = override or spec.regions
    regions = app_regions(routing_spec, cluster)
    for region in regions:
        if region not in cluster.regions:
            raise _unknown_region(region, cluster, spec, from_manifest=override is None)
    if not regions:
        raise ManifestError("the app runs in no region", file=spec.source, field="regions")
    bundle = make_bundle(app_dir, exclude=cluster.secret_files())
    return DeployPlan(
        app=spec.name, app_dir=app_dir, digest=hashlib.sha256(bundle).hexdigest(),
        bundle=bundle, regions=regions,
        routing=routing_spec.to_dict() if routing_spec else None,
        override=override.to_dict() if override else None,
        policy=routing_spec.policy if routing_spec else "failover",
        rollout=manifest_rollout(spec), manifest=str(spec.source),
        parameters=parameters or None)


def manifest_rollout(spec: AppSpec) -> dict[str, Any] | None:
    """The manifest's ``rollout:`` settings as one dict of the keys set
    (``strategy``, ``rollback_on``, ``min_requests``, ``bake``, ``waves``,
    ``on_region_failure``), None when there are none. Each function's
    settings are the app block merged with its own; the order of regions is
    one for the app, so each key is taken from the first function (by name)
    that sets it."""
    per_function = getattr(spec, "rollouts", None) or {}
    out: dict[str, Any] = {}
    for fn in sorted(per_function):
        block = per_function[fn]
        data = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        if "bake_s" in data:
            data["bake"] = data.pop("bake_s")
        for key, value in data.items():
            if value is not None:
                out.setdefault(key, value)
    return out or None


def _unknown_region(region: str, cluster: ClusterFile, spec: AppSpec,
                    from_manifest: bool) -> ManifestError:
    known = ", ".join(cluster.names) or "none"
    message = (f"region {region!r} is not in the cluster file {cluster.path} "
               f"(it has {known})")
    if not from_manifest:
        return ManifestError(message, field="regions")
    return ManifestError(message, file=spec.source, line=_region_line(Path(spec.source), region),
                         field="regions")


def _region_line(manifest: Path, region: str) -> int | None:
    """The line of the manifest's ``regions:`` entry that names ``region``."""
    from nimbus.manifest.source import read_source

    try:
        src = read_source(manifest)
    except ManifestError:
        return None
    best = None
    for table in (src.value_lines, src.key_lines):
        for loc, line in table.items():
            if not loc or loc[0] != "regions":
                continue
            value: Any = src.data
            try:
                for part in loc:
                    value = value[part]
            except (KeyError, IndexError, TypeError):
                continue
            if region in (value, loc[-1]):
                return line
            if best is None and len(loc) == 1:
                best = line
    return best


@dataclass(frozen=True, slots=True)
class RegionReport:
    region: str
    outcome: str          # deployed | refused | pending | busy (pending too)
    version: int | None
    changed: bool
    message: str

    def line(self) -> str:
        if self.outcome == "deployed":
            return f"{self.region}: version {self.version} deployed" + (
                "" if self.changed else " (unchanged)")
        if self.outcome == "refused":
            return f"{self.region}: refused — {self.message}"
        if self.outcome == "busy":
            return (f"{self.region}: pending — busy ({self.message}); it converges when the "
                    "region is free")
        return (f"{self.region}: pending — unreachable ({self.message}); it converges when "
                "the region returns")


async def deploy_plan(plan: DeployPlan, cluster: ClusterFile, *,
                      state_dir: Path | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S,
                      on_report: Callable[[RegionReport], None] | None = None,
                      extra: dict[str, str] | None = None,
                      ) -> list[RegionReport]:
    """Record the plan as desired, push it to its regions in parallel, and
    report per region: to ``on_report`` as each region answers, and as a
    list in the plan's order. ``extra``: more deploy parameters."""
    state = ClusterState(state_dir or state_dir_for(cluster.path))
    desired = Desired(app=plan.app, digest=plan.digest, regions=plan.regions,
                      routing=plan.routing, override=plan.override, updated=time.time(),
                      parameters=plan.parameters)
    await asyncio.to_thread(state.record_deploy, desired, plan.bundle, timeout_s + 5.0)
    timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))

    async def one(client: httpx.AsyncClient, region: str) -> RegionReport:
        try:
            result = await push_bundle(client, cluster.regions[region], plan.app,
                                       plan.bundle, plan.override, timeout_s, extra,
                                       parameters=plan.parameters)
        except BaseException:  # interrupted (Ctrl-C): a converger may take it at once
            state.failed(region, plan.app, plan.digest, "the deploy was interrupted")
            raise
        report = _settle(state, plan, result)
        if on_report is not None:
            on_report(report)
        return report

    async with httpx.AsyncClient(timeout=timeout) as client:
        return list(await asyncio.gather(*(one(client, r) for r in plan.regions)))


def _settle(state: ClusterState, plan: DeployPlan, r: PushResult) -> RegionReport:
    if r.outcome == DEPLOYED:
        state.done(r.region, plan.app, plan.digest)
        return RegionReport(r.region, "deployed", r.version, r.changed, "")
    refused = r.outcome == REFUSED
    state.failed(r.region, plan.app, plan.digest, r.message, refused=refused)
    outcome = "refused" if refused else "busy" if r.outcome == BUSY else "pending"
    return RegionReport(r.region, outcome, None, False, r.message)
