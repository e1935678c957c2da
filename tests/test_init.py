"""``nimbus init``: every template's app loads, and its generated test passes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import nimbus.cli.init  # noqa: F401 - registers nimbus init
from nimbus.cli.init import FILES, TEMPLATES, init_app
from nimbus.cli.main import cli
from nimbus.manifest.loader import load_app

# What each template's app holds once loaded: function -> (routes, queue, schedules).
EXPECTED = {
    "hello": {"hello": ((("GET", "/hello"),), None, 0)},
    "api": {"get_item": ((("GET", "/items/{id}"),), None, 0),
            "create_item": ((("POST", "/items"),), None, 0)},
    "queue": {"jobs": ((), "jobs", 0)},
    "schedule": {"tick": ((), None, 1)},
}


def test_every_template_loads_and_its_tests_pass(tmp_path):
    folders = []
    for template in TEMPLATES:
        folder = tmp_path / f"My_{template}"
        assert init_app(folder, template) == f"my-{template}"
        module = FILES[template][0]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["app.yaml", "README.md", f"{module}.py", f"test_{module}.py"])
        spec = load_app(folder)
        assert spec.name == f"my-{template}"
        assert {name: (tuple((r.method, r.path) for r in fn.routes), fn.queue,
                       len(fn.schedules))
                for name, fn in spec.functions.items()} == EXPECTED[template]
        assert "nimbus up ." in (folder / "README.md").read_text()
        folders.append(str(folder))
    # The generated tests, as a user runs them: pytest in a fresh process.
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *folders], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path,
                          env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 passed" in done.stdout, done.stdout


def test_cli_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    runner = CliRunner()
    for name, what in (("taken", "exists and is not empty"),
                       ("file", "exists and is not a folder")):
        result = runner.invoke(cli, ["init", str(tmp_path / name)])
        assert result.exit_code == 2, result.output
        assert f"nimbus: error: {tmp_path / name} {what}" in result.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]


def test_cli_makes_the_app_in_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["init", "--template", "api", str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    assert "created app 'empty'" in result.output
    assert (tmp_path / "empty" / "test_api.py").exists()


@pytest.mark.parametrize("args", [["init"], ["init", "--template", "web", "x"]])
def test_cli_usage_errors(tmp_path, args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert not (tmp_path / "x").exists()
