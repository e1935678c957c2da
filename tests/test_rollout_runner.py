"""The rollout runner's ticks on a real SQLite store, with the counters given
by the test (a scripted sampler) and ``now`` as a parameter: steps in
order, holds that write nothing, and the repairs a new leader makes when
its predecessor died between the rollout record and the app record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest

from nimbus.control.deploy import version_key
from nimbus.rollout import state, traffic
from nimbus.rollout.runner import RolloutRunner
from nimbus.rollout.window import Counters, Window
from nimbus.store.base import Store
from nimbus.store.registry import open_store

T0 = 1_000_000.0


def run(coro: Callable[[Store], Coroutine[Any, Any, None]], tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store("sqlite", tmp_path / "store.db")
        try:
            await coro(store)
        finally:
            await store.aclose()

    asyncio.run(main())


def version(n: int) -> dict[str, Any]:
    return {"version": n, "app": "shop", "digest": f"d{n}", "requirements_hash": None,
            "spec": {"name": "pay", "module": "h", "callable": "handler"},
            "config_hash": f"c{n}", "created": T0}


class Script:
    """A sampler answering cumulative counters the test sets."""

    def __init__(self) -> None:
        self.ok: dict[int, int] = {7: 0, 8: 0}
        self.errors: dict[int, int] = {7: 0, 8: 0}

    def add(self, v: int, ok: int, errors: int = 0) -> None:
        self.ok[v] += ok
        self.errors[v] += errors

    async def sample(self, functions: set[str]) -> Counters:
        if "pay" not in functions:
            return {}
        return {("pay", v): {"w1": Window(success=self.ok[v], error=self.errors[v])}
                for v in (7, 8)}


async def setup(store: Store, strategy: str = "linear:25%:60s") -> state.Record:
    from nimbus.rollout.policy import parse_strategy

    await store.create("functions/pay/owner", orjson.dumps({"app": "shop"}))
    for n in (7, 8):
        await store.create(version_key("pay", n), orjson.dumps(version(n)))
    steps = [(s.share, s.wait_s) for s in parse_strategy(strategy).steps]
    rec = state.new_record(app="shop", fn="pay", from_version=7, to_version=8,
                           strategy=strategy, steps=steps, rollback_on="error_rate > 2%",
                           min_requests=10, now=T0)
    await store.create(state.key("pay"), orjson.dumps(rec))
    app = {"name": "shop", "digest": "d8", "deployed": T0, "functions": {"pay": version(7)},
           "regions": None, "routes": [["GET", "/pay", "pay"]]}
    app = traffic.with_weights(app, "pay", "live", {7: 75, 8: 25}, {8: version(8)})
    await store.create("apps/shop", orjson.dumps(app))
    return rec


async def read(store: Store) -> tuple[state.Record, dict[str, Any]]:
    rec = await store.get(state.key("pay"))
    app = await store.get("apps/shop")
    assert rec is not None and app is not None
    return orjson.loads(rec.value), orjson.loads(app.value)


@pytest.fixture
def script() -> Script:
    return Script()


def test_steps_in_order_holds_write_nothing(tmp_path: Path, script: Script) -> None:
    async def body(store: Store) -> None:
        await setup(store)
        runner = RolloutRunner(store, script)
        await runner.tick(T0)  # the first tick notes the counters the step starts from
        rec, _ = await read(store)
        assert rec["start_counters"] is not None and rec["step"] == 0
        script.add(7, 30)
        script.add(8, 5)
        await runner.tick(T0 + 1)  # holds: too few requests
        rec1, _ = await read(store)
        entry = await store.get(state.key("pay"))
        assert entry is not None
        revision = entry.revision
        for i in range(4):  # the same wait, figures moving: nothing written
            script.add(8, 1)
            await runner.tick(T0 + 2 + i)
        entry = await store.get(state.key("pay"))
        assert entry is not None and entry.revision == revision
        assert len(rec1["history"]) == 1  # only the start
        script.add(8, 20)
        await runner.tick(T0 + 61)  # step over, healthy: 50%
        rec, app = await read(store)
        assert (rec["step"], rec["state"]) == (1, "running")
        assert traffic.weights_of(app, "pay") == {7: 50, 8: 50}
        # the new step's window starts now: 10 more requests are needed
        script.add(8, 9)
        await runner.tick(T0 + 122)
        assert (await read(store))[0]["step"] == 1
        script.add(8, 1)
        await runner.tick(T0 + 123)
        script.add(8, 10)
        await runner.tick(T0 + 184)
        rec, app = await read(store)
        assert (rec["state"], rec["applied"]) == ("promoted", True)
        assert traffic.stable_version(app, "pay") == 8
        assert traffic.weights_of(app, "pay") == {8: 100}
        assert "versions" not in app  # version 7's record dropped: its pools drain
        assert [(h["step"], h["share"], h["action"]) for h in rec["history"]] == [
            (0, 25, "start"), (0, 25, "promote"), (1, 50, "promote"), (2, 75, "promote")]

    run(body, tmp_path)


def test_a_rollback_drops_the_new_version(tmp_path: Path, script: Script) -> None:
    async def body(store: Store) -> None:
        await setup(store)
        runner = RolloutRunner(store, script)
        await runner.tick(T0)
        script.add(7, 100)
        script.add(8, 7, errors=3)
        await runner.tick(T0 + 1)  # no need to wait for the step's end
        rec, app = await read(store)
        assert rec["state"] == "rolled_back" and rec["reason"].startswith("error_rate 30.0%")
        assert rec["history"][-1]["canary"]["requests"] == 10
        assert traffic.weights_of(app, "pay") == {7: 100} and "versions" not in app
        assert runner.running == {}

    run(body, tmp_path)


def test_a_new_leader_repairs_the_app_record(tmp_path: Path, script: Script) -> None:
    async def body(store: Store) -> None:
        rec = await setup(store)
        # a leader recorded step 1 (50%) and died before writing the app record
        entry = await store.get(state.key("pay"))
        assert entry is not None
        moved = {**rec, "step": 1, "step_started": T0 + 60, "start_counters": {}}
        await store.update(state.key("pay"), orjson.dumps(moved), entry.revision)
        runner = RolloutRunner(store, script)
        await runner.tick(T0 + 61)
        rec2, app = await read(store)
        assert traffic.weights_of(app, "pay") == {7: 50, 8: 50}
        assert rec2["step"] == 1 and len(rec2["history"]) == 1  # no step repeated

        # another promoted it and died before the app record: applied false
        entry = await store.get(state.key("pay"))
        assert entry is not None
        done = {**rec2, "state": "promoted", "step": 3, "applied": False}
        await store.update(state.key("pay"), orjson.dumps(done), entry.revision)
        await runner.tick(T0 + 62)
        rec3, app = await read(store)
        assert rec3["applied"] is True
        assert traffic.stable_version(app, "pay") == 8
        assert traffic.weights_of(app, "pay") == {8: 100}

    run(body, tmp_path)


def test_a_rollback_by_hand_wins_over_a_decision(tmp_path: Path, script: Script) -> None:
    from nimbus.rollout import manage

    async def body(store: Store) -> None:
        await setup(store)
        runner = RolloutRunner(store, script)
        await runner.tick(T0)
        out = await manage.rollback(store, "pay", None, T0 + 5)
        assert out["to"] == 7 and out["cold_start"] is False
        script.add(8, 50)
        await runner.tick(T0 + 61)  # nothing to promote any more
        rec, app = await read(store)
        assert rec["state"] == "rolled_back" and rec["reason"] == "rolled back by hand"
        assert traffic.weights_of(app, "pay") == {7: 100}
        # without a rollout: live moves to the version asked for
        out = await manage.rollback(store, "pay", 8, T0 + 70)
        assert out["to"] == 8 and out["cold_start"] is True
        _, app = await read(store)
        assert traffic.weights_of(app, "pay") == {8: 100}

    run(body, tmp_path)


def test_a_runner_acting_on_an_old_copy_never_undoes_a_rollback_by_hand(
        tmp_path: Path, script: Script) -> None:
    """The runner read the record (running, 25%); a rollback by hand lands
    before the runner writes the app record: the app record ends as the
    newest rollout record says, not as the runner's copy."""
    from nimbus.rollout import manage

    async def body(store: Store) -> None:
        await setup(store)
        runner = RolloutRunner(store, script)
        await runner.tick(T0)
        stale, _ = await read(store)
        out = await manage.rollback(store, "pay", None, T0 + 1)
        assert out["live"] == {"7": 100}
        assert await runner._repair(stale)  # what a tick that read it before would do
        await runner._apply(stale)
        rec, app = await read(store)
        assert rec["state"] == "rolled_back" and rec["applied"] is True
        assert traffic.weights_of(app, "pay") == {7: 100}
        await runner.tick(T0 + 2)
        assert traffic.weights_of((await read(store))[1], "pay") == {7: 100}

    run(body, tmp_path)


def test_a_rollout_whose_deploy_never_wrote_the_app_record_is_left_then_ended(
        tmp_path: Path, script: Script) -> None:
    """The deploy writes the rollout record first: until the app record
    names the new version the runner leaves both alone; a minute later the
    deploy is taken as dead and the rollout ends, the old version serving."""
    from nimbus.rollout.runner import DEPLOY_GRACE_S

    async def body(store: Store) -> None:
        await setup(store)
        entry = await store.get("apps/shop")
        assert entry is not None
        app = traffic.promote(orjson.loads(entry.value), "pay", 7)  # as before the deploy
        await store.update("apps/shop", orjson.dumps(app), entry.revision)
        before = await store.get(state.key("pay"))
        assert before is not None
        runner = RolloutRunner(store, script)
        await runner.tick(T0 + 1)
        after = await store.get(state.key("pay"))
        assert after is not None and after.revision == before.revision  # untouched
        assert traffic.weights_of((await read(store))[1], "pay") == {7: 100}
        await runner.tick(T0 + DEPLOY_GRACE_S + 1)
        await runner.tick(T0 + DEPLOY_GRACE_S + 2)
        rec, app = await read(store)
        assert (rec["state"], rec["reason"]) == (
            "rolled_back", "the deploy that started it did not finish")
        assert traffic.weights_of(app, "pay") == {7: 100} and rec["applied"] is True

    run(body, tmp_path)


def test_deploying_a_version_an_alias_names_is_not_taken_for_the_rollout() -> None:
    from nimbus.control.deploy import _rolling_out

    app = {"name": "shop", "functions": {"pay": version(9)}, "routes": []}
    app = traffic.with_weights(app, "pay", "beta", {8: 100}, {8: version(8)})
    assert not _rolling_out(app, "pay", "c8", None)  # no rollout: v8's code goes live
    done = ({"state": "promoted", "to": 8}, 3)
    assert not _rolling_out(app, "pay", "c8", done)
    app = traffic.with_weights(app, "pay", "live", {9: 90, 8: 10}, {8: version(8)})
    assert _rolling_out(app, "pay", "c8", ({"state": "running", "to": 8}, 4))
    assert not _rolling_out(app, "pay", "c9", ({"state": "running", "to": 8}, 4))


def test_a_tick_with_a_process_missing_from_the_scrape_judges_nothing(
        tmp_path: Path, script: Script) -> None:
    async def body(store: Store) -> None:
        await setup(store, "canary:10%:5s")
        runner = RolloutRunner(store, script)
        await runner.tick(T0)
        script.add(8, 5, errors=20)  # failing badly
        script.missing = 1  # type: ignore[attr-defined]
        await runner.tick(T0 + 1)
        assert (await read(store))[0]["state"] == "running"  # not judged without it
        script.missing = 0  # type: ignore[attr-defined]
        await runner.tick(T0 + 2)
        assert (await read(store))[0]["state"] == "rolled_back"

    run(body, tmp_path)
