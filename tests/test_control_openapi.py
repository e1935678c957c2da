"""The control API against its own OpenAPI document, with schemathesis.

A real ``nimbus up`` serves the document at ``/v1/openapi.json``; schemathesis
generates requests for every operation from it (valid ones and, where it
can, invalid ones). No input may give a 5xx; without the token every
guarded operation answers 401 in the one error shape.
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import ROOT, Nimbus

pytestmark = pytest.mark.e2e

EXAMPLES = 20  # per operation and generation mode
PUBLIC = {"/v1/health", "/v1/openapi.json"}


@pytest.fixture(scope="module")
def nimbus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("openapi")
    n = Nimbus(ROOT / "examples" / "hello", root / "state", root / "state.out")
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def document(nimbus: Nimbus) -> dict[str, Any]:
    r = httpx.get(nimbus.control_url + "/v1/openapi.json", timeout=10.0)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def _for_fuzzing(doc: dict[str, Any]) -> dict[str, Any]:
    """The document minus ``follow`` on the logs route: ``follow=true`` keeps
    the response open by design (checked by hand below)."""
    doc = copy.deepcopy(doc)
    op = doc["paths"]["/v1/functions/{name}/logs"]["get"]
    op["parameters"] = [p for p in op["parameters"] if p["name"] != "follow"]
    return doc


def _run(schema: Any, mode: GenerationMode, headers: dict[str, str], base_url: str,
         check: Any) -> list[str]:
    seen: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            _fuzz(operation, mode, headers, base_url, check)
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE
            continue
        seen.append(f"{operation.method.upper()} {operation.path}")
    return seen


def _fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str], base_url: str,
          check: Any) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=20)
        check(operation, case, response)

    one()


def test_the_document_describes_every_route_and_the_bearer_auth(document):
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer"}
    ops = {(method.upper(), path) for path, item in document["paths"].items()
           for method in item}
    assert ops == {
        ("GET", "/v1/health"), ("GET", "/v1/openapi.json"), ("POST", "/v1/deploy"),
        ("GET", "/v1/apps"), ("GET", "/v1/functions"), ("POST", "/v1/functions/{name}/invoke"),
        ("GET", "/v1/functions/{name}/logs"), ("GET", "/v1/status"),
        ("GET", "/v1/functions/{name}/invocations"), ("GET", "/v1/invocations/{id}"),
        ("GET", "/v1/traces/{id}"),
        ("GET", "/v1/functions/{name}/dlq"), ("POST", "/v1/functions/{name}/dlq/redrive"),
        ("POST", "/v1/publish/{name}"),
        ("GET", "/v1/functions/{name}/versions"), ("GET", "/v1/functions/{name}/aliases"),
        ("PUT", "/v1/functions/{name}/aliases/{alias}"),
        ("DELETE", "/v1/functions/{name}/aliases/{alias}"),
        ("GET", "/v1/functions/{name}/rollout"), ("POST", "/v1/functions/{name}/rollback")}
    for path in PUBLIC:
        assert document["paths"][path]["get"]["security"] == []


def test_no_generated_request_gets_a_5xx_and_unauthenticated_ones_get_401(nimbus, document):
    started = time.monotonic()
    schema = schemathesis.openapi.from_dict(_for_fuzzing(document))
    auth = {"Authorization": f"Bearer {nimbus.token}"}

    def no_server_error(operation: Any, case: Any, response: Any) -> None:
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} query={case.query} "
            f"headers={case.headers} body={case.body!r:.200} -> "
            f"{response.status_code} {response.text[:300]}")
        if response.status_code >= 400:
            body = response.json()
            assert set(body) >= {"errorType", "errorMessage"}, body

    def unauthorized(operation: Any, case: Any, response: Any) -> None:
        if operation.path in PUBLIC:
            assert response.status_code == 200
            return
        assert response.status_code in (401, 404), (case.formatted_path, response.text)
        if response.status_code == 404:  # only a path no route matches
            assert response.json()["errorType"] == "NotFoundError"
            return
        assert response.json()["errorType"] == "Unauthorized"
        assert response.headers["www-authenticate"] == ["Bearer"]

    base = nimbus.control_url
    seen = _run(schema, GenerationMode.POSITIVE, auth, base, no_server_error)
    assert len(seen) == 20
    assert _run(schema, GenerationMode.NEGATIVE, auth, base, no_server_error)
    _run(schema, GenerationMode.POSITIVE, {}, base, unauthorized)
    assert time.monotonic() - started < 120  # generous; typically well under a minute


@pytest.mark.parametrize("query, where", [
    ("tail=%C2%B2", "tail must be"), ("tail=-1", "tail must be"), ("tail=0", "tail must be"),
    ("tail=100001", "tail must be"), ("tail=1e3", "tail must be"),
    ("follow=maybe", "follow must be"), ("request_id=%01", "request_id must be"),
])
def test_bad_log_parameters_are_400_naming_the_parameter(nimbus, query, where):
    r = httpx.get(f"{nimbus.control_url}/v1/functions/hello/logs?{query}",
                  headers={"Authorization": f"Bearer {nimbus.token}"}, timeout=10.0)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["errorType"] == "UserInputError"
    assert where in body["errorMessage"]


@pytest.mark.parametrize("path, query, cap", [
    ("/v1/functions/hello/invocations", "limit=10001", "10000"),
    ("/v1/functions/hello/dlq", "limit=99999999999999999999999", "10000"),
    ("/v1/publish/orders", "&".join(["attribute=k=v"] * 51), "50"),
])
def test_list_sizes_are_capped_with_a_clear_400(nimbus, path, query, cap):
    method = "POST" if path.startswith("/v1/publish") else "GET"
    r = httpx.request(method, f"{nimbus.control_url}{path}?{query}",
                      headers={"Authorization": f"Bearer {nimbus.token}"}, timeout=10.0)
    assert r.status_code == 400, r.text
    assert cap in r.json()["errorMessage"]


def test_redrive_batches_are_capped(nimbus):
    r = httpx.post(f"{nimbus.control_url}/v1/functions/hello/dlq/redrive",
                   json={"ids": [f"id-{i}" for i in range(1001)]},
                   headers={"Authorization": f"Bearer {nimbus.token}"}, timeout=10.0)
    assert r.status_code == 400, r.text
    assert "ids must hold at most 1000" in r.json()["errorMessage"]


def _status_with_authorization(url: str, value: bytes) -> int:
    """GET /v1/functions with this exact Authorization header (raw bytes: HTTP
    clients refuse to send some of these, servers still have to judge them)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10.0) as s:
        s.sendall(b"GET /v1/functions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Authorization: " + value + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("value, ok", [
    ("Bearer {t}", True), ("bearer {t}", True), ("BEARER {t} ", True), ("bEaReR {t}", True),
    ("Bearer", False), ("Bearer ", False), ("Bearer  \t ", False), ("", False), (" ", False),
    ("Bearer  {t}", False), ("Bearer\t{t}", False),
    ("Basic {t}", False), ("{t}", False), ("Bearer {t}x", False), ("Bearer x{t}", False),
])
def test_bearer_scheme_in_any_case_and_no_empty_token(nimbus, value, ok):
    status = _status_with_authorization(nimbus.control_url,
                                        value.format(t=nimbus.token).encode())
    assert status == (200 if ok else 401)


def test_follow_streams_and_unknown_routes_and_methods_answer_in_the_one_shape(nimbus):
    auth = {"Authorization": f"Bearer {nimbus.token}"}
    with httpx.stream("GET", f"{nimbus.control_url}/v1/functions/hello/logs?follow=true",
                      headers=auth, timeout=10.0) as r:
        assert r.status_code == 200
    for method, path, status in [("GET", "/v1/nothing", 404), ("DELETE", "/v1/functions", 405),
                                 ("GET", "/v1/deploy", 405)]:
        r = httpx.request(method, nimbus.control_url + path, headers=auth, timeout=10.0)
        assert r.status_code == status
        assert set(r.json()) == {"errorType", "errorMessage"}

