"""One deploy to every region of an app: ``nimbus deploy --cluster``, pending
regions and their convergence, ``nimbus status --cluster``, and the guided
deploy through a real pseudo-terminal. Two ``nimbus up`` regions are shared
by the whole module; the tests run in order and build on each other."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimbus.multiregion.clusterfile import ClusterFile, load_cluster
from nimbus.multiregion.converge import Converger
from nimbus.multiregion.state import ClusterState, state_dir_for
from tests import multiregion
from tests.multiregion import RegionProc, regions, write_cluster_file

pytestmark = pytest.mark.e2e

MANIFEST = """\
name: greet
functions:
  hello:
    handler: hello.handler
    http: [{method: GET, path: /hello}]
"""
CODE = """\
import os
def handler(event, context):
    return {"statusCode": 200, "body": "%s " + os.environ["AWS_REGION"]}
"""


def write_app(folder: Path, word: str, manifest: str = MANIFEST) -> Path:
    return multiregion.write_app(folder, manifest, "hello", CODE % word)


def nimbus(*args: str, cwd: Path | None = None,
           timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    return subprocess.run([sys.executable, "-m", "nimbus", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


class World:
    def __init__(self, root: Path, eu: RegionProc, us: RegionProc,
                 cluster: ClusterFile) -> None:
        self.root = root
        self.eu = eu
        self.us = us
        self.cluster = cluster
        self.app = write_app(root / "greet", "hello")

    @property
    def cluster_path(self) -> Path:
        return self.cluster.path

    def status(self) -> dict[str, Any]:
        out = nimbus("status", "--cluster", str(self.cluster_path), "--json")
        assert out.returncode == 0, out.stderr
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def apps(self, region: RegionProc) -> dict[str, Any]:
        r = httpx.get(f"{region.control_url}/v1/apps",
                      headers={"authorization": f"Bearer {region.token}"}, timeout=10)
        assert r.status_code == 200, r.text
        return {a["name"]: a for a in r.json()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("regions")
    with regions(root, None, ("eu", "us")) as (eu, us):
        cluster = write_cluster_file(root / "ops", [eu, us])
        yield World(root, eu, us, cluster)


def test_one_deploy_reaches_every_region(world: World) -> None:
    out = nimbus("deploy", str(world.app), "--cluster", str(world.cluster_path))
    assert out.returncode == 0, out.stderr
    assert "eu: version 1 deployed" in out.stdout
    assert "us: version 1 deployed" in out.stdout
    assert world.eu.get("/hello").text == "hello eu"
    assert world.us.get("/hello").text == "hello us"
    digests = {world.apps(r)["greet"]["digest"] for r in (world.eu, world.us)}
    assert len(digests) == 1
    doc = world.status()
    assert doc["converged"] and not doc["drift"] and not doc["pending"]
    assert doc["apps"]["greet"]["desired"] == digests.pop()
    assert {r: s["state"] for r, s in doc["apps"]["greet"]["regions"].items()} == {
        "eu": "ok", "us": "ok"}
    assert all(g["healthy"] for r in doc["regions"].values() for g in r["gateways"])


def test_a_region_down_at_deploy_time_is_pending_and_converges(world: World) -> None:
    write_app(world.app, "bonjour")
    world.us.stop()
    try:
        out = nimbus("deploy", str(world.app), "--cluster", str(world.cluster_path),
                     "--timeout", "20")
        assert out.returncode == 0, out.stderr
        assert "eu: version 2 deployed" in out.stdout
        assert re.search(r"us: pending — unreachable \(connection refused\); it converges "
                         r"when the region returns", out.stdout), out.stdout
        assert world.eu.get("/hello").text == "bonjour eu"
        doc = world.status()
        assert not doc["converged"]
        assert [(p["region"], p["app"]) for p in doc["pending"]] == [("us", "greet")]
        assert not doc["regions"]["us"]["control"]["reachable"]
        assert doc["regions"]["us"]["gateways"][0]["detail"] == "connection refused"
        # --wait-all gives up at its deadline and names the region
        out = nimbus("status", "--cluster", str(world.cluster_path), "--wait-all",
                     "--timeout", "1.5")
        assert out.returncode == 1
        assert "not converged within 1.5 s: us" in out.stderr
    finally:
        world.us.start()
    # back, but still at the old version: drift
    doc = world.status()
    assert doc["apps"]["greet"]["regions"]["us"]["state"] == "drift"
    assert world.us.get("/hello").text == "hello us"
    # the converger an edge runs brings it up to date with no one deploying
    state_dir = state_dir_for(world.cluster_path)
    report = asyncio.run(Converger(world.cluster, state_dir).converge_once(time.monotonic()))
    assert [(o.region, o.app, o.what) for o in report.outcomes] == [
        ("eu", "greet", "in sync"), ("us", "greet", "deployed")]
    assert world.us.get("/hello").text == "bonjour us"
    doc = world.status()
    assert doc["converged"] and not doc["pending"] and not doc["drift"]
    assert ClusterState(state_dir).snapshot().pending == {}


def test_status_wait_all_repairs_a_region_that_lost_the_app(world: World) -> None:
    """A region that comes back empty (its state folder lost) is drift that
    ``status --wait-all`` repairs."""
    world.us.stop()
    for name in ("store.db", "store.db-wal", "store.db-shm", "state.json"):
        (world.us.state / name).unlink(missing_ok=True)
    world.us.start()
    doc = world.status()
    assert doc["apps"]["greet"]["regions"]["us"]["state"] == "missing"
    out = nimbus("status", "--cluster", str(world.cluster_path), "--wait-all",
                 "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "us: greet deployed" in out.stdout
    assert "converged" in out.stdout
    assert world.us.get("/hello").text == "bonjour us"


def test_a_region_that_refuses_the_app_fails_the_deploy(world: World) -> None:
    other = write_app(world.root / "other", "x", MANIFEST.replace(
        "name: greet", "name: other").replace("/hello", "/other"))
    out = nimbus("deploy", str(other), "--cluster", str(world.cluster_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "eu: refused — function 'hello' already belongs to app 'greet'" in out.stdout
    assert ("nimbus: error: region us refused other: function 'hello' already belongs to "
            "app 'greet'") in out.stderr
    assert "other" not in world.apps(world.eu)


@pytest.mark.parametrize("edit,where", [
    (("token_file: eu.token", "token_file: nowhere.token"),
     r"bad.cluster.yaml:\d+: regions.eu.token_file: cannot read .*nowhere.token"),
    (("control: http://127.0.0.2", "control: ftp://127.0.0.2"),
     r"bad.cluster.yaml:\d+: regions.eu.control: expected a URL like http://HOST:PORT"),
])
def test_cluster_file_errors_name_file_and_field(world: World, edit: tuple[str, str],
                                                  where: str) -> None:
    bad = world.cluster_path.with_name("bad.cluster.yaml")
    text = world.cluster_path.read_text()
    assert edit[0] in text
    bad.write_text(text.replace(*edit))
    out = nimbus("deploy", str(world.app), "--cluster", str(bad))
    assert out.returncode == 2
    assert re.search(r"^nimbus: error: .*" + where, out.stderr), out.stderr
    assert "Traceback" not in out.stderr


def test_a_region_the_cluster_file_lacks_is_named(world: World) -> None:
    app = write_app(world.root / "far", "x", MANIFEST.replace("name: greet\n", (
        "name: far\nregions:\n  names: [eu, ap]\n")).replace("/hello", "/far"))
    out = nimbus("deploy", str(app), "--cluster", str(world.cluster_path))
    assert out.returncode == 2
    assert re.search(r"nimbus: error: .*far/app.yaml:3: regions: region 'ap' is not in the "
                     r"cluster file .*nimbus.cluster.yaml \(it has eu, us\)", out.stderr), \
        out.stderr


class Pty:
    """A command on a pseudo-terminal: read what it prints, answer its prompts."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                                     cwd=cwd, env={**env, "TERM": "dumb"}, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; saw:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the command ended
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"ended before {pattern!r}; saw:\n{self.seen}")
                self.seen += chunk.decode(errors="replace").replace("\r\n", "\n")
        out = self.seen[:m.end()]
        self.seen = self.seen[m.end():]
        return out

    def answer(self, prompt: str, text: str) -> str:
        before = self.expect(prompt)
        os.write(self.master, text.encode() + b"\r")
        return before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        return code


def test_guided_deploy_asks_saves_and_a_plain_deploy_repeats(world: World) -> None:
    app = write_app(world.root / "shop", "shop", MANIFEST.replace("name: greet\n", "").replace(
        "hello:", "shopper:").replace("/hello", "/shop"))
    term = Pty([sys.executable, "-m", "nimbus", "deploy", "--guided", str(app)],
               cwd=world.cluster_path.parent)
    try:
        guided_answers(term)
    finally:
        term.close()
    _after_guided(world, app)


def guided_answers(term: Pty) -> None:
    term.answer(r"App name \[shop\]: ", "Shop!")
    term.expect(r"'Shop!' is not an app name")
    term.answer(r"App name \[shop\]: ", "")
    term.answer(r"Cluster file .*\[nimbus.cluster.yaml\]: ", "")
    term.expect(r"Regions in .*nimbus.cluster.yaml: eu, us")
    term.answer(r"comma-separated\) \[eu, us\]: ", "us, ap")
    term.expect(r"ap not in the cluster file \(it has eu, us\); try again")
    term.answer(r"comma-separated\) \[eu, us\]: ", "us, eu")
    term.answer(r"Routing policy \(failover, weighted, latency\) \[failover\]: ", "heavy")
    term.answer(r"Routing policy .*: ", "weighted")
    term.answer(r"weight of us \[50\]: ", "30")
    term.answer(r"weight of eu \[50\]: ", "70")
    plan = term.expect(r"Deploy this plan\? \[Y/n\]: ")
    assert "regions us, eu; policy weighted" in plan
    assert "weights us 30, eu 70" in plan
    os.write(term.master, b"y\r")
    term.expect(r"saved the answers to .*nimbus.toml")
    done = term.expect(r"(?s)(us|eu): version 1 deployed.*(us|eu): version 1 deployed")
    assert "us: version 1 deployed" in done and "eu: version 1 deployed" in done
    assert term.wait() == 0, term.seen


def _after_guided(world: World, app: Path) -> None:
    saved = tomllib.loads((app / "nimbus.toml").read_text())["deploy"]
    assert saved == {"name": "shop", "cluster": "../ops/nimbus.cluster.yaml",
                     "regions": ["us", "eu"], "policy": "weighted",
                     "weights": {"us": 30, "eu": 70}}
    routing = {"names": ["us", "eu"], "policy": "weighted", "weights": {"us": 30, "eu": 70}}
    for region in (world.eu, world.us):
        assert world.apps(region)["shop"]["regions"] == routing
    assert world.us.get("/shop").text == "shop us"

    # a plain deploy, from anywhere, repeats the answers
    write_app(app, "shop2", (app / "app.yaml").read_text())
    out = nimbus("deploy", str(app), cwd=world.root)
    assert out.returncode == 0, out.stderr
    assert "repeating" in out.stdout and "regions us, eu; policy weighted" in out.stdout
    assert "us: version 2 deployed" in out.stdout and "eu: version 2 deployed" in out.stdout
    for region in (world.eu, world.us):
        assert world.apps(region)["shop"]["regions"] == routing
    assert world.eu.get("/shop").text == "shop2 eu"
    assert load_cluster(world.cluster_path).names == ("eu", "us")


def test_guided_deploy_writes_a_cluster_file_from_control_urls(world: World) -> None:
    folder = world.root / "fresh"
    app = write_app(folder / "api", "api", MANIFEST.replace("name: greet\n", "").replace(
        "hello:", "api:").replace("/hello", "/api"))
    eu_token = world.cluster_path.parent / "eu.token"
    term = Pty([sys.executable, "-m", "nimbus", "deploy", "--guided", str(app)], cwd=folder)
    try:
        term.answer(r"App name \[api\]: ", "")
        term.answer(r"Cluster file \(leave empty to enter each region's control URL\): ", "")
        term.answer(r"Region name \(leave empty when done\): ", "eu")
        term.answer(r"control URL of eu \(http://HOST:PORT\): ", "ftp://nowhere")
        term.expect(r"expected http://HOST:PORT or https://HOST:PORT; try again")
        term.answer(r"control URL of eu .*: ", world.eu.control_url)
        term.answer(r"token file of eu: ", "missing.token")
        term.expect(r"cannot read missing.token: No such file or directory; try again")
        term.answer(r"token file of eu: ", str(eu_token))
        term.answer(r"gateway URLs of eu \(comma-separated\): ", world.eu.gateway_url)
        term.answer(r"Region name \(leave empty when done\): ", "")
        term.answer(r"Write the cluster file to \[nimbus.cluster.yaml\]: ", "")
        term.answer(r"comma-separated\) \[eu\]: ", "")
        term.answer(r"Routing policy .*\[failover\]: ", "")
        term.answer(r"Deploy this plan\? \[Y/n\]: ", "n")
        term.expect(r"nothing deployed; nothing saved")
        assert term.wait() == 0
    finally:
        term.close()
    written = load_cluster(folder / "nimbus.cluster.yaml")
    assert written.names == ("eu",)
    assert written.regions["eu"] == world.cluster.regions["eu"]
    assert "token_file: ../ops/eu.token" in (folder / "nimbus.cluster.yaml").read_text()
    assert not (app / "nimbus.toml").exists()
