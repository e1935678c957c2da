"""The edge's operator pages on an address beyond loopback: ``/_nimbus/regions``
(every gateway's URL and last error) and ``/_nimbus/metrics`` ask for the
``--metrics-token-file`` token, and answer 403 naming the option when the
edge has none; ``/_nimbus/health`` stays open for load balancers. A real
``nimbus edge`` bound to 0.0.0.0, reached on 127.0.0.1 only."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from nimbus.multiregion.clusterfile import RegionEntry, write_cluster
from tests.edgeworld import stop_process


def _cluster(tmp_path: Path) -> Path:
    (tmp_path / "eu.token").write_text(secrets.token_urlsafe(32) + "\n")
    path = tmp_path / "nimbus.cluster.yaml"
    # nothing listens on port 9 of loopback: the region is simply down
    write_cluster(path, [RegionEntry("eu", "http://127.0.0.1:9", "",
                                     ("http://127.0.0.1:9",))], {"eu": "eu.token"})
    return path


@contextmanager
def edge(tmp_path: Path, *extra: str) -> Iterator[tuple[str, str]]:
    log = tmp_path / f"edge{len(list(tmp_path.glob('edge*.log')))}.log"
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbus", "edge", "--cluster", str(_cluster(tmp_path)),
         "--host", "0.0.0.0", "--port", "0", "--grace", "1", "--no-converge", *extra],
        stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"serving http://" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = log.read_bytes().split(b"serving http://0.0.0.0:", 1)[1].split()[0]
        yield f"http://127.0.0.1:{port.decode()}", log.read_text()
    finally:
        stop_process(proc, out, 15, 5)


def test_without_a_token_the_operator_pages_answer_403_beyond_loopback(tmp_path: Path) -> None:
    with edge(tmp_path) as (url, started):
        assert ("/_nimbus/metrics and /_nimbus/regions answer 403: --host 0.0.0.0 is not a "
                "loopback address") in started
        for path, what in (("/_nimbus/regions", "region views"), ("/_nimbus/metrics", "metrics")):
            r = httpx.get(url + path, timeout=5)
            assert r.status_code == 403, (path, r.text)
            body = r.json()
            assert body["errorType"] == "Forbidden"
            assert body["errorMessage"].startswith(f"{what} are served without a token only "
                                                   "on loopback; this edge listens on 0.0.0.0")
            assert "--metrics-token-file" in body["errorMessage"]
            assert "127.0.0.1:9" not in r.text, "no gateway URL leaks"
        health = httpx.get(url + "/_nimbus/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_with_a_token_the_operator_pages_need_it(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    (tmp_path / "edge.token").write_text(token + "\n")
    with edge(tmp_path, "--metrics-token-file", str(tmp_path / "edge.token")) as (url, _):
        for path in ("/_nimbus/regions", "/_nimbus/metrics"):
            assert httpx.get(url + path, timeout=5).status_code == 401
            wrong = httpx.get(url + path, timeout=5,
                              headers={"Authorization": f"Bearer {token}x"})
            assert wrong.status_code == 401
            ok = httpx.get(url + path, timeout=5, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200, ok.text
        regions = httpx.get(url + "/_nimbus/regions", timeout=5,
                            headers={"Authorization": f"Bearer {token}"}).json()
        assert regions["order"] == ["eu"]
        assert httpx.get(url + "/_nimbus/health", timeout=5).status_code == 200
