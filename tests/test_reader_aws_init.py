"""A second reader's checks of ``nimbus init`` from a new user's side: each
template's own test passes with pytest as generated, and each app deploys
and serves through one real ``nimbus up``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Nimbus

TEMPLATES = ("hello", "api", "queue", "schedule")
FOLDERS = {"hello": "Hello_App", "api": "shop", "queue": "Jobs", "schedule": "tick-tock"}
APP_NAMES = {"hello": "hello-app", "api": "shop", "queue": "jobs", "schedule": "tick-tock"}


def nimbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nimbus.cli.main", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_", "AWS_"))}
    env["HOME"] = str(home)
    # plain pytest, as in a new user's environment: not this project's
    # test plugins (hypothesis' alone takes seconds to import)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


class Made:
    def __init__(self, root: Path, inits: dict[str, subprocess.CompletedProcess[str]],
                 pytests: dict[str, subprocess.CompletedProcess[str]]) -> None:
        self.root = root
        self.inits = inits
        self.pytests = pytests

    def folder(self, template: str) -> Path:
        return self.root / FOLDERS[template]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """The four templates made side by side, and each one's pytest run in its
    folder (the way the README says: ``cd NAME && pytest``)."""
    root = tmp_path_factory.mktemp("reader-init")
    procs = {t: subprocess.Popen(
        [sys.executable, "-m", "nimbus.cli.main", "init", "--template", t, FOLDERS[t]],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for t in TEMPLATES}
    inits = {}
    for t, p in procs.items():
        out, err = p.communicate(timeout=60)
        inits[t] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    home = root / "home"
    home.mkdir()
    runs = {t: subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=root / FOLDERS[t], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=clean_env(home)) for t in TEMPLATES if inits[t].returncode == 0}
    pytests = {}
    for t, p in runs.items():
        out, _ = p.communicate(timeout=90)
        pytests[t] = subprocess.CompletedProcess(p.args, p.returncode, out, "")
    return Made(root, inits, pytests)


@pytest.fixture(scope="module")
def up(made: Made) -> Iterator[Nimbus]:
    n = Nimbus(made.folder("hello"), made.root / "state", made.root / "up.out",
               "--containment", "rlimits")
    try:
        for t in ("api", "queue", "schedule"):
            p = n.cli("deploy", str(made.folder(t)))
            assert p.returncode == 0, f"{t}: {p.stdout}{p.stderr}"
        yield n
    finally:
        n.stop()


@pytest.mark.parametrize("template", TEMPLATES)
def test_init_makes_the_four_files(made: Made, template: str) -> None:
    p = made.inits[template]
    assert p.returncode == 0, p.stderr
    folder = made.folder(template)
    files = sorted(x.name for x in folder.iterdir())
    assert "app.yaml" in files and "README.md" in files
    tests = [f for f in files if f.startswith("test_") and f.endswith(".py")]
    assert len(tests) == 1, files
    handler_module = tests[0][len("test_"):]
    assert handler_module in files, files
    assert len(files) == 4, files


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_app_is_named_after_the_folder(made: Made, template: str) -> None:
    text = (made.folder(template) / "app.yaml").read_text()
    assert f'name: "{APP_NAMES[template]}"\n' in text, text


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_generated_test_passes_with_pytest(made: Made, template: str) -> None:
    p = made.pytests[template]
    assert p.returncode == 0, p.stdout
    assert " passed" in p.stdout and "failed" not in p.stdout, p.stdout


def test_hello_serves(up: Nimbus) -> None:
    assert up.http is not None
    r = up.http.get("/hello")
    assert r.status_code == 200, r.text
    assert r.text == "Hello, World!"
    r = up.http.get("/hello", params={"name": "Zoë"})
    assert r.text == "Hello, Zoë!"


def test_api_serves_get_and_post(up: Nimbus) -> None:
    assert up.http is not None
    r = up.http.get("/items/42")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == 42
    r = up.http.post("/items", json={"name": "lamp"})
    assert r.status_code == 201, r.text
    assert r.json()["created"] == {"name": "lamp"}
    assert r.json()["requestId"] == r.headers["x-nimbus-request-id"]
    assert up.http.get("/items/abc").status_code == 400
    assert up.http.post("/items", content=b"lamp").status_code == 400


def test_queue_consumes_a_published_job(up: Nimbus) -> None:
    p = up.cli("publish", "jobs", "--data", json.dumps({"task": "resize-42"}))
    assert p.returncode == 0, p.stdout + p.stderr
    deadline = time.monotonic() + 20
    while True:
        logs = up.cli("logs", "jobs", "--tail", "50")
        if "resize-42" in logs.stdout:
            break
        assert time.monotonic() < deadline, logs.stdout + logs.stderr
        time.sleep(0.3)


def test_schedule_is_deployed_and_its_handler_runs(up: Nimbus) -> None:
    ls = up.cli("ls")
    assert ls.returncode == 0, ls.stderr
    assert "tick" in ls.stdout
    event = {"version": "0", "id": "x", "detail-type": "Scheduled Event",
             "source": "aws.events", "account": "000000000000",
             "time": "2026-12-02T06:00:00Z", "region": "local", "resources": [],
             "detail": {"task": "cleanup"}}
    p = up.cli("invoke", "tick", "--data", json.dumps(event))
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout) == {"task": "cleanup", "at": "2026-12-02T06:00:00Z"}


def test_init_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    p = nimbus("init", "full", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("nimbus: error:"), p.stderr
    assert "full" in p.stderr and "Traceback" not in p.stderr
    assert [x.name for x in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_init_takes_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    p = nimbus("init", "empty", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "empty" / "app.yaml").is_file()


def test_init_refuses_an_unknown_template(tmp_path: Path) -> None:
    p = nimbus("init", "--template", "django", "x", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("nimbus: error:"), p.stderr
    assert "django" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()


def test_init_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    p = nimbus("init", "afile", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("nimbus: error:") and "afile" in p.stderr, p.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_the_next_steps_hint_can_be_pasted_for_a_name_with_a_space(tmp_path: Path) -> None:
    p = nimbus("init", "my app", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "cd 'my app'" in p.stdout or 'cd "my app"' in p.stdout, p.stdout


def test_a_folder_name_with_other_characters_makes_a_valid_name(tmp_path: Path) -> None:
    p = nimbus("init", "Zoë_Shop", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "Zoë_Shop" / "app.yaml").read_text()
    name = text.split("name:", 1)[1].splitlines()[0].strip().strip("'\"")
    assert name and all(c.islower() or c.isdigit() or c == "-" for c in name), name


def test_an_app_in_a_folder_named_with_digits_deploys_as_made(tmp_path: Path) -> None:
    p = nimbus("init", "123", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    n = Nimbus(tmp_path / "123", tmp_path / "state", tmp_path / "up.out",
               "--containment", "rlimits")
    try:
        assert n.http is not None
        assert n.http.get("/hello").text == "Hello, World!"
    finally:
        n.stop()


def test_init_without_a_name_is_a_usage_error(tmp_path: Path) -> None:
    p = nimbus("init", cwd=tmp_path)
    assert p.returncode == 2
    assert "nimbus: error:" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_template_option_may_follow_the_name(tmp_path: Path) -> None:
    p = nimbus("init", "shop", "--template", "api", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "shop" / "api.py").is_file()
