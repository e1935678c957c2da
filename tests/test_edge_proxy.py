"""The edge's HTTP handling in one process, against small stand-in gateways
on real loopback sockets: which failures move a request to the next region
and which do not, framing (HEAD, chunked, pipelining), the retry budget."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from nimbus.edge.health import HealthConfig
from nimbus.edge.server import Edge, EdgeConfig, gateway_failure

Handler = Callable[[str, str, bytes], tuple[int, list[tuple[str, str]], bytes]]


@dataclass(frozen=True)
class Region:
    name: str
    gateways: tuple[str, ...]


@dataclass(frozen=True)
class Cluster:
    regions: dict[str, Region]


class StubGateway:
    """Answers /_nimbus/health 200 and anything else through ``handler``;
    counts the requests it got (health probes aside)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[tuple[str, str, bytes]] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ")
                hs = dict(h.split(": ", 1) for h in headers if h)
                hs = {k.lower(): v for k, v in hs.items()}
                body = b""
                if "content-length" in hs:
                    body = await reader.readexactly(int(hs["content-length"]))
                elif hs.get("transfer-encoding") == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                if target == "/_nimbus/health":
                    status, rh, data = 200, [], b'{"status": "ok"}'
                else:
                    self.seen.append((method, target, body))
                    status, rh, data = self.handler(method, target, body)
                if status < 0:  # hang up without an answer
                    writer.transport.abort()
                    return
                if ("transfer-encoding", "chunked") in rh:
                    out = [f"HTTP/1.1 {status} X\r\n".encode()]
                    out += [f"{k}: {v}\r\n".encode() for k, v in rh]
                    out.append(b"\r\n")
                    for i in range(0, len(data), 3):
                        piece = data[i:i + 3]
                        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
                    out.append(b"0\r\n\r\n")
                    writer.write(b"".join(out))
                else:
                    rh = [*rh, ("content-length", str(len(data)))]
                    writer.write(f"HTTP/1.1 {status} X\r\n".encode()
                                 + b"".join(f"{k}: {v}\r\n".encode() for k, v in rh)
                                 + b"\r\n" + (b"" if method == "HEAD" else data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def kill(self) -> None:
        """Gone at once: no new connections, the open ones reset."""
        self.close()
        for w in self.writers:
            w.transport.abort()


def ok(region: str) -> Handler:
    def handler(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return 200, [("content-type", "application/json")], orjson.dumps(
            {"region": region, "body": len(body)})
    return handler


GATEWAY_503 = orjson.dumps({"errorType": "Unavailable", "errorMessage": "store down",
                            "requestId": "r1"})
FUNCTION_503 = orjson.dumps({"message": "my own 503"})
GW_MARK = ("x-nimbus-error", "gateway")  # what a gateway sets on its own failures


def run_edge(handlers: dict[str, Handler], test: Callable[[Edge, dict[str, StubGateway], str],
                                                          Awaitable[None]],
             **config: Any) -> None:
    async def main() -> None:
        stubs = {name: StubGateway(h) for name, h in handlers.items()}
        urls = {name: await s.start() for name, s in stubs.items()}
        cluster = Cluster({n: Region(n, (u,)) for n, u in urls.items()})
        health = HealthConfig(interval_s=0.05, timeout_s=0.2, fall=2, rise_s=0.5)
        edge = Edge(cluster, EdgeConfig(health=health, **config))
        host, port = await edge.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while edge.book.up_regions(loop.time()) != set(handlers) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        try:
            await test(edge, stubs, f"http://{host}:{port}")
        finally:
            await edge.stop(1.0)
            for s in stubs.values():
                s.close()

    asyncio.run(main())


def test_gateway_made_503_moves_an_idempotent_request_on_but_not_a_post() -> None:
    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return 503, [("content-type", "application/json"), GW_MARK], GATEWAY_503

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.put("/x", content=b"abc")
            assert r.status_code == 200 and r.json() == {"region": "us", "body": 3}
            assert r.headers["x-nimbus-region"] == "us"
            assert r.headers["x-nimbus-retried-from"] == "eu"
            r = await c.post("/x", content=b"abc")
            assert r.status_code == 502
            body = r.json()
            assert body["errorType"] == "RegionFailed" and body["region"] == "eu"
            assert "503 Unavailable" in body["errorMessage"]
            assert r.headers["x-nimbus-region"] == "eu"
            # an idempotency key makes a POST safe to send again
            r = await c.post("/x", content=b"abc", headers={"idempotency-key": "k1"})
            assert r.status_code == 200 and r.json()["region"] == "us"
        assert [m for m, _, _ in stubs["us"].seen] == ["PUT", "POST"]

    run_edge({"eu": eu, "us": ok("us")}, test)


def test_function_errors_and_throttles_are_answers_not_region_failures() -> None:
    answers = {"/mine": (503, FUNCTION_503), "/throttled": (429, orjson.dumps(
        {"errorType": "Throttled", "errorMessage": "slow down"})),
        "/died": (502, orjson.dumps({"errorType": "InstanceDied", "errorMessage": "x"})),
        # a function answering with the very body a gateway uses, but no mark
        "/lookalike": (503, GATEWAY_503)}

    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        status, data = answers[target]
        return status, [("content-type", "application/json")], data

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            for path, (status, data) in answers.items():
                for _ in range(6):   # more than a burst: still no health signal
                    r = await c.get(path)
                    assert r.status_code == status and r.content == data
                    assert r.headers["x-nimbus-region"] == "eu"
        assert stubs["us"].seen == []
        assert edge.book.region_up("eu", 0.0)

    run_edge({"eu": eu, "us": ok("us")}, test)


def test_a_burst_of_gateway_errors_takes_the_region_down() -> None:
    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return 503, [("content-type", "application/json"), GW_MARK], GATEWAY_503

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            for _ in range(5):
                assert (await c.get("/x")).headers["x-nimbus-region"] == "us"
            assert not edge.book.region_up("eu", 0.0)
            n = len(stubs["eu"].seen)
            r = await c.get("/x")
            assert r.headers["x-nimbus-region"] == "us" and "x-nimbus-retried-from" not in r.headers
            assert len(stubs["eu"].seen) == n

    run_edge({"eu": eu, "us": ok("us")}, test)


def test_a_refused_connection_moves_even_a_post_on() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{spare.getsockname()[1]}"
    spare.close()

    async def main() -> None:
        us = StubGateway(ok("us"))
        cluster = Cluster({"eu": Region("eu", (dead,)), "us": Region("us", (await us.start(),))})
        edge = Edge(cluster, EdgeConfig(health=HealthConfig(interval_s=10, rise_s=0)))
        host, port = await edge.start("127.0.0.1", 0)
        await asyncio.sleep(0.05)
        edge.book.probe_ok(dead, 0.001, 0.0)   # eu looks up: the POST goes there first
        try:
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
                r = await c.post("/x", content=b"once")
            assert r.status_code == 200 and r.headers["x-nimbus-retried-from"] == "eu"
            assert [m for m, _, _ in us.seen] == ["POST"]
            assert not edge.book.gateway_up(dead, 0.0)
        finally:
            await edge.stop(1.0)
            us.close()

    asyncio.run(main())


def test_reset_after_the_request_was_sent_is_502_for_a_post_and_retried_for_a_get() -> None:
    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return -1, [], b""

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/x", content=b"pay")
            assert r.status_code == 502 and r.json()["region"] == "eu"
            assert "reset" in r.json()["errorMessage"]
            assert stubs["us"].seen == []
            await wait_up(edge, "eu")
            r = await c.post("/x")                    # no body: still not to be run twice
            assert r.status_code == 502 and stubs["us"].seen == []
            await wait_up(edge, "eu")                  # probes still pass: back after rise
            r = await c.get("/x")
            assert r.status_code == 200 and r.headers["x-nimbus-region"] == "us"
            assert r.headers["x-nimbus-retried-from"] == "eu"

    run_edge({"eu": eu, "us": ok("us")}, test)


async def wait_up(edge: Edge, region: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not edge.book.region_up(region, 0.0):
        assert loop.time() < deadline, f"{region} not up again"
        await asyncio.sleep(0.02)


def test_retry_budget_exhausted_answers_502() -> None:
    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        return 503, [("content-type", "application/json"), GW_MARK], GATEWAY_503

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.get("/x")
            assert r.status_code == 502 and r.json()["errorType"] == "RegionFailed"
        assert stubs["us"].seen == [] and edge.budget.denied == 1

    run_edge({"eu": eu, "us": ok("us")}, test, retry_ratio=0.0, retry_min_per_s=0.0)


def test_head_chunked_and_pipelined_requests() -> None:
    def eu(method: str, target: str, body: bytes) -> tuple[int, list[Any], bytes]:
        if target == "/chunked":
            return 200, [("transfer-encoding", "chunked")], b"hello chunked world"
        return 200, [("x-path", target)], target.encode() * 2

    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.head("/h")
            assert r.status_code == 200 and r.headers["content-length"] == "4"
            assert r.content == b""
            r = await c.get("/chunked")
            assert r.content == b"hello chunked world"
            assert r.headers["transfer-encoding"] == "chunked"
            assert (await c.get("/after")).content == b"/after/after"
            r = await c.get("/_nimbus/nope")
            assert r.status_code == 404 and r.headers["x-nimbus-region"] == "edge"
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.get("/big-head", headers={"x-big": "a" * 70_000})
            assert r.status_code == 431 and r.json()["errorType"] == "HeadersTooLarge"
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(5)))
        data = b""
        while data.count(b"HTTP/1.1 200") < 5:
            data += await asyncio.wait_for(reader.read(65536), 5)
        positions = [data.index(b"/p%d/p%d" % (i, i)) for i in range(5)]
        assert positions == sorted(positions)
        reader2, writer2 = await asyncio.open_connection(host, int(port))
        writer2.write(b"GET / HTTP/1.1\r\nbad header: x\r\n\r\n")
        bad = await asyncio.wait_for(reader2.read(), 5)
        assert bad.startswith(b"HTTP/1.1 400") and b"BadRequest" in bad
        writer2.close()
        # Expect: 100-continue is answered by the edge; the body then goes through
        writer.write(b"PUT /e HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
                     b"expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert stubs["eu"].seen[-1] == ("PUT", "/e", b"hello")
        writer.close()

    run_edge({"eu": eu, "us": ok("us")}, test)


def heads_through_an_edge(send: Callable[[str, int], Awaitable[None]]) -> list[bytes]:
    """The request heads a gateway gets (health probes aside) while ``send``
    talks to an edge (host, port) in front of it."""
    got: list[bytes] = []

    async def main() -> None:
        async def gw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if b"/_nimbus/health" not in head:
                        got.append(head)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                writer.close()

        server = await asyncio.start_server(gw, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        edge = Edge(Cluster({"eu": Region("eu", (url,))}), EdgeConfig())
        host, port = await edge.start("127.0.0.1", 0)
        try:
            await send(host, port)
        finally:
            await edge.stop(1.0)
            server.close()

    asyncio.run(main())
    return got


def test_forwarded_for_and_hop_by_hop_headers() -> None:
    async def send(host: str, port: int) -> None:
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            await c.get("/a", headers={"x-forwarded-for": "10.0.0.1",
                                       "connection": "keep-alive, x-secret",
                                       "x-nimbus-invocation-type": "Event"})

    head = heads_through_an_edge(send)[0].lower()
    assert b"x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n" in head
    assert b"connection:" not in head and b"x-nimbus-invocation-type: event" in head


def test_header_names_are_forwarded_as_the_client_wrote_them() -> None:
    async def send(host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: shop\r\nX-Mixed-Case: 1\r\n"
                     b"x-lower: 2\r\nAUTHORIZATION: Bearer t\r\n"
                     b"X-Forwarded-For: 10.0.0.1\r\nConnection: keep-alive\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()

    lines = heads_through_an_edge(send)[0].split(b"\r\n")
    for line in (b"Host: shop", b"X-Mixed-Case: 1", b"x-lower: 2", b"AUTHORIZATION: Bearer t",
                 b"x-forwarded-for: 10.0.0.1, 127.0.0.1"):
        assert line in lines, (line, lines)
    assert not any(line.lower().startswith(b"connection:") for line in lines)


def test_gateway_failure_tells_gateway_errors_from_function_answers() -> None:
    mark = [(b"x-nimbus-error", b"gateway")]
    assert gateway_failure(503, mark, GATEWAY_503) == "Unavailable"
    assert gateway_failure(503, mark, orjson.dumps({"errorType": "Closed"})) == "Closed"
    assert gateway_failure(503, mark, b"not json") == "Unavailable"
    assert gateway_failure(500, mark, GATEWAY_503) is None
    # without the gateway's mark, the same body is a function's own answer
    assert gateway_failure(503, [], GATEWAY_503) is None
    assert gateway_failure(503, [], FUNCTION_503) is None
    assert gateway_failure(502, [], orjson.dumps({"errorType": "InstanceDied"})) is None


def test_cli_errors_name_the_file_and_exit_2(tmp_path: Any, capsys: Any,
                                             monkeypatch: Any) -> None:
    import pytest

    from nimbus.cli.main import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.argv", ["nimbus", "edge", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        return int(exit_.value.code or 0), capsys.readouterr().err

    code, err = run("--cluster", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml: no such cluster file" in err
    bad = tmp_path / "c.yaml"
    bad.write_text("regions:\n  eu:\n    control: http://127.0.0.2:1\n    token_env: EDGE_T\n"
                   "    gateways: [https://127.0.0.2:2]\n")
    monkeypatch.setenv("EDGE_T", "x")
    code, err = run("--cluster", str(bad))
    assert code == 2 and "plain http://" in err and "c.yaml" in err
    code, err = run("--cluster", str(bad), "--fall", "0")
    assert code == 2 and "--fall" in err


def test_a_stalled_response_and_an_http10_client() -> None:
    async def main() -> None:
        async def gw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if b"/_nimbus/health" in head:
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    elif b"/stall" in head:
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
                    else:
                        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                     b"5\r\nhello\r\n0\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                writer.close()

        server = await asyncio.start_server(gw, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        edge = Edge(Cluster({"eu": Region("eu", (url,))}), EdgeConfig(body_timeout_s=0.3))
        host, port = await edge.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)   # cut after the stall
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"part")
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /c HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)    # the close ends the body
            assert b"transfer-encoding" not in data.lower() and data.endswith(b"\r\n\r\nhello")
            writer.close()
        finally:
            await edge.stop(1.0)
            server.close()

    asyncio.run(main())


def test_a_reset_on_a_reused_connection_is_not_a_health_signal() -> None:
    """A gateway may drop a kept-alive connection (its own limits) just as a
    request goes out on it: that request moves on, the region stays up."""
    async def main() -> None:
        async def gw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served = 0
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if b"/_nimbus/health" not in head:
                        served += 1
                        if served == 2:          # the second request on this connection
                            writer.transport.abort()
                            return
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\neu")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                writer.close()

        eu_server = await asyncio.start_server(gw, "127.0.0.1", 0)
        us = StubGateway(ok("us"))
        cluster = Cluster({
            "eu": Region("eu", (f"http://127.0.0.1:{eu_server.sockets[0].getsockname()[1]}",)),
            "us": Region("us", (await us.start(),))})
        edge = Edge(cluster, EdgeConfig(health=HealthConfig(interval_s=0.05, rise_s=5)))
        host, port = await edge.start("127.0.0.1", 0)
        try:
            await wait_up(edge, "eu")
            await wait_up(edge, "us")
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
                assert (await c.get("/a")).content == b"eu"
                r = await c.get("/b")
                assert r.status_code == 200 and r.headers["x-nimbus-retried-from"] == "eu"
                assert edge.book.region_up("eu", 0.0)
                assert (await c.get("/c")).content == b"eu"
        finally:
            await edge.stop(1.0)
            eu_server.close()
            us.close()

    asyncio.run(main())


def test_a_region_with_one_gateway_left_keeps_its_traffic() -> None:
    async def main() -> None:
        a, b, us = StubGateway(ok("eu-a")), StubGateway(ok("eu-b")), StubGateway(ok("us"))
        cluster = Cluster({"eu": Region("eu", (await a.start(), await b.start())),
                           "us": Region("us", (await us.start(),))})
        # one probe round at the start, then none for 10 s: requests find the loss
        edge = Edge(cluster, EdgeConfig(health=HealthConfig(interval_s=10, rise_s=5)))
        host, port = await edge.start("127.0.0.1", 0)
        try:
            await wait_up(edge, "eu")
            await wait_up(edge, "us")
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
                # least in flight, first listed on a tie: sequential requests go to a
                assert {(await c.get("/x")).json()["region"] for _ in range(3)} == {"eu-a"}
                a.kill()
                await asyncio.sleep(0.01)
                got = [(await c.get("/x")) for _ in range(10)]
            # the first one found a refused, then went to eu's other gateway
            assert {r.json()["region"] for r in got} == {"eu-b"}
            assert got[0].headers["x-nimbus-retried-from"] == "eu"
            assert all("x-nimbus-retried-from" not in r.headers for r in got[1:])
            assert {r.headers["x-nimbus-region"] for r in got} == {"eu"}
            assert edge.book.region_up("eu", 0.0)
            assert not edge.book.gateway_up(edge.book.by_region["eu"][0].url, 0.0)
            assert us.seen == []
        finally:
            await edge.stop(1.0)
            for s in (a, b, us):
                s.close()

    asyncio.run(main())


def test_past_max_connections_the_longest_idle_makes_room() -> None:
    async def test(edge: Edge, stubs: dict[str, StubGateway], url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        conns = []
        for i in range(3):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /c%d HTTP/1.1\r\nhost: x\r\n\r\n" % i)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readuntil(b"}"), 5)
            conns.append((reader, writer))
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(conns[0][0].read(), 5) == b""   # the oldest idle: closed
        conns[1][1].write(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")   # the others go on
        assert (await asyncio.wait_for(conns[1][0].readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200")
        for _, w in conns:
            w.close()

    run_edge({"eu": ok("eu")}, test, max_connections=2)


def test_stop_ends_a_background_task_that_lost_its_cancellation() -> None:
    """A task that swallows a cancellation (as asyncio.wait_for can lose one
    on Python 3.11) is cancelled again: the edge stops, within its deadline."""
    async def main() -> float:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        edge = Edge(Cluster({"eu": Region("eu", (url,))}), EdgeConfig())
        await edge.start("127.0.0.1", 0)
        swallowed = 0

        async def stubborn() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    swallowed += 1
                    if swallowed > 1:
                        raise  # the second cancellation ends it

        edge.add_task(stubborn())
        await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        await edge.stop(0.1)
        server.close()
        assert swallowed == 2, swallowed
        return asyncio.get_running_loop().time() - t0

    took = asyncio.run(main())
    assert took < 5.0, f"stop took {took:.1f} s"
