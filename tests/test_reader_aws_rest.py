"""A second reader's checks of REST API (payload 1.0) routes, from the
user's side: the event and the response rules of API Gateway's Lambda
proxy integration, field by field, through one real ``nimbus up``."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Nimbus
from tests.events_client import control, settled

MANIFEST = """\
name: restcheck
functions:
  echo:
    handler: h.echo
    http:
      - {method: GET, path: /r/items/{id}, payload: "1.0"}
      - {method: GET, path: /r/plain, payload: "1.0"}
      - {method: ANY, path: /r/any, payload: "1.0"}
      - {method: ANY, path: /r/files/{proxy+}, payload: "1.0"}
      - {method: GET, path: /r/two/{a}/{b}, payload: "1.0"}
      - {method: GET, path: /h/items/{id}}
  respond:
    handler: h.respond
    http:
      - {method: POST, path: /r/respond, payload: "1.0"}
  boom:
    handler: h.boom
    http:
      - {method: GET, path: /r/boom, payload: "1.0"}
  big:
    handler: h.big
    memory_mb: 256
    http:
      - {method: GET, path: /r/big, payload: "1.0"}
  nap:
    handler: h.nap
    timeout_s: 1
    http:
      - {method: GET, path: /r/nap, payload: "1.0"}
"""

HANDLERS = '''\
import json, time

def echo(event, context):
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps(event)}

def respond(event, context):
    return json.loads(event["body"])["r"]

def boom(event, context):
    raise ValueError("kaboom")

def big(event, context):
    n = int(event["queryStringParameters"]["n"])
    return {"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": "y" * n}

def nap(event, context):
    time.sleep(5)
    return {"statusCode": 200, "body": "late"}
'''

EVENT_KEYS = {"resource", "path", "httpMethod", "headers", "multiValueHeaders",
              "queryStringParameters", "multiValueQueryStringParameters", "pathParameters",
              "stageVariables", "requestContext", "body", "isBase64Encoded"}

IDENTITY_KEYS = {"sourceIp", "userAgent", "accessKey", "accountId", "apiKey", "apiKeyId",
                 "caller", "cognitoAuthenticationProvider", "cognitoAuthenticationType",
                 "cognitoIdentityId", "cognitoIdentityPoolId", "principalOrgId", "user",
                 "userArn"}

INTERNAL = {"message": "Internal server error"}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("reader-rest")
    app = root / "restcheck"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLERS)
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits")
    try:
        yield n
    finally:
        n.stop()


def web(up: Nimbus) -> httpx.Client:
    assert up.http is not None
    return up.http


def event_of(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return orjson.loads(r.content)  # type: ignore[no-any-return]


def answer(up: Nimbus, response: Any) -> httpx.Response:
    """What a client gets when the handler returns ``response``."""
    return web(up).post("/r/respond", content=json.dumps({"r": response}),
                        headers={"content-type": "application/json"})


def assert_internal_error(r: httpx.Response) -> None:
    assert r.status_code == 502, (r.status_code, r.text)
    assert r.json() == INTERNAL
    assert r.headers["x-amzn-errortype"] == "InternalServerErrorException"


# --- the event ---------------------------------------------------------


def test_event_has_exactly_the_proxy_integration_keys(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/items/42?tag=a&tag=b&q=x"))
    assert set(ev) == EVENT_KEYS
    assert set(ev["requestContext"]["identity"]) == IDENTITY_KEYS


def test_event_fields_for_a_get_with_repeated_headers_and_query(up: Nimbus) -> None:
    before_ms = int(time.time() * 1000)
    r = web(up).get("/r/items/42?tag=a&tag=b&q=x",
                    headers=[("x-many", "one"), ("x-many", "two"),
                             ("user-agent", "reader/1.0"), ("cookie", "s=1")])
    after_ms = int(time.time() * 1000)
    ev = event_of(r)
    assert ev["resource"] == "/r/items/{id}"
    assert ev["path"] == "/r/items/42"
    assert ev["httpMethod"] == "GET"
    assert ev["headers"]["x-many"] == "two"
    assert ev["multiValueHeaders"]["x-many"] == ["one", "two"]
    assert ev["headers"]["cookie"] == "s=1"
    assert ev["multiValueHeaders"]["cookie"] == ["s=1"]
    assert ev["headers"]["user-agent"] == "reader/1.0"
    # every header is in both maps, the single map holding the last value
    assert set(ev["headers"]) == set(ev["multiValueHeaders"])
    for name, values in ev["multiValueHeaders"].items():
        assert ev["headers"][name] == values[-1]
    assert ev["queryStringParameters"] == {"tag": "b", "q": "x"}
    assert ev["multiValueQueryStringParameters"] == {"tag": ["a", "b"], "q": ["x"]}
    assert ev["pathParameters"] == {"id": "42"}
    assert ev["stageVariables"] is None
    assert ev["body"] is None
    assert ev["isBase64Encoded"] is False
    rc = ev["requestContext"]
    assert rc["resourcePath"] == "/r/items/{id}"
    assert rc["httpMethod"] == "GET"
    assert rc["stage"] == "Prod"
    assert rc["path"] == "/r/items/42"
    assert rc["protocol"] == "HTTP/1.1"
    assert rc["identity"]["sourceIp"] == "127.0.0.1"
    assert rc["identity"]["userAgent"] == "reader/1.0"
    assert rc["requestId"] == r.headers["x-nimbus-request-id"]
    assert isinstance(rc["requestTimeEpoch"], int)
    assert before_ms - 1000 <= rc["requestTimeEpoch"] <= after_ms + 1000
    # API Gateway's CLF time: 02/Dec/2026:06:00:00 +0000
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000", rc["requestTime"])
    assert time.strftime("%d/%b/%Y:%H:%M:%S +0000",
                         time.gmtime(rc["requestTimeEpoch"] / 1000)) == rc["requestTime"]


def test_without_query_or_path_parameters_the_keys_are_null(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/plain"))
    assert ev["queryStringParameters"] is None
    assert ev["multiValueQueryStringParameters"] is None
    assert ev["pathParameters"] is None
    assert ev["resource"] == "/r/plain"
    assert ev["body"] is None


def test_query_values_are_url_decoded(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/plain?q=a%20b&e=%C3%A9t%C3%A9&amp=x%26y"))
    assert ev["queryStringParameters"] == {"q": "a b", "e": "été", "amp": "x&y"}
    assert ev["multiValueQueryStringParameters"] == {"q": ["a b"], "e": ["été"],
                                                    "amp": ["x&y"]}


def test_a_query_name_without_a_value_is_an_empty_string(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/plain?flag&x=1"))
    assert ev["queryStringParameters"] == {"flag": "", "x": "1"}
    assert ev["multiValueQueryStringParameters"] == {"flag": [""], "x": ["1"]}


def test_two_path_parameters(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/two/x1/y2"))
    assert ev["pathParameters"] == {"a": "x1", "b": "y2"}
    assert ev["resource"] == ev["requestContext"]["resourcePath"] == "/r/two/{a}/{b}"


def test_a_greedy_path_parameter_holds_the_rest_of_the_path(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/files/a/b/c.txt"))
    assert ev["resource"] == "/r/files/{proxy+}"
    assert ev["requestContext"]["resourcePath"] == "/r/files/{proxy+}"
    assert ev["pathParameters"] == {"proxy": "a/b/c.txt"}
    assert ev["path"] == "/r/files/a/b/c.txt"


def test_any_route_gives_the_method_used(up: Nimbus) -> None:
    for method in ("DELETE", "PUT", "PATCH"):
        ev = event_of(web(up).request(method, "/r/any"))
        assert ev["httpMethod"] == method
        assert ev["requestContext"]["httpMethod"] == method
        assert ev["resource"] == "/r/any"


def test_a_json_body_is_text(up: Nimbus) -> None:
    body = '{"name": "Zoë", "n": 1}'
    ev = event_of(web(up).post("/r/any", content=body.encode(),
                               headers={"content-type": "application/json"}))
    assert ev["body"] == body
    assert ev["isBase64Encoded"] is False
    assert ev["httpMethod"] == "POST"


def test_a_form_body_is_text(up: Nimbus) -> None:
    ev = event_of(web(up).post("/r/any", content=b"a=1&b=2",
                               headers={"content-type": "application/x-www-form-urlencoded"}))
    assert ev["body"] == "a=1&b=2"
    assert ev["isBase64Encoded"] is False


def test_a_binary_body_is_base64(up: Nimbus) -> None:
    raw = bytes(range(256))
    ev = event_of(web(up).post("/r/any", content=raw,
                               headers={"content-type": "application/octet-stream"}))
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == raw


def test_an_empty_post_body_is_null(up: Nimbus) -> None:
    ev = event_of(web(up).post("/r/any", content=b"",
                               headers={"content-type": "application/json"}))
    assert ev["body"] is None
    assert ev["isBase64Encoded"] is False


# --- the response ------------------------------------------------------


def test_status_headers_and_body_pass_through(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 201, "headers": {"content-type": "text/plain",
                                                   "x-one": "1"},
                    "body": "created ✓", "isBase64Encoded": False})
    assert r.status_code == 201
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["x-one"] == "1"
    assert r.content.decode() == "created ✓"


def test_multi_value_headers_in_the_response(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 200,
                    "multiValueHeaders": {"set-cookie": ["a=1; Path=/", "b=2; Path=/"],
                                          "x-list": ["p", "q"]},
                    "body": "ok"})
    assert r.status_code == 200
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert r.headers.get_list("x-list") == ["p", "q"]


def test_headers_and_multi_value_headers_are_merged(up: Nimbus) -> None:
    # AWS: both are merged into one list; a pair given in both appears once
    r = answer(up, {"statusCode": 200,
                    "headers": {"x-m": "h", "x-same": "v"},
                    "multiValueHeaders": {"x-m": ["m1", "m2"], "x-same": ["v"]},
                    "body": "ok"})
    assert r.status_code == 200
    assert r.headers.get_list("x-m") == ["m1", "m2", "h"]
    assert r.headers.get_list("x-same") == ["v"]


def test_default_content_type_is_json(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 200, "body": '{"a": 1}'})
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == "application/json"
    assert r.json() == {"a": 1}


def test_status_code_as_a_string_of_digits(up: Nimbus) -> None:
    r = answer(up, {"statusCode": "418", "body": "teapot"})
    assert r.status_code == 418
    assert r.text == "teapot"


def test_base64_body_is_sent_as_bytes(up: Nimbus) -> None:
    raw = b"\x89PNG\r\n\x1a\n\x00\xff"
    r = answer(up, {"statusCode": 200, "headers": {"content-type": "image/png"},
                    "body": base64.b64encode(raw).decode(), "isBase64Encoded": True})
    assert r.status_code == 200
    assert r.content == raw
    assert r.headers["content-type"] == "image/png"


def test_no_body_or_a_null_body_is_an_empty_answer(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 204})
    assert r.status_code == 204
    assert r.content == b""
    r = answer(up, {"statusCode": 200, "body": None})
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize("returned", [
    "just a string",
    None,
    ["a", "list"],
    42,
    {"hello": "world"},
    {"body": "no status"},
    {"statusCode": "abc", "body": "x"},
    {"statusCode": True, "body": "x"},
    {"statusCode": 200, "body": {"not": "a string"}},
    {"statusCode": 200, "body": 12},
    {"statusCode": 200, "body": "x", "extra": 1},
    {"statusCode": 200, "headers": {"x-a": ["1", "2"]}, "body": "x"},
    {"statusCode": 200, "multiValueHeaders": {"x-a": "1"}, "body": "x"},
    {"statusCode": 200, "body": "not base64!", "isBase64Encoded": True},
], ids=["str", "none", "list", "int", "no-statusCode", "body-only", "status-not-digits",
        "status-bool", "body-dict", "body-int", "extra-key", "header-list", "mvh-string",
        "bad-base64"])
def test_malformed_proxy_responses_are_502(up: Nimbus, returned: Any) -> None:
    assert_internal_error(answer(up, returned))


def test_a_raising_handler_is_502_internal_server_error(up: Nimbus) -> None:
    assert_internal_error(web(up).get("/r/boom"))


def test_a_timeout_is_504_as_on_other_routes(up: Nimbus) -> None:
    r = web(up).get("/r/nap")
    assert r.status_code == 504, r.text


def test_a_malformed_answer_is_explained_in_the_platform_log(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 200, "body": "x", "surprise": True})
    assert_internal_error(r)
    rid = r.headers["x-nimbus-request-id"]
    p = up.cli("logs", "respond", "--request-id", rid, "--json", timeout=30)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    platform = [x for x in lines if x.get("stream") == "platform"]
    assert platform, p.stdout
    assert any("surprise" in json.dumps(x) for x in platform), p.stdout


def test_an_unknown_path_is_nimbus_404(up: Nimbus) -> None:
    assert web(up).get("/r/nothing-here").status_code == 404


def test_an_async_call_on_a_rest_route_stores_the_rest_event(up: Nimbus) -> None:
    r = web(up).get("/r/items/7?k=v", headers={"x-amz-invocation-type": "Event"})
    assert r.status_code == 202, r.text
    iid = r.json()["invocationId"]
    with control(up) as ctl:
        rec = settled(ctl, iid)
    result = rec["result"]
    if isinstance(result, str):
        result = json.loads(result)
    ev = json.loads(result["body"])
    assert ev["resource"] == "/r/items/{id}"
    assert ev["pathParameters"] == {"id": "7"}
    assert ev["multiValueQueryStringParameters"] == {"k": ["v"]}
    assert ev["requestContext"]["stage"] == "Prod"



def test_path_and_path_parameters_are_url_decoded(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/items/j%40x.org%20z"))
    assert ev["pathParameters"] == {"id": "j@x.org z"}
    assert ev["path"] == "/r/items/j@x.org z"


def test_a_header_with_commas_is_one_value(up: Nimbus) -> None:
    ev = event_of(web(up).get("/r/plain", headers={"x-c": "1, 2"}))
    assert ev["headers"]["x-c"] == "1, 2"
    assert ev["multiValueHeaders"]["x-c"] == ["1, 2"]


def test_a_text_body_that_is_not_utf8_reaches_the_handler_intact(up: Nimbus) -> None:
    raw = b"\xff\xfe latin \xe9"
    ev = event_of(web(up).post("/r/any", content=raw, headers={"content-type": "text/plain"}))
    if ev["isBase64Encoded"]:
        assert base64.b64decode(ev["body"]) == raw
    else:
        assert isinstance(ev["body"], str) and ev["body"]


def test_head_on_an_any_route(up: Nimbus) -> None:
    r = web(up).head("/r/any")
    assert r.status_code == 200
    assert r.content == b""


def test_null_headers_in_the_response_are_no_headers(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 200, "headers": None, "multiValueHeaders": None,
                    "body": "x"})
    assert r.status_code == 200
    assert r.text == "x"


def test_a_header_value_with_a_line_break_never_splits_the_response(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 200, "headers": {"x-a": "1\r\nx-injected: yes"},
                    "body": "x"})
    assert "x-injected" not in r.headers


def test_the_same_function_gets_a_2_0_event_on_its_default_route(up: Nimbus) -> None:
    ev = event_of(web(up).get("/h/items/5?a=1&a=2"))
    assert ev["version"] == "2.0"
    assert ev["routeKey"] == "GET /h/items/{id}"
    assert ev["queryStringParameters"] == {"a": "1,2"}
    assert "multiValueQueryStringParameters" not in ev


def test_resource_id_is_stable_per_route_and_request_ids_are_the_request_id(up: Nimbus) -> None:
    r1 = web(up).get("/r/items/1")
    r2 = web(up).get("/r/items/2")
    r3 = web(up).get("/r/plain")
    c1, c2, c3 = (event_of(r)["requestContext"] for r in (r1, r2, r3))
    assert c1["resourceId"] == c2["resourceId"] != c3["resourceId"]
    for r, c in ((r1, c1), (r2, c2), (r3, c3)):
        assert c["requestId"] == c["extendedRequestId"] == r.headers["x-nimbus-request-id"]
    assert c1["requestId"] != c2["requestId"]


@pytest.mark.parametrize("ctype", ["application/vnd.api+json", "application/problem+json",
                                   "text/xml", "application/xml", "image/svg+xml",
                                   "application/json; charset=utf-8", "text/csv"])
def test_text_media_types_arrive_as_text(up: Nimbus, ctype: str) -> None:
    ev = event_of(web(up).post("/r/any", content=b'{"a": 1}', headers={"content-type": ctype}))
    assert ev["isBase64Encoded"] is False
    assert ev["body"] == '{"a": 1}'


def test_a_content_length_from_the_handler_does_not_break_the_answer(up: Nimbus) -> None:
    r = httpx.post(up.url + "/r/respond", timeout=10,
                   content=json.dumps({"r": {"statusCode": 200,
                                             "headers": {"content-length": "999"},
                                             "body": "x"}}))
    assert r.status_code == 200
    assert r.content == b"x"
    assert r.headers["content-length"] == "1"


def test_a_204_answer_has_no_body_even_if_one_is_given(up: Nimbus) -> None:
    r = answer(up, {"statusCode": 204, "body": "ignored"})
    assert r.status_code == 204
    assert r.content == b""


def test_a_response_under_6_mb_is_sent(up: Nimbus) -> None:
    r = web(up).get("/r/big", params={"n": "5000000"})
    assert r.status_code == 200
    assert len(r.content) == 5_000_000


def test_a_response_over_6_mb_is_502(up: Nimbus) -> None:
    assert_internal_error(web(up).get("/r/big", params={"n": "7000000"}))
