"""``nimbus rollout status FN --cluster`` and ``nimbus rollback FN --cluster``.

Status asks every region of the cluster file for the function's latest
rollout and ``live`` weights (in parallel, each with a deadline) and adds
the cluster's own progress from the state beside the cluster file: which
wave runs, until when it bakes, or why it stopped. A rollback asks every
region at once, then marks the app's desired digest as stopped, so no
converger pushes back what the operator just rolled back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from nimbus.multiregion.clusterfile import ClusterFile
from nimbus.multiregion.rollout import (
    REQUEST_TIMEOUT_S,
    get_live_weights,
    get_rollout,
    mark_stopped,
    post_rollback,
)
from nimbus.multiregion.state import BAKING, DONE, RUNNING, STOPPED, ClusterState, state_dir_for

BY_HAND = "rolled back by hand (nimbus rollback --cluster)"


async def cluster_rollout(cluster: ClusterFile, fn: str,
                          state_dir: Path | None = None) -> dict[str, Any]:
    """The status document (``--json`` prints it as is)."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        async def one(name: str) -> dict[str, Any]:
            region = cluster.regions[name]
            (record, error), live = await asyncio.gather(
                get_rollout(client, region, fn), get_live_weights(client, region, fn))
            return {"rollout": record, "error": error or None,
                    "live": None if live is None else {str(v): w for v, w in live.items()}}

        answers = await asyncio.gather(*(one(n) for n in cluster.names))
    regions = dict(zip(cluster.names, answers, strict=True))
    app = next((a["rollout"]["app"] for a in answers
                if a["rollout"] and a["rollout"].get("app")), None)
    state = ClusterState(state_dir or state_dir_for(cluster.path))
    ro = state.rollout(app) if app else None
    return {"function": fn, "app": app, "regions": regions,
            "cluster": None if ro is None else asdict(ro)}


def render(doc: dict[str, Any], now: float) -> list[str]:
    lines = []
    ro = doc["cluster"]
    if ro is not None:
        waves = "; ".join(", ".join(w) for w in ro["waves"])
        head = (f"rollout of {ro['app']} ({ro['digest'][:12]}) with {ro['strategy']} "
                f"by waves {waves}: ")
        n = len(ro["waves"])
        if ro["state"] == RUNNING:
            head += f"wave {ro['wave'] + 1} of {n} running"
        elif ro["state"] == BAKING:
            left = max(0.0, ro["bake_until"] - now)
            until = time.strftime("%H:%M:%S", time.localtime(ro["bake_until"]))
            head += f"wave {ro['wave'] + 1} of {n} baking until {until} ({left:.0f} s left)"
        elif ro["state"] == DONE:
            head += "done"
        else:
            head += f"stopped: {ro['reason']}"
        lines.append(head)
    for name, r in doc["regions"].items():
        rec = r["rollout"]
        mine = (ro or {}).get("regions", {}).get(name, {}) if ro else {}
        if rec is None:
            state = "unknown" if r["error"] else "none"
            detail = r["error"] or "no rollout of this function"
        else:
            state = str(rec.get("state", "?"))
            if state == "promoted" and mine.get("state") == "rolled_back":
                state = "rolled_back"  # promoted, then rolled back with the others
            detail = f"version {rec.get('from')} -> {rec.get('to')} ({rec.get('strategy')})"
            if state == "running":
                detail += f", step {int(rec.get('step', 0)) + 1} of {len(rec.get('steps', []))}"
            reason = mine.get("reason") if mine.get("state") == "rolled_back" else None
            reason = reason or (rec.get("reason") if state == "rolled_back" else None)
            if reason:
                detail += f": {reason}"
        if r["live"] is not None:
            detail += "; live " + ", ".join(f"{v}={w}%" for v, w in r["live"].items())
        lines.append(f"  {name:<10} {state.replace('_', ' '):<12} {detail}")
    return lines


async def cluster_rollback(cluster: ClusterFile, fn: str, to: int | None,
                           state_dir: Path | None = None) -> tuple[list[str], bool]:
    """Roll ``fn`` back in every region; (lines, every region did)."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S * 3) as client:
        records = await asyncio.gather(*(get_rollout(client, cluster.regions[n], fn)
                                         for n in cluster.names))

        async def one(name: str, record: dict[str, Any] | None) -> str:
            region = cluster.regions[name]
            if to is None and record is not None and record.get("state") == "rolled_back":
                # its rollout already ended on the old version: nothing to move
                # unless live was moved off that version since
                old = int(record["from"])
                live = await get_live_weights(client, region, fn)
                if live is None or live == {old: 100}:
                    return f"already rolled back: version {old} serves all traffic"
            error = await post_rollback(client, region, fn, to)
            return f"not rolled back — {error}" if error else "rolled back"

        outcomes = await asyncio.gather(*(one(n, r) for n, (r, _e) in
                                          zip(cluster.names, records, strict=True)))
    lines, ok = [], True
    for name, outcome in zip(cluster.names, outcomes, strict=True):
        ok = ok and not outcome.startswith("not ")
        lines.append(f"{name}: {outcome}")
    app = next((r.get("app") for r, _e in records if r and r.get("app")), None)
    if app is None:
        app = await _owner(cluster, fn)
    if app is not None:
        ro = await mark_stopped(cluster, str(app), BY_HAND, state_dir)
        if ro is not None and ro.state == STOPPED:
            lines.append(f"{app} {ro.digest[:12]} is marked stopped: no converger pushes it; "
                         "the next deploy clears the mark")
    return lines, ok


async def _owner(cluster: ClusterFile, fn: str) -> str | None:
    """The app ``fn`` belongs to, from the first region that lists it."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        for region in cluster.regions.values():
            try:
                r = await client.get(f"{region.control}/v1/functions",
                                     headers={"authorization": f"Bearer {region.token}"})
                listed = r.json() if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError):
                continue
            for f in listed if isinstance(listed, list) else []:
                if isinstance(f, dict) and f.get("name") == fn and f.get("app"):
                    return str(f["app"])
    return None
