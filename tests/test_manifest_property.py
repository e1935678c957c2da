"""Property tests of the manifest loader: whatever app.yaml holds, loading it either
succeeds or raises ManifestError whose message starts with ``app.yaml:N:``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app

SETTINGS = settings(max_examples=int(__import__("os").environ.get("PROP_N", "200")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ERROR = re.compile(r"^\S*app\.yaml:[1-9][0-9]*: ")

API = "def handler(event, context):\n    return 'ok'\n\ndef other(event, context):\n    pass\n"
VALID = {
    "name": "shop",
    "runtime": "python3.11",
    "functions": {
        "users": {
            "handler": "api.handler",
            "http": [{"method": "GET", "path": "/users/{id}"}],
            "memory_mb": 256, "timeout_s": 10, "concurrency": 2, "max_instances": 4,
            "env": {"GREETING": "hi"},
            "retries": 1, "dead_letter": True,
            "destinations": {"on_failure": {"queue": "orders"}},
        },
        "orders": {"handler": "api.other", "queue": {"name": "orders", "batch_size": 5}},
        "nightly": {"handler": "api.other", "schedule": "rate(5 minutes)"},
    },
}
VALID_SEED = {
    "runtime": "python3.8",
    "handlers": [{"function": "hello", "event": "http", "method": "get"},
                 {"function": "hello", "event": "schedule", "schedule": "rate(1 hour)"}],
}


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("prop") / "app"
    d.mkdir()
    (d / "api.py").write_text(API)
    (d / "hello.py").write_text("def hello(event, context):\n    return 'hi'\n")
    (d / "requirements.txt").write_text("")
    return d


def check(app_dir: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    (app_dir / "app.yaml").write_bytes(data)
    try:
        load_app(app_dir)
    except ManifestError as exc:
        message = str(exc)
        assert ERROR.match(message), message
        assert "\n" not in message
        assert exc.line is not None and exc.line >= 1


# -- text that looks like YAML --------------------------------------------------

YAMLISH = st.lists(
    st.sampled_from(list("abcfhnrtu01239 _-:.,[]{}&*!|>'\"#%@?<=/\\\t\n") +
                    ["functions", "handlers", "handler", "api.handler", "http",
                              "  ", "\n  ", "\n    ", "- ", ": ", "&a ", "*a", "<<: ",
                              "!!str ", "!!binary ", "!!python/name:os.system ", "\x00",
                              "\ufeff", "é", "2001-13-45", "1e400", "0x", "~"]),
    max_size=120).map("".join)


@SETTINGS
@given(text=YAMLISH)
def test_yamlish_text_loads_or_is_a_manifest_error(app_dir, text):
    check(app_dir, text)


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_load_or_are_a_manifest_error(app_dir, raw):
    check(app_dir, raw)


# -- arbitrary structures dumped to YAML ---------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(["api.handler", "GET", "/x/{id}",
                                                       "python3.11", "rate(1 minute)"]))
KEYS = st.text(max_size=12) | st.integers() | st.booleans() | st.none() | st.sampled_from(
    ["functions", "handlers", "handler", "http", "method", "path", "memory_mb", "timeout_s",
     "queue", "topic", "schedule", "destinations", "env", "preload", "requirements", "name",
     "runtime", "function", "event", "max_instances", "min_instances", "concurrency"])
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=25)


@SETTINGS
@given(data=STRUCTURES)
def test_any_structure_loads_or_is_a_manifest_error(app_dir, data):
    check(app_dir, yaml.safe_dump(data, allow_unicode=True))


@SETTINGS
@given(functions=STRUCTURES)
def test_any_functions_value_loads_or_is_a_manifest_error(app_dir, functions):
    check(app_dir, yaml.safe_dump({"functions": functions}, allow_unicode=True))


# -- mutations of valid manifests ------------------------------------------------------


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += paths(v, prefix + (i,))
    return out


def mutate(data: Any, path: tuple[Any, ...], how: str, value: Any) -> Any:
    if not path:
        return value if how == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[f"{last}_x" if isinstance(last, str) else "extra"] = value
    elif how == "add":
        parent.append(value)
    return data


@SETTINGS
@given(st.data())
def test_mutated_valid_manifests_load_or_are_a_manifest_error(app_dir, data):
    import copy

    doc = copy.deepcopy(data.draw(st.sampled_from([VALID, VALID_SEED])))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(doc)))
        how = data.draw(st.sampled_from(["replace", "delete", "add"]))
        doc = mutate(doc, path, how, data.draw(STRUCTURES))
    check(app_dir, yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))


@SETTINGS
@given(st.data())
def test_character_edits_of_a_valid_manifest_load_or_are_a_manifest_error(app_dir, data):
    text = yaml.safe_dump(VALID, sort_keys=False)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 5))
        insert = data.draw(st.text(alphabet="{}[]:&*-#'\"\n ab1", max_size=4))
        text = text[:at] + insert + text[at + cut:]
    check(app_dir, text)


def test_the_valid_manifests_used_above_are_valid(app_dir):
    (app_dir / "app.yaml").write_text(yaml.safe_dump(VALID))
    assert set(load_app(app_dir).functions) == {"users", "orders", "nightly"}
    (app_dir / "app.yaml").write_text(yaml.safe_dump(VALID_SEED))
    assert set(load_app(app_dir).functions) == {"hello"}
