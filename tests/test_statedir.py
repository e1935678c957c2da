"""The state folder on real ``nimbus up`` processes: private modes, refusals
of a folder others could tamper with, of a bad token file, and of a start
that would silently begin empty over a lost store or queue."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import up_exits
from tests.events_client import control, settled

pytestmark = pytest.mark.e2e

APP = """\
name: keep
functions:
  note:
    handler: h.note
    http: {method: POST, path: /note}
"""

HANDLERS = """\
def note(event, context):
    print("noted", event.get("n"))
    return {"n": event.get("n")}
"""

# Folders whose modes the instance runtime decides (instances read code and
# venvs, and write their TMPDIR).
RUNTIME_DIRS = ("code", "venvs", "tmp")


def write_app(root: Path) -> Path:
    app = root / "keep"
    app.mkdir()
    (app / "app.yaml").write_text(APP)
    (app / "h.py").write_text(HANDLERS)
    return app


def up_refused(state: Path, app: Path | None = None) -> str:
    """Run ``nimbus up`` on ``state``, expecting a refusal; its one-line error."""
    code, out, _took = up_exits(app or state.parent, state)
    assert code == 1, (code, out)
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("nimbus: error:")]
    assert len(errors) == 1, out
    assert not (state / "control.json").exists(), "nothing was started"
    return errors[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_everything_nimbus_writes_is_private(tmp_path: Path, start_nimbus: Any) -> None:
    app = write_app(tmp_path)
    n = start_nimbus(app, name="fresh")
    with control(n) as ctl:
        r = ctl.post("/v1/functions/note/invoke", content=b'{"n": 1}',
                     headers={"X-Nimbus-Invocation-Type": "Event"})
        settled(ctl, r.json()["invocationId"])
        assert n.http is not None and n.http.post("/note", json={}).status_code == 200
    state = n.state
    assert mode(state) == 0o700
    for name in ("store.db", "store.db-wal", "store.db-shm", "queue.db", "queue.db-wal",
                 "queue.db-shm", "queue.db-tries", "token", "control.json", "nimbus.lock",
                 "state.json"):
        assert mode(state / name) == 0o600, f"{name}: {oct(mode(state / name))}"
    assert mode(state / "logs") == 0o700 and mode(state / "blobs") == 0o700
    logs = list((state / "logs").iterdir())
    assert logs, "the invocations wrote logs"
    loose = []
    for root, dirs, files in os.walk(state):
        rel = Path(root).relative_to(state)
        if rel.parts and rel.parts[0] in RUNTIME_DIRS:
            continue
        for d in dirs:
            if mode(Path(root, d)) != 0o700 and not (not rel.parts and d in RUNTIME_DIRS):
                loose.append(f"{rel / d}/ {oct(mode(Path(root, d)))}")
        for f in files:
            if mode(Path(root, f)) & 0o077:
                loose.append(f"{rel / f} {oct(mode(Path(root, f)))}")
    assert not loose, f"readable by others: {loose}"
    for d in ("code", "tmp"):
        assert (state / d).is_dir() and mode(state / d) == 0o700, f"{d}/ is created 0700"


@pytest.mark.parametrize("bad", ["foreign", "group-writable", "world-writable"])
def test_a_folder_others_could_change_is_refused(tmp_path: Path, bad: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if bad == "foreign":
        os.chown(state, 54321, 54321)
    else:
        os.chmod(state, 0o770 if bad == "group-writable" else 0o707)
    line = up_refused(state)
    assert str(state) in line, line
    if bad == "foreign":
        assert "owned by uid 54321" in line and f"uid {os.geteuid()}" in line, line
    else:
        want = "0770" if bad == "group-writable" else "0707"
        assert f"writable by group or others (mode {want})" in line, line
    assert not (state / "store.db").exists(), "nothing was created in it"


def test_a_legacy_open_folder_is_made_private(tmp_path: Path, start_nimbus: Any) -> None:
    """0755 with 0644 files (as written before): accepted, and tightened."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    token = state / "token"
    token.write_text("t" * 40 + "\n")
    os.chmod(token, 0o644)
    n = start_nimbus(None, state=state)
    assert n.token == "t" * 40
    assert mode(state) == 0o700 and mode(token) == 0o600


@pytest.mark.parametrize("content,problem", [
    ("", "is empty"),
    ("\n", "is empty"),
    ("short-token\n", "holds a token of 11 characters, at least 32 are needed"),
])
def test_an_empty_or_short_token_file_is_refused(tmp_path: Path, content: str,
                                                 problem: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "token").write_text(content)
    line = up_refused(state)
    assert f"the token file {state / 'token'} {problem}" in line, line


def test_a_fresh_folder_starts_and_gets_an_identity(tmp_path: Path, start_nimbus: Any) -> None:
    n = start_nimbus(None, state=tmp_path / "fresh-state")
    ident = (n.state / "state.json").read_text()
    assert '"format": 1' in ident and '"store_id"' in ident
    assert len(n.token) >= 32


def damage(copy: Path, db: str, how: str) -> str:
    """Damage ``copy/db`` as ``how`` says; the problem the refusal should name."""
    target = copy / db
    for suffix in ("-wal", "-shm"):
        (copy / (db + suffix)).unlink(missing_ok=True)
    if how == "truncated":
        os.truncate(target, 0)
        return "is empty (0 bytes)"
    target.unlink()
    if how == "deleted":
        return "is missing"
    conn = sqlite3.connect(target)
    conn.execute("PRAGMA user_version = 7")  # a valid database with no tables
    conn.close()
    return "has no tables"


def test_a_lost_store_or_queue_is_refused_never_started_empty(
        tmp_path: Path, start_nimbus: Any) -> None:
    app = write_app(tmp_path)
    n = start_nimbus(app, name="used")
    with control(n) as ctl:
        ids = []
        for i in range(3):
            r = ctl.post("/v1/functions/note/invoke", content=b'{"n": %d}' % i,
                         headers={"X-Nimbus-Invocation-Type": "Event"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["invocationId"])
        for iid in ids:
            settled(ctl, iid)
    assert n.stop(signal.SIGTERM) == 0
    state = n.state

    for db in ("store.db", "queue.db"):
        for how in ("truncated", "deleted", "no tables"):
            copy = tmp_path / f"copy-{db}-{how.replace(' ', '-')}"
            shutil.copytree(state, copy)
            problem = damage(copy, db, how)
            line = up_refused(copy, app)
            assert f"{copy / db} {problem}" in line, line
            assert str(copy / "state.json") in line, line
            held = "held 1 deploy" if db == "store.db" else "held async work"
            assert held in line, line
            assert f"restore {db}" in line and "move the state folder away" in line, line
            if how != "deleted":
                assert (copy / db).exists(), "the damaged file is left for the user"

    again = start_nimbus(None, state=state, name="again")  # the intact folder
    with control(again) as ctl:
        for iid in ids:
            assert ctl.get(f"/v1/invocations/{iid}").json()["status"] == "succeeded"
        assert "note" in ctl.get("/v1/functions").text


def test_a_folder_from_before_the_identity_file_is_learned(tmp_path: Path) -> None:
    """No state.json yet (a folder written by an older nimbus): what its
    databases hold is learned at start, so losing them later is caught."""
    import asyncio

    from nimbus.control.statedir import Identity, StateDirError
    from nimbus.store.queue import Outgoing
    from nimbus.store.sqlite import open_sqlite_store
    from nimbus.store.sqlite_queue import open_sqlite_queue

    state = tmp_path / "old"
    state.mkdir(mode=0o700)

    async def fill() -> None:
        store = await open_sqlite_store(state / "store.db")
        await store.put("schedules/leader", b"x")  # every start writes this: not content
        queue = await open_sqlite_queue(state / "queue.db")
        await store.aclose()
        await queue.aclose()
    asyncio.run(fill())
    ident = Identity.check(state)
    assert (ident.store_content, ident.queue_content) == (False, False)

    async def more() -> None:
        store = await open_sqlite_store(state / "store.db")
        await store.put("apps/shop", b"{}")
        queue = await open_sqlite_queue(state / "queue.db")
        await queue.send("fn/f", [Outgoing(b"{}")])
        await store.aclose()
        await queue.aclose()
    asyncio.run(more())
    (state / "state.json").unlink()
    ident = Identity.check(state)
    assert (ident.store_content, ident.queue_content) == (True, True)
    assert Identity.check(state).store_id == ident.store_id, "kept, not made anew"
    os.truncate(state / "queue.db", 0)
    for suffix in ("-wal", "-shm"):
        (state / ("queue.db" + suffix)).unlink(missing_ok=True)
    with pytest.raises(StateDirError, match=r"queue\.db is empty \(0 bytes\)"):
        Identity.check(state)
    (state / "state.json").write_text("{not json")
    with pytest.raises(StateDirError, match=r"state\.json is damaged"):
        Identity.check(state)
