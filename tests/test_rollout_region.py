"""A rollout in a region runs on the controller leader: SIGKILLed mid-rollout,
the standby takes the lead and continues from the step the rollout record
says, judging the same windows (their start counters are in the record).
One region (two controllers, one worker, one gateway) for the module."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.region import Region, wait_until

HANDLER = """\
def handler(event, context):
    return {{"statusCode": 200, "body": {version!r}}}
"""
MANIFEST = """\
name: roll
functions:
  roll:
    handler: h.handler
    http: [{method: GET, path: /roll}]
"""


def write_app(root: Path, version: str) -> Path:
    app = root / version / "roll"
    app.mkdir(parents=True)
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLER.format(version=version))
    return app


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    root = tmp_path_factory.mktemp("rollregion")
    r = Region(write_app(root, "v1"), root / "state", workers=1, gateways=1, controllers=2)
    yield r
    r.stop()


def rollout(region: Region, url: str) -> dict[str, Any]:
    r = region.control("GET", "/v1/functions/roll/rollout", url=url)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


METER = """\
name: meter
functions:
  meter:
    handler: m.handler
    http: [{method: GET, path: /meter}]
"""


def test_a_deploy_on_the_standby_sees_the_leaders_traffic_figures(region: Region,
                                                                    tmp_path: Path) -> None:
    """What takes real traffic is measured by the leader and published, so a
    deploy answered by the standby controller defaults to a canary too."""
    def app(body: str) -> Path:
        folder = tmp_path / body / "meter"
        folder.mkdir(parents=True)
        (folder / "app.yaml").write_text(METER)
        (folder / "m.py").write_text(HANDLER.format(version=body))
        return folder

    r = region.cli("deploy", str(app("m1")))
    assert r.returncode == 0, r.stderr
    leader = region.status()["leader"]
    standby = next(p for p in region.processes("controller") if p["id"] != leader)
    sent = 0
    with httpx.Client(base_url=region.gateway_urls[0], timeout=10) as c:
        # several of the leader's samples (every 5 s) and a publication: on a
        # busy machine a sample whose scrape misses a process is skipped
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert c.get("/meter").text == "m1"
            sent += 1
            time.sleep(0.02)
    assert sent >= 150, sent
    r = region.cli("deploy", str(app("m2")), "--url", standby["url"])
    assert r.returncode == 0, r.stderr
    assert "rolling out over version 1 with canary:10%:1m" in r.stdout, r.stdout
    assert "takes real traffic" in r.stdout, r.stdout
    ro = rollout_of(region, "meter", standby["url"])
    assert (ro["state"], ro["strategy"]) == ("running", "canary:10%:1m"), ro
    r = region.cli("rollback", "meter", "--url", standby["url"])
    assert r.returncode == 0, r.stderr
    assert rollout_of(region, "meter", standby["url"])["state"] == "rolled_back"


def rollout_of(region: Region, fn: str, url: str) -> dict[str, Any]:
    r = region.control("GET", f"/v1/functions/{fn}/rollout", url=url)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_the_standby_leader_continues_a_rollout(region: Region, tmp_path: Path) -> None:
    stop = threading.Event()
    codes: list[tuple[int, str]] = []

    def load() -> None:
        with httpx.Client(base_url=region.gateway_urls[0], timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.get("/roll")
                    codes.append((r.status_code, r.text))
                except httpx.HTTPError as exc:
                    codes.append((0, repr(exc)))
                time.sleep(0.005)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        r = region.cli("deploy", str(write_app(tmp_path, "v2")), "--strategy",
                       "linear:25%:2s", "--min-requests", "5", "--rollback-on",
                       "error_rate > 2%")
        assert r.returncode == 0, r.stderr
        assert "rolling out over version 1 with linear:25%:2s" in r.stdout
        leader = region.status()["leader"]
        victim = next(p for p in region.processes("controller") if p["id"] == leader)
        other = next(p for p in region.processes("controller") if p["id"] != leader)
        # mid-rollout: once the first step has passed
        wait_until(lambda: rollout(region, other["url"])["step"] >= 1, 30,
                   "the first step passed")
        region.kill(victim["pid"])
        killed_step = rollout(region, other["url"])["step"]
        wait_until(lambda: rollout(region, other["url"])["state"] != "running", 60,
                   "the rollout finished under the new leader")
        ro = rollout(region, other["url"])
        assert region.status(other["url"])["leader"] == other["id"]
        wait_until(lambda: {text for _code, text in codes[-20:]} == {"v2"}, 15,
                   "only version 2 answering")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert ro["state"] == "promoted", ro
    steps = [(h["step"], h["share"], h["action"]) for h in ro["history"]]
    # each step exactly once, in order, none skipped, across the change of leader
    assert steps == [(0, 25, "start"), (0, 25, "promote"), (1, 50, "promote"),
                     (2, 75, "promote")], steps
    assert 1 <= killed_step <= 3
    assert [c for c in codes if c[0] != 200][:5] == []
    # the new leader's decisions are platform lines in the function's logs
    logs = region.cli("logs", "roll").stdout
    assert "rollout 1 -> 2 (linear:25%:2s): promoted: version 2 serves 100%" in logs, logs
