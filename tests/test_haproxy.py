"""``nimbus edge --emit haproxy``: the configuration is valid for Debian's
HAProxy and, run by it in front of two real regions, keeps GETs answered
when the first region is killed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nimbus.dns.apps import AppInfo
from nimbus.edge.haproxy import EmitOptions, path_regex, render
from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry
from tests.edgeworld import stop_process
from tests.multiregion import (
    RegionProc,
    free_port,
    regions,
    shared_file,
    write_app,
    write_cluster_file,
)

HAPROXY = "/usr/sbin/haproxy"
APP = """\
name: shop
runtime: python3.11
regions: {names: [eu, us], policy: failover}
functions:
  hello:
    handler: hello.hello
    http: [{method: GET, path: /hello}, {method: POST, path: /hello},
           {method: GET, path: "/items/{id}"}]
"""
CODE = """\
import os, time
RUNS = {runs!r}
def hello(event, context):
    sleep = float((event.get("queryStringParameters") or {{}}).get("sleep", 0))
    if sleep:
        with open(RUNS, "a") as f:
            f.write(event["requestContext"]["http"]["method"] + "-" + os.environ["AWS_REGION"]
                    + "\\n")
    time.sleep(sleep)
    return {{"statusCode": 200, "body": os.environ["AWS_REGION"]}}
"""


def check_config(path: Path) -> None:
    done = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------ pure rendering

def _cluster(*regions: tuple[str, int]) -> ClusterFile:
    return ClusterFile(Path("nimbus.cluster.yaml"), {
        name: RegionEntry(name, f"http://127.0.0.{i + 2}:8081", "t",
                          tuple(f"http://127.0.0.{i + 2}:{9000 + j}" for j in range(n)))
        for i, (name, n) in enumerate(regions)})


def _servers(text: str, backend: str) -> list[str]:
    block = text.split(f"backend {backend}\n")[1].split("\n\n")[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("server ")]


def test_render_maps_each_policy_and_haproxy_accepts_it(tmp_path: Path) -> None:
    cluster = _cluster(("eu", 2), ("us", 1), ("ap", 1))
    apps = [
        AppInfo("shop", RegionsSpec(("us", "eu"), "failover"), 1, frozenset({"eu", "us"}),
                (("GET", "/items/{id}"), ("POST", "/orders"))),
        AppInfo("split", RegionsSpec(("eu", "us"), "weighted", {"eu": 80, "us": 20}), 1,
                frozenset({"eu", "us"}), (("GET", "/files/{path+}"),)),
        AppInfo("near", RegionsSpec(None, "latency"), 1, frozenset({"eu"}), ()),
        AppInfo("plain", None, 1, frozenset({"eu"}), (("GET", "/a.b"),)),
    ]
    text = render(cluster, apps, EmitOptions("127.0.0.1", 18080))
    assert _servers(text, "app_shop") == [
        "server us.1 127.0.0.3:9000", "server eu.1 127.0.0.2:9000 backup",
        "server eu.2 127.0.0.2:9001 backup"]
    # 80/20 between regions: eu's two servers weigh 256 each, us's one 128
    assert _servers(text, "app_split") == [
        "server eu.1 127.0.0.2:9000 weight 256", "server eu.2 127.0.0.2:9001 weight 256",
        "server us.1 127.0.0.3:9000 weight 128"]
    near = text.split("backend app_near\n")[1].split("\n\n")[0]
    assert "balance leastconn" in near and "backup" not in near
    assert [s.split()[1] for s in _servers(text, "app_plain")] == ["eu.1", "eu.2", "us.1", "ap.1"]
    assert _servers(text, "app_plain")[2].endswith("backup")
    assert "option httpchk GET /_nimbus/health" in text
    assert "fall 2 rise 12" in text and "inter 250ms" in text
    assert "observe layer4 error-limit 1 on-error mark-down" in text
    assert "retry-on conn-failure empty-response response-timeout 502 503" in text
    assert "http-request disable-l7-retry unless idempotent || has_idempotency_key" in text
    assert "acl host_shop hdr_beg(host) -i shop." in text
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    check_config(cfg)


def test_route_paths_become_anchored_regexes() -> None:
    assert path_regex("/items/{id}") == "'^/items/[^/]+$'"
    assert path_regex("/files/{path+}") == "'^/files/.+$'"
    assert path_regex("/a.b/{x}/c") == r"'^/a\.b/[^/]+/c$'"
    assert path_regex("/it's") == r"'^/it\x27s$'"


# -------------------------------------------------- HAProxy in front of regions

class HaproxyProc:
    def __init__(self, cfg: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._out = open(log, "wb")  # noqa: SIM115
        self.log = log
        self.proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=self._out,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(self.url + "/hello", timeout=1).text == "eu":
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not serve:\n{log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, self._out, 10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[RegionProc],
                                                                      HaproxyProc, str, Path]]:
    root = tmp_path_factory.mktemp("haproxy")
    runs = shared_file(root / "runs.txt")
    app = write_app(root / "shop", APP, "hello", CODE.format(runs=str(runs)))
    with regions(root, app) as started:
        cluster = write_cluster_file(root, started)
        port = free_port("127.0.0.1")
        emitted = subprocess.run(
            [sys.executable, "-m", "nimbus", "edge", "--cluster", str(cluster.path),
             "--emit", "haproxy", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=60)
        assert emitted.returncode == 0, emitted.stderr
        cfg = root / "haproxy.cfg"
        cfg.write_text(emitted.stdout)
        check_config(cfg)
        proxy = HaproxyProc(cfg, port, root / "haproxy.out")
        try:
            yield started, proxy, emitted.stdout, runs
        finally:
            proxy.stop()


def test_the_emitted_configuration_names_both_regions(
        world: tuple[list[RegionProc], HaproxyProc, str, Path]) -> None:
    started, _proxy, text, _runs = world
    eu, us = started
    assert _servers(text, "app_shop") == [f"server eu.1 {eu.gateway_url[7:]}",
                                          f"server us.1 {us.gateway_url[7:]} backup"]
    assert "'^/hello$'" in text and "'^/items/[^/]+$'" in text


def test_requests_route_by_host_and_path(
        world: tuple[list[RegionProc], HaproxyProc, str, Path]) -> None:
    _started, proxy, _text, _runs = world
    by_host = httpx.get(proxy.url + "/hello", headers={"host": "shop.example.internal"})
    assert by_host.status_code == 200 and by_host.text == "eu"
    assert by_host.headers["x-nimbus-region"] == "eu"
    assert httpx.get(proxy.url + "/items/7").text == "eu"
    assert httpx.get(proxy.url + "/nothing-here").status_code == 503
    assert httpx.get(proxy.url + "/_nimbus/health").status_code == 200


def test_gets_keep_succeeding_when_the_first_region_is_killed(
        world: tuple[list[RegionProc], HaproxyProc, str, Path]) -> None:
    """GETs in flight and after are answered (by us); POSTs in flight are
    not sent again (HAProxy answers 502) and ran once."""
    started, proxy, _text, runs = world
    results: list[tuple[float, int | str, str]] = []
    slow: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def slow_request(method: str) -> None:
        r = httpx.request(method, proxy.url + "/hello?sleep=2", timeout=30)
        slow.append((method, r.status_code, r.text))

    def load() -> None:
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.get("/hello")
                    results.append((sent, r.status_code, r.text))
                except httpx.HTTPError as exc:
                    results.append((sent, "error", str(exc)))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    slow_threads = [threading.Thread(target=slow_request, args=(m,))
                    for m in ("GET", "GET", "POST", "POST")]
    for t in slow_threads:
        t.start()
    deadline = time.monotonic() + 20
    # a few answers well before the kill (the load threads may start slowly
    # on a busy machine), and all four slow requests running in eu
    while len(results) < 5 or time.monotonic() - results[0][0] < 0.3 or sorted(
            runs.read_text().split()) != ["GET-eu", "GET-eu", "POST-eu", "POST-eu"]:
        assert time.monotonic() < deadline, runs.read_text()    # all four running in eu
        time.sleep(0.02)
    started[0].kill()
    killed = time.monotonic()
    for t in slow_threads:
        t.join(30)
    time.sleep(max(0.0, killed + 1.5 - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(30)
    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
    # failover: eu (the first region) served before the kill; a busy machine
    # can fail a health check or two (300 ms deadline), moving some to us
    before = Counter(text for sent, _status, text in results if sent < killed - 0.1)
    assert before["eu"] > before["us"] and set(before) <= {"eu", "us"}, before
    after = Counter(text for sent, _status, text in results if sent > killed)
    assert set(after) == {"us"}, after
    outcomes = sorted((m, status, text if status == 200 else "") for m, status, text in slow)
    assert outcomes == [("GET", 200, "us"), ("GET", 200, "us"), ("POST", 502, ""),
                        ("POST", 502, "")], slow
    # the GETs ran again in us; the POSTs never did
    assert sorted(runs.read_text().split()) == ["GET-eu", "GET-eu", "GET-us", "GET-us",
                                                "POST-eu", "POST-eu"]


def test_emit_with_no_region_answering_is_one_line(tmp_path: Path) -> None:
    closed = free_port("127.0.0.1")
    cluster = tmp_path / "nimbus.cluster.yaml"
    cluster.write_text(f"regions:\n  eu:\n    control: http://127.0.0.1:{closed}\n"
                       f"    token_file: eu.token\n    gateways: [http://127.0.0.1:{closed}]\n")
    (tmp_path / "eu.token").write_text("t" * 40 + "\n")
    (tmp_path / "eu.token").chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "nimbus", "edge", "--cluster", str(cluster),
                           "--emit", "haproxy"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.startswith("nimbus: error: no region answered GET /v1/apps (eu: ")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
