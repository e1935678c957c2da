"""A region's metrics: every worker and gateway serves ``GET /metrics`` on a
port of its own, named in its node record (and so in ``/v1/status``); the
controller on its control API. One small region for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.region import Region, small_region, wait_until

MANIFEST = """\
name: counted
functions:
  hi:
    handler: h.hi
    http: [{method: GET, path: /hi}]
  oops:
    handler: h.oops
    http: [{method: GET, path: /oops}]
"""

HANDLERS = """\
def hi(event, context):
    return {"statusCode": 200, "body": "hi"}

def oops(event, context):
    raise RuntimeError("oops")
"""


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    r = small_region(tmp_path_factory.mktemp("metrics-region"), "counted", MANIFEST, HANDLERS)
    yield r
    r.stop()


def scrape(url: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url + "/metrics", headers=headers, timeout=30)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_process_lists_and_serves_its_metrics(region: Region) -> None:
    nodes = wait_until(lambda: [n for n in region.status()["nodes"] if n.get("metrics")]
                       if all(n.get("metrics") for n in region.status()["nodes"]) else None,
                       30, "every node with its metrics URL")
    by_role = {n["role"]: n["metrics"] for n in nodes}
    assert set(by_role) == {"controller", "worker", "gateway"}
    assert by_role["controller"] == region.control_urls[0]
    for role, url in by_role.items():
        assert url.startswith("http://127.0.0.1:"), (role, url)
        assert scrape(url, None).status_code == 401, role
        assert scrape(url, "w" * 43).status_code == 401, role
        ok = scrape(url, region.token)
        assert ok.status_code == 200, role
        s = samples(ok.text)
        pss = [v for (name, labels), v in s.items() if name == "nimbus_memory_pss_bytes"
               and dict(labels) == {"region": "local", "role": role, "kind": "platform"}]
        assert pss and pss[0] > 0, role


def test_invocations_count_on_the_worker_and_requests_on_the_gateway(region: Region) -> None:
    nodes = {n["role"]: n["metrics"] for n in region.status()["nodes"]}
    worker, gateway = nodes["worker"], nodes["gateway"]

    def count(url: str, name: str, **labels: str) -> float:
        s = samples(scrape(url, region.token).text)
        return s.get((name, frozenset({"region": "local", **labels}.items())), 0.0)

    hi = {"function": "hi", "version": "1"}
    before = (count(worker, "nimbus_invocations_total", outcome="success", **hi),
              count(worker, "nimbus_invocations_total", function="oops", version="1",
                    outcome="error"),
              count(gateway, "nimbus_http_requests_total", function="hi", code="200"))
    with httpx.Client(base_url=region.gateway_urls[0], timeout=30) as c:
        for _ in range(5):
            assert c.get("/hi").status_code == 200
        for _ in range(2):
            assert c.get("/oops").status_code == 500
    after = (count(worker, "nimbus_invocations_total", outcome="success", **hi),
             count(worker, "nimbus_invocations_total", function="oops", version="1",
                   outcome="error"),
             count(gateway, "nimbus_http_requests_total", function="hi", code="200"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [5, 2, 5]
    assert count(worker, "nimbus_invocation_duration_seconds_count", **hi) == after[0]
    assert count(worker, "nimbus_instances_ready", **hi) == 1
    assert count(worker, "nimbus_cold_starts_total", **hi) == 1
    # the gateway decided nothing itself: no throttles, no lost workers
    assert count(gateway, "nimbus_invocations_total", outcome="throttled", **hi) == 0
    gw = samples(scrape(gateway, region.token).text)
    assert gw[("nimbus_held_requests", frozenset({"region": "local", **hi}.items()))] == 0


def test_open_metrics_is_refused_off_loopback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    import nimbus.cli.roles  # noqa: F401 - registers the region's commands
    from nimbus.cli.main import cli

    for role, host_opt in (("gateway", "--host"), ("worker", "--metrics-host"),
                           ("controller", "--control-host")):
        out = CliRunner().invoke(cli, [
            role, "--store", "nats://127.0.0.1:1", "--state-dir", str(tmp_path), host_opt,
            "0.0.0.0", "--metrics-auth", "open"])
        assert out.exit_code == 2, (role, out.output)
        assert "loopback" in out.output and "'0.0.0.0'" in out.output, role
        assert not (tmp_path / "node.json").exists()
