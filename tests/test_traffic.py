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
                    return int(await store.update(key, value, revision))

            racing = Racing()
            seen: list[float] = []

            def change(app: dict[str, Any]) -> dict[str, Any]:
                seen.append(app["deployed"])
                new: dict[str, Any] = traffic.with_weights(app, "f", "beta", {7: 100})
                return new

            written = await records.change_app(racing, "f", change)  # type: ignore[arg-type]
            assert seen == [1.0, 2.0]  # read again after losing the race
            assert written["deployed"] == 2.0
            assert written["aliases"] == {"f": {"beta": {"7": 100}}}
            assert (await records.app_of(store, "f"))[0] == written
            assert await records.change_app(store, "f", lambda a: a) == written
        finally:
            await store.aclose()
    run(main())


def test_placement_and_garbage_collection_keep_every_referenced_version(tmp_path: Path) -> None:
    from nimbus.cluster.leader import live_targets
    from nimbus.control.gc import kept_versions
    from nimbus.manifest.model import FunctionSpec

    spec = FunctionSpec(name="f", module="m", callable="h").to_dict()

    def full(v: int) -> dict[str, Any]:
        return rec(v) | {"spec": spec}

    app = traffic.with_weights(plain() | {"functions": {"f": full(7)}}, "f", "live",
                               {7: 90, 8: 10}, {8: full(8)})
    app = traffic.with_weights(app, "f", "old", {2: 100}, {2: full(2)})
    assert sorted(live_targets({"apps/a": app})) == ["f@2", "f@7", "f@8"]

    async def main() -> None:
        store = await open_sqlite_store(tmp_path / "s.db")
        try:
            await store.create("apps/a", orjson.dumps(app))
            for v in range(1, 10):
                await store.create(f"functions/f/versions/{v:08d}", orjson.dumps(full(v)))
            keep, stale = await kept_versions(store, keep_versions=1)
            assert [key for key, _ in stale] == [f"functions/f/versions/{v:08d}"
                                                 for v in (1, 3, 4, 5, 6)]
            assert keep.digests == {"d2", "d7", "d8", "d9"}
        finally:
            await store.aclose()
    run(main())


def test_setting_live_is_refused_while_a_rollout_runs(tmp_path: Path) -> None:
    from nimbus.control.aliases import refuse_during_rollout
    from nimbus.errors import ConflictError

    async def main() -> None:
        store = await open_sqlite_store(tmp_path / "s.db")
        try:
            await refuse_during_rollout(store, "f")  # no rollout: fine
            rev = await store.create("rollouts/f", orjson.dumps(
                {"id": "r1", "from": 7, "to": 8, "strategy": "canary:10%:5m",
                 "state": "running"}))
            with pytest.raises(ConflictError, match=r"rollout r1: version 7 -> 8.*"
                               r"`nimbus rollback f`"):
                await refuse_during_rollout(store, "f")
            await store.update("rollouts/f", orjson.dumps({"id": "r1", "state": "promoted"}),
                               rev)
            await refuse_during_rollout(store, "f")
        finally:
            await store.aclose()
    run(main())


class FakeInvoker:
    """Stands for a version's pool in the pure tests of the pick."""

    def __init__(self, version: int) -> None:
        self.target = type("T", (), {"version": version, "function": "f"})()
        self.cap = 10
        self.lines: list[str] = []

    def log(self, rid: str | None, stream: str, text: str, level: str | None = None) -> None:
        self.lines.append(text)


def test_split_picks_by_weight_and_by_sticky_key() -> None:
    import random

    from nimbus.gateway.split import Split, sticky_key

    old, new = FakeInvoker(7), FakeInvoker(8)
    split = Split("live", [(7, 75, old), (8, 25, new)], old)
    assert split.target is old.target and split.cap == 10
    assert split.for_version(8) is new and split.for_version(9) is None
    random.seed(1)
    picks = [split.pick(None).target.version for _ in range(4000)]
    assert abs(picks.count(8) - 1000) <= 100
    for i in range(200):  # the same bucket table as the pure one
        key = f"user-{i}"
        want = traffic.version_for_bucket(traffic.bucket_table({7: 75, 8: 25}),
                                          traffic.bucket(key))
        assert split.pick(key).target.version == want
    assert sticky_key({"headers": {"x-nimbus-sticky": "u1"}, "cookies": ["nimbus-sticky=u2"]}) \
        == "u1"
    assert sticky_key({"headers": {}, "cookies": ["a=b", "nimbus-sticky=u2"]}) == "u2"
    assert sticky_key({"headers": {}}) is None and sticky_key([1]) is None
    zero = Split("live", [(7, 100, old), (8, 0, new)], old)
    assert {zero.pick(None).target.version for _ in range(100)} == {7}
    assert zero.for_version(8) is new  # named at weight 0: still reachable when pinned


def test_a_pinned_message_runs_on_its_version_or_says_why_not() -> None:
    from nimbus.events.dispatch import Dispatcher
    from nimbus.events.names import Subscription
    from nimbus.gateway.split import Split
    from nimbus.store.queue import Message

    old, new, beta = FakeInvoker(7), FakeInvoker(8), FakeInvoker(5)
    split = Split("live", [(7, 90, old), (8, 10, new)], old)
    d = Dispatcher(None, lambda: {"f": split},  # type: ignore[arg-type, dict-item]
                   None,  # type: ignore[arg-type]
                   version_of=lambda fn, v: beta if v == 5 else None)
    sub = Subscription("fn/f", "f", "invoke", "f")

    def msg(pin: str) -> Message:
        return Message("m1", "fn/f", b"{}", {"nimbus.version": pin}, 1, 0.0, None)

    assert d._pinned(sub, split, msg("8"), "8") is new
    assert d._pinned(sub, split, msg("5"), "5") is beta  # another alias's version
    assert d._pinned(sub, old, msg("7"), "7") is old
    gone = d._pinned(sub, split, msg("3"), "3")
    assert gone in (old, new)
    assert old.lines == [f"async invocation m1 was accepted for version 3, which is no longer "
                         f"deployed; it runs on version {gone.target.version}"]


def test_a_manifest_route_names_an_alias(tmp_path: Path) -> None:
    from nimbus.errors import ManifestError
    from nimbus.manifest.loader import load_app
    from nimbus.manifest.model import FunctionSpec

    (tmp_path / "api.py").write_text("def h(event, context):\n    return 1\n")
    (tmp_path / "app.yaml").write_text(
        "name: a\nfunctions:\n  f:\n    handler: api.h\n    http:\n"
        "      - {method: GET, path: /f}\n      - {method: GET, path: /b, alias: beta}\n")
    spec = load_app(tmp_path).functions["f"]
    assert [(r.path, r.alias) for r in spec.routes] == [("/f", "live"), ("/b", "beta")]
    stored = spec.to_dict()["routes"]
    assert stored == [{"method": "GET", "path": "/f"},  # as before: same config hash
                      {"method": "GET", "path": "/b", "alias": "beta"}]
    assert FunctionSpec.from_dict(spec.to_dict()) == spec
    (tmp_path / "app.yaml").write_text(
        "name: a\nfunctions:\n  f:\n    handler: api.h\n    http:\n"
        "      - {method: GET, path: /f}\n      - {method: GET, path: /b, alias: Beta_1}\n")
    with pytest.raises(ManifestError) as info:
        load_app(tmp_path)
    err = info.value
    assert (err.line, err.field) == (7, "functions.f.http[1].alias"), str(err)
    assert "expected an alias name" in err.message and "'Beta_1'" in err.message


def test_a_manifest_names_the_alias_its_triggers_invoke(tmp_path: Path) -> None:
    from nimbus.errors import ManifestError
    from nimbus.manifest.loader import load_app
    from nimbus.manifest.model import FunctionSpec

    (tmp_path / "api.py").write_text("def h(event, context):\n    return 1\n")
    (tmp_path / "app.yaml").write_text(
        "name: a\nfunctions:\n  f:\n    handler: api.h\n    queue: jobs\n"
        "    trigger_alias: stable\n  g:\n    handler: api.h\n    queue: other\n")
    app = load_app(tmp_path)
    assert app.functions["f"].trigger_alias == "stable"
    assert app.functions["g"].trigger_alias is None
    assert "trigger_alias" not in app.functions["g"].to_dict()  # same config hash as before
    assert FunctionSpec.from_dict(app.functions["f"].to_dict()) == app.functions["f"]
    (tmp_path / "app.yaml").write_text(
        "name: a\nfunctions:\n  f:\n    handler: api.h\n    queue: jobs\n"
        "    trigger_alias: 7\n")
    with pytest.raises(ManifestError) as info:
        load_app(tmp_path)
    assert (info.value.line, info.value.field) == (6, "functions.f.trigger_alias"), str(info.value)
    assert "expected an alias name" in info.value.message
