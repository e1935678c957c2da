"""What the control API does to rollouts by hand: roll back, and read one.

Like the runner, a rollback writes the rollout record first (compare-and-
set: a decision the runner makes meanwhile loses, or makes this one read
again) and then the app record; the runner finishes the app record if
this process dies in between (``"applied": false``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from nimbus.control.deploy import version_key
from nimbus.errors import ConflictError, NotFoundError, UserInputError
from nimbus.observe import metrics
from nimbus.rollout import state, traffic
from nimbus.rollout.records import app_of, change_app, version_records
from nimbus.store.base import Store

BY_HAND = "rolled back by hand"
TRIES = 10


async def read(store: Store, fn: str) -> tuple[state.Record, int] | None:
    entry = await store.get(state.key(fn))
    if entry is None:
        return None
    return orjson.loads(entry.value), entry.revision


async def converge_app(store: Store, fn: str) -> bool:
    """Make ``fn``'s app record serve what its newest rollout record says.

    The record is read here, never taken from a caller's copy: the app record
    is written from it, then the record is read again, and if it moved
    meanwhile (a rollback by hand, another leader's step) the app record is
    written again from the newer one. So of two writers racing, the app
    record ends as the last rollout record says. False when ``fn`` is no
    longer deployed."""
    for _ in range(TRIES):
        found = await read(store, fn)
        if found is None:
            return True
        rec, revision = found
        records = await _records(store, fn, int(rec["from"]), int(rec["to"]))
        try:
            await change_app(store, fn, _to(rec, records))
        except NotFoundError:
            return False
        again = await read(store, fn)
        if again is None or again[1] == revision:
            return True
    raise ConflictError(f"the rollout of {fn} kept changing; try again")


async def view(store: Store, fn: str, now: float, runner: Any = None) -> dict[str, Any]:
    """``GET /v1/functions/{fn}/rollout``: the latest rollout of ``fn``; with
    the ``runner`` that moves it (this process's), the current step's
    figures as ``current``."""
    found = await read(store, fn)
    if found is None:
        raise NotFoundError(f"function {fn!r} has had no rollout")
    out = state.steps_view(found[0], now)
    current = runner.current(fn, found[0]) if runner is not None else None
    if current is not None:
        out["current"] = current
    return out


async def rollback(store: Store, fn: str, to: int | None, now: float,
                   note: Callable[[str, str, str], None] | None = None) -> dict[str, Any]:
    """End ``fn``'s running rollout (``live`` back on the old version, whose
    instances are still warm), or without one move ``live`` to ``to`` (by
    default the version before the stable one). ``note(fn, text, level)``
    writes the platform line saying so in the function's logs."""
    out = await _rollback(store, fn, to, now)
    if note is not None:
        try:
            note(fn, out["message"], "WARNING")
        except Exception:  # noqa: BLE001 - the rollback is done; a log line is not
            pass
    return out


async def _rollback(store: Store, fn: str, to: int | None, now: float) -> dict[str, Any]:
    for _ in range(TRIES):
        found = await read(store, fn)
        if found is None or found[0].get("state") != state.RUNNING:
            return await _move_live(store, fn, to, found[0] if found else None)
        rec, revision = found
        if to is not None and to != int(rec["from"]):
            raise UserInputError(
                f"a rollout of {fn} ({rec['from']} -> {rec['to']}) is running: a rollback "
                f"ends it on version {rec['from']}; leave out --to")
        entry = {"at": now, "step": rec["step"], "share": state.share_of(rec),
                 "action": "rollback", "reason": BY_HAND}
        done = {**rec, "state": state.ROLLED_BACK, "ended": now, "reason": BY_HAND,
                "applied": False, "waiting": None, "wait_reason": None,
                "history": [*rec.get("history", []), entry]}
        try:
            revision = await store.update(state.key(fn), orjson.dumps(done), revision)
        except ConflictError:
            continue  # the runner moved it meanwhile: read it again
        await converge_app(store, fn)
        try:
            await store.update(state.key(fn), orjson.dumps({**done, "applied": True}),
                               revision)
        except ConflictError:
            pass  # a runner applied it too
        metrics.rollout_decided(fn, "rollback")
        return {"function": fn, "live": {str(rec["from"]): 100}, "from": int(rec["to"]),
                "to": int(rec["from"]), "rollout": state.steps_view(done, now),
                "cold_start": False,
                "message": f"rolled back {fn}: version {rec['from']} serves all traffic "
                           f"(its instances were kept warm); version {rec['to']} is out"}
    raise ConflictError(f"the rollout of {fn} kept changing; try again")


async def _move_live(store: Store, fn: str, to: int | None,
                     last: state.Record | None) -> dict[str, Any]:
    if last is not None and last.get("applied") is False:
        await converge_app(store, fn)  # a finished rollout's writer died before the app record
    app, _ = await app_of(store, fn)
    stable = traffic.stable_version(app, fn)
    stored = await version_records(store, fn)
    known = {**stored, **traffic.records_of(app, fn)}
    if to is None and last is not None and last.get("state") == state.ROLLED_BACK \
            and int(last["from"]) == stable and traffic.weights_of(app, fn) == {stable: 100}:
        # Asked again after a rollback: nothing to move (an older version
        # is only ever named with --to).
        return {"function": fn, "live": {str(stable): 100}, "from": stable, "to": stable,
                "cold_start": False,
                "message": f"{fn} already serves version {stable}: its rollout to version "
                           f"{last['to']} was rolled back ({last.get('reason')}); to go "
                           f"further back: nimbus rollback {fn} --to VERSION"}
    if to is None:
        if last is not None and last.get("state") == state.PROMOTED \
                and int(last["to"]) == stable and int(last["from"]) in known:
            to = int(last["from"])
        else:
            older = [v for v in known if v < stable]
            if not older:
                raise UserInputError(f"{fn} has no version before {stable} to roll back to")
            to = max(older)
    if to not in known:
        raise NotFoundError(f"function {fn!r} has no version {to}; its versions: "
                            f"{', '.join(str(v) for v in sorted(known))}")
    if to == stable and traffic.weights_of(app, fn) == {stable: 100}:
        return {"function": fn, "live": {str(to): 100}, "from": stable, "to": to,
                "cold_start": False, "message": f"{fn} already serves version {to}"}
    warm = to in traffic.records_of(app, fn)
    await change_app(store, fn, lambda a: traffic.with_weights(
        a, fn, traffic.DEFAULT_ALIAS, {to: 100}, {to: known[to]}))
    message = f"rolled back {fn}: version {to} serves all traffic (was {stable})"
    if not warm:
        message += "; its instances were not kept warm, so the first requests may cold-start"
    return {"function": fn, "live": {str(to): 100}, "from": stable, "to": to,
            "cold_start": not warm, "message": message}


def _to(rec: state.Record, records: dict[int, dict[str, Any]]
        ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda app: state.app_for(app, rec, records)


async def _records(store: Store, fn: str, *versions: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for v in versions:
        entry = await store.get(version_key(fn, v))
        if entry is not None:
            out[v] = orjson.loads(entry.value)
    return out
