"""The gateway's HTTP/1.1 on the wire: what its own protocol (parser
callbacks straight to the gateway, the response written whole) must keep
doing as uvicorn did: pipelining, ``Expect: 100-continue``, HTTP/1.0,
``HEAD``, the proxy-headers rule for trusted peers."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from tests.apps import write_kitchen
from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """The gateway of one ``nimbus up`` the tests share (each opens its own
    connections)."""
    root = tmp_path_factory.mktemp("wire")
    n = Nimbus(write_kitchen(root), root / "state", root / "state.out")
    u = urlsplit(n.url)
    yield u.hostname, u.port
    n.stop()


def connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=30)
    return s


def read_response(s: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[
        bytes, dict[str, str], bytes]:
    """One response from ``s`` (``buf`` holds what was read past it)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-head: {bytes(buf)!r}"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.decode().strip()
    size = 0 if head_only else int(headers.get("content-length", "0"))
    while len(rest) < size:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    buf[:] = rest[size:]
    return status, headers, rest[:size]


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_are_answered_in_order(gw):
    with connect(gw) as s:
        s.sendall(b"GET /users/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /users/2 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /echo HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\nhello")
        buf = bytearray()
        answers = [read_response(s, buf) for _ in range(3)]
        assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
        assert [json.loads(a[2])["pathParameters"]["id"] for a in answers[:2]] == ["1", "2"]
        assert json.loads(answers[2][2])["body"] == "hello"
        ids = {a[1]["x-nimbus-request-id"] for a in answers}
        assert len(ids) == 3
        assert all("connection" not in a[1] for a in answers)  # still open
        s.sendall(b"GET /users/3 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert json.loads(read_response(s, buf)[2])["pathParameters"]["id"] == "3"


def test_expect_100_continue(gw):
    with connect(gw) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"content-type: text/plain\r\ncontent-length: 4\r\n\r\n")
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
        assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del buf[:len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        s.sendall(b"ping")
        status, _headers, body = read_response(s, buf)
        assert status == b"HTTP/1.1 200 OK"
        assert json.loads(body)["body"] == "ping"


def test_http_1_0_and_connection_close_end_the_connection(gw):
    for request in (b"GET /users/7 HTTP/1.0\r\nHost: x\r\n\r\n",
                    b"GET /users/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        with connect(gw) as s:
            s.sendall(request)
            buf = bytearray()
            status, headers, body = read_response(s, buf)
            assert status == b"HTTP/1.1 200 OK"
            assert headers["connection"] == "close"
            ev = json.loads(body)
            assert ev["pathParameters"] == {"id": "7"}
            assert not buf and closed(s)


def test_head_has_the_get_framing_and_no_body(gw):
    with connect(gw) as s:
        s.sendall(b"GET /users/9 HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        _, get_headers, get_body = read_response(s, buf)
        s.sendall(b"HEAD /users/9 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(s, buf, head_only=True)
        assert status == b"HTTP/1.1 200 OK"
        assert int(headers["content-length"]) > 0
        s.sendall(b"GET /users/10 HTTP/1.1\r\nHost: x\r\n\r\n")  # no HEAD body in between
        status, _, body = read_response(s, buf)
        assert json.loads(body)["pathParameters"] == {"id": "10"}
        assert int(get_headers["content-length"]) == len(get_body)


def test_forwarded_for_from_a_trusted_peer_names_the_client(gw):
    # uvicorn's proxy-headers rule (``FORWARDED_ALLOW_IPS``, 127.0.0.1 by
    # default): a loopback peer is a trusted proxy.
    with connect(gw) as s:
        s.sendall(b"GET /users/1 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
                  b"GET /users/2 HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        first = json.loads(read_response(s, buf)[2])
        second = json.loads(read_response(s, buf)[2])
    assert first["requestContext"]["http"]["sourceIp"] == "203.0.113.9"
    assert second["requestContext"]["http"]["sourceIp"] == "127.0.0.1"


def test_only_the_gateways_own_failures_carry_its_mark() -> None:
    from nimbus import errors as e
    from nimbus.gateway.responses import GATEWAY_ERROR_HEADER, error_response, result_response

    mark = (GATEWAY_ERROR_HEADER, b"gateway")
    assert mark in error_response(e.UnavailableError("no worker"), "r")[1]
    assert mark in error_response(e.ClosedError("stopping"), "r")[1]
    for exc in (e.InstanceDiedError("died"), e.ThrottledError("busy"),
                e.HandlerError({"errorMessage": "x", "errorType": "E"})):
        assert mark not in error_response(exc, "r")[1], exc
    # a function cannot forge it
    status, headers, _ = result_response({"statusCode": 503, "body": "x",
                                          "headers": {"X-Nimbus-Error": "gateway"}})
    assert status == 503 and all(name != GATEWAY_ERROR_HEADER for name, _ in headers)
