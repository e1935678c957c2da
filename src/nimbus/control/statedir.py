"""The state folder: private to its owner, and never silently started empty.

At ``nimbus up``, before anything in the folder is opened:

* :func:`prepare` creates it ``0700`` (or checks an existing one): it must be
  a folder owned by this user and not writable by group or others, else
  nimbus refuses to start (another user could swap the databases or read
  the secrets in them). The files nimbus keeps there are tightened to
  ``0600`` (folders ``0700``); ``code/`` and ``venvs/`` are left alone.
* :class:`Identity` (``state.json``: a format version, a store id, how many
  deploys the store holds and whether the queue ever held work) is checked
  against the databases: a ``store.db`` or ``queue.db`` that is missing,
  empty (0 bytes) or has no tables while the identity says it had content
  refuses the start, naming what is missing and how to recover. A fresh
  folder gets a new identity. The identity is written when it changes
  (a deploy, the first message ever queued), never per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from nimbus.errors import UserInputError
from nimbus.ids import new_id
from nimbus.store.private import DIR_MODE, FILE_MODE, tighten, write_private

log = logging.getLogger("nimbus")

IDENTITY_FILE = "state.json"
IDENTITY_FORMAT = 1
STORE_DB = "store.db"
QUEUE_DB = "queue.db"
# Files and folders of the platform's own (the folders' files are tightened too).
PRIVATE_FILES = ("store.db", "queue.db", "queue.db-tries", "token", "control.json",
                 "nimbus.lock", IDENTITY_FILE, ".nimbus-state")
PRIVATE_DIRS = ("logs", "blobs")


class StateDirError(UserInputError):
    """The state folder cannot be used as it is; the message says why and what to do."""


def prepare(state_dir: Path) -> None:
    """Create ``state_dir`` (0700) or check an existing one; tighten its files."""
    try:
        state_dir.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"cannot create the state folder {state_dir}: {exc.strerror}") from None
    try:
        st = os.stat(state_dir)
    except OSError as exc:
        raise StateDirError(f"cannot use the state folder {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"the state folder {state_dir} is not a folder")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise StateDirError(
            f"the state folder {state_dir} is owned by uid {st.st_uid}, not by this user "
            f"(uid {uid}); refusing to use it: give another --state-dir, or chown it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise StateDirError(
            f"the state folder {state_dir} is writable by group or others (mode {mode:04o}); "
            f"refusing to use it: chmod 700 {state_dir}, or give another --state-dir")
    try:
        if mode != DIR_MODE:
            os.chmod(state_dir, DIR_MODE)
        for name in PRIVATE_FILES:
            tighten(state_dir / name)
        for name in ("store.db", "queue.db"):
            for suffix in ("-wal", "-shm", "-journal"):
                tighten(state_dir / (name + suffix))
        for name in PRIVATE_DIRS:
            folder = state_dir / name
            tighten(folder, DIR_MODE)
            if folder.is_dir() and not folder.is_symlink():
                for entry in os.scandir(folder):
                    if entry.is_file(follow_symlinks=False):
                        tighten(Path(entry.path), FILE_MODE)
    except OSError as exc:
        raise StateDirError(f"cannot make the state folder {state_dir} private: "
                            f"{exc.strerror} ({exc.filename})") from None


def _db_problem(path: Path, table: str) -> tuple[str | None, bool]:
    """(what is wrong with the SQLite file, or None; whether ``table`` has rows)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing", False
    except OSError as exc:
        return f"cannot be read ({exc.strerror})", False
    if size == 0:
        return "is empty (0 bytes)", False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"cannot be opened ({exc})", False
    try:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return "has no tables", False
        if table not in tables:
            return f"has no {table} table", False
        return None, conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
    except sqlite3.Error as exc:
        return f"is not a readable SQLite database ({exc})", False
    finally:
        conn.close()


@dataclass(slots=True)
class Identity:
    """What a state folder holds, in ``state.json`` beside the databases."""

    path: Path
    store_id: str
    created_at: float
    deploys: int = 0  # deploys that changed something, since the identity exists
    store_content: bool = False  # the store held deployed apps
    queue_content: bool = False  # the queue held async work (set once)

    @classmethod
    def check(cls, state_dir: Path) -> Identity:
        """Load (or create) the identity and check the databases against it;
        raises :class:`StateDirError` when one went missing or empty."""
        path = state_dir / IDENTITY_FILE
        store_problem, store_rows = _db_problem(state_dir / STORE_DB, "kv")
        queue_problem, queue_rows = _db_problem(state_dir / QUEUE_DB, "messages")
        ident = cls._load(path)
        fresh = ident is None
        if ident is None:
            ident = cls(path, new_id(), time.time())
        if ident.store_content and store_problem:
            held = (f"{ident.deploys} deploy{'s' if ident.deploys != 1 else ''}"
                    if ident.deploys else "deployed apps")
            raise StateDirError(
                f"{state_dir / STORE_DB} {store_problem}, but {path} says this state folder "
                f"held {held} (store {ident.store_id}); nimbus will not start empty over it: "
                f"restore {STORE_DB} (with its -wal file) from a backup, or move the state "
                f"folder away to start afresh")
        if ident.queue_content and queue_problem:
            raise StateDirError(
                f"{state_dir / QUEUE_DB} {queue_problem}, but {path} says this state folder "
                f"held async work and invocation records (store {ident.store_id}); nimbus "
                f"will not start empty over it: restore {QUEUE_DB} (with its -wal file) from "
                f"a backup, or move the state folder away to start afresh")
        for problem, name in ((store_problem, STORE_DB), (queue_problem, QUEUE_DB)):
            if problem and problem not in ("is missing", "is empty (0 bytes)", "has no tables"):
                raise StateDirError(f"{state_dir / name} {problem}; restore it from a backup, "
                                    "or move the state folder away to start afresh")
        # A folder from before the identity file: learn what it holds.
        learned = False
        if store_rows and not ident.store_content and _has_apps(state_dir / STORE_DB):
            ident.store_content = learned = True
        if queue_rows and not ident.queue_content:
            ident.queue_content = learned = True
        if fresh or learned:
            ident.save()
        return ident

    @classmethod
    def _load(cls, path: Path) -> Identity | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateDirError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data: Any = orjson.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            fmt = data.get("format")
            if fmt != IDENTITY_FORMAT:
                raise ValueError(f"format {fmt!r}, this nimbus reads format {IDENTITY_FORMAT}")
            return cls(path, str(data["store_id"]), float(data["created_at"]),
                       int(data["deploys"]), bool(data["store_content"]),
                       bool(data["queue_content"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateDirError(
                f"{path} is damaged ({exc}); it records what this state folder holds: "
                "restore it from a backup, or move the state folder away to start afresh"
            ) from None

    def save(self) -> None:
        data = {"format": IDENTITY_FORMAT, "store_id": self.store_id,
                "created_at": self.created_at, "deploys": self.deploys,
                "store_content": self.store_content, "queue_content": self.queue_content}
        write_private(self.path, orjson.dumps(data, option=orjson.OPT_INDENT_2), durable=True)

    def note_deploy(self) -> None:
        """A deploy changed the store (a new version or app record)."""
        self.deploys += 1
        self.store_content = True
        self._save_quietly()

    def note_queue_content(self) -> None:
        """The queue holds work now: written once, off the event loop."""
        if self.queue_content:
            return
        self.queue_content = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._save_quietly()
            return
        loop.run_in_executor(None, self._save_quietly)

    def _save_quietly(self) -> None:
        try:
            self.save()
        except OSError as exc:  # the work itself is safe; only the check at start weakens
            log.warning("could not update %s: %s", self.path, exc)


def _has_apps(path: Path) -> bool:
    """Whether the store holds anything a deploy wrote (not just the
    scheduler's leader key, which every start writes)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        return conn.execute("SELECT 1 FROM kv WHERE key NOT LIKE 'schedules/%' LIMIT 1"
                            ).fetchone() is not None
    except sqlite3.Error:
        return False
    finally:
        conn.close()
