"""``nimbus status --cluster``: every region's health, apps and drift.

Gathering asks every region's control (``GET /v1/apps``) and every gateway
(``/_nimbus/health``) in parallel, each with a deadline; :func:`summarize`
then compares what they run with the desired state beside the cluster file.
It is pure, so what counts as drift is tested without a region.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from nimbus.multiregion.clusterfile import ClusterFile
from nimbus.multiregion.converge import differs
from nimbus.multiregion.push import GatewayHealth, RegionApps, gateway_health, list_apps
from nimbus.multiregion.state import ClusterState, Snapshot


@dataclass(frozen=True, slots=True)
class Observed:
    apps: dict[str, RegionApps]                 # region -> its apps (or why not)
    gateways: dict[str, list[GatewayHealth]]    # region -> its gateways' health


async def observe(cluster: ClusterFile, timeout_s: float = 3.0) -> Observed:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        regions = list(cluster.regions.values())
        apps = await asyncio.gather(*(list_apps(client, r, timeout_s) for r in regions))
        gws = await asyncio.gather(*(
            asyncio.gather(*(gateway_health(client, g, timeout_s) for g in r.gateways))
            for r in regions))
    return Observed({a.region: a for a in apps},
                    {r.name: list(g) for r, g in zip(regions, gws, strict=True)})


def _gateway(region: str, g: GatewayHealth) -> dict[str, Any]:
    """A gateway's health; one that answers for another region is wrong in
    the cluster file, not healthy."""
    if g.region is not None and g.region != region:
        return {"url": g.url, "healthy": False,
                "detail": f"serves region {g.region!r}, not {region!r}: check the cluster file"}
    return {"url": g.url, "healthy": g.ok, "detail": g.detail}


def summarize(cluster: ClusterFile, snap: Snapshot, seen: Observed) -> dict[str, Any]:
    """The status document (``--json`` prints it as is)."""
    regions: dict[str, Any] = {}
    for name, entry in cluster.regions.items():
        listed = seen.apps.get(name)
        reachable = listed is not None and listed.apps is not None
        regions[name] = {
            "control": {"url": entry.control, "reachable": reachable,
                        **({} if reachable or listed is None else {"error": listed.error})},
            "gateways": [_gateway(name, g) for g in seen.gateways.get(name, [])],
        }
    apps: dict[str, Any] = {}
    drift: list[dict[str, Any]] = []
    names = sorted(set(snap.desired) | {a for r in seen.apps.values() for a in (r.apps or {})})
    for app in names:
        want = snap.desired.get(app)
        per: dict[str, Any] = {}
        for region in cluster.names:
            listed = seen.apps.get(region)
            running = (listed.apps or {}).get(app) if listed and listed.apps is not None else None
            should = want is not None and region in want.regions
            state: str | None
            if listed is None or listed.apps is None:
                state = "unknown" if should else None
            elif running is None:
                state = "missing" if should else None
            elif want is None:
                state = "unmanaged"
            elif not should:
                state = "extra"
            else:
                state = "ok" if differs(want, running) is None else "drift"
            if state is None:
                continue
            per[region] = {"state": state,
                           "version": running.get("version") if running else None,
                           "digest": running.get("digest") if running else None}
            if should and state != "ok":
                reason = {"unknown": "region unreachable",
                          "missing": "app missing",
                          "drift": "runs another version"}[state]
                drift.append({"app": app, "region": region, "state": state, "reason": reason,
                              "desired": want.digest if want else None,
                              "running": running.get("digest") if running else None})
        apps[app] = {"desired": want.digest if want else None,
                     "desired_regions": list(want.regions) if want else None,
                     "policy": ((want.routing or {}).get("policy", "failover")
                                if want else None),
                     "regions": per}
    pending = [{"app": p.app, "region": p.region, "digest": p.digest, "since": p.since,
                "attempts": p.attempts, "last_error": p.last_error, "refused": p.refused}
               for p in sorted(snap.pending.values(), key=lambda p: (p.region, p.app))
               if p.region in cluster.regions]
    rollouts = {}
    for app in sorted(snap.desired):
        held = snap.held(app)
        if held is not None:
            rollouts[app] = {"digest": held.digest, "state": held.state,
                             "strategy": held.strategy, "reason": held.reason,
                             "waves": [list(w) for w in held.waves], "wave": held.wave,
                             "waves_done": held.waves_done, "bake_until": held.bake_until}
    return {"cluster": str(cluster.path), "regions": regions, "apps": apps,
            "drift": drift, "pending": pending, "rollouts": rollouts,
            "converged": not drift and not pending and not rollouts}


async def cluster_status(cluster: ClusterFile, state_dir: Path,
                         timeout_s: float = 3.0) -> dict[str, Any]:
    seen = await observe(cluster, timeout_s)
    return summarize(cluster, ClusterState(state_dir).snapshot(), seen)


def unconverged_regions(doc: dict[str, Any]) -> list[str]:
    regions = {d["region"] for d in doc["drift"]} | {p["region"] for p in doc["pending"]}
    regions |= {r for ro in doc.get("rollouts", {}).values() for w in ro["waves"] for r in w}
    return [r for r in doc["regions"] if r in regions]


def render(doc: dict[str, Any]) -> list[str]:
    """The status as lines of text."""
    lines = [f"cluster {doc['cluster']}"]
    for name, r in doc["regions"].items():
        c = r["control"]
        control = "answers" if c["reachable"] else f"does not answer: {c.get('error', '?')}"
        gws = ", ".join(f"{g['url']} {g['detail']}" for g in r["gateways"]) or "no gateways"
        lines.append(f"region {name}: control {c['url']} {control}; gateways: {gws}")
    for app, a in doc["apps"].items():
        head = f"app {app}"
        if a["desired"]:
            head += f": desired {a['desired'][:12]} in {', '.join(a['desired_regions'])} " \
                    f"({a['policy']})"
        else:
            head += ": not deployed through the cluster file"
        lines.append(head)
        for region, s in a["regions"].items():
            version = "-" if s["version"] is None else f"version {s['version']}"
            digest = (s["digest"] or "-")[:12]
            lines.append(f"  {region:<10} {s['state']:<9} {version:<11} {digest}")
    for p in doc["pending"]:
        kind = "refused" if p["refused"] else "pending"
        err = f": {p['last_error']}" if p["last_error"] else ""
        lines.append(f"{kind}: {p['app']} {p['digest'][:12]} to {p['region']} "
                     f"({p['attempts']} attempt{'' if p['attempts'] == 1 else 's'}){err}")
    for app, ro in doc.get("rollouts", {}).items():
        what = (f"stopped: {ro['reason']}; no region gets it until the app is deployed again"
                if ro["state"] == "stopped" else
                f"wave {ro['wave'] + 1} of {len(ro['waves'])} {ro['state']}; regions not "
                "reached get it from the deploy, not from convergence")
        lines.append(f"rollout of {app} {ro['digest'][:12]} ({ro['strategy']}): {what}")
    if doc["converged"]:
        lines.append("converged: every region runs what was deployed")
    elif not doc["drift"] and not doc["pending"]:
        lines.append("not converged: a rollout by waves is stopped or under way")
    else:
        lines.append("not converged: " + ", ".join(
            f"{d['region']} ({d['app']}: {d['reason']})" for d in doc["drift"])
                     if doc["drift"] else "not converged: pushes pending")
    return lines
