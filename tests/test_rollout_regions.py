"""Rollouts across regions: wave planning (pure), the cluster state that
holds a rollout back from convergers, and two ``nimbus up`` regions where a
version is bad only in the second one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nimbus.errors import UserInputError
from nimbus.multiregion.clusterfile import ClusterFile
from nimbus.multiregion.converge import Converger
from nimbus.multiregion.deploy import plan_deploy
from nimbus.multiregion.rollout import RolloutOptions, WaveRollout, live_weights, post_rollback
from nimbus.multiregion.state import (
    BAKING,
    DONE,
    RUNNING,
    STOPPED,
    ClusterRollout,
    ClusterState,
    Desired,
    state_dir_for,
)
from nimbus.multiregion.status import cluster_status, render
from nimbus.multiregion.waves import (
    default_waves,
    parse_bake,
    parse_waves,
    wait_deadline_s,
)
from tests import multiregion
from tests.multiregion import RegionProc, regions

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


# -- two regions -----------------------------------------------------------------
MANIFEST = """\
name: shop
functions:
  hello:
    handler: hello.handler
    http: [{method: GET, path: /hello}]
"""
# The same code runs in every region; AWS_REGION says which one it is in.
CODE = """\
import os
def handler(event, context):
    region = os.environ["AWS_REGION"]
    if %r and region == "us":
        raise RuntimeError("broken in us")
    return {"statusCode": 200, "body": "%s " + region}
"""
CANARY = ("--strategy", "canary:20%:2s", "--bake", "1s", "--min-requests", "5",
          "--rollback-on", "error_rate > 2%")


def write_version(folder: Path, word: str, bad_in_us: bool, rollout: str = "") -> Path:
    return multiregion.write_app(folder, MANIFEST + rollout, "hello", CODE % (bad_in_us, word))


class Load:
    """Steady GET /hello against every region's gateway, from one thread per
    region, until stopped (a rollout's canary needs requests to judge)."""

    def __init__(self, urls: list[str]) -> None:
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(u,), daemon=True)
                        for u in urls]

    def _run(self, url: str) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop_event.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    client.get(url + "/hello")
                time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)


class World:
    def __init__(self, root: Path, eu: RegionProc, us: RegionProc,
                 cluster: ClusterFile) -> None:
        self.root, self.eu, self.us, self.cluster = root, eu, us, cluster
        self.app = root / "shop"

    def deploy(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
        return subprocess.run([sys.executable, "-m", "nimbus", "deploy", str(self.app),
                               "--cluster", str(self.cluster.path), *args],
                              capture_output=True, text=True, timeout=120, env=env)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
        return subprocess.run([sys.executable, "-m", "nimbus", *args, "--cluster",
                               str(self.cluster.path)],
                              capture_output=True, text=True, timeout=60, env=env)

    def serves(self, region: RegionProc) -> set[str]:
        """What /hello answers in ``region`` over 20 requests."""
        return {region.get("/hello").text for _ in range(20)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("rollregions")
    with regions(root, None) as (eu, us):
        cluster = multiregion.write_cluster_file(root / "cluster", [eu, us])
        w = World(root, eu, us, cluster)
        write_version(w.app, "v1", bad_in_us=False)
        out = w.deploy()
        assert out.returncode == 0, out.stdout + out.stderr
        yield w


def _reached_stable(w: World, word: str) -> None:
    assert w.serves(w.eu) == {f"{word} eu"}
    assert w.serves(w.us) == {f"{word} us"}


@pytest.mark.e2e
def test_a_version_bad_in_the_second_region_is_rolled_back_everywhere(world: World) -> None:
    write_version(world.app, "v2", bad_in_us=True)
    with Load([world.eu.gateway_url, world.us.gateway_url]):
        out = world.deploy(*CANARY)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert re.search(r"^eu: version 2 promoted$", out.stdout, re.M), text
    assert re.search(r"^us: rolled back — hello: .*error_rate", out.stdout, re.M), text
    assert "eu: rolled back (on_region_failure: rollback-all)" in out.stdout, text
    assert "rollout stopped: us: hello: " in text
    _reached_stable(world, "v1")
    state = ClusterState(state_dir_for(world.cluster.path))
    held = state.snapshot().held("shop")
    assert held is not None and held.state == STOPPED and held.reason.startswith("us: ")
    # the converger leaves the stopped digest alone: nothing is pushed
    report = asyncio.run(Converger(world.cluster, state.root).converge_once(time.monotonic()))
    assert {(o.region, o.what) for o in report.outcomes} == {("eu", "held"), ("us", "held")}
    doc = asyncio.run(cluster_status(world.cluster, state.root))
    assert doc["rollouts"]["shop"]["state"] == STOPPED and not doc["converged"]
    assert any(line.startswith("rollout of shop ") and "stopped: us: hello:" in line
               for line in render(doc)), render(doc)
    # the cluster's view of the rollout
    status = world.cli("rollout", "status", "hello")
    assert status.returncode == 0, status.stderr
    assert "stopped: us: hello:" in status.stdout, status.stdout
    assert re.search(r"^  eu +rolled back", status.stdout, re.M), status.stdout
    assert re.search(r"^  us +rolled back", status.stdout, re.M), status.stdout


@pytest.mark.e2e
def test_with_stop_the_first_region_keeps_the_new_version(world: World) -> None:
    write_version(world.app, "v3", bad_in_us=True,
                  rollout="rollout: {on_region_failure: stop}\n")
    with Load([world.eu.gateway_url, world.us.gateway_url]):
        out = world.deploy(*CANARY)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert re.search(r"^eu: version 3 promoted$", out.stdout, re.M), text
    assert re.search(r"^us: rolled back — hello: .*error_rate", out.stdout, re.M), text
    assert "left on the new version (on_region_failure: stop): eu" in out.stdout, text
    assert world.serves(world.eu) == {"v3 eu"}
    assert world.serves(world.us) == {"v1 us"}
    # rolled back by hand everywhere: eu returns to version 1
    back = world.cli("rollback", "hello")
    assert back.returncode == 0, back.stdout + back.stderr
    assert "eu: rolled back\n" in back.stdout, back.stdout
    assert "us: already rolled back: version 1 serves all traffic" in back.stdout, back.stdout
    _reached_stable(world, "v1")


@pytest.mark.e2e
def test_a_deploy_killed_while_baking_continues_from_the_next_wave(world: World) -> None:
    write_version(world.app, "v4", bad_in_us=False)
    args = ("--strategy", "canary:20%:1s", "--bake", "1m", "--min-requests", "5",
            "--rollback-on", "error_rate > 2%")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    with Load([world.eu.gateway_url, world.us.gateway_url]):
        proc = subprocess.Popen([sys.executable, "-m", "nimbus", "deploy", str(world.app),
                                 "--cluster", str(world.cluster.path), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        seen = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # ends when the deploy exits (it bakes for 1m)
                seen.append(line)
                if "baking" in line:
                    break
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        assert any(line.startswith("wave 1/2 (eu): promoted; baking") for line in seen), seen
        state = ClusterState(state_dir_for(world.cluster.path))
        ro = state.rollout("shop")
        assert ro is not None and ro.state == BAKING and ro.waves_done == 0
        assert world.serves(world.eu) == {"v4 eu"}
        assert world.serves(world.us) == {"v1 us"}  # not reached, and not converged
        report = asyncio.run(Converger(world.cluster, state.root).converge_once(
            time.monotonic()))
        assert {o.what for o in report.outcomes} == {"held"}
        ro.bake_until = time.time()  # the bake ended meanwhile
        assert state.update_rollout(ro)
        out = world.deploy(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "continuing the rollout of" in out.stdout and "0 of 2 waves done" in out.stdout
    assert "eu: version" not in out.stdout, out.stdout  # not pushed again
    assert re.search(r"^us: version \d+ promoted$", out.stdout, re.M), out.stdout
    assert "rollout done" in out.stdout
    _reached_stable(world, "v4")
    assert ClusterState(state_dir_for(world.cluster.path)).snapshot().held("shop") is None


def _cluster_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "t.token").write_text("secret\n")
    (folder / "t.token").chmod(0o600)
    text = "regions:\n" + "".join(
        f"  {name}:\n    control: http://127.0.0.{i + 2}:9\n    token_file: t.token\n"
        f"    gateways: [http://127.0.0.{i + 2}:10]\n" for i, name in enumerate(CLUSTER))
    (folder / "nimbus.cluster.yaml").write_text(text)
    return folder / "nimbus.cluster.yaml"


@pytest.mark.parametrize(("args", "message"), [
    (("--waves", "eu;mars"), "--waves: region 'mars' is not in the cluster file"),
    (("--waves", "eu;us"), "--waves: region ap of the app is in no wave"),
    (("--bake", "soon"), "--bake: expected a duration like 1m, 30s or 0, got 'soon'"),
    (("--strategy", "canary:150%:1m"), "canary"),
])
def test_deploy_flags_are_checked_before_any_region_is_asked(
        tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    from click.testing import CliRunner

    from nimbus.cli.main import cli

    cluster = _cluster_file(tmp_path / "c")
    app = write_version(tmp_path / "shop", "v1", bad_in_us=False)
    flags = ("--strategy", "canary:10%:1m", *args) if args[0] != "--strategy" else args
    result = CliRunner().invoke(cli, ["deploy", str(app), "--cluster", str(cluster), *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    # nothing was recorded: no region is held back or pending
    assert not state_dir_for(cluster).exists()


@pytest.mark.e2e
def test_a_rollback_by_hand_during_the_bake_stops_the_rollout(world: World) -> None:
    """The bake watches what live serves: a region rolled back by hand while
    the deploy bakes fails the rollout, and the others are rolled back."""
    state = ClusterState(state_dir_for(world.cluster.path))
    ro = state.rollout("shop")
    assert ro is not None and ro.state == DONE  # version 4, everywhere
    # the same rollout, as if its deploy were baking after the first wave
    ro.state, ro.wave, ro.waves_done, ro.bake_until = BAKING, 0, 0, time.time() + 30
    assert state.update_rollout(ro)
    plan = plan_deploy(world.app, world.cluster)
    lines: list[str] = []
    opts = RolloutOptions(ro.strategy, ro.rollback_on, ro.min_requests, ro.waves, 1.0,
                          ro.on_region_failure, 30.0)

    async def run() -> int:
        task = asyncio.ensure_future(WaveRollout(plan, world.cluster, opts, echo=lines.append,
                                                 poll_s=0.2).run())
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient() as client:
            assert await post_rollback(client, world.cluster.regions["eu"], "hello") == ""
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(run()) == 1, lines
    assert any(line.startswith("eu: rolled back — hello: rolled back during the bake: live "
                               "serves version") for line in lines), lines
    assert "us: rolled back (on_region_failure: rollback-all)" in lines, lines
    assert world.serves(world.us) == {"v1 us"}
    assert "v4 eu" not in world.serves(world.eu)
