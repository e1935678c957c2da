"""A rollout across regions: wave by wave, with a bake time between.

Each region runs its own rollout (its controller leader shifts traffic and
decides, from the region's own metrics); this module only drives the order.
For each wave, the bundle goes to the wave's regions in parallel with the
rollout's parameters (``strategy``, ``rollback_on``, ``min_requests``);
the deploy then polls every changed function's ``GET
/v1/functions/{fn}/rollout`` in those regions until each rollout ends, or
the strategy's total time plus slack passes. When every region of the wave
promoted, it *bakes*: waits ``bake_s`` while watching that no region
already on the new version is rolled back (by hand or otherwise), then
starts the next wave.

A region whose rollout rolls back (or that refuses the bundle, cannot be
reached, or does not decide in time) stops the rollout. With
``on_region_failure: rollback-all`` (the default) every region already on
the new version is rolled back (``POST /v1/functions/{fn}/rollback``);
with ``stop`` they are left as they are. Either way the regions not
reached keep the old version, and the cluster's state
(:class:`~nimbus.multiregion.state.ClusterRollout`) records that this
digest stopped, and why: no converger pushes it. Deploying again clears it.

Progress is written to the cluster's state after every step, so a deploy
that dies mid-waves is continued by deploying the same bundle again: the
waves already done are skipped, and a region whose push landed is not
pushed again (its own rollout went on without the deploy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry
from nimbus.multiregion.deploy import DeployPlan
from nimbus.multiregion.push import DEPLOYED, REFUSED, describe, push_bundle
from nimbus.multiregion.state import (
    BAKING,
    DONE,
    RUNNING,
    STOPPED,
    ClusterRollout,
    ClusterState,
    Desired,
    state_dir_for,
)
from nimbus.multiregion.waves import ROLLBACK_ALL, Waves, describe_waves

POLL_S = 0.5
REQUEST_TIMEOUT_S = 3.0

# What a region's part of the rollout came to.
PROMOTED, ROLLED_BACK, FAILED = "promoted", "rolled_back", "failed"


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    strategy: str
    rollback_on: str | None
    min_requests: int | None
    waves: Waves
    bake_s: float
    on_region_failure: str
    wait_s: float          # how long one wave's region rollouts may take to end

    def params(self) -> dict[str, str]:
        out = {"strategy": self.strategy}
        if self.rollback_on is not None:
            out["rollback_on"] = self.rollback_on
        if self.min_requests is not None:
            out["min_requests"] = str(self.min_requests)
        return out


def _auth(region: RegionEntry) -> dict[str, str]:
    return {"authorization": f"Bearer {region.token}"}


async def get_rollout(client: httpx.AsyncClient, region: RegionEntry,
                      fn: str) -> tuple[dict[str, Any] | None, str]:
    """A region's rollout record of ``fn``: (record, ""), (None, "") when it
    has none, (None, why) when the region did not answer."""
    try:
        r = await client.get(f"{region.control}/v1/functions/{fn}/rollout",
                             headers=_auth(region), timeout=REQUEST_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return None, describe(exc)
    if r.status_code == 404:
        return None, ""
    if r.status_code != 200:
        return None, f"HTTP {r.status_code}: {r.text[:200]}"
    try:
        body = r.json()
    except ValueError:
        return None, f"unexpected answer: {r.text[:200]!r}"
    return (body, "") if isinstance(body, dict) else (None, f"unexpected answer: {body!r}")


async def post_rollback(client: httpx.AsyncClient, region: RegionEntry, fn: str,
                        to: int | None = None) -> str:
    """Roll ``fn`` back in ``region``; "" when done, else why not."""
    body = {} if to is None else {"to": to}
    try:
        r = await client.post(f"{region.control}/v1/functions/{fn}/rollback", json=body,
                              headers=_auth(region), timeout=REQUEST_TIMEOUT_S * 3)
    except httpx.HTTPError as exc:
        return describe(exc)
    if r.status_code >= 300:
        try:
            msg = r.json().get("errorMessage") or r.text
        except (ValueError, AttributeError):
            msg = r.text
        return f"{str(msg)[:300]} (HTTP {r.status_code})"
    return ""


async def get_live_weights(client: httpx.AsyncClient, region: RegionEntry,
                           fn: str) -> dict[int, int] | None:
    """The weights of ``fn``'s ``live`` alias in ``region`` (version ->
    percent), None when the region does not say."""
    try:
        r = await client.get(f"{region.control}/v1/functions/{fn}/aliases",
                             headers=_auth(region), timeout=REQUEST_TIMEOUT_S)
        body = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return live_weights(body)


def live_weights(body: Any) -> dict[int, int] | None:
    """``live``'s weights out of an aliases listing: ``{"live": {"7": 100}}``,
    ``{"aliases": {"live": ...}}`` or a list of ``{"name": "live",
    "weights": ...}``."""
    if isinstance(body, dict) and "aliases" in body:
        body = body["aliases"]
    found: Any = None
    if isinstance(body, dict):
        found = body.get("live")
    elif isinstance(body, list):
        for item in body:
            if isinstance(item, dict) and item.get("name") == "live":
                found = item
    if isinstance(found, dict) and "weights" in found:
        found = found["weights"]
    if not isinstance(found, dict):
        return None
    try:
        return {int(v): int(w) for v, w in found.items()}
    except (TypeError, ValueError):
        return None


def _ours(record: dict[str, Any] | None, version: int) -> bool:
    """Is this rollout record the one our push started (to ``version``)?"""
    return record is not None and _int(record.get("to")) == version


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class WaveRollout:
    """Drives one rollout by waves; :meth:`run` returns the exit status."""

    def __init__(self, plan: DeployPlan, cluster: ClusterFile, opts: RolloutOptions, *,
                 state_dir: Path | None = None, push_timeout_s: float = 120.0,
                 echo: Callable[[str], None] = print,
                 error: Callable[[str], None] | None = None, poll_s: float = POLL_S) -> None:
        self.plan = plan
        self.cluster = cluster
        self.opts = opts
        self.state = ClusterState(state_dir or state_dir_for(cluster.path))
        self.push_timeout_s = push_timeout_s
        self.echo = echo
        self.error = error or (lambda text: echo(f"error: {text}"))
        self.poll_s = poll_s
        self.ro: ClusterRollout | None = None

    # -- the record ----------------------------------------------------------
    def _begin(self) -> ClusterRollout:
        """The rollout to drive: the unfinished one of the same bundle (a
        deploy that died mid-waves), else a new one, recorded with the
        desired state before any region is asked."""
        plan, opts = self.plan, self.opts
        previous = self.state.rollout(plan.app)
        desired = self.state.snapshot().desired.get(plan.app)
        if (previous is not None and previous.digest == plan.digest
                and previous.state in (RUNNING, BAKING)
                and desired is not None and desired.digest == plan.digest
                and all(r in self.cluster.regions for w in previous.waves for r in w)):
            self.echo(f"continuing the rollout of {plan.digest[:12]} "
                      f"({previous.strategy}; waves {describe_waves(previous.waves)}): "
                      f"{previous.waves_done} of {len(previous.waves)} waves done")
            return previous
        now = time.time()
        ro = ClusterRollout(app=plan.app, digest=plan.digest, strategy=opts.strategy,
                            waves=opts.waves, bake_s=opts.bake_s,
                            on_region_failure=opts.on_region_failure,
                            rollback_on=opts.rollback_on, min_requests=opts.min_requests,
                            started=now, updated=now)
        desired = Desired(app=plan.app, digest=plan.digest, regions=plan.regions,
                          routing=plan.routing, override=plan.override, updated=now)
        self.state.record_deploy(desired, plan.bundle, rollout=ro)
        return ro

    def _save(self) -> None:
        assert self.ro is not None
        self.ro.updated = time.time()
        if not self.state.update_rollout(self.ro):
            raise Superseded(f"another deploy of {self.plan.app} replaced this rollout")

    def _params(self, ro: ClusterRollout) -> dict[str, str]:
        opts = RolloutOptions(ro.strategy, ro.rollback_on, ro.min_requests, ro.waves,
                              ro.bake_s, ro.on_region_failure, self.opts.wait_s)
        return opts.params()

    # -- the run -------------------------------------------------------------
    async def run(self) -> int:
        ro = self.ro = await asyncio.to_thread(self._begin)
        self.echo(f"rollout {ro.strategy} by waves: {describe_waves(ro.waves)}; "
                  f"bake {ro.bake_s:g} s; on a region's failure: {ro.on_region_failure}")
        timeout = httpx.Timeout(self.push_timeout_s, connect=min(5.0, self.push_timeout_s))
        async with httpx.AsyncClient(timeout=timeout) as client:
            try:
                return await self._waves(client)
            except Superseded as exc:
                self.error(f"stopped: {exc}")
                return 1

    async def _waves(self, client: httpx.AsyncClient) -> int:
        ro = self.ro
        assert ro is not None
        # a deploy that died after a region rolled back, before acting on it
        failed = {r: str(e.get("reason", "rolled back")) for r, e in ro.regions.items()
                  if e.get("state") == ROLLED_BACK}
        if failed:
            return await self._fail(client, failed)
        for i in range(ro.waves_done, len(ro.waves)):
            wave = ro.waves[i]
            label = f"wave {i + 1}/{len(ro.waves)} ({', '.join(wave)})"
            # a deploy that died while this wave baked: the bake goes on to
            # its recorded end, the wave's rollouts are not run again
            resumed_bake = ro.state == BAKING and ro.wave == i
            if not resumed_bake:
                ro.wave, ro.state, ro.bake_until = i, RUNNING, 0.0
                self._save()
                failures = await self._wave(client, wave)
                if failures:
                    self.echo(f"{label}: failed")
                    return await self._fail(client, failures)
            changed = any(ro.regions.get(r, {}).get("changed") for r in wave)
            if resumed_bake or (i + 1 < len(ro.waves) and changed and ro.bake_s > 0):
                if not resumed_bake:
                    ro.state, ro.bake_until = BAKING, time.time() + ro.bake_s
                    self._save()
                left = max(0.0, ro.bake_until - time.time())
                self.echo(f"{label}: promoted; baking {left:.3g} s until "
                          f"{time.strftime('%H:%M:%S', time.localtime(ro.bake_until))}")
                failures = await self._bake(client)
                if failures:
                    return await self._fail(client, failures)
            else:
                self.echo(f"{label}: promoted")
            ro.waves_done = i + 1
            self._save()
        ro.state, ro.bake_until = DONE, 0.0
        self._save()
        self.echo(f"rollout done: every region runs {ro.digest[:12]}")
        return 0

    async def _wave(self, client: httpx.AsyncClient,
                    wave: tuple[str, ...]) -> dict[str, str]:
        """Run the wave's regions; returns {region: why} for those that failed.
        Under ``rollback-all`` the first failure ends the wait for the others
        (they are rolled back anyway); under ``stop`` they finish."""
        assert self.ro is not None
        tasks = {asyncio.ensure_future(self._region(client, r)): r for r in wave}
        failures: dict[str, str] = {}
        try:
            waiting = set(tasks)
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    why = t.result()
                    if why:
                        failures[tasks[t]] = why
                if failures and self.ro.on_region_failure == ROLLBACK_ALL:
                    await self._pushes_landed(wave, waiting)
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return failures

    async def _pushes_landed(self, wave: tuple[str, ...], tasks: set[Any]) -> None:
        """Wait until no region of the wave is between push and answer: a
        push cut short could still land and start a rollout no one rolls back."""
        assert self.ro is not None
        while tasks and any(self.ro.regions.get(r, {}).get("state") == "pushing" for r in wave):
            _done, tasks = await asyncio.wait(tasks, timeout=0.1)

    async def _region(self, client: httpx.AsyncClient, name: str) -> str:
        """One region's rollout: push (unless an earlier run's push landed),
        then wait for each changed function's rollout to end. Returns "" when
        it promoted, else why not."""
        ro = self.ro
        assert ro is not None
        region = self.cluster.regions[name]
        entry = ro.regions.get(name) or {}
        # an earlier run of this deploy got the bundle there: its rollout went
        # on without the deploy, and is only watched now
        if entry.get("state") not in ("running", PROMOTED):
            ro.regions[name] = {"state": "pushing"}
            self._save()
            result = await push_bundle(client, region, self.plan.app, self.plan.bundle,
                                       self.plan.override, self.push_timeout_s,
                                       self._params(ro), parameters=self.plan.parameters)
            if result.outcome != DEPLOYED:
                what = "refused" if result.outcome == REFUSED else "not reached"
                ro.regions[name] = {"state": FAILED, "reason": f"{what}: {result.message}"}
                self._save()
                self.echo(f"{name}: {what} — {result.message}")
                return f"{what}: {result.message}"
            # every function is watched: a push repeated after a deploy died
            # reports the version being rolled out as unchanged
            entry = {"state": "running", "version": result.version,
                     "changed": result.changed,
                     "functions": {fn: {"version": v} for fn, v, _c in result.functions}}
            ro.regions[name] = entry
            self._save()
            self.echo(f"{name}: version {result.version} deployed"
                      + (f"; rollout {ro.strategy} under way" if result.changed else
                         " (unchanged)"))
        outcome, why = await self._settle(client, region, entry)
        entry["state"] = outcome  # "running" when it did not decide in time
        if why:
            entry["reason"] = why
        self._save()
        if outcome == PROMOTED:
            self.echo(f"{name}: version {entry.get('version')} promoted")
        elif outcome == ROLLED_BACK:
            self.echo(f"{name}: rolled back — {why}")
        else:
            self.echo(f"{name}: undecided — {why}")
        return why

    async def _settle(self, client: httpx.AsyncClient, region: RegionEntry,
                      entry: dict[str, Any]) -> tuple[str, str]:
        """Wait for every function's rollout in ``entry`` to end: (promoted,
        ""), (rolled_back, why), or (running, why) when one did not end
        within the deadline (it is still under way in the region)."""
        functions: dict[str, dict[str, Any]] = entry.get("functions") or {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.wait_s
        left = dict(functions)
        last_error = ""
        while left:
            for fn, info in list(left.items()):
                record, error = await get_rollout(client, region, fn)
                if error:
                    last_error = error
                    continue
                if not _ours(record, int(info["version"])):
                    left.pop(fn)  # no rollout for this version (nothing to shift from)
                    continue
                assert record is not None
                if record.get("from") is not None:
                    info["from"] = _int(record.get("from"))
                entry["changed"] = True
                state = record.get("state")
                if state == "promoted":
                    left.pop(fn)
                elif state == "rolled_back":
                    return ROLLED_BACK, f"{fn}: {record.get('reason') or 'rolled back'}"
            if not left:
                break
            if loop.time() >= deadline:
                fns = ", ".join(left)
                return "running", (f"{fns}: no decision within {self.opts.wait_s:g} s"
                                   + (f" ({last_error})" if last_error else ""))
            await asyncio.sleep(self.poll_s)
        return PROMOTED, ""

    async def _bake(self, client: httpx.AsyncClient) -> dict[str, str]:
        """Until the bake ends, watch every region on the new version: one
        whose rollout is rolled back meanwhile fails the rollout."""
        ro = self.ro
        assert ro is not None
        while True:
            failures: dict[str, str] = {}
            for name, entry in ro.regions.items():
                if entry.get("state") != PROMOTED:
                    continue
                for fn, info in (entry.get("functions") or {}).items():
                    if "from" not in info:
                        continue  # no rollout of ours: nothing to watch
                    why = await self._moved_back(client, self.cluster.regions[name], fn,
                                                 int(info["version"]))
                    if why:
                        why = f"{fn}: rolled back during the bake: {why}"
                        entry["state"], entry["reason"] = ROLLED_BACK, why
                        failures[name] = why
                        self.echo(f"{name}: rolled back — {why}")
                        break
            if failures:
                self._save()
                return failures
            left = ro.bake_until - time.time()
            if left <= 0:
                return {}
            await asyncio.sleep(min(self.poll_s, left))

    async def _moved_back(self, client: httpx.AsyncClient, region: RegionEntry, fn: str,
                          version: int) -> str:
        """Why ``fn`` in ``region`` no longer serves ``version`` fully ("" if
        it does, or the region does not say): its rollout was rolled back, or
        its ``live`` alias was moved off it after the promotion."""
        record, _error = await get_rollout(client, region, fn)
        if _ours(record, version) and record is not None \
                and record.get("state") == "rolled_back":
            return str(record.get("reason") or "by hand")
        weights = await get_live_weights(client, region, fn)
        if weights is not None and weights.get(version, 0) < 100:
            split = ", ".join(f"version {v} {w}%" for v, w in sorted(weights.items()))
            return f"live serves {split}"
        return ""

    async def _fail(self, client: httpx.AsyncClient, failures: dict[str, str]) -> int:
        ro = self.ro
        assert ro is not None
        ro.state = STOPPED
        ro.reason = "; ".join(f"{r}: {why}" for r, why in failures.items())
        self._save()
        back = [name for name, e in ro.regions.items()
                if e.get("state") in (PROMOTED, "running") and e.get("changed")]
        # a region that refused the bundle or could not be reached says
        # nothing about the version: the others keep it whatever the policy
        judged = any(ro.regions.get(r, {}).get("state") != FAILED for r in failures)
        if ro.on_region_failure == ROLLBACK_ALL and back and not judged:
            self.echo("left on the new version (no region judged it: deploy again to go "
                      f"on once the region is back): {', '.join(back)}")
        elif ro.on_region_failure == ROLLBACK_ALL and back:
            results = await asyncio.gather(*(self._roll_back(client, name) for name in back))
            for name, error in zip(back, results, strict=True):
                entry = ro.regions[name]
                if error:
                    entry["reason"] = f"rollback failed: {error}"
                    self.echo(f"{name}: rollback failed — {error}")
                else:
                    entry["state"], entry["reason"] = ROLLED_BACK, "rolled back with the others"
                    self.echo(f"{name}: rolled back (on_region_failure: rollback-all)")
            self._save()
        elif back:
            self.echo(f"left on the new version (on_region_failure: stop): {', '.join(back)}")
        untouched = [r for w in ro.waves for r in w if r not in ro.regions]
        if untouched:
            self.echo(f"not reached, still on the old version: {', '.join(untouched)}")
        self.error(f"rollout stopped: {ro.reason}")
        return 1

    async def _roll_back(self, client: httpx.AsyncClient, name: str) -> str:
        assert self.ro is not None
        region = self.cluster.regions[name]
        errors = []
        for fn, info in (self.ro.regions[name].get("functions") or {}).items():
            if "from" not in info:  # not polled yet: is a rollout of ours there?
                record, _error = await get_rollout(client, region, fn)
                if not _ours(record, int(info["version"])) or record is None:
                    continue  # none (unchanged, or a first version)
                info["from"] = _int(record.get("from"))
            error = await post_rollback(client, region, fn, _int(info.get("from")))
            if error:
                errors.append(f"{fn}: {error}")
        return "; ".join(errors)


class Superseded(Exception):
    """Another deploy of the app replaced this rollout's record."""


async def roll_out(plan: DeployPlan, cluster: ClusterFile, opts: RolloutOptions, *,
                   state_dir: Path | None = None, push_timeout_s: float = 120.0,
                   echo: Callable[[str], None] = print,
                   error: Callable[[str], None] | None = None) -> int:
    return await WaveRollout(plan, cluster, opts, state_dir=state_dir,
                             push_timeout_s=push_timeout_s, echo=echo, error=error).run()


async def mark_stopped(cluster: ClusterFile, app: str, reason: str,
                       state_dir: Path | None = None) -> ClusterRollout | None:
    """The operator rolled ``app`` back by hand: its desired digest must not
    be pushed again by a converger. Returns the (now stopped) record, None
    when the app is not deployed through the cluster file."""
    state = ClusterState(state_dir or state_dir_for(cluster.path))

    def mark() -> ClusterRollout | None:
        snap = state.snapshot()
        desired = snap.desired.get(app)
        if desired is None:
            return None
        ro = snap.rollouts.get(app)
        if ro is None or ro.digest != desired.digest:
            now = time.time()
            ro = ClusterRollout(app=app, digest=desired.digest, strategy="all-at-once",
                                waves=(desired.regions,), started=now, updated=now)
        if ro.state != STOPPED:
            ro.state, ro.reason = STOPPED, reason
        state.replace_rollout(ro)
        return ro

    return await asyncio.to_thread(mark)
