"""Second reader, written from README.md and docs/aws.md only: route overlap
rules (ANY beside a named method, one path spelled with other parameter
names, the same rules between apps, in the rich, short and SAM forms), and
the header names REST (payload 1.0) and HTTP API (2.0) events carry. One
real ``nimbus up``; raw sockets where the spelling of a header name matters."""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Nimbus
from tests.events_client import control, settled

BASE = """\
name: base
functions:
  anyfn:
    handler: h.handler
    http:
      - {method: ANY, path: /orders}
      - {method: ANY, path: '/o/{id}'}
      - {method: ANY, path: '/p/{proxy+}'}
  getfn:
    handler: h.handler
    http:
      - {method: GET, path: /orders}
      - {method: GET, path: '/o/{id}'}
      - {method: GET, path: '/p/{proxy+}'}
  me:
    handler: h.handler
    http: [{method: GET, path: /users/me}]
  user:
    handler: h.handler
    http: [{method: GET, path: '/users/{id}'}]
  v1:
    handler: h.echo
    http:
      - {method: GET, path: '/rest/{id}', payload: "1.0"}
      - {method: POST, path: '/rest/{id}', payload: "1.0"}
  v2:
    handler: h.echo
    http:
      - {method: GET, path: '/v2/{id}'}
      - {method: POST, path: '/v2/{id}'}
"""

CODE = """\
import json

def handler(event, context):
    info = {"fn": context.function_name,
            "method": event.get("httpMethod") or event["requestContext"]["http"]["method"],
            "route": event.get("resource") or event.get("routeKey"),
            "params": event.get("pathParameters"),
            "payload": event.get("version", "1.0")}
    return {"statusCode": 200, "headers": {"x-fn": context.function_name},
            "body": json.dumps(info)}

def echo(event, context):
    return {"statusCode": 200, "headers": {"x-fn": context.function_name},
            "body": json.dumps(event)}
"""


def _app(folder: Path, manifest: str, code: str = CODE, module: str = "h") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.yaml").write_text(textwrap.dedent(manifest))
    (folder / f"{module}.py").write_text(code)
    return folder


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("reader-routes")
    app = _app(root / "base", BASE)
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits")
    yield n
    n.stop()


def web(n: Nimbus) -> httpx.Client:
    assert n.http is not None
    return n.http


def _deploy(n: Nimbus, folder: Path) -> tuple[int, str]:
    p = n.cli("deploy", str(folder))
    return p.returncode, p.stdout + p.stderr


def _raw(n: Nimbus, method: str, target: str, head: bytes, body: bytes = b"",
         url: str | None = None) -> tuple[bytes, bytes]:
    """One request with exactly the header lines ``head``; (status+headers, body)."""
    host, port = (url or n.url).removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.settimeout(15)
        extra = b"Content-Length: %d\r\n" % len(body) if body else b""
        sock.sendall(method.encode() + b" " + target.encode() + b" HTTP/1.1\r\n" + head
                     + extra + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    return top, rest


def _event(n: Nimbus, method: str, target: str, head: bytes, body: bytes = b"") -> Any:
    top, rest = _raw(n, method, target, head, body)
    assert top.startswith(b"HTTP/1.1 200"), top + rest[:500]
    return orjson.loads(rest)


# --- ANY beside a named method ---------------------------------------------


def test_get_goes_to_get_and_every_other_method_to_any(up: Nimbus) -> None:
    assert web(up).get("/orders").json()["fn"] == "getfn"
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = web(up).request(method, "/orders")
        assert r.status_code == 200 and r.json()["fn"] == "anyfn", (method, r.text)


def test_head_beside_get_and_any_goes_to_any(up: Nimbus) -> None:
    # docs/aws.md: "GET goes to the GET route, every other method to ANY"
    r = web(up).head("/orders")
    assert r.status_code == 200, r.headers
    assert r.headers["x-fn"] == "anyfn"
    assert r.content == b""


def test_options_beside_get_and_any_goes_to_any(up: Nimbus) -> None:
    r = web(up).options("/orders")
    assert r.status_code == 200, r.text
    assert r.json() == {"fn": "anyfn", "method": "OPTIONS", "route": "ANY /orders",
                        "params": None, "payload": "2.0"}


def test_any_and_get_with_a_path_parameter(up: Nimbus) -> None:
    g = web(up).get("/o/42").json()
    assert (g["fn"], g["params"], g["route"]) == ("getfn", {"id": "42"}, "GET /o/{id}")
    p = web(up).post("/o/43").json()
    assert (p["fn"], p["params"], p["route"]) == ("anyfn", {"id": "43"}, "ANY /o/{id}")
    h = web(up).head("/o/44")
    assert h.status_code == 200 and h.headers["x-fn"] == "anyfn"


def test_any_and_get_with_a_greedy_parameter(up: Nimbus) -> None:
    g = web(up).get("/p/a/b/c").json()
    assert (g["fn"], g["params"]) == ("getfn", {"proxy": "a/b/c"})
    d = web(up).delete("/p/a/b").json()
    assert (d["fn"], d["params"]) == ("anyfn", {"proxy": "a/b"})


def test_a_literal_path_beside_a_parameter_is_served_as_on_api_gateway(up: Nimbus) -> None:
    # /users/me and /users/{id} both "match" GET /users/me; API Gateway takes
    # the literal one, and the docs promise API Gateway's behaviour
    assert web(up).get("/users/me").json()["fn"] == "me"
    assert web(up).get("/users/7").json() == {
        "fn": "user", "method": "GET", "route": "GET /users/{id}", "params": {"id": "7"},
        "payload": "2.0"}


# --- refusals within one app --------------------------------------------------


@pytest.mark.parametrize(("name", "first", "second", "clash"), [
    ("pnames", "{method: GET, path: '/u/{id}'}", "{method: GET, path: '/u/{uid}'}", "/u/{uid}"),
    ("pmethods", "{method: ANY, path: '/u/{id}'}", "{method: GET, path: '/u/{uid}'}",
     "/u/{uid}"),
    ("otherm", "{method: GET, path: '/u/{id}'}", "{method: POST, path: '/u/{uid}'}",
     "/u/{uid}"),
    ("greedy", "{method: ANY, path: '/g/{a+}'}", "{method: GET, path: '/g/{b+}'}", "/g/{b+}"),
    ("anyany", "{method: ANY, path: /dup}", "{method: ANY, path: /dup}", "/dup"),
    ("same", "{method: GET, path: /dup}", "{method: get, path: /dup}", "/dup"),
])
def test_two_routes_matching_the_same_request_are_refused_with_file_and_line(
        up: Nimbus, tmp_path: Path, name: str, first: str, second: str, clash: str) -> None:
    manifest = (f"name: {name}\nfunctions:\n  a:\n    handler: h.handler\n"
                f"    http: [{first}, {{method: GET, path: /{name}-fine}}]\n"
                f"  b:\n    handler: h.handler\n    http: [{second}]\n")
    code, out = _deploy(up, _app(tmp_path / name, manifest))
    assert code != 0, out
    assert "app.yaml:8" in out and clash in out, out
    # nothing of the refused app is served
    assert web(up).get(f"/{name}-fine").status_code == 404


def test_short_form_any_beside_get_is_served_and_other_names_refused(
        up: Nimbus, tmp_path: Path) -> None:
    ok = """\
        runtime: python3.8
        handlers:
          - {function: sa, handler: h.handler, event: http, method: any, path: /sf}
          - {function: sg, handler: h.handler, event: http, method: get, path: /sf}
        """
    code, out = _deploy(up, _app(tmp_path / "shortok", ok))
    assert code == 0, out
    assert web(up).get("/sf").json()["fn"] == "sg"
    assert web(up).put("/sf").json()["fn"] == "sa"
    bad = """\
        runtime: python3.8
        handlers:
          - {function: sa, handler: h.handler, event: http, method: any, path: '/sx/{id}'}
          - {function: sg, handler: h.handler, event: http, method: get, path: '/sx/{x}'}
        """
    code, out = _deploy(up, _app(tmp_path / "shortbad", bad))
    assert code != 0, out
    assert "app.yaml:4" in out and "/sx/{x}" in out and "overlaps" in out, out


SAM_HEAD = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Globals:
  Function:
    Runtime: python3.11
    CodeUri: src/
Resources:
"""


def _sam_fn(name: str, kind: str, method: str, path: str) -> str:
    return (f"  {name}:\n    Type: AWS::Serverless::Function\n    Properties:\n"
            f"      Handler: h.handler\n      Events:\n        E:\n          Type: {kind}\n"
            f"          Properties:\n            Path: {path}\n            Method: {method}\n")


def _sam(folder: Path, *fns: str) -> Path:
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "h.py").write_text(CODE)
    (folder / "template.yaml").write_text(SAM_HEAD + "".join(fns))
    return folder


def test_sam_any_and_get_from_two_functions_with_both_payloads(
        up: Nimbus, tmp_path: Path) -> None:
    folder = _sam(tmp_path / "samok", _sam_fn("A", "Api", "any", "/sam/{id}"),
                  _sam_fn("B", "HttpApi", "GET", "/sam/{id}"))
    code, out = _deploy(up, folder)
    assert code == 0, out
    g = web(up).get("/sam/1").json()
    assert (g["fn"], g["payload"], g["params"]) == ("B", "2.0", {"id": "1"})
    p = web(up).post("/sam/2").json()
    assert (p["fn"], p["payload"], p["route"]) == ("A", "1.0", "/sam/{id}")


def test_sam_other_parameter_names_refused_with_template_line(
        up: Nimbus, tmp_path: Path) -> None:
    folder = _sam(tmp_path / "sambad", _sam_fn("A", "Api", "get", "/st/{id}"),
                  _sam_fn("B", "Api", "any", "/st/{tid}"))
    code, out = _deploy(up, folder)
    assert code != 0, out
    # B's event starts at line 18, its Path on line 26
    assert "template.yaml:" in out and "/st/{tid}" in out and "overlaps" in out, out


def test_sam_api_and_httpapi_same_method_and_path_refused(up: Nimbus, tmp_path: Path) -> None:
    # on AWS these are two APIs on two hosts; nimbus serves one host, so the
    # two routes match the same request and the docs say they are refused
    folder = _sam(tmp_path / "sambad2", _sam_fn("A", "Api", "get", "/sh"),
                  _sam_fn("B", "HttpApi", "GET", "/sh"))
    code, out = _deploy(up, folder)
    assert code != 0, out
    assert "template.yaml:" in out and "/sh" in out, out


# --- between apps ---------------------------------------------------------------


def _one(root: Path, name: str, routes: str) -> Path:
    return _app(root / name, f"name: {name}\nfunctions:\n  {name}fn:\n    handler: h.handler\n"
                f"    http: {routes}\n  {name}ok:\n    handler: h.handler\n"
                f"    http: [{{method: GET, path: /{name}-fine}}]\n")


def test_between_apps_any_beside_get_is_served(up: Nimbus, tmp_path: Path) -> None:
    code, out = _deploy(up, _one(tmp_path, "xa", "[{method: ANY, path: '/x/{id}'}]"))
    assert code == 0, out
    code, out = _deploy(up, _one(tmp_path, "xg", "[{method: GET, path: '/x/{id}'}]"))
    assert code == 0, out
    assert web(up).get("/x/1").json()["fn"] == "xgfn"
    assert web(up).post("/x/1").json()["fn"] == "xafn"
    h = web(up).head("/x/1")
    assert h.status_code == 200 and h.headers["x-fn"] == "xafn"


@pytest.mark.parametrize(("name", "routes", "other"), [
    ("yn", "[{method: GET, path: '/orders'}]", "GET /orders"),
    ("yp", "[{method: POST, path: '/o/{oid}'}]", "/o/{id}"),
    ("yq", "[{method: ANY, path: '/p/{rest+}'}]", "/p/{proxy+}"),
    ("yr", "[{method: get, path: '/users/{uid}'}]", "/users/{id}"),
])
def test_between_apps_clashes_are_refused_and_nothing_is_deployed(
        up: Nimbus, tmp_path: Path, name: str, routes: str, other: str) -> None:
    code, out = _deploy(up, _one(tmp_path, name, routes))
    assert code != 0, out
    assert "overlaps" in out and other in out and "base/" in out, out
    assert web(up).get(f"/{name}-fine").status_code == 404, "no partial deploy"
    ls = up.cli("ls")
    assert f"{name}fn" not in ls.stdout and f"{name}ok" not in ls.stdout, ls.stdout
    # the existing app still serves
    assert web(up).get("/orders").json()["fn"] == "getfn"


def test_an_app_redeployed_may_rename_its_own_parameters(up: Nimbus, tmp_path: Path) -> None:
    code, out = _deploy(up, _one(tmp_path / "1", "zs", "[{method: GET, path: '/zs/{id}'}]"))
    assert code == 0, out
    code, out = _deploy(up, _one(tmp_path / "2", "zs", "[{method: GET, path: '/zs/{key}'}]"))
    assert code == 0, out
    assert web(up).get("/zs/5").json()["params"] == {"key": "5"}


# --- header names -------------------------------------------------------------------

HEAD = (b"HOST: shop.example\r\nUSER-AGENT: raw/1\r\nX-Mixed-Case: a\r\nx-lower: b\r\n"
        b"Cookie: c=1\r\nX-A: 1\r\nx-a: 2\r\n")


def test_rest_event_keeps_spelling_and_finds_well_known_headers_case_insensitively(
        up: Nimbus) -> None:
    ev = _event(up, "POST", "/rest/1", HEAD + b"CONTENT-TYPE: application/json\r\n",
                b'{"k": 1}')
    h, mv = ev["headers"], ev["multiValueHeaders"]
    assert {"HOST", "USER-AGENT", "X-Mixed-Case", "x-lower", "Cookie", "CONTENT-TYPE"} <= set(h)
    assert "x-mixed-case" not in h and "cookie" not in h
    assert h["Cookie"] == "c=1" and "cookies" not in ev
    assert set(h) == set(mv)
    assert all(h[k] == mv[k][-1] for k in h), (h, mv)
    # the platform's own reading of the headers does not depend on the spelling
    assert ev["body"] == '{"k": 1}' and ev["isBase64Encoded"] is False
    assert ev["requestContext"]["domainName"] == "shop.example"
    assert ev["requestContext"]["identity"]["userAgent"] == "raw/1"


def test_rest_event_one_name_in_two_spellings_is_one_repeated_name(up: Nimbus) -> None:
    # header names are case-insensitive: X-A and x-a are one name repeated;
    # docs/aws.md: headers hold its last value, multiValueHeaders all in order
    ev = _event(up, "GET", "/rest/1", HEAD)
    h = {k: v for k, v in ev["headers"].items() if k.lower() == "x-a"}
    mv = {k: v for k, v in ev["multiValueHeaders"].items() if k.lower() == "x-a"}
    assert list(h.values()) == ["2"], ev["headers"]
    assert list(mv.values()) == [["1", "2"]], ev["multiValueHeaders"]


def test_http_api_event_lowers_names_and_joins_repeats(up: Nimbus) -> None:
    ev = _event(up, "GET", "/v2/1", HEAD)
    h = ev["headers"]
    assert all(k == k.lower() for k in h), h
    assert h["x-mixed-case"] == "a" and h["x-a"] == "1,2"
    assert ev["cookies"] == ["c=1"]
    assert ev["requestContext"]["domainName"] == "shop.example"


def test_async_rest_request_event_keeps_header_spelling(up: Nimbus) -> None:
    top, rest = _raw(up, "GET", "/rest/9", HEAD + b"X-Nimbus-Invocation-Type: Event\r\n")
    assert top.startswith(b"HTTP/1.1 202"), top + rest
    with control(up) as ctl:
        rec = settled(ctl, json.loads(rest)["invocationId"])
    ev = orjson.loads(rec["result"]["body"])
    assert ev["pathParameters"] == {"id": "9"}
    assert {"X-Mixed-Case", "x-lower", "USER-AGENT"} <= set(ev["headers"]), ev["headers"]
    assert set(ev["headers"]) == set(ev["multiValueHeaders"])


def test_async_http_api_request_event_has_lower_names(up: Nimbus) -> None:
    top, rest = _raw(up, "GET", "/v2/9", HEAD + b"X-Nimbus-Invocation-Type: Event\r\n")
    assert top.startswith(b"HTTP/1.1 202"), top + rest
    with control(up) as ctl:
        rec = settled(ctl, json.loads(rest)["invocationId"])
    ev = orjson.loads(rec["result"]["body"])
    assert all(k == k.lower() for k in ev["headers"]), ev["headers"]
    assert ev["headers"]["x-mixed-case"] == "a"


def test_async_rest_request_with_a_lower_case_header_is_queued(up: Nimbus) -> None:
    top, rest = _raw(up, "GET", "/rest/10", HEAD + b"x-nimbus-invocation-type: Event\r\n")
    assert top.startswith(b"HTTP/1.1 202"), top + rest
    with control(up) as ctl:
        rec = settled(ctl, json.loads(rest)["invocationId"])
    ev = orjson.loads(rec["result"]["body"])
    assert {"X-Mixed-Case", "x-lower", "USER-AGENT"} <= set(ev["headers"]), ev["headers"]


def test_dry_run_on_a_rest_route_with_lambdas_spelling(up: Nimbus) -> None:
    two, _ = _raw(up, "GET", "/v2/1", b"Host: x\r\nX-Amz-Invocation-Type: DryRun\r\n")
    assert two.split(b" ")[1] == b"204", two
    top, rest = _raw(up, "GET", "/rest/1", b"Host: x\r\nX-Amz-Invocation-Type: DryRun\r\n")
    assert top.split(b" ")[1] == b"204", top + rest[:200]


def test_idempotency_key_on_a_rest_route_as_written(up: Nimbus) -> None:
    head = b"Host: x\r\nx-nimbus-invocation-type: Event\r\nIdempotency-Key: same-key-1\r\n"
    answers = []
    for _ in range(2):
        top, rest = _raw(up, "GET", "/rest/11", head)
        assert top.startswith(b"HTTP/1.1 202"), top + rest
        answers.append(json.loads(rest))
    assert answers[1]["invocationId"] == answers[0]["invocationId"], answers
    assert answers[1]["duplicate"] is True


STICKY = """\
name: stick
functions:
  stickfn:
    handler: h.version
    http:
      - {method: GET, path: /stick1, payload: "1.0"}
      - {method: GET, path: /stick2}
"""
STICKY_CODE = """\
def version(event, context):
    return {"statusCode": 200, "body": context.function_version}
"""


@pytest.fixture(scope="module")
def split(up: Nimbus, tmp_path_factory: pytest.TempPathFactory) -> Nimbus:
    folder = tmp_path_factory.mktemp("stick") / "stick"
    _app(folder, STICKY, STICKY_CODE)
    for i in range(2):
        (folder / "h.py").write_text(STICKY_CODE + f"# {i}\n")
        code, out = _deploy(up, folder)
        assert code == 0, out
    with control(up) as ctl:
        r = ctl.put("/v1/functions/stickfn/aliases/live", json={"weights": {"1": 50, "2": 50}})
        assert r.status_code == 200, r.text
    return up


def _versions(n: Nimbus, path: str, head: bytes) -> set[bytes]:
    seen = set()
    for _ in range(24):
        top, body = _raw(n, "GET", path, b"Host: x\r\n" + head)
        assert top.startswith(b"HTTP/1.1 200"), top + body
        seen.add(body)
    return seen


def test_sticky_header_on_a_split_alias_http_api_route(split: Nimbus) -> None:
    assert len(_versions(split, "/stick2", b"")) == 2, "the alias is split"
    assert len(_versions(split, "/stick2", b"X-Nimbus-Sticky: user-1\r\n")) == 1
    assert len(_versions(split, "/stick2", b"Cookie: nimbus-sticky=user-2\r\n")) == 1


def test_sticky_header_on_a_split_alias_rest_route(split: Nimbus) -> None:
    assert len(_versions(split, "/stick1", b"X-Nimbus-Sticky: user-1\r\n")) == 1


def test_sticky_cookie_on_a_split_alias_rest_route(split: Nimbus) -> None:
    assert len(_versions(split, "/stick1", b"Cookie: nimbus-sticky=user-2\r\n")) == 1


CLIENT_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_traced_rest_event_has_one_traceparent(tmp_path: Path) -> None:
    app = _app(tmp_path / "traced", "name: traced\nfunctions:\n  tr:\n    handler: h.echo\n"
               "    http: [{method: GET, path: /tr, payload: '1.0'}]\n")
    n = Nimbus(app, tmp_path / "state", tmp_path / "up.out", "--containment", "rlimits",
               "--trace", "file")
    try:
        ev = _event(n, "GET", "/tr", b"Host: x\r\nTraceparent: " + CLIENT_TP.encode() + b"\r\n")
    finally:
        n.stop()
    h = {k: v for k, v in ev["headers"].items() if k.lower() == "traceparent"}
    mv = {k: v for k, v in ev["multiValueHeaders"].items() if k.lower() == "traceparent"}
    assert len(h) == 1, h
    [value] = h.values()
    assert value.split("-")[1] == CLIENT_TP.split("-")[1], "joins the client's trace"
    assert value != CLIENT_TP, "the gateway's own span"
    assert list(mv.values()) == [[value]], mv
