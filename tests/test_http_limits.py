"""Hostile clients against both HTTP ports of a real ``nimbus up``: slow
request heads, floods of half-open connections, oversized heads and bodies,
and handlers that return headers HTTP cannot carry.

One nimbus with small caps (gateway 20 connections, control API 8, head
deadline 2 s, keep-alive 1 s) so that a few hundred sockets are a flood.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e
T = TypeVar("T")

MB = 1024 * 1024
GATEWAY_CAP = 20
CONTROL_CAP = 8
HEADER_TIMEOUT_S = 2
KEEP_ALIVE_S = 1
BUNDLE_LIMIT = 8 * MB

MANIFEST = """\
name: limits
functions:
  hello:
    handler: h.hello
    http: [{method: GET, path: /hello}, {method: POST, path: /hello}]
  nap:
    handler: h.nap
    timeout_s: 20
    max_instances: 2
    concurrency: 10
    http: [{method: GET, path: /nap}]
  badhdr:
    handler: h.badhdr
    http: [{method: GET, path: /bad/{kind}}]
"""

HANDLERS = '''\
import time

BAD = {
    "name_newline": {"x-a\\n": "v"},
    "name_space": {"x a": "v"},
    "name_colon": {"x-a:": "v"},
    "value_soh": {"x-a": "a\\x01b"},
    "value_del": {"x-a": "a\\x7fb"},
    "value_lf": {"x-a": "a\\nb"},
    "value_trailing_newline": {"x-a": "v\\n"},
    "value_cr": {"x-a": "v\\rx-injected: 1"},
    "value_nul": {"x-a": "a\\x00b"},
    "cookie_ctl": None,
    "tab_ok": {"x-a": "a\\tb"},
}

def hello(event, context):
    return {"statusCode": 200, "body": "hello"}

def nap(event, context):
    time.sleep(float((event.get("queryStringParameters") or {}).get("s", "3")))
    return {"statusCode": 200, "body": "rested"}

def badhdr(event, context):
    kind = event["pathParameters"]["kind"]
    if kind == "cookie_ctl":
        return {"statusCode": 200, "cookies": ["a=b\\x01c"], "body": "x"}
    return {"statusCode": 200, "headers": BAD[kind], "body": "x"}
'''


@pytest.fixture(scope="module")
def nim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("limits")
    app = root / "limits"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLERS)
    n = Nimbus(app, root / "state", root / "state.out",
               "--max-connections", str(GATEWAY_CAP),
               "--control-max-connections", str(CONTROL_CAP),
               "--header-timeout", str(HEADER_TIMEOUT_S), "--keep-alive", str(KEEP_ALIVE_S),
               "--max-bundle-bytes", str(BUNDLE_LIMIT))
    try:
        yield n
    finally:
        n.stop()


def addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_rss_growth_kb(pid: int, fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and how far the process's RSS rose above its level before:
    the peak (VmHWM after resetting it through clear_refs, where allowed)
    and, in any case, VmRSS sampled every 2 ms while ``fn`` runs. Freed
    buffers leave RSS at once, so the level after is not enough."""
    before = status_kb(pid, "VmRSS")
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to VmRSS
        hwm = True
    except OSError:
        hwm = False
    samples = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(status_kb(pid, "VmRSS"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join(timeout=10)
    peak = max(samples + ([status_kb(pid, "VmHWM")] if hwm else []))
    return result, peak - before


def read_response(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout``)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def control_get(n: Nimbus, path: str, timeout: float = 10.0) -> httpx.Response:
    return httpx.get(n.control_url + path, headers={"Authorization": f"Bearer {n.token}"},
                     timeout=timeout)


class SlowHeadFlood:
    """``count`` connections per address, each sending one byte of a request
    head that never ends every ``interval_s``; closed ones are reopened."""

    HEAD = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000

    def __init__(self, addrs: list[tuple[str, int]], count: int,
                 interval_s: float = 0.5) -> None:
        self.slots: list[tuple[tuple[str, int], socket.socket | None, int]] = [
            (a, None, 0) for a in addrs for _ in range(count)]
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self, a: tuple[str, int]) -> socket.socket | None:
        try:
            s = socket.create_connection(a, timeout=1.0)
        except OSError:
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def _run(self) -> None:
        while not self.stop.is_set():
            for i, (a, s, sent) in enumerate(self.slots):
                if self.stop.is_set():
                    break
                if s is None:
                    s, sent = self._connect(a), 0
                if s is not None:
                    try:
                        s.send(self.HEAD[sent:sent + 1])
                        sent += 1
                    except OSError:  # closed by the server: open another
                        s.close()
                        s = None
                self.slots[i] = (a, s, sent)
            self.stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for _, s, _ in self.slots:
            if s is not None:
                s.close()


# -- floods and deadlines -----------------------------------------------------------


def test_a_slow_head_flood_on_both_ports_leaves_the_control_api_reachable(nim):
    gw, ctl = addr(nim.url), addr(nim.control_url)
    # 300 sockets at the gateway (cap 20) and 60 at the control API (cap 8)
    flood = SlowHeadFlood([gw] * 15 + [ctl] * 3, 20)
    started = time.monotonic()
    with flood:
        time.sleep(2.0)  # every slot has connected and sent a few bytes
        for _ in range(3):
            r = control_get(nim, "/v1/status")
            assert r.status_code == 200, r.text
            http = r.json()["http"]
            time.sleep(0.5)
        assert flood.opened > GATEWAY_CAP + CONTROL_CAP
        # the flood filled the gateway and made room on the control API by
        # closing the connections that waited longest for their heads
        assert http["gateway"]["connections"] >= GATEWAY_CAP - 1, http
        assert http["gateway"]["evicted"] + http["gateway"]["refused"] > 0, http
        assert http["control"]["evicted"] > 0, http
    deadline = time.monotonic() + 15
    while True:  # once the flood stops, the gateway answers again
        try:
            r = httpx.get(nim.url + "/hello", timeout=5.0)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway did not answer after the flood"
        time.sleep(0.2)
    assert r.text == "hello"
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("port", ["gateway", "control"])
def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_deadline(nim, port):
    a = addr(nim.url if port == "gateway" else nim.control_url)
    head = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    started = time.monotonic()
    with socket.create_connection(a, timeout=10.0) as s:
        answer = b""
        for i in range(len(head)):
            try:
                s.sendall(head[i:i + 1])
            except OSError:
                break
            s.settimeout(0.25)
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
            break
        answer += read_response(s, timeout=5.0)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"RequestTimeout" in answer
    assert HEADER_TIMEOUT_S - 0.5 < took < HEADER_TIMEOUT_S + 5  # generous bound


def test_idle_connections_are_closed(nim):
    with socket.create_connection(addr(nim.url), timeout=10.0) as s:
        started = time.monotonic()  # never sends anything: the head deadline
        assert read_response(s, timeout=HEADER_TIMEOUT_S + 5) == b""
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 4
    with socket.create_connection(addr(nim.url), timeout=10.0) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()  # served, then idle: the keep-alive timeout
        answer = read_response(s, timeout=KEEP_ALIVE_S + 5)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello")
        assert time.monotonic() - started < KEEP_ALIVE_S + 4


@pytest.mark.parametrize("port, path", [("gateway", "/hello"),
                                        ("control", "/v1/functions/hello/invoke")])
def test_a_body_that_stops_arriving_ends_the_connection(nim, port, path):
    a = addr(nim.url if port == "gateway" else nim.control_url)
    with socket.create_connection(a, timeout=10.0) as s:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                  b"Authorization: Bearer " + nim.token.encode() + b"\r\n\r\n{}" + b" " * 98)
        started = time.monotonic()
        answer = read_response(s, timeout=HEADER_TIMEOUT_S + 5)
        took = time.monotonic() - started
    assert answer == b"", answer[:200]  # closed, unanswered
    assert HEADER_TIMEOUT_S - 0.5 < took < HEADER_TIMEOUT_S + 4
    assert control_get(nim, "/v1/status").json()["http"][port]["body_stalls"] >= 1


def test_a_slow_but_steady_body_is_not_cut_off(nim):
    # 4 pieces 0.8 s apart: longer in all than the deadline, never stalled as long
    assert 4 * 0.8 > HEADER_TIMEOUT_S > 0.8

    def body() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * 100
            time.sleep(0.8)

    r = httpx.post(nim.url + "/hello", content=body(), timeout=30.0)
    assert r.status_code == 200 and r.text == "hello"


def test_past_the_cap_with_every_connection_busy_new_ones_get_503(nim):
    # GATEWAY_CAP requests in flight (2 instances, the rest held by the pool)
    with concurrent.futures.ThreadPoolExecutor(GATEWAY_CAP) as ex:
        busy = [ex.submit(httpx.get, nim.url + "/nap?s=4", timeout=60.0)
                for _ in range(GATEWAY_CAP)]
        deadline = time.monotonic() + 10
        while control_get(nim, "/v1/status").json()["http"]["gateway"]["connections"] \
                < GATEWAY_CAP:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(addr(nim.url), timeout=10.0) as s:
            answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"TooManyConnections" in answer and b"retry-after: 1" in answer
        assert control_get(nim, "/v1/status").status_code == 200  # its own budget
        assert all(f.result().status_code in (200, 429) for f in busy)
    assert httpx.get(nim.url + "/hello", timeout=10.0).status_code == 200


# -- sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["gateway", "control"])
@pytest.mark.parametrize("slowly", [False, True])
def test_a_request_head_over_64_kib_is_431(nim, port, slowly):
    a = addr(nim.url if port == "gateway" else nim.control_url)
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n"
    with socket.create_connection(a, timeout=10.0) as s:
        try:
            if slowly:  # 4 KiB pieces: the head is refused before it is complete
                for i in range(0, len(head), 4096):
                    s.sendall(head[i:i + 4096])
                    time.sleep(0.005)
            else:
                s.sendall(head)
        except OSError:
            pass
        answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"RequestHeaderFieldsTooLarge" in answer


def test_a_head_just_under_the_limit_is_served(nim):
    r = httpx.get(nim.url + "/hello", headers={"x-big": "b" * (60 * 1024)}, timeout=10.0)
    assert r.status_code == 200


def _chunked_upload(a: tuple[str, int], path: str, total: int, headers: bytes = b"") -> bytes:
    """POST up to ``total`` bytes with chunked encoding from a thread while
    reading the answer; sending stops once the server hangs up."""
    piece = b"z" * (256 * 1024)
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    s = socket.create_connection(a, timeout=30.0)
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
              b"Transfer-Encoding: chunked\r\n" + headers + b"\r\n")
    stop = threading.Event()

    def send() -> None:
        sent = 0
        try:
            while sent < total and not stop.is_set():
                s.sendall(chunk)
                sent += len(piece)
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        return read_response(s, timeout=30.0)
    finally:
        stop.set()
        sender.join(timeout=30)
        s.close()


@pytest.mark.parametrize("port, path", [
    ("gateway", "/hello"),  # 6 MB payload limit
    ("control", "/v1/functions/hello/invoke"),  # 6 MB payload limit
    ("control", "/v1/deploy"),  # the bundle limit (--max-bundle-bytes)
])
def test_a_chunked_body_over_the_limit_is_413_without_buffering_it(nim, port, path):
    a = addr(nim.url if port == "gateway" else nim.control_url)
    auth = f"Authorization: Bearer {nim.token}\r\n".encode()
    answer, growth = peak_rss_growth_kb(
        nim.proc.pid, lambda: _chunked_upload(a, path, 64 * MB, auth))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"connection: close" in answer.lower()
    assert b"over the limit" in answer
    # the body is 64 MB: a server that buffered it would grow by at least that
    assert growth < 32 * 1024, f"RSS rose by {growth} KiB during a 64 MB upload"


def test_the_platform_still_serves_after_oversized_bodies(nim):
    assert httpx.post(nim.url + "/hello", content=b"x" * 1000, timeout=10.0).status_code == 200
    assert control_get(nim, "/v1/functions").status_code == 200


# -- handler headers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", [
    "name_newline", "name_space", "name_colon", "value_soh", "value_del", "value_lf",
    "value_trailing_newline", "value_cr", "value_nul", "cookie_ctl",
])
def test_a_handler_header_http_cannot_carry_is_500_invalid_response(nim, kind):
    with httpx.Client(base_url=nim.url, timeout=10.0) as c:
        r = c.get(f"/bad/{kind}")
        assert r.status_code == 500, (r.status_code, r.headers, r.text)
        body = r.json()
        assert body["errorType"] == "Runtime.InvalidResponse"
        assert body["requestId"] == r.headers["x-nimbus-request-id"]
        assert "x-injected" not in r.headers
        # the same connection still serves
        again = c.get("/hello")
        assert again.status_code == 200 and again.text == "hello"
        assert c.get("/bad/tab_ok").headers["x-a"] == "a\tb"


# -- the file-descriptor budget (pure) ----------------------------------------------


@pytest.mark.parametrize("gateway, control, fds, want", [
    (10_000, 256, 20_000, (10_000, 256)),  # fits: unchanged
    (10_000, 256, 1_024, (576, 192)),  # a small limit: the reserve, then the control API
    (10_000, 256, 65_536, (10_000, 256)),
    (50, 8, 100, (50, 8)),
])
def test_connection_caps_fit_in_the_open_files_limit(gateway, control, fds, want):
    from nimbus.gateway.connections import fit_to_fds

    got = fit_to_fds(gateway, control, fds)
    assert got == want
    assert sum(got) <= fds
