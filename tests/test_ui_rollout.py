"""The function page's rollout and alias data, read straight from a store
(SQLite, a temp file): a rollout record with decisions whose figures were
stored as figures or as whole windows, and an app record with aliases."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from nimbus.rollout.window import Window
from nimbus.store.sqlite import open_sqlite_store
from nimbus.ui.dashboard import (
    MAX_DECISIONS_SHOWN,
    function_aliases,
    function_rollout,
    with_shares,
)


def record(history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "r1", "app": "shop", "function": "hello", "from": 7, "to": 8,
            "strategy": "canary:10%:5m", "steps": [[10, 300.0], [100, 0.0]],
            "rollback_on": "error_rate > 2%", "min_requests": 20, "state": "rolled_back",
            "step": 0, "step_started": 100.0, "started": 100.0, "ended": 130.0,
            "reason": "error_rate 30.0% > 2% over 20 requests", "start_counters": None,
            "history": history}


def test_rollout_and_aliases_from_the_store(tmp_path: Path) -> None:
    bad = Window(success=14, error=6, buckets=(0,) * 3 + (20,) + (0,) * 15, total_s=0.2)
    history = [{"at": 100.0 + i, "step": 0, "share": 10, "action": "hold", "reason": "x"}
               for i in range(MAX_DECISIONS_SHOWN + 5)]
    history.append({"at": 130.0, "step": 0, "share": 10, "action": "rollback",
                    "reason": "error_rate 30.0% > 2% over 20 requests",
                    "canary": bad.to_dict(), "baseline": Window(success=50).figures()})
    app = {"name": "shop", "functions": {"hello": {"version": 7}},
           "aliases": {"hello": {"beta": {"8": 100}, "half": {"7": 50, "8": 50}}}}

    async def main() -> tuple[Any, ...]:
        store = await open_sqlite_store(tmp_path / "s.db")
        try:
            nothing = await function_rollout(store, "hello", 131.0)
            await store.create("rollouts/hello", orjson.dumps(record(history)))
            await store.create("functions/hello/owner", orjson.dumps({"app": "shop"}))
            await store.create("apps/shop", orjson.dumps(app))
            await store.create("rollouts/broken", b"{not json")
            return (nothing, await function_rollout(store, "hello", 131.0),
                    await function_aliases(store, "hello"),
                    await function_aliases(store, "nobody"),
                    await function_rollout(store, "broken", 131.0))
        finally:
            await store.aclose()

    nothing, view, aliases, no_aliases, broken = asyncio.run(main())
    assert nothing is None and broken is None and no_aliases == {}
    assert (view["state"], view["share"], view["reason"]) == (
        "rolled_back", 0, "error_rate 30.0% > 2% over 20 requests")
    assert view["decisions"] == MAX_DECISIONS_SHOWN + 6
    assert len(view["history"]) == MAX_DECISIONS_SHOWN
    last = view["history"][-1]
    # a stored window is shown as its figures
    assert (last["canary"]["requests"], last["canary"]["error_rate"]) == (20, 0.3)
    assert last["canary"]["p99"] == bad.quantile(0.99)
    assert last["baseline"]["requests"] == 50
    assert aliases == {"live": {"7": 100}, "beta": {"8": 100}, "half": {"7": 50, "8": 50}}
    versions: list[dict[str, Any]] = [{"version": 8}, {"version": 7}, {"version": 6}]
    with_shares(versions, aliases)
    assert [v["shares"] for v in versions] == [
        {"beta": 100, "half": 50}, {"live": 100, "half": 50}, {}]
