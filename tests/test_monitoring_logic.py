"""Monitoring's pure parts: the edge's detection times and families, who
may read them, and the file_sd targets made from a status. No sleeping:
``now`` is passed in."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import nimbus.cli.edge
import nimbus.cli.metrics  # noqa: F401 - registers nimbus metrics
from nimbus.cli.main import cli
from nimbus.edge.health import ERROR_BURST, HealthBook, HealthConfig
from nimbus.edge.metrics import EdgeMetrics, MetricsAuth
from nimbus.edge.server import Edge, EdgeConfig
from nimbus.multiregion.clusterfile import RegionEntry, write_cluster
from nimbus.observe.targets import TargetError, edge_target, file_sd, from_status, render, target


@dataclass(frozen=True)
class Region:
    name: str
    gateways: tuple[str, ...]


@dataclass(frozen=True)
class Cluster:
    regions: dict[str, Region]


EU1, EU2, US1 = "http://127.0.0.2:1", "http://127.0.0.2:2", "http://127.0.0.3:1"
CLUSTER = Cluster({"eu": Region("eu", (EU1, EU2)), "us": Region("us", (US1,))})
CFG = HealthConfig(interval_s=0.25, timeout_s=0.3, fall=2, rise_s=3.0)


def book_all_up() -> tuple[HealthBook, list[tuple[str, float]]]:
    book = HealthBook(CLUSTER, CFG, 0.0)
    for gw in (EU1, EU2, US1):
        book.probe_ok(gw, 0.001, 0.0)
    downs: list[tuple[str, float]] = []
    book.on_region_down.append(lambda region, s: downs.append((region, s)))
    return book, downs


def test_detection_runs_from_the_first_failed_probe_to_down() -> None:
    book, downs = book_all_up()
    book.probe_failed(US1, "timeout", 10.0)
    book.probe_failed(US1, "timeout", 10.25)   # fall=2: down now
    assert downs == [("us", 0.25)]
    # the same region down again later: a second observation, from its own first failure
    for t in (11.0, 12.0, 13.0, 14.0, 15.0):
        book.probe_ok(US1, 0.001, t)
    assert book.region_up("us", 15.0)
    book.probe_failed(US1, "timeout", 20.0)
    book.probe_ok(US1, 0.001, 20.25)           # a good probe forgets the failure
    book.probe_failed(US1, "timeout", 21.0)
    book.passive_failure(US1, "connection refused", 21.1)
    assert len(downs) == 2 and downs[1][0] == "us"
    assert downs[1][1] == pytest.approx(0.1)


def test_a_refused_request_is_detected_at_once_and_a_region_is_down_with_its_last_gateway(
        ) -> None:
    book, downs = book_all_up()
    book.passive_failure(EU1, "connection refused", 5.0)
    assert downs == []                         # EU2 still up: the region is up
    book.probe_failed(EU2, "timeout", 6.0)
    book.passive_failure(EU2, "connection refused", 6.5)
    assert downs == [("eu", 0.5)]              # from EU2's own first failure
    book.passive_failure(EU2, "connection refused", 7.0)
    assert downs == [("eu", 0.5)]              # already down: no second observation


def test_a_burst_of_gateway_errors_counts_from_its_first() -> None:
    book, downs = book_all_up()
    for i in range(ERROR_BURST):
        book.gateway_error(US1, "503 NoInstance", 1.0 + i * 0.1)
    assert [r for r, _ in downs] == ["us"] and downs[0][1] == pytest.approx(0.4)


def families(metrics: EdgeMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_edge_families_read_the_book_and_the_counters() -> None:
    book, _ = book_all_up()
    m = EdgeMetrics(("eu", "us"), book)
    m.requests["eu"][200] = 7
    m.requests["eu"][503] = 1
    m.requests[""][502] = 2
    m.retries["eu"] = 3
    m.failovers["eu"] = 2
    book.probe_failed(US1, "timeout", 1.0)
    book.probe_failed(US1, "timeout", 1.5)
    f = families(m)
    assert f["nimbus_edge_region_up"] == {(("region", "eu"),): 1.0, (("region", "us"),): 0.0}
    assert f["nimbus_edge_requests_total"] == {
        (("code", "200"), ("region", "eu")): 7.0, (("code", "503"), ("region", "eu")): 1.0,
        (("code", "502"), ("region", "")): 2.0}
    assert f["nimbus_edge_retries_total"] == {(("region", "eu"),): 3.0,
                                              (("region", "us"),): 0.0}
    assert f["nimbus_edge_failovers_total"] == {(("region", "eu"),): 2.0,
                                                (("region", "us"),): 0.0}
    assert f["nimbus_edge_detection_seconds_count"] == {(("region", "eu"),): 0.0,
                                                        (("region", "us"),): 1.0}
    assert f["nimbus_edge_detection_seconds_sum"][(("region", "us"),)] == 0.5
    assert f["nimbus_edge_detection_seconds_bucket"][(("le", "0.25"), ("region", "us"))] == 0
    assert f["nimbus_edge_detection_seconds_bucket"][(("le", "0.5"), ("region", "us"))] == 1
    assert f["nimbus_memory_pss_bytes"][(("kind", "platform"), ("region", ""),
                                         ("role", "edge"))] > 0
    assert "process_cpu_seconds_total" in f
    # a second edge in the same process counts apart
    other = families(EdgeMetrics(("eu", "us"), book_all_up()[0]))
    assert other["nimbus_edge_failovers_total"][(("region", "eu"),)] == 0.0


TOKEN = "a-metrics-token-of-some-length"


@pytest.mark.parametrize(("token", "host", "headers", "expect"), [
    (None, "127.0.0.1", [], None),
    (None, "::1", [], None),
    (None, "localhost", [], None),
    (None, "0.0.0.0", [], 403),
    (None, "10.1.2.3", [(b"authorization", b"Bearer " + TOKEN.encode())], 403),
    (TOKEN, "0.0.0.0", [(b"authorization", b"Bearer " + TOKEN.encode())], None),
    (TOKEN, "0.0.0.0", [(b"authorization", b"bearer " + TOKEN.encode())], None),
    (TOKEN, "127.0.0.1", [], 401),
    (TOKEN, "0.0.0.0", [(b"authorization", b"Bearer " + TOKEN.encode() + b"x")], 401),
    (TOKEN, "0.0.0.0", [(b"authorization", b"Basic " + TOKEN.encode())], 401),
])
def test_who_may_read_the_edge_metrics(token: str | None, host: str,
                                       headers: list[tuple[bytes, bytes]],
                                       expect: int | None) -> None:
    denied = MetricsAuth(token, host).check(headers)
    assert (denied[0] if denied else None) == expect
    if expect == 403:
        assert denied is not None and "--metrics-token-file" in denied[1] and host in denied[1]


UP_STATUS = {"region": "eu", "pid": 10, "control_url": "http://127.0.0.2:8081",
             "gateway_url": "http://127.0.0.2:8080", "functions": []}
REGION_STATUS = {
    "mode": "region", "region": "us", "control_url": "http://10.0.0.1:8081",
    "nodes": [
        {"role": "controller", "id": "c1", "url": "http://10.0.0.1:8081"},
        {"role": "controller", "id": "c2", "url": "http://10.0.0.2:8081",
         "metrics": "http://10.0.0.2:8081"},
        {"role": "worker", "id": "w1", "url": "tcp://10.0.0.3:7000",
         "metrics": "http://10.0.0.3:9101"},
        {"role": "worker", "id": "w2", "metrics": "http://10.0.0.4:9101"},
        {"role": "worker", "id": "w3"},                         # no metrics port: left out
        {"role": "gateway", "id": "g1", "url": "http://10.0.0.5:8080",
         "metrics": "https://[fd00::5]:9102"},
        {"role": "gateway", "id": "g2", "metrics": "http://10.0.0.6:9102/x"},  # not a base URL
    ]}


def test_targets_of_a_nimbus_up() -> None:
    found, warnings = from_status(UP_STATUS, "http://ignored:1")
    assert warnings == []
    assert file_sd(found) == [{"targets": ["127.0.0.2:8081"],
                               "labels": {"role": "up", "region": "eu"}}]


def test_targets_of_a_region_group_by_role_and_say_what_is_left_out() -> None:
    found, warnings = from_status(REGION_STATUS, "http://10.0.0.1:8081")
    assert file_sd(found) == [
        {"targets": ["10.0.0.1:8081", "10.0.0.2:8081"],
         "labels": {"role": "controller", "region": "us"}},
        {"targets": ["[fd00::5]:9102"],
         "labels": {"role": "gateway", "region": "us", "__scheme__": "https"}},
        {"targets": ["10.0.0.3:9101", "10.0.0.4:9101"],
         "labels": {"role": "worker", "region": "us"}},
    ]
    assert warnings == [
        "region us: worker w3 lists no metrics URL; left out",
        "region us: gateway g2: 'http://10.0.0.6:9102/x': expected a base URL "
        "(http://HOST:PORT), no path; left out"]


def test_a_loopback_metrics_url_in_a_region_reached_from_afar_is_named() -> None:
    status = {"mode": "region", "region": "us", "nodes": [
        {"role": "controller", "id": "c1", "metrics": "http://10.0.0.1:8081"},
        {"role": "worker", "id": "w1", "metrics": "http://127.0.0.1:9101"}]}
    found, warnings = from_status(status, "http://10.0.0.1:8081")
    assert len(found) == 2
    assert warnings == ["region us: worker w1 serves metrics at http://127.0.0.1:9101, a "
                        "loopback address, though the region answers at http://10.0.0.1:8081: "
                        "a Prometheus on another machine cannot reach it (give the process "
                        "--metrics-host)"]
    # all on one machine: nothing to say
    assert from_status(status, "http://127.0.0.1:8081")[1] == []


def test_a_region_whose_nodes_list_no_controller_keeps_the_url_asked() -> None:
    found, _ = from_status({"mode": "region", "region": "us", "nodes": []},
                           "http://10.0.0.9:8081", "us")
    assert file_sd(found) == [{"targets": ["10.0.0.9:8081"],
                               "labels": {"role": "controller", "region": "us"}}]


def test_edges_and_the_rendered_file() -> None:
    found = [edge_target("http://127.0.0.1:8000/"), edge_target("http://127.0.0.5:8000"),
             target("http://127.0.0.2:8081", "eu", "up")]
    data = render(found)
    assert data == render(list(reversed(found)))           # same processes, same bytes
    assert orjson.loads(data) == [
        {"targets": ["127.0.0.1:8000", "127.0.0.5:8000"],
         "labels": {"role": "edge", "__metrics_path__": "/_nimbus/metrics"}},
        {"targets": ["127.0.0.2:8081"], "labels": {"role": "up", "region": "eu"}},
    ]
    for bad in ("ftp://x:1", "http://", "127.0.0.1:8000", "http://h:99999"):
        with pytest.raises(TargetError, match="expected|Port out of range"):
            edge_target(bad)


# -- the commands' own checks (in this process; nothing listens) ---------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])   # closed again: connections are refused


def cluster_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "asia.token").write_text("t" * 40 + "\n")
    control = f"http://127.0.0.1:{closed_port()}"
    path = tmp_path / "nimbus.cluster.yaml"
    write_cluster(path, [RegionEntry("asia", control, "", (f"http://127.0.0.1:{closed_port()}",))],
                  {"asia": "asia.token"})
    return path, control


def test_a_region_that_does_not_answer_keeps_its_control_url_and_is_named(
        tmp_path: Path) -> None:
    path, control = cluster_file(tmp_path)
    out = CliRunner().invoke(cli, ["metrics", "targets", "--cluster", str(path)])
    assert out.exit_code == 0, out.output
    assert orjson.loads(out.stdout) == [{"targets": [control.removeprefix("http://")],
                                         "labels": {"role": "controller", "region": "asia"}}]
    assert out.stderr.startswith(f"nimbus: warning: region asia: cannot reach {control}")


def test_edge_metrics_token_file_mistakes_are_usage_errors(tmp_path: Path) -> None:
    path, _ = cluster_file(tmp_path)
    (tmp_path / "short").write_text("abc\n")
    for token_file, why in (
            (tmp_path / "missing", "no such file"),
            (tmp_path / "short", "the token must be at least 16 printable characters "
                                 "without spaces")):
        out = CliRunner().invoke(cli, ["edge", "--cluster", str(path), "--port", "0",
                                       "--metrics-token-file", str(token_file)])
        assert out.exit_code == 2
        assert out.stderr == f"nimbus: error: --metrics-token-file {token_file}: {why}\n"


# -- the edge's counters on its request path (in this process, stub gateways) --------------

async def stub_gateway(answer: bytes) -> tuple[asyncio.Server, str]:
    """A gateway that answers probes 200 and every other request ``answer``."""
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
                             if b"/_nimbus/health" in head else answer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


GATEWAY_503 = (b"HTTP/1.1 503 Service Unavailable\r\nx-nimbus-error: gateway\r\n"
               b"content-length: 26\r\n\r\n" + b'{"errorType":"NoInstance"}')
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_edge_counts_answers_retries_and_failovers_on_its_request_path() -> None:
    async def main() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        eu_server, eu = await stub_gateway(GATEWAY_503)
        us_server, us = await stub_gateway(OK)
        edge = Edge(Cluster({"eu": Region("eu", (eu,)), "us": Region("us", (us,))}),
                    EdgeConfig(health=HealthConfig(interval_s=10, rise_s=0),
                               metrics_token=TOKEN))
        host, port = await edge.start("127.0.0.1", 0)
        try:
            for _ in range(100):
                if edge.book.up_regions(0.0) == {"eu", "us"}:
                    break
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
                # idempotent: eu's gateway could not serve it, us answers
                r = await c.get("/a")
                assert (r.status_code, r.headers["x-nimbus-retried-from"]) == (200, "eu")
                # not idempotent: it may have run in eu, so the client hears of it
                r = await c.post("/b")
                assert r.status_code == 502 and r.json()["region"] == "eu"
                assert (await c.get("/_nimbus/metrics")).status_code == 401
                r = await c.get("/_nimbus/metrics",
                                headers={"authorization": f"Bearer {TOKEN}"})
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain; version=")
        finally:
            await edge.stop(1.0)
            eu_server.close()
            us_server.close()
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    f = asyncio.run(main())
    assert f["nimbus_edge_requests_total"] == {(("code", "200"), ("region", "us")): 1.0,
                                               (("code", "502"), ("region", "eu")): 1.0}
    assert f["nimbus_edge_retries_total"] == {(("region", "eu"),): 1.0,
                                              (("region", "us"),): 0.0}
    assert f["nimbus_edge_failovers_total"] == {(("region", "eu"),): 1.0,
                                                (("region", "us"),): 0.0}
    assert f["nimbus_edge_region_up"] == {(("region", "eu"),): 1.0, (("region", "us"),): 1.0}
