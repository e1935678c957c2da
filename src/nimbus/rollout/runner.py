"""The rollout runner: moves every running rollout along, one tick at a time.

It runs where decisions are made once: in ``nimbus up``, and in a region on
the controller leader only. Each tick (every ``interval_s``):

1. lists ``rollouts/``; a finished rollout whose app record was not written
   (``"applied": false``: its writer died in between) is applied now;
2. samples the invocation counters of the functions being rolled out (and,
   every ``meter_every_s``, of every function: what "takes real traffic"
   is measured by);
3. for each running rollout: makes the app record match the rollout record
   (a leader that died between the two writes left it behind), computes
   the step's canary and baseline windows from the ``start_counters``
   stored when the step started (so a new leader judges the same windows),
   asks :func:`nimbus.rollout.policy.decide` and applies the decision.

Every step change is one compare-and-set on the rollout record (against
the revision read, so the step index is checked) and only then the app
record: a step is never repeated or skipped, whichever leader acts.
A hold writes nothing unless what it waits for changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from nimbus.clock import Clock, SystemClock
from nimbus.errors import ConflictError, NimbusError, NotFoundError
from nimbus.observe import metrics
from nimbus.rollout import state, traffic
from nimbus.rollout.manage import converge_app
from nimbus.rollout.policy import Step, decide, parse_rule
from nimbus.rollout.records import app_of
from nimbus.rollout.sampler import Sampler
from nimbus.rollout.window import Counters, Window, counters_from_dict, counters_to_dict, delta
from nimbus.store.base import Store

log = logging.getLogger("nimbus.rollout")

Note = Callable[[str, str, str], None]  # (function, text, level): a platform log line

DEFAULT_INTERVAL_S = 0.5
METER_EVERY_S = 5.0
TRAFFIC_WINDOW_S = 60.0
# In a region the leader publishes what it measured, for deploys that land
# on another controller: at most this often, read while this fresh.
TRAFFIC_KEY = "rollout-traffic"
PUBLISH_EVERY_S = 10.0
DEPLOY_GRACE_S = 60.0  # a new rollout's deploy writes the app record within it
PUBLISHED_FRESH_S = 30.0


def _no_note(fn: str, text: str, level: str) -> None:
    return None


class RolloutRunner:
    def __init__(self, store: Store, sampler: Sampler, clock: Clock | None = None, *,
                 note: Note | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 meter_every_s: float = METER_EVERY_S, publish: bool = False) -> None:
        self.store = store
        self.sampler = sampler
        self.clock = clock or SystemClock()
        self.note = note or _no_note
        self.interval_s = interval_s
        self.meter_every_s = meter_every_s
        # (time, counters of every function): the last minute, for traffic_of
        self._samples: deque[tuple[float, Counters]] = deque()
        self._metered_at = -1e18
        self.publish = publish  # write the traffic figures to TRAFFIC_KEY
        self._published_at = -1e18
        self.running: dict[str, state.Record] = {}  # function -> its running rollout
        # function -> the figures of the current step's window at the last tick
        self.latest: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick(self.clock.now())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.exception("rollout tick failed")
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.running = {}

    # -- one tick ---------------------------------------------------------------------

    async def tick(self, now: float) -> None:
        running: list[tuple[state.Record, int]] = []
        for entry in await self.store.list(state.PREFIX):
            try:
                rec = orjson.loads(entry.value)
            except orjson.JSONDecodeError:
                continue
            if rec.get("state") == state.RUNNING:
                running.append((rec, entry.revision))
            elif rec.get("applied") is False:
                try:
                    await self._apply_finished(rec, entry.revision)
                except Exception as exc:  # noqa: BLE001 - one record never stops the others
                    log.warning("applying the end of %s's rollout: %s", entry.key, exc,
                                exc_info=not isinstance(exc, NimbusError))
        self.running = {rec["function"]: rec for rec, _ in running}
        self.latest = {fn: v for fn, v in self.latest.items() if fn in self.running}
        functions = {rec["function"] for rec, _ in running}
        meter = now - self._metered_at >= self.meter_every_s
        if meter:
            functions |= await self._deployed_functions()
        counters = await self.sampler.sample(functions) if functions else {}
        if meter:
            self._metered_at = now
            self._samples.append((now, counters))
            while self._samples and self._samples[0][0] < now - TRAFFIC_WINDOW_S - 1:
                self._samples.popleft()
            if self.publish and now - self._published_at >= PUBLISH_EVERY_S:
                self._published_at = now
                await self._publish(now)
        for rec, revision in running:
            try:
                await self._advance(rec, revision, counters, now)
            except Exception as exc:  # noqa: BLE001 - one record never stops the others
                log.warning("rollout of %s: %s", rec.get("function"), exc,
                            exc_info=not isinstance(exc, NimbusError))

    async def _deployed_functions(self) -> set[str]:
        out: set[str] = set()
        for entry in await self.store.list("apps/"):
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                out.update(orjson.loads(entry.value)["functions"])
        return out

    def traffic_of(self, fn: str, version: int, now: float) -> int | None:
        """Invocations of ``fn`` version ``version`` in the last minute (as
        far back as this runner's samples go), or None when it has not
        sampled twice yet."""
        first = next(((t, c) for t, c in self._samples if t >= now - TRAFFIC_WINDOW_S - 1),
                     None)
        if first is None or not self._samples or self._samples[-1][0] <= first[0]:
            return None
        last = self._samples[-1][1]
        return delta(first[1].get((fn, version), {}), last.get((fn, version), {})).requests

    async def _publish(self, now: float) -> None:
        figures = {f"{fn}@{v}": n for (fn, v) in self._samples[-1][1]
                   if (n := self.traffic_of(fn, v, now)) is not None}
        try:
            await self.store.put(TRAFFIC_KEY, orjson.dumps({"at": now, "last_minute": figures}))
        except NimbusError as exc:
            log.warning("publishing traffic figures failed: %s", exc)

    # -- one rollout ------------------------------------------------------------------

    async def _advance(self, rec: state.Record, revision: int, counters: Counters,
                       now: float) -> None:
        fn = rec["function"]
        frm, to = int(rec["from"]), int(rec["to"])
        if rec.get("start_counters") is None and not await self._deployed(rec, revision, now):
            return
        if not await self._repair(rec):
            gone = {**rec, "state": state.ROLLED_BACK, "ended": now,
                    "reason": f"function {fn} is no longer deployed"}
            with contextlib.suppress(ConflictError):
                await self._write(gone, revision)
            return
        if getattr(self.sampler, "missing", 0):
            # A process that did not answer this scrape would be counted from
            # zero in a window it had counts before: judge nothing this tick.
            return
        if rec.get("start_counters") is None:  # the first tick of the first step
            rec = {**rec, "start_counters": counters_to_dict(_only(counters, fn, frm, to)),
                   "step_started": now}
            await self._write(rec, revision)
            return
        start = counters_from_dict(rec["start_counters"])
        canary = delta(start.get((fn, to), {}), counters.get((fn, to), {}))
        baseline = delta(start.get((fn, frm), {}), counters.get((fn, frm), {}))
        self.latest[fn] = {"at": now, "step": rec["step"], "canary": canary.figures(),
                           "baseline": baseline.figures()}
        share, wait_s = rec["steps"][rec["step"]]
        decision = decide(step=Step(int(share), float(wait_s)),
                          step_started=float(rec["step_started"]), now=now, canary=canary,
                          baseline=baseline, rule=parse_rule(rec["rollback_on"]),
                          min_requests=int(rec["min_requests"]))
        if decision.action == "hold":
            shape = state.reason_shape(decision.reason)
            if rec.get("waiting") != shape:
                with contextlib.suppress(ConflictError):
                    await self._write({**rec, "waiting": shape,
                                       "wait_reason": decision.reason}, revision)
                self._log(rec, "hold", decision.reason, canary, baseline, "INFO")
                metrics.rollout_decided(fn, "hold")
            return
        entry = {"at": now, "step": rec["step"], "share": int(share),
                 "action": decision.action, "reason": decision.reason,
                 "canary": canary.figures(), "baseline": baseline.figures()}
        new = {**rec, "history": [*rec.get("history", []), entry], "waiting": None,
               "wait_reason": None}
        if decision.action == "rollback":
            new.update(state=state.ROLLED_BACK, ended=now, reason=decision.reason,
                       applied=False)
        elif int(rec["steps"][rec["step"] + 1][0]) >= 100:
            new.update(state=state.PROMOTED, step=rec["step"] + 1, ended=now, applied=False,
                       step_started=now)
        else:
            new.update(step=rec["step"] + 1, step_started=now,
                       start_counters=counters_to_dict(_only(counters, fn, frm, to)))
        try:
            revision = await self._write(new, revision)
        except ConflictError:
            return  # someone else moved it (a rollback by hand): read again next tick
        self.running[fn] = new
        level = "WARNING" if decision.action == "rollback" else "INFO"
        self._log(new, decision.action, decision.reason, canary, baseline, level)
        metrics.rollout_decided(fn, decision.action)
        await self._apply(new)
        if new["state"] != state.RUNNING:
            self.running.pop(fn, None)
            with contextlib.suppress(ConflictError):
                await self._write({**new, "applied": True}, revision)

    async def _deployed(self, rec: state.Record, revision: int, now: float) -> bool:
        """Whether the deploy that started ``rec`` has written the app record
        (its new version is there). Until then the runner leaves both alone
        for ``DEPLOY_GRACE_S`` (a deploy writes the rollout record first);
        after that, the deploy died or failed half-way: the rollout ends,
        rolled back, and the old version keeps serving."""
        fn = rec["function"]
        try:
            app, _ = await app_of(self.store, fn)
        except NotFoundError:
            return True  # gone: the repair below ends it
        if int(rec["to"]) in traffic.records_of(app, fn):
            return True
        if now - float(rec.get("started") or now) >= DEPLOY_GRACE_S:
            gone = {**rec, "state": state.ROLLED_BACK, "ended": now, "applied": False,
                    "reason": "the deploy that started it did not finish"}
            with contextlib.suppress(ConflictError):
                await self._write(gone, revision)
        return False

    async def _write(self, rec: state.Record, revision: int) -> int:
        return await self.store.update(state.key(rec["function"]), orjson.dumps(rec), revision)

    async def _repair(self, rec: state.Record) -> bool:
        """Make the app record serve what the newest rollout record says
        (read again, not ``rec``: a rollback by hand may have moved it since);
        False when the function is gone (the rollout cannot go on)."""
        return await converge_app(self.store, rec["function"])

    async def _apply(self, rec: state.Record) -> None:
        await converge_app(self.store, rec["function"])

    async def _apply_finished(self, rec: state.Record, revision: int) -> None:
        await converge_app(self.store, rec["function"])
        with contextlib.suppress(ConflictError):
            await self._write({**rec, "applied": True}, revision)

    def _log(self, rec: state.Record, action: str, reason: str, canary: Window,
             baseline: Window, level: str) -> None:
        what = {"promote": ("promoted to" if rec["state"] == state.RUNNING else "promoted:"),
                "rollback": "rolled back:", "hold": "holding:"}[action]
        share = state.share_of(rec)
        head = (f"rollout {rec['from']} -> {rec['to']} ({rec['strategy']}): ")
        if action == "promote" and rec["state"] == state.RUNNING:
            head += f"{what} {share}% (step {rec['step'] + 1} of {len(rec['steps'])})"
        elif action == "promote":
            head += f"{what} version {rec['to']} serves 100%"
        else:
            head += f"{what} {reason}"
        text = (f"{head}; canary {_summary(canary)}; baseline {_summary(baseline)}"
                + (f"; {reason}" if action == "promote" and reason else ""))
        log.info("%s: %s", rec["function"], text)
        try:
            self.note(rec["function"], text, level)
        except Exception:  # noqa: BLE001 - a log line never stops a rollout
            log.exception("writing a rollout log line failed")

    def current(self, fn: str, rec: state.Record) -> dict[str, Any] | None:
        """The current step's figures of ``fn``'s running rollout ``rec``, if
        this runner is moving it and has judged this step."""
        latest = self.latest.get(fn)
        if not self.active or latest is None or rec.get("state") != state.RUNNING \
                or latest["step"] != rec.get("step"):
            return None
        return latest

    def shares(self) -> list[tuple[str, int, int]]:
        """(function, new version, its share) of each running rollout."""
        return [(fn, int(rec["to"]), state.share_of(rec)) for fn, rec in self.running.items()]


async def published_traffic(store: Store, fn: str, version: int, now: float) -> int | None:
    """What the leader's runner last published for ``fn`` version ``version``
    (None when it published nothing lately)."""
    entry = await store.get(TRAFFIC_KEY)
    if entry is None:
        return None
    try:
        data = orjson.loads(entry.value)
        if now - float(data["at"]) > PUBLISHED_FRESH_S:
            return None
        n = data["last_minute"].get(f"{fn}@{version}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return int(n) if isinstance(n, int) else None


def _only(counters: Counters, fn: str, *versions: int) -> Counters:
    return {(fn, v): counters.get((fn, v), {}) for v in versions}


def _summary(w: Window) -> str:
    p99 = w.quantile(0.99)
    return (f"{w.requests} requests, {w.error_rate:.1%} errors, "
            f"p99 {'-' if p99 is None else f'{p99 * 1000:.0f}ms'}, "
            f"{w.throttle_rate:.1%} throttled")
