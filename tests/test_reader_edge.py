"""Second reader, from README.md ("Several regions: the edge") and
docs/monitoring.md and docs/aws.md only: header names through a real
``nimbus edge`` in front of a real ``nimbus up`` region, and the edge's own
pages (``/_nimbus/regions`` and ``/_nimbus/metrics`` behind the
``--metrics-token-file`` token beyond loopback, ``/_nimbus/health`` open)."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from nimbus.multiregion.clusterfile import RegionEntry, write_cluster
from tests.edgeworld import EdgeProc, stop_process, wait_for
from tests.events_client import control, settled
from tests.multiregion import regions, write_app, write_cluster_file

APP = """\
runtime: python3.8
handlers:
  - {function: rest, handler: shop.echo, event: http, method: get, path: '/rest/{id}',
     payload: "1.0"}
  - {function: two, handler: shop.echo, event: http, method: get, path: '/two/{id}'}
"""
CODE = """\
import json

def echo(event, context):
    return {"statusCode": 200, "body": json.dumps(event)}
"""

HEAD = (b"Host: shop.example\r\nUser-Agent: raw/1\r\nX-Mixed-Case: a\r\nx-lower: b\r\n"
        b"X-Api-Key: k\r\nX-Twice: 1\r\nX-Twice: 2\r\n")


def _raw(url: str, method: str, target: str, head: bytes) -> tuple[bytes, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.settimeout(15)
        sock.sendall(method.encode() + b" " + target.encode() + b" HTTP/1.1\r\n" + head
                     + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    return top, rest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("reader-edge")
    app = write_app(root / "shop", APP, "shop", CODE)
    with regions(root, app, ("eu",)) as (eu,):
        cluster = write_cluster_file(root, [eu])
        edge = EdgeProc(cluster.path, root / "edge.out", 1.0)
        try:
            wait_for(lambda: all(r["up"] for r in edge.regions()["regions"].values()), 20,
                     "the region up")
            wait_for(lambda: "shop" in edge.regions()["apps"], 20, "the apps table")
            yield {"eu": eu, "edge": edge}
        finally:
            edge.stop()


def test_rest_event_through_the_edge_keeps_header_names(world: dict[str, Any]) -> None:
    top, body = _raw(world["edge"].url, "GET", "/rest/7", HEAD)
    assert top.startswith(b"HTTP/1.1 200"), top + body[:400]
    ev = orjson.loads(body)
    h, mv = ev["headers"], ev["multiValueHeaders"]
    assert {"User-Agent", "X-Mixed-Case", "x-lower", "X-Api-Key", "X-Twice"} <= set(h), h
    assert "x-mixed-case" not in h and "x-api-key" not in h
    assert h["X-Twice"] == "2" and mv["X-Twice"] == ["1", "2"]
    assert set(h) == set(mv)
    assert ev["pathParameters"] == {"id": "7"}


def test_http_api_event_through_the_edge_has_lower_names(world: dict[str, Any]) -> None:
    top, body = _raw(world["edge"].url, "GET", "/two/7", HEAD)
    assert top.startswith(b"HTTP/1.1 200"), top + body[:400]
    h = orjson.loads(body)["headers"]
    assert all(k == k.lower() for k in h), h
    assert h["x-mixed-case"] == "a" and h["x-api-key"] == "k" and h["x-twice"] == "1,2"


def test_async_rest_request_through_the_edge_keeps_header_names(world: dict[str, Any]) -> None:
    # README: async invocations pass through the edge untouched
    top, body = _raw(world["edge"].url, "GET", "/rest/8",
                     HEAD + b"x-nimbus-invocation-type: Event\r\n")
    assert top.startswith(b"HTTP/1.1 202"), top + body[:400]
    with control(world["eu"].nimbus) as ctl:
        rec = settled(ctl, json.loads(body)["invocationId"])
    ev = orjson.loads(rec["result"]["body"])
    assert {"X-Mixed-Case", "x-lower", "X-Api-Key"} <= set(ev["headers"]), ev["headers"]


def test_async_rest_request_through_the_edge_with_the_documented_spelling(
        world: dict[str, Any]) -> None:
    top, body = _raw(world["edge"].url, "GET", "/rest/8",
                     HEAD + b"X-Nimbus-Invocation-Type: Event\r\n")
    assert top.startswith(b"HTTP/1.1 202"), top + body[:400]


# --- the edge's own pages ---------------------------------------------------------


def _down_cluster(tmp_path: Path) -> Path:
    (tmp_path / "eu.token").write_text(secrets.token_urlsafe(32) + "\n")
    path = tmp_path / "nimbus.cluster.yaml"
    write_cluster(path, [RegionEntry("eu", "http://127.0.0.1:9", "",
                                     ("http://127.0.0.1:9",))], {"eu": "eu.token"})
    return path


@contextmanager
def edge(tmp_path: Path, host: str, *extra: str) -> Iterator[tuple[str, str]]:
    log = tmp_path / f"edge{len(list(tmp_path.glob('edge*.log')))}.log"
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbus", "edge", "--cluster", str(_down_cluster(tmp_path)),
         "--host", host, "--port", "0", "--grace", "1", "--no-converge", *extra],
        stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"serving http://" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = log.read_bytes().split(b"serving http://", 1)[1].split()[0].rsplit(b":", 1)[1]
        yield f"http://127.0.0.1:{port.decode()}", log.read_text()
    finally:
        stop_process(proc, out, 15, 5)


def _leaks(text: str) -> bool:
    """The regions page (its "order" of regions) or the metrics page."""
    return '"order"' in text or "nimbus_edge_" in text


SPELLINGS = ["/_nimbus/regions/", "/_nimbus/regions?x=1", "//_nimbus/regions",
             "/%5Fnimbus/regions", "/_nimbus/%72egions", "/_nimbus/./regions",
             "/x/../_nimbus/regions", "/_NIMBUS/regions", "/_nimbus//metrics",
             "/_nimbus/metrics?format=text", "/_nimbus/metrics/"]


def test_beyond_loopback_no_spelling_of_the_pages_answers_without_a_token(
        tmp_path: Path) -> None:
    with edge(tmp_path, "0.0.0.0") as (url, _):
        for target in SPELLINGS:
            top, body = _raw(url, "GET", target, b"Host: x\r\n")
            text = body.decode(errors="replace")
            assert not _leaks(text), (target, top, text[:300])
        for method in ("HEAD", "POST"):
            for path in ("/_nimbus/regions", "/_nimbus/metrics"):
                top, body = _raw(url, method, path, b"Host: x\r\nContent-Length: 0\r\n")
                assert top.split(b" ")[1] == b"403", (method, path, top)
                assert not _leaks(body.decode(errors="replace"))
        # absolute-form request target
        top, body = _raw(url, "GET", url + "/_nimbus/regions", b"Host: x\r\n")
        assert not _leaks(body.decode(errors="replace")), top
        assert httpx.head(url + "/_nimbus/health", timeout=5).status_code == 200


def test_with_a_token_file_head_and_bearer_spellings(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    (tmp_path / "edge.token").write_text(token + "\n")
    with edge(tmp_path, "0.0.0.0", "--metrics-token-file", str(tmp_path / "edge.token")) \
            as (url, _):
        for path in ("/_nimbus/regions", "/_nimbus/metrics"):
            assert httpx.head(url + path, timeout=5).status_code == 401
            assert httpx.head(url + path, timeout=5, headers={
                "Authorization": f"Bearer {token}"}).status_code == 200
            for bad in (f"Basic {token}", f"Bearer {token[:-1]}", "Bearer", token,
                        f"Bearer {token} x"):
                r = httpx.get(url + path, timeout=5, headers={"Authorization": bad})
                assert r.status_code == 401 and not _leaks(r.text), (path, bad, r.status_code)
        for target in SPELLINGS:
            top, body = _raw(url, "GET", target, b"Host: x\r\n")
            assert not _leaks(body.decode(errors="replace")), (target, top)
        assert httpx.get(url + "/_nimbus/health", timeout=5).status_code == 200


def test_an_empty_token_file_lets_nobody_in(tmp_path: Path) -> None:
    (tmp_path / "edge.token").write_text("\n")
    log = tmp_path / "empty.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nimbus", "edge", "--cluster", str(_down_cluster(tmp_path)),
             "--host", "0.0.0.0", "--port", "0", "--grace", "1", "--no-converge",
             "--metrics-token-file", str(tmp_path / "edge.token")],
            stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while b"serving http://" not in log.read_bytes() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            if proc.poll() is not None:  # refusing to start is fine
                assert proc.returncode != 0
                return
            port = log.read_bytes().split(b"serving http://0.0.0.0:", 1)[1].split()[0]
            url = f"http://127.0.0.1:{port.decode()}"
            for auth in (b"Bearer ", b"Bearer", b"", b"Bearer \t"):
                top, body = _raw(url, "GET", "/_nimbus/regions",
                                 b"Host: x\r\nAuthorization: " + auth + b"\r\n")
                assert top.split(b" ")[1] in (b"401", b"403", b"400"), (auth, top)
                assert not _leaks(body.decode(errors="replace")), (auth, body)
        finally:
            stop_process(proc, out, 15, 5)


def test_on_loopback_the_pages_are_open_without_a_token_file(tmp_path: Path) -> None:
    with edge(tmp_path, "127.0.0.1") as (url, _):
        for path in ("/_nimbus/regions", "/_nimbus/metrics"):
            assert httpx.get(url + path, timeout=5).status_code == 200, path


def test_on_loopback_a_token_file_still_asks_for_the_token(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    (tmp_path / "edge.token").write_text(token + "\n")
    with edge(tmp_path, "127.0.0.1", "--metrics-token-file", str(tmp_path / "edge.token")) \
            as (url, _):
        for path in ("/_nimbus/regions", "/_nimbus/metrics"):
            assert httpx.get(url + path, timeout=5).status_code == 401, path
            assert httpx.get(url + path, timeout=5, headers={
                "Authorization": f"Bearer {token}"}).status_code == 200, path


def test_another_loopback_address_is_loopback(tmp_path: Path) -> None:
    # 127.0.0.0/8 is loopback; the edge listens on 127.0.0.2 only
    with edge(tmp_path, "127.0.0.2") as (url, _):
        url = url.replace("127.0.0.1", "127.0.0.2")
        assert httpx.get(url + "/_nimbus/regions", timeout=5).status_code == 200


def test_a_region_failure_answer_does_not_name_the_gateway_url(tmp_path: Path) -> None:
    with edge(tmp_path, "0.0.0.0") as (url, _):
        r = httpx.get(url + "/anything", timeout=10)
        assert r.status_code == 502 and r.json()["errorType"] == "RegionFailed", r.text
        assert "127.0.0.1:9" not in r.text, r.text


def test_a_short_loopback_spelling_is_loopback(tmp_path: Path) -> None:
    with edge(tmp_path, "127.1") as (url, started):
        assert "not a loopback address" not in started
        assert httpx.get(url + "/_nimbus/regions", timeout=5).status_code == 200
