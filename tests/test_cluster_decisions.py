"""The leader's decisions without a store: demand aggregation, planner, shares."""

from __future__ import annotations

import orjson
import pytest

from nimbus.cluster.demand import Demand, aggregate, decode_report
from nimbus.cluster.leader import Planner, concurrency_cap, live_targets, share_of, worker_state
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


def test_share_is_cap_over_gateways_at_least_one() -> None:
    assert share_of(10, 3) == 3
    assert share_of(2, 5) == 1
    assert share_of(7, 0) == 7
    assert concurrency_cap(spec(max_concurrency=4)) == 4
    assert concurrency_cap(spec(max_instances=2, concurrency=3)) == 6


def workers(*placed: dict[str, int], max_instances: int = 8) -> list[WorkerState]:
    return [WorkerState(f"w{i}", max_instances, 4096, p) for i, p in enumerate(placed)]


def test_scale_from_zero_at_the_first_held_request() -> None:
    p = Planner()
    t = {"f@1": spec()}
    plan = p.step(0.0, t, {}, workers({}, {}), 1)
    assert totals(plan.placement) == {}
    plan = p.step(0.1, t, {"f@1": Demand(0, 1, 1)}, workers({}, {}), 1)
    assert totals(plan.placement) == {"f@1": 1}


def test_demand_spreads_over_workers_and_respects_max_instances() -> None:
    p = Planner()
    t = {"f@1": spec(max_instances=3)}
    plan = p.step(0.0, t, {"f@1": Demand(20, 10, 30)}, workers({}, {}), 2)
    assert totals(plan.placement) == {"f@1": 3}
    assert all(plan.placement[w].get("f@1", 0) >= 1 for w in ("w0", "w1"))


def test_idle_target_goes_to_zero_after_its_grace_not_before() -> None:
    p = Planner()
    t = {"f@1": spec(scale_to_zero_after_s=10.0)}
    cur = workers({"f@1": 1}, {})
    assert totals(p.step(0.0, t, {}, cur, 1).placement) == {"f@1": 1}
    assert totals(p.step(5.0, t, {}, cur, 1).placement) == {"f@1": 1}
    assert totals(p.step(10.5, t, {}, cur, 1).placement) == {}


def test_a_new_leader_keeps_the_placement_it_finds() -> None:
    """A fresh planner (no history) with no demand yet moves nothing."""
    cur = workers({"f@1": 2}, {"f@1": 1})
    plan = Planner().step(100.0, {"f@1": spec()}, {}, cur, 1)
    assert plan.placement == {"w0": {"f@1": 2}, "w1": {"f@1": 1}}


def test_warm_request_gets_one_instance_and_min_instances_holds() -> None:
    p = Planner()
    t = {"f@1": spec(), "g@1": spec("g", min_instances=2)}
    plan = p.step(0.0, t, {}, workers({}, {}), 1, frozenset({"f@1"}))
    assert totals(plan.placement) == {"f@1": 1, "g@1": 2}
    assert plan.placement["w0"].get("g@1") == 1 and plan.placement["w1"].get("g@1") == 1


def test_targets_no_longer_live_lose_their_decider_and_placement() -> None:
    p = Planner()
    p.step(0.0, {"f@1": spec()}, {"f@1": Demand(1, 0, 1)}, workers({}), 1)
    plan = p.step(1.0, {"f@2": spec()}, {}, workers({"f@1": 1}), 1)
    assert "f@1" not in p.deciders
    assert plan.placement == {"w0": {}}


def test_live_targets_and_worker_state_from_records() -> None:
    app = {"name": "a", "functions": {"f": {"version": 3, "spec": spec().to_dict()}}}
    assert list(live_targets({"apps/a": app})) == ["f@3"]
    info = orjson.loads(orjson.dumps({"budget": {"max_instances": 4, "memory_mb": 512}}))
    w = worker_state("w1", info, {"f@3": 1})
    assert (w.max_instances, w.memory_mb, dict(w.placed)) == (4, 512, {"f@3": 1})
    assert worker_state("w2", {}, {}).max_instances == 0  # no budget: nothing placed there
