"""The state folder and tries that never ran, read from the README ("The
state folder", the retries paragraph of "Events") and the spec: a private
folder, a refused start over an unsafe folder, a bad token file or a
store/queue that lost its content, and attempts that count handler starts,
not leases, across a SIGKILL."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Nimbus, up_exits
from tests.events_client import control, wait_for

ROOT = Path(__file__).resolve().parent.parent

MANIFEST = """\
name: st
functions:
  hello:
    handler: h.hello
    http: [{method: GET, path: /hello}]
"""
HANDLERS = """\
def hello(event, context):
    print("logged line")
    return {"statusCode": 200, "body": "hi"}
"""


def write_app(root: Path) -> Path:
    app = root / "st"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLERS)
    return app


def up_refuses(app: Path | None, state: Path, timeout: float = 60.0) -> str:
    """Run ``nimbus up`` expecting it to refuse: exit 1, one line, no
    traceback; the line."""
    code, out, _took = up_exits(app, state, timeout)
    assert "Traceback" not in out, out
    assert code == 1, (code, out)
    errors = [ln for ln in out.splitlines() if "error" in ln.lower() or "refus" in ln.lower()]
    assert len(errors) == 1, out
    return errors[0]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


# ------------------------------------------------------------ permissions


def test_state_folder_is_private(tmp_path: Path, start_nimbus: Any) -> None:
    n = start_nimbus(write_app(tmp_path))
    assert n.http.get("/hello").status_code == 200
    with control(n) as c:
        r = c.post("/v1/functions/hello/invoke?async=1", json={})
        assert r.status_code == 202
        iid = r.json()["invocationId"]
        wait_for("the async run", lambda: c.get(f"/v1/invocations/{iid}").json()[
            "status"] == "succeeded")
    n.stop()
    assert mode(n.state) == 0o700, oct(mode(n.state))
    for name in ("token", "store.db", "queue.db", "state.json", "control.json"):
        p = n.state / name
        if p.exists():
            assert mode(p) == 0o600, (name, oct(mode(p)))
        else:
            assert name == "control.json", f"{name} missing"
    logs = list((n.state / "logs").glob("*.log*"))
    assert logs, "no log files"
    for p in logs:
        assert mode(p) == 0o600, (p.name, oct(mode(p)))
    exposed = []
    for dirpath, dirnames, filenames in os.walk(n.state):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            if mode(p) & (stat.S_IWGRP | stat.S_IWOTH):
                exposed.append(f"{p.relative_to(n.state)} {oct(mode(p))} writable by others")
    assert not exposed, exposed[:10]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    """A fresh ``nimbus up`` (no token file given) that has served a request,
    for the tests that only look at its state folder."""
    root = tmp_path_factory.mktemp("served")
    n = Nimbus(write_app(root), root / "state", root / "state.out")
    assert n.http is not None and n.http.get("/hello").status_code == 200
    time.sleep(0.5)
    yield n
    n.stop()


def test_no_file_in_the_state_folder_is_readable_by_others(served: Nimbus) -> None:
    """README: 'every file nimbus writes there 0600, except the apps' code
    and requirements venvs' (readable by the function's uid through its
    view; the next test checks no other user reaches them)."""
    n = served
    readable = []
    shared = (n.state / "code", n.state / "venvs")
    for dirpath, _dirnames, filenames in os.walk(n.state):
        if Path(dirpath).is_relative_to(shared[0]) or Path(dirpath).is_relative_to(shared[1]):
            continue
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink() and mode(p) & stat.S_IROTH:
                readable.append(f"{p.relative_to(n.state)} {oct(mode(p))}")
    assert not readable, readable[:10]


def test_no_other_user_can_reach_a_file_of_the_state_folder(served: Nimbus) -> None:
    """What the 0600 rule protects: a user other than nimbus's opens no file
    there (a file readable by others sits behind a folder they cannot
    enter)."""
    n = served
    reachable = []
    for dirpath, _dirnames, filenames in os.walk(n.state):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink() or not mode(p) & stat.S_IROTH:
                continue
            folders = [n.state, *[n.state / q for q in
                                  _prefixes(p.parent.relative_to(n.state))]]
            if all(mode(d) & stat.S_IXOTH for d in folders):
                reachable.append(f"{p.relative_to(n.state)} {oct(mode(p))}")
    assert not reachable, reachable[:10]


def _prefixes(rel: Path) -> list[Path]:
    parts = rel.parts
    return [Path(*parts[:i]) for i in range(1, len(parts) + 1)]


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o707, 0o702])
def test_up_refuses_a_folder_writable_by_others(tmp_path: Path, bits: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, bits)
    line = up_refuses(write_app(tmp_path), state)
    assert str(state) in line, line
    assert mode(state) == bits, "the folder was changed instead of refused"


def test_up_refuses_a_folder_owned_by_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the folder to another user")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 54321, 54321)
    line = up_refuses(write_app(tmp_path), state)
    assert str(state) in line, line


def test_up_accepts_a_group_readable_folder(tmp_path: Path, start_nimbus: Any) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o750)
    n = start_nimbus(write_app(tmp_path), state=state)
    assert n.http.get("/hello").status_code == 200


# ------------------------------------------------------------------ token


@pytest.mark.parametrize("content", ["", "\n", "   \n\t  ", "x" * 31, " " * 40])
def test_up_refuses_an_empty_or_short_token(tmp_path: Path, content: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "token").write_text(content)
    os.chmod(state / "token", 0o600)
    line = up_refuses(write_app(tmp_path), state)
    assert "token" in line, line
    assert (state / "token").read_text() == content, "the token file was rewritten"


def test_a_32_character_token_is_accepted_and_kept(tmp_path: Path, start_nimbus: Any) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    token = "k" * 31 + "Z"
    (state / "token").write_text(token + "\n")
    os.chmod(state / "token", 0o600)
    n = start_nimbus(write_app(tmp_path), state=state)
    assert n.token == token
    r = httpx.get(n.control_url + "/v1/functions", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200
    host, port = n.control_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/v1/functions", headers={"Authorization": "Bearer "})
        assert conn.getresponse().status == 401
    finally:
        conn.close()


def test_a_missing_token_is_written_long_and_private(served: Nimbus) -> None:
    n = served
    token = (n.state / "token").read_text().strip()
    assert len(token) >= 32
    assert mode(n.state / "token") == 0o600
    assert not [p for p in n.state.iterdir() if p.name.startswith("token") and p.name != "token"]


# ------------------------------------------------- store and queue content


def deployed_once(tmp_path: Path, start_nimbus: Any, async_work: bool = False) -> tuple[
        Path, Path]:
    app = write_app(tmp_path)
    n = start_nimbus(app)
    assert n.http.get("/hello").status_code == 200
    if async_work:
        with control(n) as c:
            r = c.post("/v1/functions/hello/invoke?async=1", json={})
            assert r.status_code == 202
            iid = r.json()["invocationId"]
            wait_for("the async run", lambda: c.get(f"/v1/invocations/{iid}").json()[
                "status"] == "succeeded")
    assert n.stop() == 0
    return app, n.state


@pytest.fixture(scope="module")
def used_states(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, Path]]:
    """An app and a state folder it was deployed to once (and stopped), with
    and without async work run: each refusal test damages a copy of one."""
    out: dict[bool, tuple[Path, Path]] = {}
    for async_work in (False, True):
        root = tmp_path_factory.mktemp("used-async" if async_work else "used")
        app = write_app(root)
        n = Nimbus(app, root / "state", root / "state.out")
        try:
            assert n.http is not None and n.http.get("/hello").status_code == 200
            if async_work:
                with control(n) as c:
                    r = c.post("/v1/functions/hello/invoke?async=1", json={})
                    assert r.status_code == 202
                    iid = r.json()["invocationId"]
                    wait_for("the async run", lambda iid=iid: c.get(
                        f"/v1/invocations/{iid}").json()["status"] == "succeeded")
        finally:
            assert n.stop() == 0
        out[async_work] = (app, n.state)
    return out


def used_copy(used_states: dict[bool, tuple[Path, Path]], tmp_path: Path,
              async_work: bool = False) -> tuple[Path, Path]:
    """The test's own copy of a used state folder (modes kept), and its app."""
    app, state = used_states[async_work]
    copy = tmp_path / "state"
    shutil.copytree(state, copy, symlinks=True)
    return app, copy


def drop_sidecars(state: Path, db: str) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        p = state / f"{db}{suffix}"
        if p.exists():
            p.unlink()


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_up_refuses_a_store_that_lost_its_apps(
        tmp_path: Path, used_states: dict[bool, tuple[Path, Path]], how: str) -> None:
    app, state = used_copy(used_states, tmp_path)
    store = state / "store.db"
    if how == "truncated":
        store.write_bytes(b"")
    else:
        store.unlink()
    drop_sidecars(state, "store.db")
    line = up_refuses(app, state)
    assert "store.db" in line, line
    if how == "truncated":
        assert store.stat().st_size == 0, "nimbus wrote over the empty store"
    else:
        assert not store.exists(), "nimbus created a fresh store over the lost one"


def test_up_refuses_a_truncated_store_even_without_an_app_to_deploy(
        tmp_path: Path, used_states: dict[bool, tuple[Path, Path]]) -> None:
    _app, state = used_copy(used_states, tmp_path)
    (state / "store.db").write_bytes(b"")
    drop_sidecars(state, "store.db")
    line = up_refuses(None, state)
    assert "store.db" in line, line


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_up_refuses_a_queue_that_lost_its_async_work(
        tmp_path: Path, used_states: dict[bool, tuple[Path, Path]], how: str) -> None:
    app, state = used_copy(used_states, tmp_path, async_work=True)
    queue = state / "queue.db"
    if how == "truncated":
        queue.write_bytes(b"")
    else:
        queue.unlink()
    drop_sidecars(state, "queue.db")
    line = up_refuses(app, state)
    assert "queue.db" in line, line


def test_queue_missing_after_a_deploy_only_never_loses_the_apps(
        tmp_path: Path, start_nimbus: Any) -> None:
    """No async work ever: the queue held nothing, so starting over a fresh
    one is allowed, but the apps stay (version 1, not redeployed afresh);
    a refusal must be the clear one-line kind."""
    app, state = deployed_once(tmp_path, start_nimbus)
    (state / "queue.db").unlink()
    drop_sidecars(state, "queue.db")
    try:
        n = start_nimbus(app, state=state, name="again")
    except RuntimeError as e:
        text = str(e)
        assert "Traceback" not in text, text
        assert "queue.db" in text, text
        return
    assert n.http.get("/hello").status_code == 200
    with control(n) as c:
        fns = c.get("/v1/functions").json()
    assert [(f["name"], f["version"]) for f in fns] == [("hello", 1)], fns


# ------------------------------------------------- tries that never ran

CRASH_MANIFEST = """\
name: crash
functions:
  failer:
    handler: f.failer
    retries: {retries}
    retry_delay_s: 1
    max_instances: 1
    concurrency: 1
    timeout_s: 10
"""
CRASH_HANDLER = """\
import os, time

MARKS = {marks!r}

def _mark(text):
    fd = os.open(MARKS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)

def failer(event, context):
    _mark("start " + context.aws_request_id + "\\n")
    if not os.path.exists(MARKS + ".hurry"):
        time.sleep(0.15)
    _mark("end " + context.aws_request_id + "\\n")
    raise RuntimeError("always fails")
"""
RETRIES = 1
EVENTS = 24


def starts(marks: Path) -> Counter[str]:
    if not marks.exists():
        return Counter()
    return Counter(ln.split()[1] for ln in marks.read_text().splitlines()
                   if ln.startswith("start "))


def test_sigkill_during_retry_backoff_costs_no_tries(tmp_path: Path, start_nimbus: Any) -> None:
    marks = tmp_path / "marks.txt"
    app = tmp_path / "crash"
    app.mkdir()
    (app / "app.yaml").write_text(CRASH_MANIFEST.format(retries=RETRIES))
    (app / "f.py").write_text(CRASH_HANDLER.format(marks=str(marks)))
    n = start_nimbus(app, "--containment", "rlimits")
    with control(n) as c:
        ids = []
        for i in range(EVENTS):
            r = c.post("/v1/functions/failer/invoke?async=1", json={"i": i})
            assert r.status_code == 202, r.text
            ids.append(r.json()["invocationId"])
        # Let some fail once and wait in their backoff, most not start yet.
        wait_for("a few first tries", lambda: len(starts(marks)) >= 6, timeout=60)
        before = Counter(c.get(f"/v1/invocations/{i}").json()["status"] for i in ids)
    n.stop(signal.SIGKILL)
    assert before["retrying"] + before["queued"] + before["running"] > 0, before
    time.sleep(0.5)
    frozen = marks.read_text()
    time.sleep(1.0)
    assert marks.read_text() == frozen, "a handler kept running after nimbus was killed"
    Path(f"{marks}.hurry").touch()  # after the restart the tries need not take their time

    again = start_nimbus(app, "--containment", "rlimits", state=n.state, name="again")
    with control(again) as c:
        def records() -> list[dict[str, Any]] | None:
            recs = [c.get(f"/v1/invocations/{i}").json() for i in ids]
            done = all(r["status"] in ("dead", "failed", "succeeded") for r in recs)
            return recs if done else None
        recs = wait_for("every event to run out of tries", records, timeout=120)
    ran = starts(marks)
    problems = []
    short = 0
    for rec in recs:
        rid = rec["request_id"]
        runs = ran[rid]
        if rec["status"] != "dead":
            problems.append(f"{rid}: {rec['status']}, not dead")
        if rec["attempts"] != runs:
            short += 1
            if rec["attempts"] != runs + 1:
                problems.append(f"{rid}: attempts {rec['attempts']} but the handler "
                                f"began {runs} times")
        if runs != RETRIES + 1 and rec["attempts"] == runs:
            problems.append(f"{rid}: ran {runs} times with retries: {RETRIES} "
                            f"({rec.get('error')})")
    assert short <= 1, f"{short} records count a try the crash cut short: {problems}"
    assert not problems, "\n".join(problems)
    assert sum(ran.values()) >= EVENTS * (RETRIES + 1) - 1


NAP_MANIFEST = """\
name: cut
functions:
  napper:
    handler: f.napper
    retries: {retries}
    retry_delay_s: 0.2
    max_instances: 1
    timeout_s: 30
"""
NAP_HANDLER = """\
import os, time

MARKS = {marks!r}

def napper(event, context):
    mark = "start " + context.aws_request_id + "\\n"
    first = not os.path.exists(MARKS) or mark not in open(MARKS).read()
    fd = os.open(MARKS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, mark.encode())
    os.close(fd)
    # only the first try naps (long enough to be cut short); a retry fails at once
    time.sleep(float(event.get("nap", 0)) if first else 0)
    raise RuntimeError("fails after its nap")
"""


@pytest.mark.parametrize("retries", [0, 1])
def test_run_cut_short_by_sigkill_costs_exactly_its_one_try(
        tmp_path: Path, start_nimbus: Any, retries: int) -> None:
    """README: a run cut short by a crash costs its one (error Interrupted;
    with no try left the event is dead-lettered without running again)."""
    marks = tmp_path / "marks.txt"
    app = tmp_path / "cut"
    app.mkdir()
    (app / "app.yaml").write_text(NAP_MANIFEST.format(retries=retries))
    (app / "f.py").write_text(NAP_HANDLER.format(marks=str(marks)))
    n = start_nimbus(app, "--containment", "rlimits")
    with control(n) as c:
        r = c.post("/v1/functions/napper/invoke?async=1", json={"nap": 20})
        assert r.status_code == 202, r.text
        iid = r.json()["invocationId"]
        wait_for("the handler to start", lambda: starts(marks), timeout=60)
        running = c.get(f"/v1/invocations/{iid}").json()
        rid = iid  # README: the request id is the invocation id, for every try
        assert running["request_id"] in (None, iid), running
    n.stop(signal.SIGKILL)
    again = start_nimbus(app, "--containment", "rlimits", state=n.state, name="again")
    with control(again) as c:
        def final() -> dict[str, Any] | None:
            rec = c.get(f"/v1/invocations/{iid}").json()
            return rec if rec["status"] in ("dead", "failed", "succeeded") else None
        rec = wait_for("the record to settle", final, timeout=90)
        # nothing more runs afterwards
        time.sleep(1.5)
        assert c.get(f"/v1/invocations/{iid}").json()["attempts"] == rec["attempts"]
    runs = starts(marks)[rid]
    assert rec["status"] == "dead", rec
    assert runs == retries + 1, \
        f"the handler began {runs} times with retries: {retries}: {marks.read_text()} {rec}"
    assert rec["attempts"] == runs, rec
    if retries == 0:
        assert "Interrupted" in str(rec.get("error")), rec["error"]
