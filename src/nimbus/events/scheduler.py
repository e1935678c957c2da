"""Schedules: each tick fires exactly once per region, however many controllers run.

* Leadership: the controller holding the campaign key ``schedules/leader``
  (in the Store) fires; the others wait. The leader renews the key every
  round (``ROUND_S``, well inside ``LEASE_TTL_S``); a leader that dies stops
  renewing, the key expires ``LEASE_TTL_S`` after its last renewal, and
  another takes over. A renewal that fails with ``ConflictError`` means the
  lead is lost: the scheduler stops firing until it wins a campaign again.
* Progress: every schedule keeps the time of the last tick it handled in
  ``schedules/ticks/<function>/<id>``, advanced with compare-and-set after
  the tick's invocations are queued. A new leader starts from there.
* Exactly once: a tick is queued with the dedup key
  ``schedule:<id>:<tick>``, so a leader that queued a tick and died before
  advancing the record cannot make its successor fire it again.
* Missed ticks (nothing was running at their time, or a leader change took
  longer than ``LATE_S``): the schedule's ``missed`` policy fires the latest
  ``once`` (default), ``none``, or ``all`` of them (at most ``CATCHUP_LIMIT``).

A scheduled invocation is an async invocation of the function: same
retries, records and dead letters. Decisions (:func:`ticks_to_fire`) are
pure and take ``now``; :meth:`Scheduler.tick` is one round, so tests drive
it with a manual clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from nimbus.errors import ConflictError, NimbusError, UnavailableError
from nimbus.events.names import invoke_queue
from nimbus.events.schedule_expr import Schedule, parse_schedule
from nimbus.events.shapes import scheduled_event
from nimbus.ids import new_id
from nimbus.observe import metrics
from nimbus.store.queue import Delivery, Outgoing

if TYPE_CHECKING:
    from nimbus.clock import Clock
    from nimbus.manifest.model import ScheduleSpec
    from nimbus.store.base import Store
    from nimbus.worker.pool import FunctionPool

log = logging.getLogger("nimbus.schedule")

LEADER_KEY = "schedules/leader"
TICKS_PREFIX = "schedules/ticks/"
LEASE_TTL_S = 5.0
ROUND_S = 0.5  # how often the leader looks for due ticks
LATE_S = 30.0  # a tick fired later than this after its time counts as missed
CATCHUP_LIMIT = 100


@dataclass(frozen=True, slots=True)
class Scheduled:
    function: str
    index: int  # among the function's schedules: names the EventBridge rule
    spec: ScheduleSpec

    @property
    def key(self) -> str:
        """Changing the expression, zone or input makes a new schedule (no
        backlog); two that are alike but for their place stay two."""
        spec = self.spec
        digest = hashlib.sha256(orjson.dumps([spec.expression, spec.timezone, dict(spec.input),
                                              self.index, *(["event"] if spec.input_as_event
                                                            else [])],
                                             option=orjson.OPT_SORT_KEYS))
        return f"{self.function}/{digest.hexdigest()[:12]}"

    def parsed(self) -> Schedule:
        return parse_schedule(self.spec.expression, self.spec.timezone)


def schedules_of(pools: dict[str, FunctionPool]) -> list[Scheduled]:
    return [Scheduled(fn, i, s) for fn, pool in sorted(pools.items())
            for i, s in enumerate(pool.target.spec.schedules)]


def ticks_to_fire(schedule: Schedule, missed: str, last: float,
                  now: float) -> tuple[list[float], float]:
    """(ticks to fire now, the new ``last``) for ticks in (``last``, ``now``]."""
    fire, _skipped, new_last = tick_plan(schedule, missed, last, now)
    return fire, new_last


def tick_plan(schedule: Schedule, missed: str, last: float,
              now: float) -> tuple[list[float], int, float]:
    """(ticks to fire now, how many due ticks are skipped by the ``missed``
    policy, the new ``last``) for ticks in (``last``, ``now``]."""
    due = [d.timestamp() for d in schedule.due(_dt(last), _dt(now), CATCHUP_LIMIT)]
    if not due:
        return [], 0, last
    on_time = [t for t in due if now - t <= LATE_S]
    late = [t for t in due if now - t > LATE_S]
    if missed == "all":
        fire = due
    elif missed == "once":
        fire = on_time or late[-1:]
    else:
        fire = on_time
    return fire, len(due) - len(fire), due[-1]


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Scheduler:
    def __init__(self, store: Store, queue: Delivery, clock: Clock, *,
                 node: str | None = None, lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.store = store
        self.queue = queue
        self.clock = clock
        self.node = node or new_id()[:8]
        self.lease_ttl_s = lease_ttl_s
        self.schedules: list[Scheduled] = []
        self._term: int | None = None  # revision of our leader key while we lead
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self._term is not None

    def set_pools(self, pools: dict[str, FunctionPool]) -> None:
        self.schedules = schedules_of(pools)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except NimbusError as exc:  # a store failing over is one line, a bug a traceback
                log.warning("schedule round failed (%s); trying again", exc,
                            exc_info=not isinstance(exc, UnavailableError))
            except Exception:  # noqa: BLE001 - the scheduler must outlive a bug in one round
                log.exception("schedule round failed")
            await asyncio.sleep(ROUND_S)

    async def tick(self) -> list[tuple[str, float]]:
        """One round: keep or take the lead, then fire what is due.
        Returns the (schedule key, tick) pairs this round queued."""
        if not self.schedules:
            await self.resign()
            return []
        if not await self._lead():
            return []
        fired: list[tuple[str, float]] = []
        for s in list(self.schedules):
            fired += await self._fire_due(s)
        return fired

    async def _lead(self) -> bool:
        if self._term is not None:
            try:
                self._term = await self.store.renew(LEADER_KEY, self._term, self.lease_ttl_s)
                return True
            except ConflictError:  # expired or taken: someone else may lead now
                log.warning("scheduler %s lost the lead", self.node)
                self._term = None
        term = await self.store.campaign(LEADER_KEY, self.node.encode(), self.lease_ttl_s)
        if term is None:
            return False
        self._term = term
        log.info("scheduler %s leads", self.node)
        return True

    async def _fire_due(self, s: Scheduled) -> list[tuple[str, float]]:
        key = TICKS_PREFIX + s.key
        now = self.clock.now()
        entry = await self.store.get(key)
        if entry is None:  # a new schedule starts now: no backlog from the epoch
            try:
                await self.store.create(key, orjson.dumps({"last": now}))
            except ConflictError:
                pass
            return []
        last = float(orjson.loads(entry.value)["last"])
        fire, skipped, new_last = tick_plan(s.parsed(), s.spec.missed, last, now)
        if new_last == last:
            return []
        detail = dict(s.spec.input)
        name = f"schedule-{s.index}"
        metrics.schedule_missed(s.function, name, skipped)
        for t in fire:
            # an EventBridge target's Input replaces the event (SAM's Input)
            event = detail if s.spec.input_as_event else scheduled_event(
                new_id(), s.function, name, t, detail)
            await self.queue.send(invoke_queue(s.function), [Outgoing(
                orjson.dumps(event), {"nimbus.source": "schedule"},
                dedup_key=f"schedule:{s.key}:{t:.3f}")])
            metrics.schedule_fired(s.function, name)
        try:
            await self.store.update(key, orjson.dumps({"last": new_last}), entry.revision)
        except ConflictError:  # another leader moved it: its ticks were deduplicated
            log.warning("schedule %s advanced by another controller", s.key)
        return [(s.key, t) for t in fire]

    async def resign(self) -> None:
        if self._term is not None:
            term, self._term = self._term, None
            try:
                await self.store.resign(LEADER_KEY, term)
            except NimbusError:
                log.warning("could not give up the schedule lead", exc_info=True)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.resign()
