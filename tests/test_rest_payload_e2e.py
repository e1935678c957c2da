"""Payload 1.0 (API Gateway REST) and 2.0 (HTTP API) routes side by side
through one real ``nimbus up``; and an app made by ``nimbus init`` deployed
into it and serving."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest

from nimbus.cli.init import init_app
from tests.conftest import Nimbus
from tests.events_client import control, settled

MANIFEST = """\
name: restapp
functions:
  v1:
    handler: h.v1
    http:
      - {method: GET, path: /v1/items/{id}, payload: "1.0"}
      - {method: POST, path: /v1/echo, payload: "1.0"}
      - {method: GET, path: /v1/bare, payload: "1.0"}
      - {method: GET, path: /v1/boom, payload: "1.0"}
  v2:
    handler: h.v2
    http:
      - {method: GET, path: /v2/items/{id}}
      - {method: GET, path: /v2/bare}
"""

HANDLERS = '''\
import json

def v1(event, context):
    if event["resource"] == "/v1/bare":
        return {"hello": "world"}  # no statusCode: a REST API answers 502
    if event["resource"] == "/v1/boom":
        raise ValueError("boom")
    if event["resource"] == "/v1/echo":
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "body": event["body"], "isBase64Encoded": event["isBase64Encoded"]}
    return {"statusCode": 200, "headers": {"X-Kind": "rest"},
            "multiValueHeaders": {"Set-Cookie": ["a=1; Path=/", "b=2; Path=/"]},
            "body": json.dumps(event)}

def v2(event, context):
    if event["rawPath"] == "/v2/bare":
        return {"hello": "world"}
    return {"statusCode": 200, "body": json.dumps(event)}
'''


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("rest")
    app = root / "restapp"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLERS)
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits")
    yield n
    n.stop()


def web(up: Nimbus) -> httpx.Client:
    assert up.http is not None
    return up.http


def test_rest_and_http_api_events_side_by_side(up: Nimbus) -> None:
    headers = [("x-many", "one"), ("x-many", "two"), ("user-agent", "tester/1")]
    r1 = web(up).get("/v1/items/42?tag=a&tag=b&q=x", headers=headers)
    assert r1.status_code == 200, r1.text
    ev = orjson.loads(r1.content)
    assert ev["resource"] == "/v1/items/{id}"
    assert ev["path"] == "/v1/items/42"
    assert ev["httpMethod"] == "GET"
    assert ev["pathParameters"] == {"id": "42"}
    assert ev["queryStringParameters"] == {"tag": "b", "q": "x"}
    assert ev["multiValueQueryStringParameters"] == {"tag": ["a", "b"], "q": ["x"]}
    assert ev["headers"]["x-many"] == "two"
    assert ev["multiValueHeaders"]["x-many"] == ["one", "two"]
    assert ev["body"] is None and ev["isBase64Encoded"] is False
    assert ev["stageVariables"] is None
    rc = ev["requestContext"]
    assert (rc["resourcePath"], rc["httpMethod"], rc["stage"], rc["path"]) == (
        "/v1/items/{id}", "GET", "Prod", "/v1/items/42")
    assert rc["identity"]["sourceIp"] == "127.0.0.1"
    assert rc["identity"]["userAgent"] == "tester/1"
    assert rc["requestId"] == r1.headers["x-nimbus-request-id"]
    # multiValueHeaders in the response: both cookies, and the single header
    assert r1.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert r1.headers["x-kind"] == "rest"
    assert r1.headers["content-type"] == "application/json"  # API Gateway's default

    r2 = web(up).get("/v2/items/42?tag=a&tag=b", headers=headers)
    assert r2.status_code == 200, r2.text
    ev2 = orjson.loads(r2.content)
    assert ev2["version"] == "2.0" and ev2["routeKey"] == "GET /v2/items/{id}"
    assert ev2["pathParameters"] == {"id": "42"}
    assert ev2["queryStringParameters"] == {"tag": "a,b"}
    assert ev2["headers"]["x-many"] == "one,two"
    assert "multiValueHeaders" not in ev2 and "resource" not in ev2


def _raw_get(up: Nimbus, target: str, head: bytes) -> dict:
    """GET ``target`` with exactly the header lines ``head`` (names as written)."""
    host, port = up.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET " + target.encode() + b" HTTP/1.1\r\n" + head
                     + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, _, body = data.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), data[:500]
    return orjson.loads(body)


def test_rest_events_keep_header_names_as_sent_and_http_api_events_lower_them(
        up: Nimbus) -> None:
    head = (b"Host: shop.example\r\nUser-Agent: raw/1\r\nX-Mixed-Case: a\r\n"
            b"x-lower: b\r\nX-Twice: 1\r\nX-Twice: 2\r\nAccept: */*\r\n")
    ev = _raw_get(up, "/v1/items/7", head)
    assert {"Host", "User-Agent", "X-Mixed-Case", "x-lower", "X-Twice", "Accept"} \
        <= set(ev["headers"]), ev["headers"]
    assert ev["headers"]["X-Twice"] == "2" and ev["multiValueHeaders"]["X-Twice"] == ["1", "2"]
    assert "x-mixed-case" not in ev["headers"]
    assert set(ev["headers"]) == set(ev["multiValueHeaders"])
    rc = ev["requestContext"]
    assert (rc["domainName"], rc["identity"]["userAgent"]) == ("shop.example", "raw/1")
    ev2 = _raw_get(up, "/v2/items/7", head)
    assert ev2["headers"]["x-mixed-case"] == "a" and ev2["headers"]["x-twice"] == "1,2"
    assert "X-Mixed-Case" not in ev2["headers"]


def test_binary_body_round_trip(up: Nimbus) -> None:
    raw = bytes(range(256)) * 4
    r = web(up).post("/v1/echo", content=raw,
                     headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.content == raw
    assert r.headers["content-type"] == "application/octet-stream"
    text = web(up).post("/v1/echo", content=b'{"a": 1}',
                        headers={"content-type": "application/json"})
    assert text.content == b'{"a": 1}'


def test_malformed_or_failing_rest_handler_is_502_while_http_api_takes_bare_values(
        up: Nimbus) -> None:
    for path in ("/v1/bare", "/v1/boom"):
        r = web(up).get(path)
        assert r.status_code == 502, r.text
        assert r.json() == {"message": "Internal server error"}
        assert r.headers["x-amzn-errortype"] == "InternalServerErrorException"
    r2 = web(up).get("/v2/bare")
    assert r2.status_code == 200 and r2.json() == {"hello": "world"}


def test_async_request_on_a_rest_route_gets_the_rest_event(up: Nimbus) -> None:
    r = web(up).get("/v1/items/7?x=1", headers={"x-nimbus-invocation-type": "Event"})
    assert r.status_code == 202, r.text
    with control(up) as ctl:
        rec = settled(ctl, r.json()["invocationId"])
    ev = orjson.loads(rec["result"]["body"])
    assert (ev["resource"], ev["pathParameters"], ev["multiValueQueryStringParameters"]) == (
        "/v1/items/{id}", {"id": "7"}, {"x": ["1"]})


def test_an_app_from_nimbus_init_deploys_and_serves(up: Nimbus, tmp_path) -> None:
    folder = tmp_path / "shop"
    init_app(folder, "api")
    done = up.cli("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    r = web(up).get("/items/42")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": 42, "name": "item 42"}
    created = web(up).post("/items", json={"name": "lamp"})
    assert created.status_code == 201, created.text
    assert created.json()["created"] == {"name": "lamp"}
    assert created.json()["requestId"] == created.headers["x-nimbus-request-id"]
