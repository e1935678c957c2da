"""Placement: a pure function, tested by examples and by properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nimbus.cluster.placement import (
    WorkerState,
    parse_target_key,
    place,
    shortfall,
    target_key,
    totals,
)

MEM = {"a@1": 128, "b@1": 256, "c@2": 512}


def w(id: str, placed: dict[str, int] | None = None, max_instances: int = 10,
      memory_mb: int = 4096, alive: bool = True) -> WorkerState:
    return WorkerState(id, max_instances, memory_mb, placed or {}, alive)


def test_new_instances_spread_across_workers() -> None:
    out = place({"a@1": 4}, [w("w1"), w("w2")], MEM)
    assert out == {"w1": {"a@1": 2}, "w2": {"a@1": 2}}


def test_single_instance_on_the_least_loaded_worker() -> None:
    out = place({"a@1": 1, "b@1": 4}, [w("w1", {"b@1": 3}), w("w2", {"b@1": 1})], MEM)
    assert out["w2"].get("a@1") == 1
    assert "a@1" not in out["w1"]


def test_existing_placement_kept_when_valid() -> None:
    current = [w("w1", {"a@1": 3, "b@1": 1}), w("w2", {"a@1": 1})]
    out = place({"a@1": 4, "b@1": 1}, current, MEM)
    assert out == {"w1": {"a@1": 3, "b@1": 1}, "w2": {"a@1": 1}}


def test_scale_down_takes_from_the_biggest_holder() -> None:
    out = place({"a@1": 3}, [w("w1", {"a@1": 3}), w("w2", {"a@1": 2})], MEM)
    assert out == {"w1": {"a@1": 2}, "w2": {"a@1": 1}}


def test_all_on_one_worker_moves_one_when_another_has_room() -> None:
    out = place({"a@1": 3}, [w("w1", {"a@1": 3}), w("w2")], MEM)
    assert out == {"w1": {"a@1": 2}, "w2": {"a@1": 1}}


def test_all_on_one_worker_stays_when_no_other_has_room() -> None:
    out = place({"a@1": 2, "c@2": 1},
                [w("w1", {"a@1": 2}), w("w2", {"c@2": 1}, max_instances=1)], MEM)
    assert out == {"w1": {"a@1": 2}, "w2": {"c@2": 1}}


def test_dead_workers_instances_are_placed_elsewhere() -> None:
    out = place({"a@1": 4},
                [w("w1", {"a@1": 2}), w("w2", {"a@1": 2}, alive=False), w("w3")], MEM)
    assert "w2" not in out
    assert totals(out) == {"a@1": 4}
    assert out["w1"]["a@1"] == 2  # kept


def test_budgets_hold_and_shortfall_is_reported() -> None:
    out = place({"c@2": 10}, [w("w1", memory_mb=1024), w("w2", max_instances=1)], MEM)
    assert out == {"w1": {"c@2": 2}, "w2": {"c@2": 1}}
    assert shortfall({"c@2": 10}, out) == {"c@2": 7}


def test_a_shrunk_budget_sheds_instances() -> None:
    out = place({"a@1": 6}, [w("w1", {"a@1": 6}, max_instances=2), w("w2", max_instances=2)],
                MEM)
    assert out == {"w1": {"a@1": 2}, "w2": {"a@1": 2}}


def test_targets_no_longer_wanted_are_dropped() -> None:
    out = place({"a@1": 1}, [w("w1", {"a@1": 1, "b@1": 2})], MEM)
    assert out == {"w1": {"a@1": 1}}


def test_every_live_worker_has_an_entry() -> None:
    assert place({}, [w("w1"), w("w2", {"a@1": 1})], MEM) == {"w1": {}, "w2": {}}


@pytest.mark.parametrize("desired, memory, message", [
    ({"a@1": -1}, MEM, "desired['a@1']"),
    ({"x@1": 1}, MEM, "memory_mb['x@1']"),
])
def test_bad_input_is_named(desired: dict[str, int], memory: dict[str, int],
                            message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        place(desired, [w("w1")], memory)


def test_duplicate_worker_is_an_error() -> None:
    with pytest.raises(ValueError, match="w1"):
        place({}, [w("w1"), w("w1")], MEM)


def test_target_keys_round_trip() -> None:
    assert parse_target_key(target_key("my-fn", 12)) == ("my-fn", 12)
    with pytest.raises(ValueError, match="function@version"):
        parse_target_key("nope")


# -- properties ---------------------------------------------------------------

TARGETS = sorted(MEM)
counts = st.dictionaries(st.sampled_from(TARGETS), st.integers(0, 12), max_size=3)
workers_st = st.lists(
    st.builds(lambda i, mi, mem, placed, alive: (i, mi, mem, placed, alive),
              st.integers(0, 5), st.integers(0, 8), st.sampled_from([0, 512, 1024, 4096]),
              counts, st.booleans()),
    max_size=5, unique_by=lambda x: x[0])


def build(raw: list[tuple[int, int, int, dict[str, int], bool]]) -> list[WorkerState]:
    return [WorkerState(f"w{i}", mi, mem, placed, alive) for i, mi, mem, placed, alive in raw]


@settings(max_examples=1000, deadline=None)
@given(counts, workers_st)
def test_properties(desired: dict[str, int], raw: list[tuple[int, int, int, dict[str, int],
                                                               bool]]) -> None:
    workers = build(raw)
    out = place(desired, workers, MEM)
    live = {x.id: x for x in workers if x.alive}
    assert set(out) == set(live)
    for wid, p in out.items():
        # budgets hold
        assert sum(p.values()) <= live[wid].max_instances
        assert sum(n * MEM[t] for t, n in p.items()) <= live[wid].memory_mb
        assert all(n > 0 and desired.get(t, 0) > 0 for t, n in p.items())
    placed = totals(out)
    for t, n in desired.items():
        assert placed.get(t, 0) <= n
        if placed.get(t, 0) < n:  # short only when nobody has room for one more
            for wid, p in out.items():
                x = live[wid]
                assert (sum(p.values()) + 1 > x.max_instances
                        or sum(m * MEM[u] for u, m in p.items()) + MEM[t] > x.memory_mb)
        holders = [wid for wid, p in out.items() if p.get(t)]
        if len(holders) == 1 and out[holders[0]][t] >= 2:  # all on one: no one else fits
            for wid, p in out.items():
                if wid != holders[0]:
                    x = live[wid]
                    assert (sum(p.values()) + 1 > x.max_instances
                            or sum(m * MEM[u] for u, m in p.items()) + MEM[t] > x.memory_mb)
    # stable: placing again from the result changes nothing
    again = place(desired, [WorkerState(x.id, x.max_instances, x.memory_mb, out[x.id])
                            for x in live.values()], MEM)
    assert again == out


@settings(max_examples=200, deadline=None)
@given(counts, workers_st)
def test_growth_never_moves_existing_instances_needlessly(
        desired: dict[str, int], raw: list[tuple[int, int, int, dict[str, int], bool]]) -> None:
    """With the same workers, asking for more of a target keeps every
    instance of the first placement (apart from one spread move)."""
    workers = [WorkerState(x.id, x.max_instances, x.memory_mb, {}) for x in build(raw)]
    first = place(desired, workers, MEM)
    more = {t: n + 2 for t, n in desired.items()}
    second = place(more, [WorkerState(x.id, x.max_instances, x.memory_mb, first[x.id])
                          for x in workers], MEM)
    for wid, p in first.items():
        for t, n in p.items():
            assert second[wid].get(t, 0) >= n - 1
