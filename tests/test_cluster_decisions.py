"""The leader's decisions without a store: demand aggregation, planner, shares."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nimbus.cluster.demand import Demand, aggregate, decode_report
from nimbus.cluster.leader import Planner, concurrency_cap, live_targets, split_cap, worker_state
from nimbus.cluster.placement import WorkerState, totals
from nimbus.manifest.model import FunctionSpec


def spec(name: str = "f", **kw: object) -> FunctionSpec:
    base: dict[str, object] = {"name": name, "handler": "app.handler", "module": "app",
                               "callable": "handler", "memory_mb": 128,
                               "concurrency": 1, "max_instances": 10,
                               "scale_to_zero_after_s": 30.0}
    base.update(kw)
    return FunctionSpec.from_dict(base)


def test_aggregate_sums_gateways_and_takes_arrivals() -> None:
    reports = [
        {"targets": {"f@1": {"in_flight": 2, "held": 1, "arrivals": 5}}},
        {"targets": {"f@1": {"in_flight": 1, "held": 0, "arrivals": 1},
                     "g@2": {"in_flight": 0, "held": 3, "arrivals": 3}}},
    ]
    out = aggregate(reports, {"f@1": 9, "h@1": 1})
    assert out["f@1"] == Demand(3, 1, 9)
    assert out["f@1"].concurrency == 4
    assert out["g@2"] == Demand(0, 3, 0)
    assert out["h@1"] == Demand(0, 0, 1)


@pytest.mark.parametrize("value", [b"nope", b"[]", b'{"targets": 1}',
                                   b'{"targets": {"f@1": {"held": -1}}}',
                                   b'{"targets": {"f@1": {"held": "x"}}}'])
def test_malformed_reports_are_refused(value: bytes) -> None:
    assert decode_report(value) is None


def test_split_cap_adds_up_to_the_cap_and_follows_demand() -> None:
    assert split_cap(10, ["a", "b", "c"], {}, {}) == {"a": 4, "b": 3, "c": 3}
    # a cap below the number of gateways: some get none, never over the cap
    assert split_cap(1, ["a", "b"], {}, {}) == {"a": 1, "b": 0}
    # what a gateway runs now stays with it; the rest goes to unmet demand
    assert split_cap(2, ["a", "b", "c"], {"b": 1}, {"b": 1, "c": 5}) == \
        {"a": 0, "b": 1, "c": 1}
    assert split_cap(1, ["a", "b"], {"a": 1}, {"a": 1, "b": 4}) == {"a": 1, "b": 0}
    assert split_cap(1, ["a", "b"], {}, {"b": 4}) == {"a": 0, "b": 1}
    assert split_cap(7, [], {}, {}) == {}
    assert concurrency_cap(spec(max_concurrency=4)) == 4
    assert concurrency_cap(spec(max_instances=2, concurrency=3)) == 6


@given(st.integers(0, 500), st.lists(st.sampled_from("abcdefgh"), min_size=1, unique=True),
       st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 50)),
       st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 200)))
def test_split_cap_never_hands_out_more_than_the_cap(cap: int, gws: list[str],
                                                     busy: dict[str, int],
                                                     want: dict[str, int]) -> None:
    parts = split_cap(cap, gws, busy, want)
    assert set(parts) == set(gws)
    assert sum(parts.values()) == cap  # exactly: together the gateways run at most cap
    assert all(n >= 0 for n in parts.values())
    if sum(max(busy.get(g, 0), 0) for g in gws) <= cap:
        assert all(parts[g] >= busy.get(g, 0) for g in gws)  # nothing taken from under it


GW1 = {"g1": {}}  # one gateway, no demand of its own reported
GW2 = {"g1": {}, "g2": {}}


def workers(*placed: dict[str, int], max_instances: int = 8) -> list[WorkerState]:
    return [WorkerState(f"w{i}", max_instances, 4096, p) for i, p in enumerate(placed)]


def test_scale_from_zero_at_the_first_held_request() -> None:
    p = Planner()
    t = {"f@1": spec()}
    plan = p.step(0.0, t, {}, workers({}, {}), GW1)
    assert totals(plan.placement) == {}
    plan = p.step(0.1, t, {"f@1": Demand(0, 1, 1)}, workers({}, {}), GW1)
    assert totals(plan.placement) == {"f@1": 1}


def test_demand_spreads_over_workers_and_respects_max_instances() -> None:
    p = Planner()
    t = {"f@1": spec(max_instances=3)}
    plan = p.step(0.0, t, {"f@1": Demand(20, 10, 30)}, workers({}, {}), GW2)
    assert totals(plan.placement) == {"f@1": 3}
    assert all(plan.placement[w].get("f@1", 0) >= 1 for w in ("w0", "w1"))


def test_idle_target_goes_to_zero_after_its_grace_not_before() -> None:
    p = Planner()
    t = {"f@1": spec(scale_to_zero_after_s=10.0)}
    cur = workers({"f@1": 1}, {})
    assert totals(p.step(0.0, t, {}, cur, GW1).placement) == {"f@1": 1}
    assert totals(p.step(5.0, t, {}, cur, GW1).placement) == {"f@1": 1}
    assert totals(p.step(10.5, t, {}, cur, GW1).placement) == {}


def test_a_new_leader_keeps_the_placement_it_finds() -> None:
    """A fresh planner (no history) with no demand yet moves nothing."""
    cur = workers({"f@1": 2}, {"f@1": 1})
    plan = Planner().step(100.0, {"f@1": spec()}, {}, cur, GW1)
    assert plan.placement == {"w0": {"f@1": 2}, "w1": {"f@1": 1}}


def test_warm_request_gets_one_instance_and_min_instances_holds() -> None:
    p = Planner()
    t = {"f@1": spec(), "g@1": spec("g", min_instances=2)}
    plan = p.step(0.0, t, {}, workers({}, {}), GW1, frozenset({"f@1"}))
    assert totals(plan.placement) == {"f@1": 1, "g@1": 2}
    assert plan.placement["w0"].get("g@1") == 1 and plan.placement["w1"].get("g@1") == 1


def test_targets_no_longer_live_lose_their_decider_and_placement() -> None:
    p = Planner()
    p.step(0.0, {"f@1": spec()}, {"f@1": Demand(1, 0, 1)}, workers({}), GW1)
    plan = p.step(1.0, {"f@2": spec()}, {}, workers({"f@1": 1}), GW1)
    assert "f@1" not in p.deciders
    assert plan.placement == {"w0": {}}


def test_live_targets_and_worker_state_from_records() -> None:
    app = {"name": "a", "functions": {"f": {"version": 3, "spec": spec().to_dict()}}}
    assert list(live_targets({"apps/a": app})) == ["f@3"]
    info = orjson.loads(orjson.dumps({"budget": {"max_instances": 4, "memory_mb": 512}}))
    w = worker_state("w1", info, {"f@3": 1})
    assert (w.max_instances, w.memory_mb, dict(w.placed)) == (4, 512, {"f@3": 1})
    assert worker_state("w2", {}, {}).max_instances == 0  # no budget: nothing placed there


@given(st.integers(0, 60), st.lists(st.sampled_from("abcdef"), min_size=1, unique=True),
       st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 20)),
       st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 80)),
       st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 20)))
def test_a_unit_moves_only_once_its_gateway_gave_it_up(cap: int, gws: list[str],
                                                       busy: dict[str, int],
                                                       want: dict[str, int],
                                                       hold: dict[str, int]) -> None:
    if sum(hold.get(g, 0) for g in gws) > cap:
        return  # what gateways hold never adds up past the cap: parts only ever did
    parts = split_cap(cap, gws, busy, want, hold)
    # whatever a gateway may still be using, plus what the others may now
    # start, never passes the cap
    assert sum(max(parts[g], hold.get(g, 0)) for g in gws) <= cap


def test_a_handover_takes_two_steps() -> None:
    # a holds the only unit; b wants it: a is told to give it up first
    assert split_cap(1, ["a", "b"], {}, {"b": 3}, {"a": 1}) == {"a": 0, "b": 0}
    # a reported it enforces 0 and runs nothing: now b gets it
    assert split_cap(1, ["a", "b"], {}, {"b": 3}, {"a": 0}) == {"a": 0, "b": 1}
