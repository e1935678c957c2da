"""The dashboard on a region's controller: its history comes from scraping
the workers' and gateways' metrics ports (their node records) with the
region token, so the page counts what the workers ran."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.region import Region, small_region, wait_until
from tests.test_metrics_region import HANDLERS, MANIFEST
from tests.test_ui_browser import SHOTS

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    r = small_region(tmp_path_factory.mktemp("ui-region"), "counted", MANIFEST, HANDLERS)
    yield r
    r.stop()


def test_the_controller_dashboard_counts_what_the_workers_ran(region: Region) -> None:
    ctl = httpx.Client(base_url=region.control_urls[0], timeout=30.0)
    with ctl:
        assert ctl.get("/ui/api/overview").status_code == 401
        assert ctl.post("/ui/login", data={"token": region.token}).status_code == 303
        assert "nimbus_session" in ctl.cookies

        def row(name: str) -> dict[str, Any] | None:
            data = ctl.get("/ui/api/overview").json()
            assert data["region"] == "local"
            return next((f for f in data["functions"] if f["name"] == name), None)

        # every worker and gateway scraped: hi's instance is counted before any request
        wait_until(lambda: (r := row("hi")) and r["instances"] == 1, 30,
                   "hi's ready instance, scraped from the worker")
        assert row("hi")["invocations"] == 0  # type: ignore[index]
        with httpx.Client(base_url=region.gateway_urls[0], timeout=30.0) as gw:
            for _ in range(5):
                assert gw.get("/hi").status_code == 200
            for _ in range(2):
                assert gw.get("/oops").status_code == 500
        wait_until(lambda: (r := row("hi")) and r["invocations"] == 5, 30,
                   "hi's 5 invocations on the controller's dashboard")
        wait_until(lambda: (r := row("oops")) and r["errors"] == 2, 30, "oops's 2 errors")
        assert row("hi")["errors"] == 0  # type: ignore[index]
        detail = ctl.get("/ui/api/functions/hi").json()
        assert detail["totals"]["outcomes"]["success"] == 5
        assert [(v["version"], v["live"]) for v in detail["versions"]] == [(1, True)]
        # the page's control API calls: the session and the CSRF header
        assert ctl.get("/v1/status").status_code == 401
        status = ctl.get("/v1/status", headers={"x-nimbus-csrf": "1"})
        assert status.status_code == 200 and status.json()["mode"] == "region"
        # how the last scrape of each worker and gateway went
        ports = {n["metrics"] for n in status.json()["nodes"] if n["role"] != "controller"}
        scrapes = ctl.get("/ui/api/scrapes").json()
        assert set(scrapes) == ports and len(ports) == 2
        assert all(s["ok"] and s["error"] is None for s in scrapes.values())
    if SHOTS:
        screenshot_regions(region)


def screenshot_regions(region: Region) -> None:
    """The regions page of a region's controller, for the docs."""
    from types import SimpleNamespace

    from tests.test_ui_browser import shot, sign_in, start_browser, wait_text

    driver = start_browser()
    try:
        sign_in(driver, SimpleNamespace(control_url=region.control_urls[0]), region.token)
        driver.get(region.control_urls[0] + "/ui#/regions")
        wait_text(driver, "#nodes", lambda t: "ok" in t, "the nodes of the region")
        shot(driver, "regions-cluster")
    finally:
        driver.quit()
