"""API Gateway REST API (payload 1.0) events and proxy responses: pure functions."""

from __future__ import annotations

import base64

import orjson
import pytest

from nimbus import errors as e
from nimbus.gateway.events_v1 import (
    ERROR_BODY,
    RestRoute,
    error_response,
    header,
    parse_query_multi,
    put_trace_context,
    rest_event,
    rest_response,
)
from nimbus.worker.target import ACCOUNT

IDENTITY_NULLS = ("accessKey", "accountId", "apiKey", "apiKeyId", "caller",
                  "cognitoAuthenticationProvider", "cognitoAuthenticationType",
                  "cognitoIdentityId", "cognitoIdentityPoolId", "principalOrgId", "user",
                  "userArn")


def scope(method="GET", path="/users/42", qs=b"", headers=(), names=None):
    s = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(),
        "query_string": qs, "headers": list(headers), "client": ("10.1.2.3", 5555),
        "http_version": "1.1",
    }
    if names is not None:
        s["header_names"] = list(names)
    return s


def spelled(*pairs):
    """A scope with the headers as written (the server lowers the names)."""
    return scope(headers=[(n.lower(), v) for n, v in pairs], names=[n for n, _ in pairs])


def test_header_names_keep_their_spelling_and_one_name_is_one_header():
    spellings = {}
    ev = rest_event(spelled((b"Host", b"api.example"), (b"X-A", b"1"), (b"x-a", b"2"),
                            (b"USER-AGENT", b"ua/1"), (b"Content-Type", b"text/plain")),
                    b"hi", resource="/x", resource_id="r", path_params=None,
                    request_id="r", now_s=0, spellings=spellings)
    assert ev["headers"] == {"Host": "api.example", "X-A": "2", "USER-AGENT": "ua/1",
                             "Content-Type": "text/plain"}
    assert ev["multiValueHeaders"]["X-A"] == ["1", "2"]
    assert set(ev["headers"]) == set(ev["multiValueHeaders"])
    assert ev["requestContext"]["domainName"] == "api.example"
    assert ev["requestContext"]["identity"]["userAgent"] == "ua/1"
    assert (ev["body"], ev["isBase64Encoded"]) == ("hi", False)  # its content type was read
    assert header(ev, spellings, b"x-a") == "2" and header(ev, spellings, b"user-agent") == "ua/1"
    assert header(ev, spellings, b"idempotency-key") is None


def test_trace_headers_are_read_under_lower_case_names_whatever_the_spelling():
    tp = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    ev = rest_event(spelled((b"TraceParent", tp.encode()), (b"TRACESTATE", b"a=1"),
                            (b"X-Other", b"x")), b"", resource="/x", resource_id="r",
                    path_params=None, request_id="r", now_s=0)
    assert ev["headers"] == {"traceparent": tp, "tracestate": "a=1", "X-Other": "x"}
    assert ev["multiValueHeaders"]["traceparent"] == [tp]


def test_names_the_server_did_not_keep_are_the_lower_case_ones():
    ev = rest_event(scope(headers=[(b"x-a", b"1")], names=[b"X-A", b"X-B"]), b"",
                    resource="/x", resource_id="r", path_params=None, request_id="r", now_s=0)
    assert ev["headers"] == {"x-a": "1"}


def test_the_gateway_s_trace_context_replaces_the_client_s_in_any_spelling():
    spellings = {}
    ev = rest_event(spelled((b"Traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
                            (b"TraceState", b"a=1"), (b"X-Other", b"x")),
                    b"", resource="/x", resource_id="r", path_params=None,
                    request_id="r", now_s=0, spellings=spellings)
    mine = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"
    put_trace_context(ev, spellings, mine, "")
    assert ev["headers"] == {"X-Other": "x", "traceparent": mine}
    assert ev["multiValueHeaders"] == {"X-Other": ["x"], "traceparent": [mine]}
    put_trace_context(ev, spellings, mine, "n=2")
    assert ev["headers"]["tracestate"] == "n=2" and ev["multiValueHeaders"]["tracestate"] == ["n=2"]
    assert header(ev, spellings, b"traceparent") == mine


def test_event_has_the_rest_proxy_shape():
    ev = rest_event(
        scope("POST", "/users/42", b"a=1&b=2&a=x%20y",
              [(b"host", b"api.example.test"), (b"x-dup", b"one"), (b"x-dup", b"two"),
               (b"cookie", b"c1=v1; c2=v2"), (b"content-type", b"application/json"),
               (b"user-agent", b"curl/8")]),
        b'{"k": 1}', resource="/users/{id}", resource_id="abc123",
        path_params={"id": "42"}, request_id="rid-1", now_s=1583348638.39)
    assert set(ev) == {"resource", "path", "httpMethod", "headers", "multiValueHeaders",
                       "queryStringParameters", "multiValueQueryStringParameters",
                       "pathParameters", "stageVariables", "requestContext", "body",
                       "isBase64Encoded"}
    assert ev["resource"] == "/users/{id}"
    assert ev["path"] == "/users/42"
    assert ev["httpMethod"] == "POST"
    assert ev["headers"]["x-dup"] == "two"  # the last value
    assert ev["multiValueHeaders"]["x-dup"] == ["one", "two"]
    assert ev["headers"]["cookie"] == "c1=v1; c2=v2"  # a header like any other in 1.0
    assert ev["multiValueHeaders"]["host"] == ["api.example.test"]
    assert ev["queryStringParameters"] == {"a": "x y", "b": "2"}
    assert ev["multiValueQueryStringParameters"] == {"a": ["1", "x y"], "b": ["2"]}
    assert ev["pathParameters"] == {"id": "42"}
    assert ev["stageVariables"] is None
    assert ev["body"] == '{"k": 1}' and ev["isBase64Encoded"] is False
    rc = ev["requestContext"]
    assert rc["resourceId"] == "abc123"
    assert rc["resourcePath"] == "/users/{id}"
    assert rc["httpMethod"] == "POST"
    assert rc["path"] == "/users/42"
    assert rc["stage"] == "Prod"
    assert rc["requestId"] == rc["extendedRequestId"] == "rid-1"
    assert rc["requestTime"] == "04/Mar/2020:19:03:58 +0000"
    assert rc["requestTimeEpoch"] == 1583348638390
    assert rc["protocol"] == "HTTP/1.1"
    assert rc["accountId"] == ACCOUNT
    assert rc["apiId"] == "nimbus"
    assert rc["domainName"] == "api.example.test"
    assert rc["domainPrefix"] == "api"
    ident = rc["identity"]
    assert ident["sourceIp"] == "10.1.2.3" and ident["userAgent"] == "curl/8"
    assert all(ident[k] is None for k in IDENTITY_NULLS)
    assert "version" not in ev and "routeKey" not in rc  # 2.0's keys


def test_event_without_query_body_or_params_has_nulls():
    ev = rest_event(scope("GET", "/ping"), b"", resource="/ping", resource_id="r",
                    path_params=None, request_id="r", now_s=0)
    for key in ("queryStringParameters", "multiValueQueryStringParameters",
                "pathParameters", "body", "headers", "multiValueHeaders"):
        assert key in ev and ev[key] is None, key
    assert ev["isBase64Encoded"] is False
    assert ev["requestContext"]["identity"]["userAgent"] is None
    assert ev["requestContext"]["domainName"] == "localhost"


def test_binary_body_is_base64():
    raw = bytes(range(256))
    ev = rest_event(scope("POST", headers=[(b"content-type", b"application/octet-stream")]),
                    raw, resource="/x", resource_id="r", path_params=None, request_id="r",
                    now_s=0)
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == raw


def test_query_keys_without_values_and_empty_parts():
    assert parse_query_multi("a&&b=&a=2") == ({"a": "2", "b": ""},
                                              {"a": ["", "2"], "b": [""]})
    assert parse_query_multi("&") == (None, None)


def test_response_merges_headers_and_multi_value_headers():
    status, headers, body = rest_response({
        "statusCode": 201,
        "headers": {"X-One": "1", "Set-Cookie": "a=1"},
        "multiValueHeaders": {"Set-Cookie": ["a=1", "b=2"], "X-Many": ["x", "y"]},
        "body": "made",
    })
    assert status == 201 and body == b"made"
    assert headers == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-many", b"x"),
                       (b"x-many", b"y"), (b"x-one", b"1"), (b"content-type", b"application/json")]


def test_response_base64_body_and_own_content_type():
    status, headers, body = rest_response({
        "statusCode": 200, "headers": {"content-type": "image/png", "content-length": "3"},
        "body": base64.b64encode(b"\x89PN").decode(), "isBase64Encoded": True})
    assert (status, headers, body) == (200, [(b"content-type", b"image/png")], b"\x89PN")


def test_response_minimal_and_no_body_status():
    assert rest_response({"statusCode": 200}) == (
        200, [(b"content-type", b"application/json")], b"")
    assert rest_response({"statusCode": "204", "body": "x"})[::2] == (204, b"")


@pytest.mark.parametrize("result", [
    {"hello": "world"},  # no statusCode: 2.0 would answer it as JSON, 1.0 does not
    "a string",
    None,
    [1, 2],
    {"statusCode": 200, "body": {"a": 1}},  # body must be a string
    {"statusCode": 200, "cookies": ["a=1"]},  # a 2.0 key
    {"statusCode": "OK"},
    {"statusCode": "²"},  # a digit to str.isdigit, not to int()
    {"statusCode": True},
    {"statusCode": 700},
    {"statusCode": 200, "headers": {"x": ["a", "b"]}},
    {"statusCode": 200, "multiValueHeaders": {"x": "a"}},
    {"statusCode": 200, "headers": "x: y"},
    {"statusCode": 200, "isBase64Encoded": "yes", "body": "eA=="},
    {"statusCode": 200, "isBase64Encoded": True, "body": "not base64!"},
    {"statusCode": 200, "headers": {"bad name": "x"}},
])
def test_malformed_responses_are_handler_errors(result):
    with pytest.raises(e.HandlerError) as info:
        rest_response(result)
    assert info.value.error["errorType"] == "Runtime.InvalidResponse"


def test_error_response_is_api_gateways():
    status, headers, body = error_response()
    assert status == 502
    assert orjson.loads(body) == {"message": "Internal server error"} == orjson.loads(ERROR_BODY)
    assert (b"x-amzn-errortype", b"InternalServerErrorException") in headers


def test_rest_route_wraps_an_invoker():
    class Inv:
        target = "fv"
        logged: list[str] = []

        async def invoke(self, rid, event):
            return {"rid": rid}

        def log(self, rid, stream, text, level=None):
            self.logged.append(text)

    inner = Inv()
    route = RestRoute(inner, "/users/{id}", "GET")
    assert route.target == "fv" and route.inner is inner
    assert route.resource == "/users/{id}"
    assert len(route.resource_id) == 6
    assert route.resource_id == RestRoute(inner, "/users/{id}", "GET").resource_id
    assert route.resource_id != RestRoute(inner, "/users/{id}", "POST").resource_id
    route.log("r", "platform", "x")
    assert inner.logged == ["x"]


def test_sticky_key_of_a_rest_event():
    from nimbus.gateway.split import sticky_key

    def ev(headers):
        return rest_event(scope(headers=headers), b"", resource="/x", resource_id="r",
                          path_params=None, request_id="r", now_s=0)

    assert sticky_key(ev([(b"cookie", b"a=1; nimbus-sticky=u7; b=2")])) == "u7"
    assert sticky_key(ev([(b"x-nimbus-sticky", b"u1"), (b"cookie", b"nimbus-sticky=u7")])) == "u1"
    assert sticky_key(ev([(b"cookie", b"a=1")])) is None
    assert sticky_key(ev([])) is None
    # as the client wrote the names
    assert sticky_key(rest_event(spelled((b"X-Nimbus-Sticky", b"u3")), b"", resource="/x",
                                 resource_id="r", path_params=None, request_id="r",
                                 now_s=0)) == "u3"
    assert sticky_key(rest_event(spelled((b"Cookie", b"nimbus-sticky=u4")), b"",
                                 resource="/x", resource_id="r", path_params=None,
                                 request_id="r", now_s=0)) == "u4"
