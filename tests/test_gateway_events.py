"""Event encoding (request -> API Gateway v2 event) and result decoding."""

from __future__ import annotations

import base64

import orjson
import pytest

from nimbus import errors as e
from nimbus.gateway.events import encode_body, http_event, parse_query
from nimbus.gateway.responses import error_response, result_response, status_for
from nimbus.gateway.router import Router


def scope(method="GET", path="/hello", qs=b"", headers=()):
    return {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(),
        "query_string": qs, "headers": list(headers), "client": ("10.1.2.3", 5555),
        "http_version": "1.1",
    }


def test_event_has_the_payload_2_shape():
    ev = http_event(
        scope("POST", "/users/42", b"a=1&b=2&a=3",
              [(b"Host", b"example.test"), (b"X-Dup", b"one"), (b"x-dup", b"two"),
               (b"Cookie", b"c1=v1; c2=v2"), (b"content-type", b"application/json"),
               (b"user-agent", b"curl/8")]),
        b'{"k": 1}', route_key="POST /users/{id}", path_params={"id": "42"},
        request_id="rid-1", now_s=1583348638.39,
    )
    assert ev["version"] == "2.0"
    assert ev["routeKey"] == "POST /users/{id}"
    assert ev["rawPath"] == "/users/42"
    assert ev["rawQueryString"] == "a=1&b=2&a=3"
    assert ev["queryStringParameters"] == {"a": "1,3", "b": "2"}
    assert ev["headers"]["x-dup"] == "one,two"
    assert ev["headers"]["host"] == "example.test"
    assert "cookie" not in ev["headers"]
    assert ev["cookies"] == ["c1=v1", "c2=v2"]
    assert ev["pathParameters"] == {"id": "42"}
    assert ev["body"] == '{"k": 1}' and ev["isBase64Encoded"] is False
    rc = ev["requestContext"]
    assert rc["http"] == {"method": "POST", "path": "/users/42", "protocol": "HTTP/1.1",
                          "sourceIp": "10.1.2.3", "userAgent": "curl/8"}
    assert rc["requestId"] == "rid-1"
    assert rc["timeEpoch"] == 1583348638390
    assert rc["time"] == "04/Mar/2020:19:03:58 +0000"
    assert rc["domainName"] == "example.test"


def test_event_without_query_body_or_params_omits_those_keys():
    ev = http_event(scope(), b"", route_key="GET /hello", path_params=None,
                    request_id="r", now_s=0)
    for key in ("queryStringParameters", "pathParameters", "body", "cookies"):
        assert key not in ev
    assert ev["isBase64Encoded"] is False


def test_binary_bodies_are_base64():
    raw = bytes(range(256))
    body, b64 = encode_body(raw, "application/octet-stream")
    assert b64 and base64.b64decode(body) == raw
    body, b64 = encode_body(b"\xff\xfe", None)  # not UTF-8 and no type: binary
    assert b64 and base64.b64decode(body) == b"\xff\xfe"
    assert encode_body("héllo".encode(), "text/plain; charset=utf-8") == ("héllo", False)


def test_query_decoding():
    assert parse_query("q=a+b&x=%2F&flag&") == {"q": "a b", "x": "/", "flag": ""}


def test_plain_returns_are_json_200():
    for value in ({"a": 1}, [1, 2], "text", None, 3):
        status, headers, body = result_response(value)
        assert status == 200
        assert (b"content-type", b"application/json") in headers
        assert orjson.loads(body) == value


def test_structured_result():
    status, headers, body = result_response({
        "statusCode": 201, "headers": {"X-A": "1"}, "cookies": ["s=1; HttpOnly", "t=2"],
        "body": "made",
    })
    assert status == 201 and body == b"made"
    assert (b"x-a", b"1") in headers
    assert [v for k, v in headers if k == b"set-cookie"] == [b"s=1; HttpOnly", b"t=2"]
    assert (b"content-type", b"text/plain; charset=utf-8") in headers


def test_structured_base64_body():
    status, _, body = result_response(
        {"statusCode": 200, "body": base64.b64encode(b"\x00\x01").decode(),
         "isBase64Encoded": True})
    assert body == b"\x00\x01"


def test_bad_status_code_is_a_handler_error():
    with pytest.raises(e.HandlerError, match="statusCode"):
        result_response({"statusCode": "abc"})
    with pytest.raises(e.HandlerError):
        result_response({"statusCode": 42})


@pytest.mark.parametrize("exc,status", [
    (e.RouteNotFoundError("x"), 404), (e.MethodNotAllowedError("x", ("GET",)), 405),
    (e.PayloadTooLargeError("x"), 413), (e.ThrottledError("x"), 429),
    (e.HandlerError({"errorMessage": "m", "errorType": "T"}), 500),
    (e.InvocationTimeoutError("x"), 504), (e.InstanceDiedError("x"), 502),
    (e.UnavailableError("x"), 503), (ValueError("bug"), 500),
])
def test_error_table(exc, status):
    assert status_for(exc) == status
    got, headers, body = error_response(exc, "rid")
    assert got == status
    data = orjson.loads(body)
    assert data["requestId"] == "rid"
    if isinstance(exc, ValueError):
        assert "bug" not in data["errorMessage"]  # internals never leak


def test_handler_error_body_is_lambdas():
    _, _, body = error_response(e.HandlerError({"errorMessage": "boom", "errorType": "KeyError"}),
                                "r1")
    assert orjson.loads(body) == {"errorMessage": "boom", "errorType": "KeyError",
                                  "requestId": "r1"}


def test_405_and_429_headers():
    _, headers, _ = error_response(e.MethodNotAllowedError("no", ("GET", "POST")), "r")
    assert (b"allow", b"GET, POST") in headers
    _, headers, _ = error_response(e.ThrottledError("slow down", retry_after_s=2), "r")
    assert (b"retry-after", b"2") in headers


class TestRouter:
    def router(self):
        return Router([
            ("GET", "/hello", "hello"),
            ("POST", "/hello", "hello-post"),
            ("GET", "/users/{id}", "user"),
            ("GET", "/users/me", "me"),
            ("ANY", "/files/{key+}", "files"),
            ("GET", "/users/{id}/posts/{post}", "post"),
        ])

    def test_static(self):
        m = self.router().match("GET", "/hello")
        assert (m.target, m.route_key, m.path_params) == ("hello", "GET /hello", None)
        assert self.router().match("POST", "/hello").target == "hello-post"

    def test_params_and_specificity(self):
        r = self.router()
        m = r.match("GET", "/users/42")
        assert m.target == "user" and m.path_params == {"id": "42"}
        assert m.route_key == "GET /users/{id}"
        assert r.match("GET", "/users/me").target == "me"
        m = r.match("GET", "/users/7/posts/9")
        assert m.target == "post" and m.path_params == {"id": "7", "post": "9"}

    def test_greedy_and_any(self):
        m = self.router().match("DELETE", "/files/a/b/c.txt")
        assert m.target == "files" and m.path_params == {"key": "a/b/c.txt"}
        assert m.route_key == "ANY /files/{key+}"

    def test_404_and_405(self):
        with pytest.raises(e.RouteNotFoundError):
            self.router().match("GET", "/nope")
        with pytest.raises(e.MethodNotAllowedError) as info:
            self.router().match("DELETE", "/hello")
        assert info.value.allowed == ("GET", "POST")

    def test_head_falls_back_to_get(self):
        assert self.router().match("HEAD", "/hello").target == "hello"

    def test_a_named_method_wins_over_any_on_one_path(self):
        r = Router([("ANY", "/orders", "all"), ("GET", "/orders", "list"),
                    ("ANY", "/o/{id}", "all-o"), ("GET", "/o/{id}", "get-o")])
        assert (r.match("GET", "/orders").target, r.match("GET", "/orders").route_key) \
            == ("list", "GET /orders")
        m = r.match("POST", "/orders")
        assert (m.target, m.route_key) == ("all", "ANY /orders")
        assert r.match("DELETE", "/o/5").target == "all-o"
        m = r.match("GET", "/o/5")
        assert (m.target, m.path_params) == ("get-o", {"id": "5"})
