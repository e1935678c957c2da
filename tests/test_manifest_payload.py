"""The ``payload`` key of HTTP routes: "1.0" (REST API) or "2.0" (HTTP API, the default)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import FunctionSpec, Route
from nimbus.rollout.traffic import route_payload

H = "def h(event, context):\n    return {'statusCode': 200}\n"


def app(root: Path, manifest: str) -> Path:
    (root / "app.yaml").write_text(textwrap.dedent(manifest))
    (root / "api.py").write_text(H)
    return root


def test_rich_form_payload_per_route(tmp_path):
    spec = load_app(app(tmp_path, """\
        functions:
          f:
            handler: api.h
            http:
              - {method: GET, path: /v1/{id}, payload: "1.0"}
              - {method: GET, path: /v2/{id}}
              - {method: POST, path: /v1b, payload: 1.0}
        """))
    routes = spec.functions["f"].routes
    assert [r.payload for r in routes] == ["1.0", "2.0", "1.0"]


def test_seed_form_payload(tmp_path):
    spec = load_app(app(tmp_path, """\
        handlers:
          - {function: f, handler: api.h, event: http, path: /a, payload: "1.0"}
          - {function: f, event: http, path: /b}
        """))
    assert [(r.path, r.payload) for r in spec.functions["f"].routes] == [
        ("/a", "1.0"), ("/b", "2.0")]


@pytest.mark.parametrize("value", ['"3.0"', "1", "v1", '""', "[1.0]"])
def test_bad_payload_names_file_line_and_field(tmp_path, value):
    with pytest.raises(ManifestError) as info:
        load_app(app(tmp_path, f"""\
            functions:
              f:
                handler: api.h
                http:
                  - {{method: GET, path: /x}}
                  - {{method: GET, path: /y, payload: {value}}}
            """))
    err = info.value
    msg = str(err)
    assert Path(str(err.file)).name == "app.yaml"
    assert (err.line, err.field) == (6, "functions.f.http[1].payload")
    assert '"1.0"' in msg and '"2.0"' in msg


def test_payload_on_a_non_http_seed_entry_is_refused(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_app(app(tmp_path, """\
            handlers:
              - {function: f, handler: api.h, event: schedule, schedule: rate(1 minute),
                 payload: "1.0"}
            """))
    assert "payload" in str(info.value) and "event: http" in str(info.value)


def test_default_payload_leaves_records_and_hashes_as_before():
    plain = FunctionSpec("f", "api", "h", routes=(Route("GET", "/x"),))
    assert plain.to_dict()["routes"] == [{"method": "GET", "path": "/x"}]
    rest = FunctionSpec("f", "api", "h", routes=(Route("GET", "/x", payload="1.0"),))
    assert rest.to_dict()["routes"] == [{"method": "GET", "path": "/x", "payload": "1.0"}]
    assert FunctionSpec.from_dict(rest.to_dict()) == rest
    assert FunctionSpec.from_dict(plain.to_dict()) == plain


def test_stored_route_payload():
    assert route_payload(["GET", "/x", "f"]) == "2.0"
    assert route_payload(["GET", "/x", "f", "beta"]) == "2.0"
    assert route_payload(["GET", "/x", "f", "live", "1.0"]) == "1.0"
