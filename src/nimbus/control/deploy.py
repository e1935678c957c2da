"""Deploys: bundle in, immutable versions and a live app record out.

Order matters for the promise that a failed deploy leaves the running
version serving:

1. store the bundle (content-addressed) and unpack it on this node, within
   :class:`~nimbus.control.bundle.BundleLimits`;
2. load and validate the manifest from the unpacked code;
   byte-compile it, so no cold start compiles (unpacking, parsing and
   compiling run in a thread: the event loop, and so the gateway, keeps
   answering whatever the bundle holds);
3. build requirements venvs (pip's failure fails the deploy);
4. for each function whose code or config changed, warm one instance of the
   new version: an import error fails the deploy before anything moves;
5. write the version records (create-only, numbered) and then the app record
   (compare-and-set): the app record is what gateways watch, so routes move
   to the new versions in one write;
6. collect garbage (:mod:`nimbus.control.gc`) in the background: code,
   blobs and venvs that neither the newest ``keep_versions`` versions of a
   function nor a live version need (also once at start).

Without a local worker (the region's controller: ``worker=None`` and a
warmer, :class:`nimbus.cluster.warm.ClusterWarmer`), steps 1-2 run in a
scratch folder only to validate and compile-check the bundle; workers
unpack it themselves from the blobs. Step 3 only hashes the requirements
(the workers build the venv), and step 4 asks the region's leader for one
instance of each new version (``warm/<fn>/<version>``) and waits until a
worker reports it ready, or fails the deploy with the error a worker
reported (``status/<worker>/<fn>/<version>``): an import error or a pip
failure still stops the deploy before routes move. With no worker
registered at all the deploy goes live as ``pending``.

Store layout::

    functions/<fn>/versions/<n:08d>   version record (immutable)
    functions/<fn>/owner              {"app": name}: function names are global
    apps/<app>                        live record: functions -> version record, routes
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from nimbus.control import gc
from nimbus.control.bundle import BundleLimits, extract_bundle
from nimbus.control.venvs import ensure_venv, requirements_hash
from nimbus.errors import (
    ConflictError,
    DeployError,
    ManifestError,
    NimbusError,
    UserInputError,
)
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import AppSpec, FunctionSpec, RegionsSpec, RolloutSpec
from nimbus.manifest.routes import collide
from nimbus.rollout.traffic import DEFAULT_ALIAS
from nimbus.store.base import Blobs, Store
from nimbus.worker.containment import share_read_only
from nimbus.worker.target import Target, code_dir_for
from nimbus.worker.worker import Worker

Progress = Callable[[str], None]
# (function, version) -> its invocations in the last minute, None: not known
Traffic = Callable[[str, int], Awaitable[int | None]]
log = logging.getLogger("nimbus.deploy")

DEFAULT_KEEP_VERSIONS = 5
# A stable version that took this many invocations in the last minute takes
# real traffic: a deploy without a strategy then rolls out as a canary.
REAL_TRAFFIC_PER_MINUTE = 100
DEFAULT_CANARY = "canary:10%:1m"
# Larger modules are left to compile on import: compile() holds the GIL for
# as long as it runs, which would stall the event loop from any thread.
MAX_COMPILE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeployConfig:
    bundle: BundleLimits = field(default_factory=BundleLimits)
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # per function, besides the live one

    def __post_init__(self) -> None:
        if (not isinstance(self.keep_versions, int) or isinstance(self.keep_versions, bool)
                or self.keep_versions < 1):
            raise ValueError(f"keep_versions must be an integer of at least 1, "
                             f"was: {self.keep_versions!r}")


def version_key(fn: str, n: int) -> str:
    return f"functions/{fn}/versions/{n:08d}"


def target_from_record(app: str, rec: dict[str, Any]) -> Target:
    return Target(app=app, version=rec["version"], spec=FunctionSpec.from_dict(rec["spec"]),
                  digest=rec["digest"], requirements_hash=rec.get("requirements_hash"))


def _config_hash(spec: FunctionSpec, digest: str, req_hash: str | None) -> str:
    blob = orjson.dumps({"spec": spec.to_dict(), "digest": digest, "req": req_hash},
                        option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    """A deploy's rollout flags; each one set overrides the manifest's ``rollout:``."""

    strategy: str | None = None
    rollback_on: str | None = None
    min_requests: int | None = None

    def check(self) -> RolloutOptions:
        """Raise ``UserInputError`` naming a flag that does not parse."""
        from nimbus.rollout.policy import MAX_MIN_REQUESTS, parse_rule, parse_strategy

        if self.strategy is not None:
            parse_strategy(self.strategy)
        if self.rollback_on is not None:
            parse_rule(self.rollback_on)
        if self.min_requests is not None and not 1 <= self.min_requests <= MAX_MIN_REQUESTS:
            raise UserInputError(f"min_requests must be from 1 to {MAX_MIN_REQUESTS}, "
                                 f"was {self.min_requests}")
        return self


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one changed function with a previous version goes live."""

    strategy: str
    steps: list[tuple[int, float]]
    rollback_on: str
    min_requests: int
    defaulted: bool  # chosen because the stable version takes real traffic


class Warmer(Protocol):
    """How a deploy without a local worker gets its new versions started."""

    async def warm(self, records: list[dict[str, Any]], progress: Progress) -> bool:
        """Have one instance of each record's version ready somewhere; True
        when they are, False when there is nowhere to start them (pending).
        Raises ``DeployError`` with the reason a start failed."""
        ...


class Deployer:
    def __init__(self, store: Store, blobs: Blobs, worker: Worker | None, state_dir: Path,
                 config: DeployConfig | None = None, warmer: Warmer | None = None) -> None:
        if worker is None and warmer is None:
            raise ValueError("a deployer needs a local worker or a warmer")
        self.store = store
        self.blobs = blobs
        self.worker = worker
        self.warmer = warmer
        self.state_dir = state_dir
        self.config = config or DeployConfig()
        self._busy: Counter[str] = Counter()  # digests of deploys under way
        self._gc_lock = asyncio.Lock()
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_again = False
        # how much traffic a stable version takes (the rollout runner's
        # samples); None: unknown, and a deploy without a strategy is all-at-once
        self.traffic: Traffic | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.schedule_gc()  # leftovers of earlier runs (crashes, failed deploys)

    async def deploy(self, bundle: bytes, progress: Progress,
                     name: str | None = None,
                     regions: RegionsSpec | None = None,
                     rollout: RolloutOptions | None = None,
                     parameters: dict[str, str] | None = None) -> dict[str, Any]:
        """Deploy ``bundle``; ``name`` names the app when its manifest does not
        (the folder's name on the client: the bundle itself carries none);
        ``regions``, when given, replaces the manifest's ``regions:`` (the
        routing a guided deploy saved); ``rollout``: the deploy's strategy
        flags (see :mod:`nimbus.rollout`); ``parameters``: a SAM template's
        parameter overrides."""
        digest = await asyncio.to_thread(lambda: hashlib.sha256(bundle).hexdigest())
        async with self._gc_lock:  # a collection under way finishes first
            self._busy[digest] += 1
        try:
            return await self._deploy(bundle, digest, progress, name, regions,
                                      rollout or RolloutOptions(), parameters or {})
        finally:
            self._busy[digest] -= 1
            if not self._busy[digest]:
                del self._busy[digest]
            self.schedule_gc()

    async def _deploy(self, bundle: bytes, digest: str, progress: Progress,
                      name: str | None, regions: RegionsSpec | None,
                      rollout: RolloutOptions, parameters: dict[str, str]) -> dict[str, Any]:
        await self.blobs.put(bundle)
        if self.worker is not None:
            return await self._deploy_in(bundle, digest, progress, name, regions, rollout,
                                         code_dir_for(self.state_dir, digest), parameters)
        scratch = self.state_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="deploy-", dir=scratch)
        try:
            return await self._deploy_in(bundle, digest, progress, name, regions, rollout,
                                         Path(tmp) / "code", parameters)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    async def _deploy_in(self, bundle: bytes, digest: str, progress: Progress,
                         name: str | None, regions: RegionsSpec | None,
                         rollout: RolloutOptions, code_dir: Path,
                         parameters: dict[str, str]) -> dict[str, Any]:
        try:
            app = await asyncio.to_thread(self._prepare, bundle, code_dir, name, parameters)
        except ManifestError as exc:  # name the app's own files, not our folder
            raise exc.relative_to(code_dir) from None
        if regions is not None:
            app = dataclasses.replace(app, regions=regions)
        progress(f"bundle {digest[:12]} ({len(bundle)} bytes)")
        for notice in app.notices:
            progress(notice)
        claimed = await self._check_ownership(app)
        try:
            return await self._deploy_app(app, digest, code_dir, progress, rollout)
        except BaseException:
            await self._release(claimed)  # a failed first deploy keeps no names
            raise

    def _prepare(self, bundle: bytes, code_dir: Path, name: str | None,
                 parameters: dict[str, str]) -> AppSpec:
        """Unpack, byte-compile and load the manifest (in a thread)."""
        prepare_code(bundle, code_dir, self.config.bundle)
        return load_app(code_dir, default_name=name, parameters=parameters or None)

    def schedule_gc(self) -> None:
        """Collect garbage in the background; runs asked for meanwhile coalesce."""
        if self._gc_task is not None and not self._gc_task.done():
            self._gc_again = True
            return
        self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())

    async def _gc_loop(self) -> None:
        self._gc_again = True
        while self._gc_again:
            self._gc_again = False
            try:
                await self.collect_garbage()
            except Exception:  # a failed collection is retried after the next deploy
                log.exception("garbage collection failed")

    async def collect_garbage(self) -> gc.Collected:
        """One collection now (see :mod:`nimbus.control.gc`)."""
        async with self._gc_lock:
            in_use = gc.Keep(set(self._busy))
            for pool in (self.worker.pools.values() if self.worker is not None else ()):
                in_use.add({"digest": pool.target.digest,
                            "requirements_hash": pool.target.requirements_hash})
            # Venvs are built inside deploys (their folders are referenced only
            # once the version record exists): swept only when none is under way.
            done = await gc.collect(self.state_dir, self.store, self.blobs,
                                    keep_versions=self.config.keep_versions, in_use=in_use,
                                    sweep_venvs=not self._busy)
        if done:
            log.info("removed %d old version records, %d code folders, %d blobs, %d venvs",
                     len(done.versions), len(done.code), len(done.blobs), len(done.venvs))
        return done

    async def aclose(self) -> None:
        """Wait for a collection under way (it only deletes what nothing needs)."""
        if self._gc_task is not None:
            self._gc_again = False
            with contextlib.suppress(Exception):
                await self._gc_task

    async def _deploy_app(self, app: AppSpec, digest: str, code_dir: Path,
                          progress: Progress, rollout: RolloutOptions) -> dict[str, Any]:
        req_hashes: dict[str, str | None] = {}
        for fn in app.functions.values():
            if not fn.requirements:
                req_hashes[fn.name] = None
            elif self.worker is None:  # each worker builds it (and reports pip's failure)
                content = await asyncio.to_thread((code_dir / fn.requirements).read_bytes)
                req_hashes[fn.name] = requirements_hash(content)
            else:
                req_hashes[fn.name] = await ensure_venv(
                    self.state_dir, code_dir / fn.requirements, progress,
                    self.worker.containment, code_dir)
        current = await self.store.get(f"apps/{app.name}")
        live = orjson.loads(current.value) if current else {"functions": {}}
        records: dict[str, dict[str, Any]] = {}
        new: list[dict[str, Any]] = []
        rollouts = await self._rollouts_of(app)
        plans: dict[str, _Plan] = {}
        for fn in app.functions.values():
            chash = _config_hash(fn, digest, req_hashes[fn.name])
            prev = live["functions"].get(fn.name)
            if prev is not None and prev.get("config_hash") == chash:
                records[fn.name] = prev
                continue
            if prev is not None and _rolling_out(live, fn.name, chash,
                                                 rollouts.get(fn.name)):
                records[fn.name] = prev  # the version being rolled out, unchanged
                continue
            _check_no_rollout(fn.name, rollouts.get(fn.name))
            if prev is not None:
                plan = await self._plan(fn.name, int(prev["version"]), app.rollouts.get(fn.name),
                                        rollout)
                if plan is not None:
                    plans[fn.name] = plan
            number = await self._next_version(fn.name)
            rec: dict[str, Any] = {"version": number, "app": app.name, "digest": digest,
                   "requirements_hash": req_hashes[fn.name], "spec": fn.to_dict(),
                   "config_hash": chash, "created": time.time()}
            records[fn.name] = rec
            new.append(rec)
        warmed = [target_from_record(app.name, rec) for rec in new]
        pending = False
        try:
            if self.worker is None:
                assert self.warmer is not None
                pending = bool(new) and not await self.warmer.warm(new, progress)
            else:
                for target in warmed:  # warm before anything moves: an import error stops here
                    progress(f"starting {target.function} version {target.version}")
                    await self.worker.pool(target).ensure_warm()
            for rec in new:
                try:
                    await self.store.create(version_key(rec["spec"]["name"], rec["version"]),
                                            orjson.dumps(rec))
                except ConflictError:
                    raise DeployError(f"another deploy of {rec['spec']['name']} is in "
                                      "progress; retry") from None
        except BaseException:
            # Stop what this deploy warmed, unless a concurrent identical deploy
            # already made those versions live.
            if self.worker is None:
                raise
            latest = await self.store.get(f"apps/{app.name}")
            live = orjson.loads(latest.value)["functions"] if latest else {}
            self.worker.discard([t for t in warmed if live.get(t.function, {}).get(
                "config_hash") != records[t.function]["config_hash"]])
            raise
        app_record: dict[str, Any] = {
            "name": app.name, "digest": digest, "deployed": time.time(),
            "functions": records,
            "regions": app.regions.to_dict() if app.regions else None,
            # a 4th element names the alias a route serves (none: live), a
            # 5th its payload format when not 2.0 (the alias is written then)
            "routes": [[r.method, r.path, fn.name,
                        *([r.alias] if r.alias != DEFAULT_ALIAS or r.payload != "2.0" else []),
                        *([r.payload] if r.payload != "2.0" else [])]
                       for fn in app.functions.values() for r in fn.routes],
        }
        app_record = _with_traffic(app_record, live if current else None, plans)
        started = await self._start_rollouts(app.name, live, app_record, plans, rollouts,
                                             progress)
        try:
            await self._write_app(app.name, current, app_record)
        except BaseException:
            await self._abandon(started)
            raise
        serving = {fn: int(rec["version"]) for fn, rec in app_record["functions"].items()}
        return {
            "app": app.name,
            "digest": digest,
            "regions": app.regions.to_dict() if app.regions else None,
            "functions": [
                {"name": name, "version": rec["version"], "changed": rec in new,
                 "serving": serving[name],
                 "routes": [f"{r['method']} {r['path']}" for r in rec["spec"]["routes"]],
                 **({"rollout": started[name][0]} if name in started else {})}
                for name, rec in ((n, _newest(app_record, n)) for n in records)
            ],
            "notices": list(app.notices),
            **({"pending": True} if pending else {}),
        }

    async def _rollouts_of(self, app: AppSpec) -> dict[str, tuple[dict[str, Any], int]]:
        """The latest rollout record of each of the app's functions, and its revision."""
        from nimbus.rollout import state

        out = {}
        for fn in app.functions:
            entry = await self.store.get(state.key(fn))
            if entry is not None:
                out[fn] = (orjson.loads(entry.value), entry.revision)
        return out

    async def _plan(self, fn: str, stable: int, spec: RolloutSpec | None,
                    flags: RolloutOptions) -> _Plan | None:
        """How a new version of ``fn`` replaces version ``stable``: a
        rollout plan, or None for all at once."""
        from nimbus.observe import metrics
        from nimbus.rollout.policy import DEFAULT_MIN_REQUESTS, DEFAULT_RULE, parse_strategy

        spec = spec or RolloutSpec()
        text = flags.strategy or spec.strategy
        defaulted = False
        if text is None:
            seen = await self.traffic(fn, stable) if self.traffic is not None else None
            if seen is None or seen < REAL_TRAFFIC_PER_MINUTE or not metrics.COUNTING:
                return None
            text, defaulted = DEFAULT_CANARY, True
        strategy = parse_strategy(text)
        if len(strategy.steps) < 2:
            return None
        if not metrics.COUNTING:
            raise DeployError(f"strategy {text!r} for {fn} needs per-version metrics, and they "
                              "are off (NIMBUS_METRICS=off): turn them on, or deploy with "
                              "--strategy all-at-once")
        return _Plan(strategy=strategy.text,
                     steps=[(s.share, s.wait_s) for s in strategy.steps],
                     rollback_on=flags.rollback_on or spec.rollback_on or DEFAULT_RULE,
                     min_requests=flags.min_requests or spec.min_requests
                     or DEFAULT_MIN_REQUESTS, defaulted=defaulted)

    async def _start_rollouts(self, app: str, live: dict[str, Any], record: dict[str, Any],
                              plans: dict[str, _Plan],
                              existing: dict[str, tuple[dict[str, Any], int]],
                              progress: Progress) -> dict[str, tuple[dict[str, Any], int]]:
        """Write a running rollout record for each planned function (before the
        app record: the runner then finds the rollout whatever happens next)."""
        from nimbus.rollout import state

        started: dict[str, tuple[dict[str, Any], int]] = {}
        now = time.time()
        try:
            for fn, plan in plans.items():
                frm = int(record["functions"][fn]["version"])
                to = int(_newest(record, fn)["version"])
                rec = state.new_record(app=app, fn=fn, from_version=frm, to_version=to,
                                       strategy=plan.strategy, steps=plan.steps,
                                       rollback_on=plan.rollback_on,
                                       min_requests=plan.min_requests, now=now)
                rec["defaulted"] = plan.defaulted
                data = orjson.dumps(rec)
                try:
                    if fn in existing:
                        revision = await self.store.update(state.key(fn), data,
                                                           existing[fn][1])
                    else:
                        revision = await self.store.create(state.key(fn), data)
                except ConflictError:
                    raise DeployError(f"another rollout of {fn} started during this deploy; "
                                      f"see nimbus rollout status {fn}") from None
                started[fn] = (rec, revision)
                why = (f" (the default: version {frm} takes real traffic; --strategy "
                       "all-at-once to skip)" if plan.defaulted else "")
                progress(f"rolling out {fn} version {to} over version {frm}: "
                         f"{plan.strategy}{why}")
        except BaseException:
            await self._abandon(started)
            raise
        return started

    async def _abandon(self, started: dict[str, tuple[dict[str, Any], int]]) -> None:
        """End rollouts this deploy started but could not make live."""
        from nimbus.rollout import state

        for fn, (rec, revision) in started.items():
            done = {**rec, "state": state.ROLLED_BACK, "ended": time.time(),
                    "reason": "the deploy that started it failed"}
            with contextlib.suppress(NimbusError):
                await self.store.update(state.key(fn), orjson.dumps(done), revision)

    async def _check_ownership(self, app: AppSpec) -> list[tuple[str, int]]:
        """Claim the app's function names; returns the claims made now (key,
        revision), which a failed deploy gives back."""
        claimed: list[tuple[str, int]] = []
        try:
            for fn in app.functions:
                key = f"functions/{fn}/owner"
                owner = await self.store.get(key)
                if owner is None:
                    try:
                        claimed.append(
                            (key, await self.store.create(key, orjson.dumps({"app": app.name}))))
                    except ConflictError:
                        owner = await self.store.get(key)
                if owner is not None and orjson.loads(owner.value)["app"] != app.name:
                    other = orjson.loads(owner.value)["app"]
                    raise DeployError(f"function {fn!r} already belongs to app {other!r}")
            await self._check_routes(app)
        except BaseException:
            await self._release(claimed)
            raise
        return claimed

    async def _release(self, claimed: list[tuple[str, int]]) -> None:
        for key, revision in claimed:
            with contextlib.suppress(NimbusError):
                await self.store.delete(key, revision=revision)

    async def _check_routes(self, app: AppSpec) -> None:
        """Routes of other apps follow the rules of one app's routes."""
        taken: list[tuple[str, str, str]] = []
        for entry in await self.store.list("apps/"):
            other = orjson.loads(entry.value)
            if other["name"] == app.name:
                continue
            for method, path, fn, *_alias in other["routes"]:
                taken.append((method, path, f"{other['name']}/{fn}"))
        for fn in app.functions.values():
            for r in fn.routes:
                for method, path, holder in taken:
                    if collide(r.method, r.path, method, path):
                        hint = ("" if r.path == path else
                                " (one path with other parameter names; name them the same)")
                        raise DeployError(f"route {r.method} {r.path} of {fn.name} overlaps "
                                          f"{method} {path}, served by {holder}{hint}")

    async def _next_version(self, fn: str) -> int:
        entries = await self.store.list(f"functions/{fn}/versions/")
        return (int(entries[-1].key.rsplit("/", 1)[1]) + 1) if entries else 1

    async def _write_app(self, name: str, current: Any, record: dict[str, Any]) -> None:
        data = orjson.dumps(record)
        try:
            if current is None:
                await self.store.create(f"apps/{name}", data)
            else:
                await self.store.update(f"apps/{name}", data, current.revision)
        except ConflictError:
            raise DeployError(f"app {name} changed during this deploy; retry") from None


def _rolling_out(live: dict[str, Any], fn: str, chash: str,
                 latest: tuple[dict[str, Any], int] | None) -> bool:
    """Whether a running rollout of ``fn`` moves traffic to a version with
    this config (a version another alias names is not that: deploying its
    code again makes it live)."""
    from nimbus.rollout import state

    if latest is None or latest[0].get("state") != state.RUNNING:
        return False
    to = (live.get("versions") or {}).get(fn, {}).get(str(latest[0].get("to")))
    return to is not None and to.get("config_hash") == chash


def _check_no_rollout(fn: str, latest: tuple[dict[str, Any], int] | None) -> None:
    from nimbus.rollout import state

    if latest is None or latest[0].get("state") != state.RUNNING:
        return
    rec = latest[0]
    raise DeployError(f"a rollout of {fn} is in progress ({rec['from']} -> {rec['to']}, "
                      f"step {rec['step'] + 1} of {len(rec['steps'])}): wait, or "
                      f"nimbus rollback {fn}")


def _newest(record: dict[str, Any], fn: str) -> dict[str, Any]:
    """The newest version record of ``fn`` the app record holds."""
    recs = [record["functions"][fn], *((record.get("versions") or {}).get(fn) or {}).values()]
    return max(recs, key=lambda r: int(r["version"]))


def _with_traffic(record: dict[str, Any], previous: dict[str, Any] | None,
                  plans: dict[str, _Plan]) -> dict[str, Any]:
    """The app record a deploy writes: ``record`` (every function on its
    deployed version) with the aliases ``previous`` kept, ``live`` moved
    to each changed function's new version, except that each planned
    rollout's new version takes only the first step's share beside the
    previous version (which stays the stable one), and a function whose
    rollout is under way keeps its split."""
    from nimbus.rollout import traffic

    out = traffic.after_deploy(previous, record)
    if previous is None:
        return out
    before = previous.get("functions", {})
    for fn, rec in record["functions"].items():
        prev = before.get(fn)
        if prev is None:
            continue
        if fn in plans:
            old, new, share = int(prev["version"]), int(rec["version"]), plans[fn].steps[0][0]
            out = traffic.promote(out, fn, old, {old: prev})
            out = traffic.with_weights(out, fn, traffic.DEFAULT_ALIAS,
                                       {old: 100 - share, new: share}, {new: rec})
        elif prev is rec:
            weights = traffic.weights_of(previous, fn)
            if len(weights) > 1:  # unchanged, mid-rollout: the split stays
                out = traffic.with_weights(out, fn, traffic.DEFAULT_ALIAS, weights,
                                           traffic.records_of(previous, fn))
    return out


def prepare_code(bundle: bytes, code_dir: Path, limits: BundleLimits | None = None) -> None:
    """Unpack ``bundle`` into ``code_dir`` (a no-op if it is there),
    byte-compile it and make it readable to the functions. Blocking: run it
    in a thread. Raises ``DeployError`` for a bundle it refuses."""
    extract_bundle(bundle, code_dir, limits)
    # Byte-compile once here so that no cold start compiles (instances
    # may run with PYTHONDONTWRITEBYTECODE and would compile every time).
    _compile_tree(code_dir)
    # Readable by the functions' uids (nimbus's own umask is 077): the
    # folders above it stay root-only, so only its own instances see it.
    share_read_only(code_dir)


def _compile_tree(code_dir: Path) -> None:
    for root, _dirs, names in os.walk(code_dir):
        for name in names:
            path = Path(root) / name
            if name.endswith(".py") and path.stat().st_size <= MAX_COMPILE_BYTES:
                compileall.compile_file(str(path), quiet=2)
