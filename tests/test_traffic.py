"""Versions and aliases in an app record: the pure functions and the CAS writes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from nimbus.errors import NotFoundError, UserInputError
from nimbus.rollout import records, traffic
from nimbus.store.sqlite import open_sqlite_store


def rec(v: int, fn: str = "f") -> dict[str, Any]:
    return {"version": v, "app": "a", "digest": f"d{v}", "requirements_hash": None,
            "spec": {"name": fn}, "config_hash": f"c{v}", "created": 1000.0 + v}


def plain(v: int = 7) -> dict[str, Any]:
    return {"name": "a", "digest": "d", "deployed": 1.0,
            "functions": {"f": rec(v), "g": rec(3, "g")}, "regions": None,
            "routes": [["GET", "/f", "f"]]}


def test_alias_names() -> None:
    for good in ("live", "beta", "a", "canary-2", "a" * 63):
        assert traffic.check_alias_name(good) == good
    for bad in ("", "7", "Beta", "-x", "9lives", "a" * 64, "be ta", "beta/1"):
        with pytest.raises(UserInputError, match="alias name"):
            traffic.check_alias_name(bad)


def test_parse_weights() -> None:
    assert traffic.parse_weights("8") == {8: 100}
    assert traffic.parse_weights("7=90,8=10") == {7: 90, 8: 10}
    assert traffic.parse_weights(" 7=90%, 8=10% ") == {7: 90, 8: 10}
    assert traffic.parse_weights("7=100,8=0") == {7: 100, 8: 0}
    for bad, words in [("", "empty"), ("7=90,8=20", "sum to 110"), ("x", "not a version"),
                       ("0", "versions start at 1"), ("7=90,7=10", "named twice"),
                       ("7=-1,8=101", "whole percent"), ("7,8", "no '=WEIGHT'"),
                       ("7=ninety,8=10", "whole percent")]:
        with pytest.raises(UserInputError, match=words):
            traffic.parse_weights(bad)
    assert traffic.check_weights({"7": 90, "8": 10}) == {7: 90, 8: 10}
    with pytest.raises(UserInputError, match="whole percent"):
        traffic.check_weights({"7": True, "8": 99})


def test_a_plain_record_has_live_on_its_stable_version() -> None:
    app = plain()
    assert traffic.weights_of(app, "f") == {7: 100}
    assert traffic.aliases_of(app, "f") == {"live": {7: 100}}
    assert traffic.records_of(app, "f") == {7: rec(7)}
    assert traffic.referenced(app) == [("f", rec(7)), ("g", rec(3, "g"))]
    assert traffic.normalized(app) == app
    with pytest.raises(NotFoundError, match="no alias 'beta'; its aliases: live"):
        traffic.weights_of(app, "f", "beta")
    with pytest.raises(NotFoundError, match="function 'h'"):
        traffic.weights_of(app, "h")


def test_weighted_live_keeps_both_records_and_promote_drops_the_old() -> None:
    app = traffic.with_weights(plain(), "f", "live", {7: 90, 8: 10}, {8: rec(8)})
    assert app["functions"]["f"] == rec(7)
    assert app["aliases"] == {"f": {"live": {"7": 90, "8": 10}}}
    assert app["versions"] == {"f": {"8": rec(8)}}
    assert traffic.weights_of(app, "f") == {7: 90, 8: 10}
    assert [(fn, r["version"]) for fn, r in traffic.referenced(app)] == [
        ("f", 7), ("f", 8), ("g", 3)]
    done = traffic.promote(app, "f", 8)
    assert done["functions"]["f"] == rec(8)
    assert "aliases" not in done and "versions" not in done
    assert done == {**plain(8)}
    # rolling back: live to the stable version alone drops the canary
    back = traffic.with_weights(app, "f", "live", {7: 100})
    assert back == plain()


def test_other_aliases_survive_a_promotion() -> None:
    app = traffic.with_weights(plain(), "f", "beta", {8: 100}, {8: rec(8)})
    assert app["aliases"] == {"f": {"beta": {"8": 100}}}
    assert traffic.weights_of(app, "f") == {7: 100}
    promoted = traffic.with_weights(app, "f", "live", {9: 100}, {9: rec(9)})
    assert promoted["functions"]["f"] == rec(9)
    assert promoted["versions"] == {"f": {"8": rec(8)}}  # beta still names 8; 7 is gone
    old = traffic.with_weights(promoted, "f", "stay", {7: 100}, {7: rec(7)})
    assert set(old["versions"]["f"]) == {"7", "8"}
    gone = traffic.without_alias(old, "f", "beta")
    assert gone["aliases"] == {"f": {"stay": {"7": 100}}}
    assert gone["versions"] == {"f": {"7": rec(7)}}


def test_unknown_versions_and_aliases_are_named() -> None:
    with pytest.raises(NotFoundError, match="no version 9; its versions: 7, 8"):
        traffic.with_weights(plain(), "f", "beta", {9: 100}, {8: rec(8)})
    with pytest.raises(UserInputError, match="cannot be removed"):
        traffic.without_alias(plain(), "f", "live")
    with pytest.raises(NotFoundError, match="its aliases: live"):
        traffic.without_alias(plain(), "f", "beta")
    routed = traffic.with_weights({**plain(), "routes": [["GET", "/b", "f", "beta"]]}, "f",
                                  "beta", {7: 100})
    with pytest.raises(UserInputError, match="route GET /b"):
        traffic.without_alias(routed, "f", "beta")


def test_qualifiers() -> None:
    app = traffic.with_weights(plain(), "f", "beta", {8: 100}, {8: rec(8)})
    assert traffic.resolve(app, "f", None) == {7: 100}
    assert traffic.resolve(app, "f", "8") == {8: 100}
    assert traffic.resolve(app, "f", "beta") == {8: 100}
    with pytest.raises(NotFoundError, match="aliases: live, beta; its versions: 7, 8"):
        traffic.resolve(app, "f", "gamma")
    with pytest.raises(NotFoundError, match="no version or alias '5'"):
        traffic.resolve(app, "f", "5")


def test_sticky_buckets_move_a_client_at_most_once_old_to_new() -> None:
    keys = [f"client-{i}" for i in range(2000)]
    assert [traffic.bucket(k) for k in keys[:3]] == [traffic.bucket(k) for k in keys[:3]]
    assert all(0 <= traffic.bucket(k) < traffic.BUCKETS for k in keys)
    seen: dict[str, list[int]] = {k: [] for k in keys}
    for share in (0, 1, 5, 10, 25, 50, 75, 99, 100):
        table = traffic.bucket_table({7: 100 - share, 8: share})
        for k in keys:
            seen[k].append(traffic.version_for_bucket(table, traffic.bucket(k)))
    for k, path in seen.items():
        assert path == sorted(path), k  # only ever 7 -> 8
        assert path[0] == 7 and path[-1] == 8
    at_ten = sum(1 for p in seen.values() if p[3] == 8)
    assert 150 <= at_ten <= 250  # about 10% of 2,000 clients


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_change_app_is_compare_and_set(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_sqlite_store(tmp_path / "s.db")
        try:
            with pytest.raises(NotFoundError, match="'f' is not deployed"):
                await records.app_of(store, "f")
            await store.create("functions/f/owner", orjson.dumps({"app": "a"}))
            await store.create("apps/a", orjson.dumps(plain()))
            app, rev = await records.app_of(store, "f")
            assert app == plain()

            class Racing:
                """The real store, with another writer landing just before our first write."""
                raced = 0

                async def get(self, key: str) -> Any:
                    return await store.get(key)

                async def update(self, key: str, value: bytes, revision: int) -> int:
                    if not self.raced:
                        self.raced += 1
                        await store.update(key, orjson.dumps(plain(7) | {"deployed": 2.0}),
                                           revision)
                    return await store.update(key, value, revision)

            racing = Racing()
            seen: list[float] = []

            def change(app: dict[str, Any]) -> dict[str, Any]:
                seen.append(app["deployed"])
                return traffic.with_weights(app, "f", "beta", {7: 100})

            written = await records.change_app(racing, "f", change)  # type: ignore[arg-type]
            assert seen == [1.0, 2.0]  # read again after losing the race
            assert written["deployed"] == 2.0
            assert written["aliases"] == {"f": {"beta": {"7": 100}}}
            assert (await records.app_of(store, "f"))[0] == written
            assert await records.change_app(store, "f", lambda a: a) == written
        finally:
            await store.aclose()
    run(main())
