"""The region's leader: one controller decides, the others stand by.

:class:`Leadership` campaigns for ``leader/controller`` (a ttl key) and
renews it every ttl/3. It steps down when a renewal is refused (someone
else holds the key: we were paused past the ttl) or when renewals have
failed for 2/3 of the ttl (we can no longer be sure we hold it, and the
key expires a third of a ttl later, so two leaders never act at once for
longer than a store round trip). Standbys campaign every ttl/6, so a
crashed leader is replaced within ttl + ttl/6.

:class:`ControlLoop` is what the leader does, every ``tick_s`` (sooner when
a gateway holds requests for a target with no instance):

- the live targets are the function versions the ``apps/`` records point
  at, plus those a deploy asked to warm (``warm/<fn>/<version>``: one instance);
- per target a :class:`~nimbus.autoscale.decider.Decider` records the
  region's demand (:class:`~nimbus.cluster.demand.Collector`) and decides a
  count, ``ready`` being what is placed now;
- :func:`~nimbus.cluster.placement.place` spreads the counts over the live
  workers within their budgets, starting from the current placement;
- ``placement/<worker>`` is written for each worker whose placement
  changed, and ``shares/<fn>/<version>`` (each gateway's part of the target's
  ``max_concurrency``: cap // live gateways, at least 1) when it changed.

A new leader starts from the placements in the store, so a handover moves
nothing; its deciders start without history (a function with no demand
keeps its instances for the idle grace, as after a deploy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait, wait_event
from nimbus.autoscale.decider import Decider, Decision, ScalingConfig
from nimbus.clock import Clock, SystemClock
from nimbus.cluster.demand import Collector, Demand
from nimbus.cluster.keys import (
    LEADER,
    PLACEMENT,
    SHARES,
    STATUS,
    WARM,
    ClusterStore,
    KeyWatch,
    placement_key,
    share_key,
    target_of_path,
)
from nimbus.cluster.nodes import NodeWatch
from nimbus.cluster.placement import Placement, WorkerState, place, target_key, totals
from nimbus.errors import ConflictError, NimbusError
from nimbus.manifest.model import FunctionSpec
from nimbus.rollout.traffic import referenced

log = logging.getLogger("nimbus.cluster")


class Leadership:
    """Campaigns for ``key``; ``on_gain(term)`` / ``on_loss()`` run on changes."""

    def __init__(self, store: ClusterStore, node_id: str, key: str = LEADER,
                 ttl_s: float = 3.0, on_gain: Callable[[int], None] | None = None,
                 on_loss: Callable[[], None] | None = None) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, was: {ttl_s!r}")
        self.store = store
        self.node_id = node_id
        self.key = key
        self.ttl_s = ttl_s
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.term: int | None = None  # revision of the campaign that won
        self.terms = 0  # how many times this node gained the lead
        self._revision: int | None = None
        self._last_ok = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self.term is not None

    def holds(self, now: float) -> bool:
        """Leading, and the last renewal is recent enough (``now`` on the
        event loop's clock) that the key cannot have expired: a leader that
        was frozen past its ttl writes nothing before it learns it lost."""
        return self.term is not None and now - self._last_ok < self.ttl_s * 2 / 3

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._revision is None:
                    await self._campaign(loop.time())
                else:
                    await self._renew(loop.time())
            except Exception:  # noqa: BLE001 - the campaign must go on
                log.exception("leadership round failed")
            await asyncio.sleep(self.ttl_s / 6 if self._revision is None else self.ttl_s / 3)

    async def _campaign(self, now: float) -> None:
        value = orjson.dumps({"id": self.node_id, "pid": os.getpid(), "at": time.time()})
        try:
            rev = await self.store.campaign(self.key, value, self.ttl_s)
        except NimbusError as exc:
            log.warning("campaign for %s failed: %s", self.key, exc)
            return
        if rev is not None:
            self._revision = self.term = rev
            self._last_ok = now
            self.terms += 1
            log.info("%s leads (term %d)", self.node_id, rev)
            self._call(self.on_gain, rev)

    async def _renew(self, now: float) -> None:
        assert self._revision is not None
        try:
            self._revision = await self.store.renew(self.key, self._revision, self.ttl_s)
            self._last_ok = now
        except ConflictError:
            self._step_down("the lead was taken over")
        except NimbusError as exc:
            if now - self._last_ok >= self.ttl_s * 2 / 3:
                self._step_down(f"could not renew for {now - self._last_ok:.1f} s ({exc})")
            else:
                log.warning("renewing %s failed: %s", self.key, exc)

    def _step_down(self, why: str) -> None:
        log.warning("%s steps down: %s", self.node_id, why)
        self._revision = self.term = None
        self._call(self.on_loss)

    def _call(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the campaign goes on
            log.exception("leadership callback failed")

    async def aclose(self) -> None:
        """Stop campaigning; a leader resigns (a standby takes over at once)."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._revision is not None:
            rev, self._revision, self.term = self._revision, None, None
            with contextlib.suppress(NimbusError):
                await self.store.resign(self.key, rev)
            self._call(self.on_loss)


async def current_leader(store: ClusterStore, key: str = LEADER) -> str | None:
    """The id of the node leading now, if any."""
    e = await store.get(key)
    if e is None:
        return None
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        return str(orjson.loads(e.value)["id"])
    return None


# -- the decisions (time as a parameter) ---------------------------------------


def scaling_config(spec: FunctionSpec) -> ScalingConfig:
    assert spec.target_concurrency is not None and spec.panic_window_s is not None
    return ScalingConfig(
        target_concurrency=spec.target_concurrency, max_instances=spec.max_instances,
        min_instances=spec.min_instances, stable_window_s=spec.stable_window_s,
        panic_window_s=spec.panic_window_s, scale_to_zero_after_s=spec.scale_to_zero_after_s)


def concurrency_cap(spec: FunctionSpec) -> int:
    """A target's region-wide cap on invocations in flight (as a pool's)."""
    most = spec.max_instances * spec.concurrency
    return min(spec.max_concurrency or most, most)


def split_cap(cap: int, gateways: Iterable[str], busy: Mapping[str, int],
              want: Mapping[str, int], holding: Mapping[str, int] | None = None
              ) -> dict[str, int]:
    """Each gateway's part of a target's region-wide ``cap``: never more in
    all than ``cap``, counting what gateways may still be using.

    ``holding``: units a gateway may be using now, as far as the leader
    knows (the part it last reported enforcing, the part last written for
    it, its calls in flight). A unit moves in two steps: the gateway giving
    it up is told its smaller part, and only once it reports holding less
    is the unit free for another. ``ideal`` parts: first what each gateway
    is running now (``busy``), then the rest one at a time to the largest
    unmet ``want`` (running + held), then evenly, the fewest first, ties by
    gateway id."""
    gws = sorted(gateways)
    if not gws:
        return {}
    ideal = _ideal_split(max(cap, 0), gws, busy, want)
    if holding is None:
        return ideal
    hold = {g: max(holding.get(g, 0), 0) for g in gws}
    parts = {g: min(ideal[g], hold[g]) for g in gws}  # shrink now; grow from what is free
    free = max(cap, 0) - sum(hold.values())
    for g in sorted(gws, key=lambda g: (-(ideal[g] - hold[g]), g)):
        if free <= 0:
            break
        grow = min(ideal[g] - parts[g], free) if ideal[g] > hold[g] else 0
        grow = max(grow, 0)
        parts[g] = hold[g] + grow if grow else parts[g]
        free -= grow
    return parts


def holding(target: str, gateways: Mapping[str, Mapping[str, Demand]],
            written: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """What each gateway may be using of ``target``'s cap: the most of its
    calls in flight, the part it reported enforcing and the part last
    written for it (which it may have applied since its report)."""
    out = {}
    for g, d in gateways.items():
        mine = d.get(target, Demand())
        out[g] = max(mine.in_flight, mine.cap, written.get(target, {}).get(g, 0))
    return out


def _ideal_split(cap: int, gws: list[str], busy: Mapping[str, int],
                 want: Mapping[str, int]) -> dict[str, int]:
    alloc = dict.fromkeys(gws, 0)
    left = cap
    for g in sorted(gws, key=lambda g: -busy.get(g, 0)):
        take = min(max(busy.get(g, 0), 0), left)
        alloc[g] += take
        left -= take
    while left > 0:
        g = max(gws, key=lambda g: (want.get(g, 0) - alloc[g], -gws.index(g)))
        if want.get(g, 0) - alloc[g] <= 0:
            break
        alloc[g] += 1
        left -= 1
    while left > 0:  # level the rest: raise the lowest to the next level
        low = min(alloc.values())
        lows = [g for g in gws if alloc[g] == low]
        above = [n for n in alloc.values() if n > low]
        step = min(above) - low if above else None
        if step is None or step * len(lows) > left:
            each, extra = divmod(left, len(lows))
            for i, g in enumerate(lows):
                alloc[g] += each + (1 if i < extra else 0)
            left = 0
        else:
            for g in lows:
                alloc[g] += step
            left -= step * len(lows)
    return alloc


@dataclass(frozen=True, slots=True)
class Plan:
    placement: Placement
    shares: dict[str, dict[str, int]]  # target -> gateway id -> its part of the cap
    decisions: dict[str, Decision] = field(default_factory=dict)


class Planner:
    """The leader's decisions for one tick: a decider per live target, then
    placement and shares. Pure apart from the deciders' own memory."""

    def __init__(self) -> None:
        self.deciders: dict[str, Decider] = {}

    def step(self, now: float, targets: Mapping[str, FunctionSpec],
             demand: Mapping[str, Demand], workers: list[WorkerState],
             gateways: Mapping[str, Mapping[str, Demand]],
             warm: frozenset[str] = frozenset(),
             written: Mapping[str, Mapping[str, int]] | None = None) -> Plan:
        """``gateways``: every live gateway's id -> its own demand per target;
        ``written``: the parts of each cap as last written (None: hand out
        parts without waiting for gateways to give units back)."""
        placed = totals({w.id: dict(w.placed) for w in workers if w.alive})
        desired: dict[str, int] = {}
        decisions: dict[str, Decision] = {}
        for t, spec in targets.items():
            decider = self.deciders.get(t)
            if decider is None:
                decider = self.deciders[t] = Decider(scaling_config(spec))
            d = demand.get(t, Demand())
            decider.record(now, d.concurrency, d.arrivals)
            decision = decisions[t] = decider.decide(now, placed.get(t, 0))
            desired[t] = max(decision.desired, 1 if t in warm else 0)
        for t in [t for t in self.deciders if t not in targets]:
            del self.deciders[t]
        memory = {t: spec.memory_mb for t, spec in targets.items()}
        placement = place(desired, workers, memory)
        shares = {t: split_cap(concurrency_cap(spec), gateways,
                               {g: d[t].in_flight for g, d in gateways.items() if t in d},
                               {g: d[t].concurrency for g, d in gateways.items() if t in d},
                               None if written is None else holding(t, gateways, written))
                  for t, spec in targets.items()}
        return Plan(placement, shares, decisions)


def live_targets(apps: Mapping[str, Mapping[str, Any]]) -> dict[str, FunctionSpec]:
    """Target key -> spec for every version an app record points at (its
    stable versions and any other an alias names: a rollout keeps both
    placed); a record that cannot be read is logged and skipped."""
    out: dict[str, FunctionSpec] = {}
    for key, app in apps.items():
        try:
            for _fn, rec in referenced(app):  # every version some alias names
                spec = FunctionSpec.from_dict(rec["spec"])
                out[target_key(spec.name, rec["version"])] = spec
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the region
            log.warning("ignoring app record %s: %s", key, exc)
    return out


def spec_version(record: bytes) -> int:
    """The version number in a version record (a warm request's value)."""
    version = orjson.loads(record)["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"version must be an integer, was: {version!r}")
    return version


def worker_state(worker_id: str, info: Mapping[str, Any],
                 placed: Mapping[str, int]) -> WorkerState:
    budget = info.get("budget") or {}
    return WorkerState(worker_id, int(budget.get("max_instances", 0)),
                       int(budget.get("memory_mb", 0)), dict(placed))


# -- the loop -------------------------------------------------------------------


class ControlLoop:
    """Leadership plus, while leading, the control loop. ``start``/``aclose``.

    ``on_gain(term)`` / ``on_loss()`` are told of leadership changes too,
    for whatever else only the leader runs (the event scheduler)."""

    def __init__(self, store: ClusterStore, node_id: str, *, ttl_s: float = 3.0,
                 tick_s: float = 0.5, forget_after_s: float = 30.0,
                 clock: Clock | None = None, on_gain: Callable[[int], None] | None = None,
                 on_loss: Callable[[], None] | None = None) -> None:
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.store = store
        self.node_id = node_id
        self.tick_s = tick_s
        self.forget_after_s = forget_after_s  # a vanished worker's placement is kept so long
        self.clock = clock or SystemClock()
        self.leadership = Leadership(store, node_id, ttl_s=ttl_s, on_gain=self._gain,
                                     on_loss=self._loss)
        self.planner = Planner()
        self.placements: dict[str, dict[str, int]] = {}
        self.shares: dict[str, dict[str, int]] = {}
        self.last_plan: Plan | None = None
        self.ticks = 0
        self._missing_since: dict[str, float] = {}
        self._worker_ids: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self._lead_task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    async def start(self) -> None:
        await self.leadership.start()

    def wake(self, _target: str = "") -> None:
        self._wake.set()

    def _gain(self, term: int) -> None:
        self._lead_task = asyncio.get_running_loop().create_task(self._lead(term))
        if self.on_gain is not None:
            self.on_gain(term)

    def _loss(self) -> None:
        task, self._lead_task = self._lead_task, None
        if task is not None:
            stop = asyncio.get_running_loop().create_task(cancel_and_wait(task))
            self._stopping.add(stop)
            stop.add_done_callback(self._stopping.discard)
        if self.on_loss is not None:
            self.on_loss()

    async def _lead(self, term: int) -> None:
        failures = 0
        while True:  # until the lead is lost (this task is cancelled)
            try:
                await self._lead_once(term)
            except Exception as exc:  # noqa: BLE001 - e.g. the store failed while starting
                log.warning("leading failed (%s); starting again", exc)
            await asyncio.sleep(min(2.0, 0.1 * 2 ** min(failures, 5)))
            failures += 1

    def _workers_changed(self, nodes: dict[str, dict[str, Any]]) -> None:
        """Decide again at once when workers come or go (not on renewals)."""
        ids = frozenset(nodes)
        if ids != self._worker_ids:
            self._worker_ids = ids
            self.wake()

    async def _lead_once(self, term: int) -> None:
        self.planner = Planner()
        apps = KeyWatch(self.store, "apps/", on_change=lambda _w: self.wake())
        warm = KeyWatch(self.store, WARM, on_change=lambda _w: self.wake())
        workers = NodeWatch(self.store, "worker", on_change=self._workers_changed)
        gateways = NodeWatch(self.store, "gateway")
        collector = Collector(self.store, on_urgent=self.wake)
        parts: list[Any] = []
        try:
            for part in (apps, warm, workers, gateways, collector):
                await part.start()
                parts.append(part)
            self.placements = {}
            for e in await self.store.list(PLACEMENT):
                with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError):
                    self.placements[e.key[len(PLACEMENT):]] = {
                        str(t): int(n) for t, n in orjson.loads(e.value).items()}
            self.shares = {}
            for e in await self.store.list(SHARES):
                with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError,
                                         ValueError):
                    self.shares[target_of_path(e.key[len(SHARES):])] = {
                        str(g): int(n) for g, n in orjson.loads(e.value)["shares"].items()}
            log.info("leading (term %d) from %d placements", term, len(self.placements))
            while True:
                self._wake.clear()
                try:
                    await self.tick(self.clock.monotonic(), apps, warm, workers, gateways,
                                    collector)
                except NimbusError as exc:
                    log.warning("control tick failed: %s", exc)
                except Exception:  # noqa: BLE001 - one bad tick must not stop leading
                    log.exception("control tick failed")
                await wait_event(self._wake, self.tick_s)
        finally:
            for part in reversed(parts):
                with contextlib.suppress(Exception):
                    await part.aclose()

    async def tick(self, now: float, apps: KeyWatch, warm: KeyWatch, workers: NodeWatch,
                   gateways: NodeWatch, collector: Collector) -> Plan:
        records: dict[str, Any] = {}
        for key, e in apps.entries.items():
            with contextlib.suppress(orjson.JSONDecodeError):
                records[key] = orjson.loads(e.value)
        targets = live_targets(records)
        warm_keys: set[str] = set()
        for key, e in warm.entries.items():  # a deploy's new versions, not routed yet
            found = self._warm_target(key, e.value)
            if found is not None:
                warm_keys.add(found[0])
                targets.setdefault(*found)
        live = dict(workers.nodes)
        states = [worker_state(wid, info, self.placements.get(wid, {}))
                  for wid, info in sorted(live.items())]
        plan = self.planner.step(now, targets, collector.take(), states,
                                 collector.by_gateway(gateways.nodes), frozenset(warm_keys),
                                 written=self.shares)
        self.last_plan = plan
        if not self.leadership.holds(asyncio.get_running_loop().time()):
            return plan  # the lead may have lapsed: write nothing until renewed
        await self._write_placements(now, plan.placement)
        await self._write_shares(plan.shares)
        self.ticks += 1
        return plan

    def _warm_target(self, key: str, value: bytes) -> tuple[str, FunctionSpec] | None:
        try:
            spec = FunctionSpec.from_dict(orjson.loads(value)["spec"])
            return target_key(spec.name, spec_version(value)), spec
        except Exception:  # noqa: BLE001
            log.warning("ignoring a malformed warm request %s", key)
            return None

    async def _write_placements(self, now: float, placement: Placement) -> None:
        for wid, p in placement.items():
            self._missing_since.pop(wid, None)
            if self.placements.get(wid) != p:
                await self.store.put(placement_key(wid), orjson.dumps(p))
                log.info("placement of %s: %s", wid, p)
                self.placements[wid] = p
        for wid in [w for w in self.placements if w not in placement]:
            since = self._missing_since.setdefault(wid, now)
            if now - since >= self.forget_after_s:
                await self.store.delete(placement_key(wid))
                for e in await self.store.list(f"{STATUS}{wid}/"):
                    await self.store.delete(e.key)
                del self.placements[wid]
                del self._missing_since[wid]

    async def _write_shares(self, shares: dict[str, dict[str, int]]) -> None:
        for t, parts in shares.items():
            if self.shares.get(t) != parts:
                await self.store.put(share_key(t), orjson.dumps(
                    {"shares": parts, "cap": sum(parts.values()), "gateways": len(parts)}))
                self.shares[t] = parts
        for t in [t for t in self.shares if t not in shares]:
            await self.store.delete(share_key(t))
            del self.shares[t]

    async def aclose(self) -> None:
        await self.leadership.aclose()
        task, self._lead_task = self._lead_task, None
        await cancel_and_wait(task)
        if self._stopping:
            await asyncio.gather(*list(self._stopping), return_exceptions=True)
