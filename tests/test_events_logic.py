"""Pure decisions of the events side: retry schedule, batch responses, which
ticks to fire; and the scheduler's leader election with a manual clock
(two controllers racing over one real SQLite store and queue)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from nimbus.clock import ManualClock
from nimbus.events.dispatch import (
    MAX_LEASE,
    GiveBack,
    Slots,
    batch_failures,
    lease_ahead,
    lease_s,
)
from nimbus.events.names import invoke_queue
from nimbus.events.retry import MAX_DELAY_S, RetryPolicy, next_retry, too_old
from nimbus.events.schedule_expr import parse_schedule
from nimbus.events.scheduler import LATE_S, LEADER_KEY, Scheduled, Scheduler, ticks_to_fire
from nimbus.manifest.model import ScheduleSpec
from nimbus.store.sqlite import open_sqlite_store
from nimbus.store.sqlite_queue import open_sqlite_queue
from nimbus.worker.pool import ACQUIRE_GRACE_S

POLICY = RetryPolicy(retries=2, retry_delay_s=1.0, max_event_age_s=3600)


# -- leasing ahead ---------------------------------------------------------------

def test_lease_ahead_follows_the_observed_run_time() -> None:
    assert lease_ahead(2, None, 3.0) == 20  # 2 slots x 30 s / 3 s timeout, before any run
    assert lease_ahead(2, 0.001, 3.0) == MAX_LEASE  # fast runs: as many as allowed
    assert lease_ahead(4, 60.0, 60.0) == 4  # slow: one per slot, never fewer
    assert lease_ahead(1, None, 900.0) == 1
    # the lease covers the wait for a slot, the pool holding it, and the run
    assert lease_s(3.0) >= 30.0 + (3.0 + ACQUIRE_GRACE_S) + 3.0


def test_slots_bound_runs_give_back_a_lease_too_short_and_learn_run_time() -> None:
    async def main() -> None:
        slots = Slots(1)
        loop = asyncio.get_running_loop()
        ran: list[str] = []

        async def run(name: str) -> str:
            ran.append(f"start {name}")
            await asyncio.sleep(0.01)
            ran.append(f"end {name}")
            return name
        with pytest.raises(GiveBack):  # 3 s run + margin cannot end in a 2 s lease
            await slots.call(loop.time() + 2.0, 3.0, lambda: run("late"))
        assert ran == [] and slots.run_s is None
        got = await asyncio.gather(*(slots.call(loop.time() + 600, 1.0, lambda n=n: run(n))
                                     for n in "ab"))
        assert got == ["a", "b"]
        assert ran == ["start a", "end a", "start b", "end b"], "one slot: one at a time"
        assert slots.run_s is not None and 0.005 < slots.run_s < 1.0

        # close() gives back everyone waiting, at once; the running one finishes
        blocker = asyncio.create_task(slots.call(loop.time() + 600, 1.0, lambda: run("c")))
        waiter = asyncio.create_task(slots.call(loop.time() + 600, 1.0, lambda: run("d")))
        await asyncio.sleep(0)
        slots.close()
        assert await blocker == "c"
        with pytest.raises(GiveBack):
            await waiter
        with pytest.raises(GiveBack):
            await slots.call(loop.time() + 600, 1.0, lambda: run("e"))
        assert "start d" not in ran and "start e" not in ran

    asyncio.run(main())


# -- retries -------------------------------------------------------------------

def test_backoff_doubles_with_jitter_between_half_and_whole() -> None:
    for attempts, base in ((1, 1.0), (2, 2.0)):
        low = next_retry(POLICY, attempts=attempts, enqueued_at=0, now=0, rand=0.0).delay_s
        high = next_retry(POLICY, attempts=attempts, enqueued_at=0, now=0, rand=0.999).delay_s
        assert low == base / 2 and high is not None and base * 0.99 < high < base


def test_gives_up_after_the_last_retry() -> None:
    v = next_retry(POLICY, attempts=3, enqueued_at=0, now=0, rand=0.5)
    assert v.delay_s is None and "failed after 3 tries (retries: 2)" in v.reason
    none = RetryPolicy(retries=0, retry_delay_s=1.0, max_event_age_s=3600)
    assert next_retry(none, attempts=1, enqueued_at=0, now=0, rand=0.5).delay_s is None


def test_gives_up_when_the_retry_would_be_past_the_maximum_age() -> None:
    v = next_retry(POLICY, attempts=1, enqueued_at=0, now=3599.9, rand=0.5)
    assert v.delay_s is None and "maximum event age" in v.reason
    assert too_old(POLICY, enqueued_at=0, now=3600.1)
    assert not too_old(POLICY, enqueued_at=0, now=3599)


def test_delay_is_capped() -> None:
    many = RetryPolicy(retries=20, retry_delay_s=100.0, max_event_age_s=10**9)
    assert next_retry(many, attempts=15, enqueued_at=0, now=0, rand=0.999).delay_s == MAX_DELAY_S


def test_batch_item_failures() -> None:
    ids = {"a", "b", "c"}
    assert batch_failures(None, ids) == (set(), "")
    assert batch_failures({"batchItemFailures": []}, ids) == (set(), "")
    assert batch_failures({"batchItemFailures": [{"itemIdentifier": "b"}]}, ids) == ({"b"}, "")
    failed, problem = batch_failures({"batchItemFailures": [{"itemIdentifier": "zz"}]}, ids)
    assert failed == ids and "'zz'" in problem
    failed, problem = batch_failures({"batchItemFailures": "b"}, ids)
    assert failed == ids and "must be a list" in problem


def test_batch_item_failures_not_read_without_reporting() -> None:
    # A function that does not report batch item failures (SAM without
    # FunctionResponseTypes: [ReportBatchItemFailures]): the key is ignored.
    ids = {"a", "b"}
    listed = {"batchItemFailures": [{"itemIdentifier": "b"}]}
    assert batch_failures(listed, ids, report=False) == (set(), "")
    assert batch_failures({"batchItemFailures": "b"}, ids, report=False) == (set(), "")
    assert batch_failures(listed, ids, report=True) == ({"b"}, "")


# -- which ticks fire ---------------------------------------------------------

def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


MINUTELY = parse_schedule("rate(1 minute)")


def test_on_time_tick_fires_whatever_the_policy() -> None:
    for policy in ("once", "none", "all"):
        fire, last = ticks_to_fire(MINUTELY, policy, ts("2026-01-01T00:00:30"),
                                   ts("2026-01-01T00:01:01"))
        assert fire == [ts("2026-01-01T00:01:00")] and last == fire[0]


def test_missed_ticks_policies() -> None:
    last, now = ts("2026-01-01T00:00:00"), ts("2026-01-01T01:00:45")  # down an hour
    once, new_last = ticks_to_fire(MINUTELY, "once", last, now)
    assert now - ts("2026-01-01T01:00:00") > LATE_S  # so every due tick is a missed one
    assert once == [ts("2026-01-01T01:00:00")]  # only the latest
    assert new_last == ts("2026-01-01T01:00:00")
    none, _ = ticks_to_fire(MINUTELY, "none", last, now)
    assert none == []
    every, _ = ticks_to_fire(MINUTELY, "all", last, now)
    assert len(every) == 60 and every[0] == ts("2026-01-01T00:01:00")
    nothing, same = ticks_to_fire(MINUTELY, "all", now, now + 1)
    assert nothing == [] and same == now


def test_catch_up_is_bounded() -> None:
    fire, last = ticks_to_fire(MINUTELY, "all", ts("2025-01-01T00:00:00"),
                               ts("2026-01-01T00:00:00"))
    assert len(fire) == 100 and last == ts("2026-01-01T00:00:00")


# -- two controllers, one store, a manual clock --------------------------------

class Crash(Exception):
    pass


class CrashingStore:
    """A store whose next ``update`` "kills" the controller: the scheduler
    has queued a tick but not yet recorded it (the window dedup covers)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def update(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            raise Crash()
        return await self.inner.update(*args, **kwargs)

def test_each_tick_fires_once_with_two_controllers_racing(tmp_path: Path) -> None:
    """Two schedulers over one SQLite store and queue (each with its own
    connections, as two processes would have) race for the leader key through
    ~40 minutes of manual time; the leader "crashes" (stops renewing) now
    and then and comes back. Every minute's tick must be queued exactly once."""

    async def main() -> None:
        clock = ManualClock(ts("2026-03-01T00:00:10"))
        stores = [await open_sqlite_store(tmp_path / "store.db", clock=clock) for _ in range(2)]
        queues = [await open_sqlite_queue(tmp_path / "queue.db", clock=clock) for _ in range(2)]
        spec = ScheduleSpec("rate(1 minute)", missed="all")
        crashing = [CrashingStore(s) for s in stores]
        nodes = [Scheduler(s, q, clock, node=f"n{i}", lease_ttl_s=5.0)  # type: ignore[arg-type]
                 for i, (s, q) in enumerate(zip(crashing, queues, strict=True))]
        sched = [Scheduled("cron_fn", 0, spec)]
        for node in nodes:
            node.schedules = sched
        rng = random.Random(4)
        down: dict[int, float] = {}
        leaders_seen = set()
        died_after_queueing = 0
        start = clock.now()
        try:
            while clock.now() < start + 40 * 60:
                clock.advance(rng.uniform(0.5, 4.0))
                order = [0, 1]
                rng.shuffle(order)
                for i in order:
                    if down.get(i, 0) > clock.now():
                        continue
                    if nodes[i].leading and rng.random() < 0.05:
                        crashing[i].armed = True
                    try:
                        await nodes[i].tick()
                    except Crash:  # queued a tick, died before recording it
                        died_after_queueing += 1
                        nodes[i]._term = None
                        down[i] = clock.now() + rng.uniform(6, 90)
                        continue
                    crashing[i].armed = False
                    if nodes[i].leading:
                        leaders_seen.add(i)
                        if rng.random() < 0.03:  # crash: no renewals for a while
                            nodes[i]._term = None
                            down[i] = clock.now() + rng.uniform(6, 90)
                leaders = [i for i in (0, 1) if nodes[i].leading]
                assert len(leaders) <= 1, f"two leaders at once: {leaders}"
            got = await queues[0].receive(invoke_queue("cron_fn"), max_messages=1000,
                                          visibility_s=60)
        finally:
            for q in queues:
                await q.aclose()
            for s in stores:
                await s.aclose()
        times = [orjson.loads(m.body)["time"] for m in got]
        assert len(times) == len(set(times)), "a tick was queued twice"
        minutes = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
                         for t in times)
        assert minutes, "nothing fired"
        assert all(b - a == 60 for a, b in zip(minutes, minutes[1:], strict=False)), \
            "a tick was skipped"
        assert minutes[0] == ts("2026-03-01T00:01:00")
        assert leaders_seen == {0, 1}, "the lead should have changed hands"
        assert died_after_queueing >= 1, "a leader should have died between queue and record"
        assert len(minutes) >= 38

    asyncio.run(main())


def test_a_new_schedule_does_not_fire_its_past(tmp_path: Path) -> None:
    async def main() -> None:
        clock = ManualClock(ts("2026-03-01T00:00:10"))
        store = await open_sqlite_store(tmp_path / "s.db", clock=clock)
        queue = await open_sqlite_queue(tmp_path / "q.db", clock=clock)
        node = Scheduler(store, queue, clock)
        node.schedules = [Scheduled("f", 0, ScheduleSpec("rate(1 minute)", missed="all"))]
        try:
            assert await node.tick() == []  # first sight: starts now
            clock.advance(50)
            [(key, tick)] = await node.tick()
            assert tick == ts("2026-03-01T00:01:00")
            assert (await store.get(LEADER_KEY)) is not None
            node.schedules = []
            await node.tick()  # nothing to schedule: gives up the lead
            assert not node.leading and await store.get(LEADER_KEY) is None
        finally:
            await queue.aclose()
            await store.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("expression", ["rate(1 minute)", "cron(0/1 * * * ? *)", "* * * * *"])
def test_schedule_forms_tick_every_minute(expression: str) -> None:
    s = parse_schedule(expression)
    fire, _ = ticks_to_fire(s, "all", ts("2026-01-01T00:00:00"), ts("2026-01-01T00:05:00"))
    assert fire == [ts(f"2026-01-01T00:0{m}:00") for m in range(1, 6)]


def test_alike_schedules_of_one_function_stay_two() -> None:
    spec = ScheduleSpec("rate(1 minute)")
    a, b = Scheduled("f", 0, spec), Scheduled("f", 1, spec)
    assert a.key != b.key, "both must fire: they have their own progress and dedup keys"
    assert a.key == Scheduled("f", 0, ScheduleSpec("rate(1 minute)")).key, "stable"
    other_input = Scheduled("f", 0, ScheduleSpec("rate(1 minute)", input=(("k", 1),)))
    assert other_input.key != a.key
