"""Manifests written to hurt: alias bombs, huge files, deep nesting, values Python
cannot build, and app modules named like the standard library. Each is refused
quickly with a ManifestError naming the file and line."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.manifest.source import MAX_MANIFEST_BYTES

HANDLER = "def handler(event, context):\n    return 'ok'\n"


def app(tmp_path: Path, manifest: str, files: dict[str, str] | None = None) -> Path:
    d = tmp_path / "app"
    d.mkdir(exist_ok=True)
    (d / "app.yaml").write_text(manifest)
    for name, text in (files or {"api.py": HANDLER}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def error(path: Path) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_app(path)
    assert "\n" not in str(info.value)
    return info.value


def alias_bomb(levels: int = 10, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"functions: {{f: {{handler: api.handler, env: *a{levels - 1}}}}}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_at_its_line(tmp_path):
    text = alias_bomb()
    assert len(text) < 1000
    started = time.monotonic()
    err = error(app(tmp_path, text))
    assert time.monotonic() - started < 2.0  # generous: the expansion is never done
    assert err.line is not None and 2 <= err.line <= 10
    assert str(err).startswith(f"{tmp_path / 'app' / 'app.yaml'}:{err.line}: ")
    assert "once aliases are expanded" in str(err)


def test_a_merge_key_bomb_is_refused(tmp_path):
    lines = ["m0: &m0 {" + ", ".join(f"k{j}: v" for j in range(10)) + "}"]
    for i in range(1, 8):
        lines.append(f"m{i}: &m{i} [" + ", ".join([f"{{<<: *m{i - 1}}}"] * 10) + "]")
    lines.append("functions: {f: {handler: api.handler}}")
    err = error(app(tmp_path, "\n".join(lines) + "\n"))
    assert "once aliases are expanded" in err.message


def test_modest_aliases_still_work(tmp_path):
    manifest = textwrap.dedent("""\
        functions:
          f: &f {handler: api.handler, memory_mb: 256, timeout_s: 5}
          g: {<<: *f, timeout_s: 7}
        """)
    spec = load_app(app(tmp_path, manifest))
    assert spec.functions["g"].memory_mb == 256
    assert spec.functions["g"].timeout_s == 7


def test_a_recursive_alias_is_refused(tmp_path):
    err = error(app(tmp_path, "functions: &a {f: {handler: api.handler, env: *a}}\n"))
    assert err.line == 1 and "recursive" in err.message


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    err = error(app(tmp_path, "functions: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert err.line == 1 and "nests deeper" in err.message


def test_a_manifest_over_the_size_cap_is_refused_before_parsing(tmp_path):
    filler = "# " + "x" * 100 + "\n"
    text = "functions: {f: {handler: api.handler}}\n" + filler * (MAX_MANIFEST_BYTES // 100)
    err = error(app(tmp_path, text))
    assert err.line == 1 and "256 KiB" in err.message


def test_a_manifest_just_under_the_cap_loads(tmp_path):
    filler = "# " + "x" * 100 + "\n"
    body = "functions: {f: {handler: api.handler}}\n"
    text = body + filler * ((MAX_MANIFEST_BYTES - len(body)) // len(filler))
    assert len(text.encode()) <= MAX_MANIFEST_BYTES
    assert load_app(app(tmp_path, text)).functions["f"].module == "api"


@pytest.mark.parametrize("value, words", [
    ("2001-13-45", "month must be in 1..12"),
    ("1" * 5000, "digits"),
])
def test_values_python_cannot_build_are_errors_at_their_line(tmp_path, value, words):
    err = error(app(tmp_path, f"functions:\n  f:\n    handler: api.handler\n    x: {value}\n"))
    assert err.line == 4 and words in err.message


@pytest.mark.parametrize("module", ["json", "logging", "queue", "nimbus", "orjson", "email.utils"])
def test_a_handler_module_named_like_a_preloaded_or_stdlib_module_is_refused(tmp_path, module):
    parts = module.split(".")
    path = "/".join(parts) + ".py"
    files = {path: HANDLER}
    if len(parts) > 1:
        files["/".join(parts[:-1]) + "/__init__.py"] = ""
    err = error(app(tmp_path, f"functions:\n  f:\n    handler: {module}.handler\n", files))
    assert err.line == 3 and err.field == "functions.f.handler"
    assert f"{parts[0]!r}" in err.message and "rename it" in err.message


def test_a_preloaded_dependency_name_is_refused_for_the_handler(tmp_path):
    err = error(app(tmp_path, "functions:\n  f:\n    handler: jinja2.handler\n"
                              "    preload: [jinja2]\n", {"jinja2.py": HANDLER}))
    assert "preloads" in err.message


@pytest.mark.parametrize("name", ["logging.py", "json/__init__.py", "queue.py"])
def test_a_top_level_module_shadowing_the_stdlib_is_refused_naming_the_file(tmp_path, name):
    err = error(app(tmp_path, "functions:\n  f:\n    handler: api.handler\n",
                    {"api.py": HANDLER, name: ""}))
    assert err.line == 1 and name in err.message and "rename it" in err.message


def test_stdlib_names_below_the_top_level_are_fine(tmp_path):
    spec = load_app(app(tmp_path, "functions:\n  f:\n    handler: pkg.api.handler\n",
                        {"pkg/__init__.py": "", "pkg/api.py": HANDLER, "pkg/json.py": "",
                         "templates/logging.txt": "", "data/json/x.txt": ""}))
    assert spec.functions["f"].module == "pkg.api"


def test_keys_with_control_characters_give_one_line_errors(tmp_path):
    err = error(app(tmp_path, 'functions:\n  "a\\nb": {handler: api.handler, bad: 1}\n'))
    assert err.line == 2 and "a\\nb" in str(err)


def test_a_null_queue_or_destinations_is_no_queue(tmp_path):
    spec = load_app(app(tmp_path, "functions:\n  f: {handler: api.handler, queue: null, "
                                  "destinations: null}\n"))
    assert spec.functions["f"].queue is None
