"""The rollout record (``rollouts/<fn>``) and what it asks of the app record.

A rollout moves ``live`` of one function from version ``from`` to ``to`` in
the strategy's steps. The record is the truth: the app record is made to
match it (:func:`app_for`), never the other way round, so whoever acts on
a rollout (the leader's runner, ``nimbus rollback``) writes the record
first, with compare-and-set, then the app record. A writer that dies
between the two leaves a record the next one repairs from: a running
rollout's app record is checked on every tick, and a finished rollout
whose app record was not written yet carries ``"applied": false``.

Pure functions only here (the store I/O is in :mod:`nimbus.rollout.runner`
and :mod:`nimbus.rollout.manage`).
"""

from __future__ import annotations

import re
from typing import Any

from nimbus.ids import new_id
from nimbus.rollout import traffic

PREFIX = "rollouts/"
RUNNING = "running"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
STATES = (RUNNING, PROMOTED, ROLLED_BACK)

Record = dict[str, Any]


def key(fn: str) -> str:
    return f"{PREFIX}{fn}"


def new_record(*, app: str, fn: str, from_version: int, to_version: int, strategy: str,
               steps: list[tuple[int, float]], rollback_on: str, min_requests: int,
               now: float) -> Record:
    """A running rollout at its first step. ``start_counters`` is filled in
    by the runner's first tick (the counters the first step's windows start
    from)."""
    return {
        "id": new_id(), "app": app, "function": fn,
        "from": from_version, "to": to_version, "strategy": strategy,
        "steps": [[int(s), float(w)] for s, w in steps],
        "rollback_on": rollback_on, "min_requests": min_requests,
        "state": RUNNING, "step": 0, "step_started": now, "started": now,
        "ended": None, "reason": None, "start_counters": None, "applied": True,
        "history": [{"at": now, "step": 0, "share": int(steps[0][0]), "action": "start",
                     "reason": f"deployed version {to_version} with {strategy}"}],
    }


def share_of(rec: Record) -> int:
    """The new version's share now (percent)."""
    if rec["state"] == PROMOTED:
        return 100
    if rec["state"] == ROLLED_BACK:
        return 0
    return int(rec["steps"][rec["step"]][0])


def live_weights(rec: Record) -> dict[int, int]:
    """What ``live`` must be while the record is what it is."""
    frm, to = int(rec["from"]), int(rec["to"])
    share = share_of(rec)
    if share >= 100:
        return {to: 100}
    if share <= 0:
        return {frm: 100}
    return {frm: 100 - share, to: share}


def matches(app: dict[str, Any], rec: Record) -> bool:
    """Whether ``app`` serves ``live`` the way ``rec`` says."""
    fn = rec["function"]
    if fn not in app.get("functions", {}):
        return True  # the function went away: nothing to serve
    want = live_weights(rec)
    have = {v: w for v, w in traffic.weights_of(app, fn).items() if w > 0}
    if have != want:
        return False
    stable = traffic.stable_version(app, fn)
    return stable == int(rec["to"] if rec["state"] == PROMOTED else rec["from"])


def app_for(app: dict[str, Any], rec: Record, records: dict[int, dict[str, Any]]
            ) -> dict[str, Any]:
    """``app`` changed to serve ``live`` as ``rec`` says. ``records``: the
    version records of ``from`` and ``to`` (from ``functions/<fn>/versions/``),
    for a version the app record does not hold (yet, or any more)."""
    fn = rec["function"]
    if fn not in app.get("functions", {}) or matches(app, rec):
        return app
    frm, to = int(rec["from"]), int(rec["to"])
    if rec["state"] == PROMOTED:
        return traffic.promote(app, fn, to, records)
    if rec["state"] == ROLLED_BACK:
        # the old version serves everything; the new one's record is dropped
        # with the last alias that names it
        return traffic.with_weights(app, fn, traffic.DEFAULT_ALIAS, {frm: 100}, records)
    if traffic.stable_version(app, fn) != frm:
        app = traffic.promote(app, fn, frm, records)
    return traffic.with_weights(app, fn, traffic.DEFAULT_ALIAS, live_weights(rec), records)


_NUMBERS = re.compile(r"\d+(?:\.\d+)?(?:ms|s|m|h|d|%)?")  # a figure with its unit


def reason_shape(reason: str) -> str:
    """``reason`` without its figures: a hold is noted again only when what
    it waits for changes, not every time a count moves."""
    return _NUMBERS.sub("#", reason)


def steps_view(rec: Record, now: float) -> dict[str, Any]:
    """What ``nimbus rollout status`` shows: the steps with their shares,
    where the rollout is, the time left in the step, the decisions."""
    steps = [{"index": i, "share": int(s), "wait_s": float(w)}
             for i, (s, w) in enumerate(rec["steps"])]
    out = {k: rec.get(k) for k in ("id", "app", "function", "from", "to", "strategy",
                                   "rollback_on", "min_requests", "state", "step",
                                   "step_started", "started", "ended", "reason")}
    out["steps"] = steps
    out["share"] = share_of(rec)
    out["history"] = rec.get("history", [])
    out["waiting"] = rec.get("wait_reason")
    if rec["state"] == RUNNING:
        wait = float(rec["steps"][rec["step"]][1])
        out["time_left_s"] = round(max(0.0, rec["step_started"] + wait - now), 1)
    return out
