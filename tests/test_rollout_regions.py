"""Rollouts across regions: wave planning (pure), the cluster state that
holds a rollout back from convergers, and two ``nimbus up`` regions where a
version is bad only in the second one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nimbus.errors import UserInputError
from nimbus.multiregion.rollout import live_weights
from nimbus.multiregion.state import (
    DONE,
    RUNNING,
    STOPPED,
    ClusterRollout,
    ClusterState,
    Desired,
)
from nimbus.multiregion.waves import (
    default_waves,
    parse_bake,
    parse_waves,
    wait_deadline_s,
)

CLUSTER = ("eu", "us", "ap")


# -- wave planning (pure) -----------------------------------------------------
def test_default_waves_follow_the_cluster_file_not_the_app_order() -> None:
    assert default_waves(("us", "eu"), CLUSTER) == (("eu",), ("us",))
    assert default_waves(CLUSTER, CLUSTER) == (("eu",), ("us",), ("ap",))


def test_parse_waves_groups_regions() -> None:
    assert parse_waves("eu;us,ap", CLUSTER, CLUSTER) == (("eu",), ("us", "ap"))
    assert parse_waves("eu,us,ap", CLUSTER, CLUSTER) == (("eu", "us", "ap"),)
    assert parse_waves(" ap ; eu , us ", CLUSTER, CLUSTER) == (("ap",), ("eu", "us"))
    # the manifest's spellings
    assert parse_waves(["eu", "us,ap"], CLUSTER, CLUSTER) == (("eu",), ("us", "ap"))
    assert parse_waves([["eu"], ["us", "ap"]], CLUSTER, CLUSTER) == (("eu",), ("us", "ap"))


@pytest.mark.parametrize(("spec", "message"), [
    ("eu;mars", "--waves: region 'mars' is not in the cluster file (it has eu, us, ap)"),
    ("eu;us", "--waves: region ap of the app is in no wave"),
    ("eu;us;eu,ap", "--waves: region 'eu' is in wave 1 and wave 3"),
    ("eu;;us,ap", "--waves: wave 2 names no region"),
])
def test_parse_waves_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(UserInputError) as err:
        parse_waves(spec, CLUSTER, CLUSTER)
    assert str(err.value).startswith(message)


def test_parse_waves_refuses_a_region_the_app_does_not_run_in() -> None:
    with pytest.raises(UserInputError, match="the app does not run in region 'ap'"):
        parse_waves("eu;us,ap", ("eu", "us"), CLUSTER)
    with pytest.raises(UserInputError, match=r"^rollout\.waves: wave 2 is 3"):
        parse_waves(["eu", 3], CLUSTER, CLUSTER, where="rollout.waves")


def test_bake_and_deadline() -> None:
    assert parse_bake("1m") == 60.0
    assert parse_bake("1.5s") == 1.5
    assert parse_bake("500ms") == 0.5
    assert parse_bake("0") == 0.0
    assert parse_bake(90) == 90.0
    for bad in ("soon", "-1s", "2d", "25h"):
        with pytest.raises(UserInputError, match="--bake"):
            parse_bake(bad)
    # the strategy's time plus at least 30 s of slack
    assert wait_deadline_s([2.0, 0.0]) == 32.0
    assert wait_deadline_s([300.0, 300.0, 0.0]) == 900.0


def test_live_weights_from_an_aliases_listing() -> None:
    assert live_weights({"live": {"7": 90, "8": 10}}) == {7: 90, 8: 10}
    assert live_weights({"aliases": {"live": {"weights": {"8": 100}}}}) == {8: 100}
    assert live_weights([{"name": "beta", "weights": {"8": 100}},
                         {"name": "live", "weights": {"7": 100}}]) == {7: 100}
    assert live_weights({"errorMessage": "no"}) is None


# -- the cluster state ---------------------------------------------------------
def _desired(digest: str) -> Desired:
    return Desired(app="shop", digest=digest, regions=("eu", "us"), updated=time.time())


def test_a_rollout_by_waves_holds_the_app_back_until_done(tmp_path: Path) -> None:
    state = ClusterState(tmp_path / "state")
    a, b = "a" * 64, "b" * 64
    state.record_deploy(_desired(a), b"zip-a")
    assert set(state.snapshot().pending) == {("eu", "shop"), ("us", "shop")}
    ro = ClusterRollout(app="shop", digest=b, strategy="canary:10%:5m",
                        waves=(("eu",), ("us",)), started=1.0)
    state.record_deploy(_desired(b), b"zip-b", rollout=ro)
    snap = state.snapshot()
    assert snap.pending == {}  # no region is left for a converger to push
    assert snap.held("shop") == ro and ro.state == RUNNING
    ro.state, ro.reason = STOPPED, "us: rolled back"
    assert state.update_rollout(ro)
    assert state.snapshot().held("shop").reason == "us: rolled back"  # type: ignore[union-attr]
    # another start of the same digest (a newer deploy) wins over this writer
    newer = ClusterRollout(app="shop", digest=b, strategy="canary:10%:5m",
                           waves=(("eu", "us"),), started=2.0)
    state.replace_rollout(newer)
    assert not state.update_rollout(ro)
    newer.state = DONE
    assert state.update_rollout(newer)
    assert state.snapshot().held("shop") is None
    # the next deploy at once clears the record
    state.record_deploy(_desired(a), b"zip-a")
    assert state.snapshot().rollouts == {}
    assert state.snapshot().held("shop") is None
