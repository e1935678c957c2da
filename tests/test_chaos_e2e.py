"""``nimbus chaos`` and ``nimbus demo regions`` for real: two ``nimbus up``
regions on 127.0.0.2 and 127.0.0.3 behind an edge, on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import alive, descendants
from tests.multiregion import RegionProc, free_port, regions, write_app, write_cluster_file

pytestmark = pytest.mark.e2e

APP = """\
name: shop
functions:
  hello:
    handler: h.hello
    http: [{method: GET, path: /hello}]
"""

HANDLERS = """\
def hello(event, context):
    return {"statusCode": 200, "body": "hello from " + context.invoked_function_arn}
"""


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer")


def stop_pid(pid: int, timeout_s: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("chaos")
    app = write_app(root / "shop", APP, "h", HANDLERS)
    with regions(root, app) as rs:
        cluster = write_cluster_file(root, rs)
        port = free_port("127.0.0.1")
        log = open(root / "edge.log", "wb")  # noqa: SIM115
        edge = subprocess.Popen(
            [sys.executable, "-m", "nimbus", "edge", "--cluster", str(cluster.path),
             "--host", "127.0.0.1", "--port", str(port), "--grace", "2"],
            stdout=log, stderr=log)  # a short drain: its stop is waited for below
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/_nimbus/health", edge)
            wait_http(url + "/hello", edge)
            yield {"root": root, "regions": rs, "cluster": cluster.path, "edge": url}
        finally:
            edge.terminate()
            edge.wait(15)
            log.close()
            for r in rs:  # a region chaos started again is no child of ours
                restarted_pid(r, stop=True)


def restarted_pid(r: RegionProc, stop: bool = False) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(orjson.loads((r.state / "control.json").read_bytes())["pid"])
        if pid != r.pid and alive(pid):
            if stop:
                stop_pid(pid)
            return pid
    return None


def chaos(world: dict[str, Any], *args: str,
          timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nimbus", "chaos", "--cluster", str(world["cluster"]),
         "--app", "shop", "--edge", world["edge"], "--json", *args],
        capture_output=True, text=True, timeout=timeout)


def test_a_region_killed_under_load_is_detected_and_brought_back(world: dict[str, Any]) -> None:
    eu = world["regions"][0]
    old = {eu.pid, *descendants(eu.pid)}
    out = chaos(world, "--duration", "6s", "--rate", "40", "--events", "region",
                "--min-success", "0.99")
    assert out.returncode in (0, 1), out.stderr
    report = orjson.loads(out.stdout)
    (ev,) = report["events"]
    # the region taking the traffic (eu: first in the file) was killed whole
    assert ev["kind"] == "region" and ev["region"] == "eu" and not ev["skipped"], ev
    assert eu.pid in ev["pids"] and len(ev["pids"]) > 1  # its zygote and instances too
    assert not any(alive(p) for p in old)
    assert ev["detection_s"] is not None and ev["detection_s"] <= 2.0, ev
    assert ev["recovery_s"] is not None and ev["recovery_s"] > ev["detection_s"]
    # it runs again, on its ports, with the same state
    (new,) = ev["restarted_pids"]
    assert restarted_pid(eu) == new
    assert httpx.get(eu.gateway_url + "/hello", timeout=10).status_code == 200
    req = report["requests"]
    assert req["scheduled"] == 240 and req["succeeded"] + req["failed"] == 240
    assert req["by_region"].get("us", 0) > 0, "the edge failed over"
    assert sum(req["failed_by_cause"].values()) == req["failed"]
    assert req["failed"] == 0, req["failed_by_cause"]
    # every async invocation the edge accepted is found in its region
    assert report["async"]["accepted"] > 0 and report["async"]["lost"] == []
    assert report["async"]["found"] == report["async"]["accepted"]
    assert report["goals_missed"] == [] and out.returncode == report["exit_code"] == 0
    assert "region" in out.stderr and "killed" in out.stderr


def test_exit_status_follows_min_success(world: dict[str, Any]) -> None:
    """Every request fails (a route the app does not have): below the goal,
    exit 1, the cause counted; the printed report says so."""
    out = subprocess.run(
        [sys.executable, "-m", "nimbus", "chaos", "--cluster", str(world["cluster"]),
         "--app", "shop", "--edge", world["edge"], "--duration", "1s", "--rate", "20",
         "--events", "worker", "--path", "/nope", "--min-success", "0.5"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    text = out.stdout
    assert "20 scheduled, 20 sent, 0 succeeded (0.0000%), 20 failed" in text
    assert re.search(r"^failed by cause  http_404( RouteNotFound)? 20$", text, re.M), text
    assert re.search(r"worker\s+eu .*skipped: a nimbus up region has no separate worker", text)
    assert "GOALS MISSED: success 0.0000% is below the goal 50.0000%" in text


@pytest.mark.parametrize(("args", "message"), [
    (("--edge", "http://10.1.2.3:8000"), "not on this machine's loopback"),
    (("--edge", "http://127.0.0.1:1", "--duration", "soon"), "--duration"),
    (("--edge", "http://127.0.0.1:1", "--events", "zone"), "unknown event 'zone'"),
])
def test_bad_options_are_refused(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    cluster = tmp_path / "nimbus.cluster.yaml"
    cluster.write_text("regions: {}\n")
    out = subprocess.run([sys.executable, "-m", "nimbus", "chaos", "--cluster", str(cluster),
                          "--app", "shop", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("nimbus: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr


def resolve(name: str, port: int) -> list[str]:
    """The A records of ``name`` from the DNS server on 127.0.0.1:``port``
    (it may need a moment to learn the apps and the regions' health)."""
    import dns.exception
    import dns.resolver

    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime = ["127.0.0.1"], port, 2.0
    deadline = time.monotonic() + 15
    while True:
        try:
            return sorted(r.address for r in res.resolve(name, "A"))
        except dns.exception.DNSException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_demo_regions_serves_through_its_edge_and_stops_on_sigint(tmp_path: Path) -> None:
    app = write_app(tmp_path / "shop", APP, "h", HANDLERS)
    err = open(tmp_path / "demo.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbus", "demo", "regions", str(app), "--dir",
         str(tmp_path / "demo"), "--edge-port", "0", "--dns-port", "0", "--region-port", "0",
         "--control-port", "0", "--containment", "rlimits"],
        stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    printed = b""
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while b"Ctrl-C" not in printed:
            assert proc.poll() is None and time.monotonic() < deadline, (
                printed.decode() + (tmp_path / "demo.err").read_text())
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                printed += os.read(proc.stdout.fileno(), 65536)
        text = printed.decode()
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 2
        edge = re.search(r"^edge\s+(http://\S+)", text, re.M)
        assert edge, text
        r = httpx.get(edge.group(1) + "/hello", timeout=10)
        assert r.status_code == 200 and r.headers["x-nimbus-region"] == "eu"
        assert ":eu:" in r.text
        assert re.search(rf"kill -9 {pids[0]}\b", text)
        assert "curl -si " + edge.group(1) + "/hello" in text
        assert (tmp_path / "demo" / "nimbus.cluster.yaml").exists()
        dns_line = re.search(r"^dns\s+127\.0\.0\.1:(\d+) .*zone nimbus\.internal", text, re.M)
        assert dns_line, text
        assert resolve("shop.nimbus.internal", int(dns_line.group(1))) == ["127.0.0.2"]
        everything = {pid for p in pids for pid in (p, *descendants(p))}
        # the printed kill line: the edge answers from us at once
        os.kill(pids[0], signal.SIGKILL)
        r = httpx.get(edge.group(1) + "/hello", timeout=10)
        assert r.status_code == 200 and r.headers["x-nimbus-region"] == "us"
        deadline = time.monotonic() + 10
        while "to start it again" not in (tmp_path / "demo.err").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        again = (tmp_path / "demo.err").read_text()
        assert f"region eu (pid {pids[0]}) exited" in again
        assert "--port 0" not in again.split("to start it again:")[1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0
        assert not any(alive(p) for p in everything)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err.close()
        for p in pids:
            stop_pid(p, 5)


def test_a_cluster_file_off_loopback_is_refused(tmp_path: Path) -> None:
    (tmp_path / "eu.token").write_text("t" * 40 + "\n")
    cluster = tmp_path / "nimbus.cluster.yaml"
    cluster.write_text("regions:\n  eu:\n    control: http://10.9.8.7:8081\n"
                       "    token_file: eu.token\n    gateways: [http://127.0.0.2:8080]\n")
    out = subprocess.run([sys.executable, "-m", "nimbus", "chaos", "--cluster", str(cluster),
                          "--app", "shop", "--edge", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "regions.eu.control" in out.stderr and "loopback" in out.stderr
    assert str(cluster) in out.stderr and "Traceback" not in out.stderr
