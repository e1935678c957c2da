"""A weighted alias in a region, set through a controller's API: every
gateway follows it and serves both versions from the workers' instances
(that placement counts every referenced version is checked in
test_traffic.py)."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.region import Region
from tests.test_aliases import write_app

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    root = tmp_path_factory.mktemp("aliases-region")
    app = root / "ab"
    app.mkdir()
    write_app(app, "one")
    r = Region(app, root / "state", workers=1, gateways=2, controllers=1)
    try:
        yield r
    finally:
        r.stop()


def served(url: str, n: int) -> collections.Counter[str]:
    with httpx.Client(base_url=url, timeout=30.0) as c:
        return collections.Counter(c.get("/api").text for _ in range(n))


def test_a_weighted_alias_keeps_both_versions_placed_and_served(region: Region,
                                                                 tmp_path: Path) -> None:
    app = tmp_path / "ab"
    app.mkdir()
    write_app(app, "two")
    p = region.cli("deploy", str(app))
    assert p.returncode == 0, p.stderr
    r = region.control("PUT", "/v1/functions/api/aliases/live",
                       json={"weights": {"1": 50, "2": 50}})
    assert r.status_code == 200, r.text
    assert r.json()["aliases"]["live"] == {"1": 50, "2": 50}
    deadline = time.monotonic() + 30
    while True:  # every gateway follows the record through its own watch
        seen = [served(url, 40) for url in region.gateway_urls]
        if all(set(s) == {"one:1", "two:2"} for s in seen):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    p = region.cli("versions", "api", "--json")
    assert p.returncode == 0, p.stderr
    shares = {v["version"]: v["shares"] for v in __import__("json").loads(p.stdout)["versions"]}
    assert shares == {2: {"live": 50}, 1: {"live": 50, "beta": 100}}
    r = region.control("POST", "/v1/functions/api/invoke", params={"qualifier": "beta"})
    assert r.json()["result"]["body"] == "one:1", r.text
