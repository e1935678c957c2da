"""``Store`` over one SQLite file, shared safely by several processes.

Contract (beyond :class:`nimbus.store.base.Store`):

* Durability: WAL journal with ``synchronous=FULL``; a write is on disk
  before its coroutine returns.
* Threading: every sqlite call runs on one dedicated worker thread, so the
  event loop never waits on disk. ``sqlite3`` errors surface as
  ``UnavailableError`` (``__cause__`` is the driver error), never raw.
* Watches read the ``changes`` log. In-process writes wake watchers at once;
  writes by other connections (other processes) are noticed by polling
  ``PRAGMA data_version`` every ``POLL_S`` while watchers exist. The log keeps
  the last ``keep_changes`` rows; a watcher that asks for older history gets
  the current entries of its prefix (revision > ``after``) as puts instead.
* Leases expire by ``clock.now()``. Expired leases (and their keys, which
  produce delete events) are removed by a sweeper every ``SWEEP_S``, before
  reads and writes, and by :meth:`SQLiteStore.sweep` on demand.
* ``update`` keeps the key's lease; ``put``/``create`` set it (or clear it).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from nimbus.clock import Clock, SystemClock
from nimbus.errors import ClosedError, ConflictError, NimbusError, NotFoundError, UnavailableError
from nimbus.store.base import Entry, WatchEvent
from nimbus.store.private import private_database

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.05  # how often watchers look for other processes' writes
SWEEP_S = 0.2  # how often expired leases are swept
BUSY_TIMEOUT_MS = 5000  # wait this long for another process's write lock
WATCH_BATCH = 1000  # changes read per watcher query

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL, lease INTEGER NULL);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl_s REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL, compacted INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (1, 0, 0);
"""


def _prefix_where(prefix: str) -> tuple[str, tuple[object, ...]]:
    """SQL matching keys that start with ``prefix`` (exact, case-sensitive).

    A key range lets sqlite use the primary-key index; ``substr`` keeps it
    exact (LIKE would be case-insensitive and treat ``%``/``_`` specially)."""
    if not prefix:
        return "1", ()
    return "key >= ? AND substr(key, 1, ?) = ?", (prefix, len(prefix), prefix)


async def open_sqlite_store(path: Path, *, clock: Clock | None = None,
                            keep_changes: int = 10_000) -> SQLiteStore:
    """Open (creating if needed) the store file at ``path``."""
    store = SQLiteStore(Path(path), clock or SystemClock(), keep_changes)
    try:
        await store._call(store._open)
    except BaseException:
        store._executor.shutdown(wait=False)
        raise
    store._sweeper = asyncio.create_task(store._sweep_loop(), name=f"sweep {path}")
    return store


class SQLiteStore:
    """Use :func:`open_sqlite_store`; the constructor does no I/O."""

    def __init__(self, path: Path, clock: Clock, keep_changes: int) -> None:
        self.path = path
        self._clock = clock
        self._keep = max(1, keep_changes)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nimbus-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._writes = 0  # worker-thread counter: did a job write anything?
        self._data_version = 0
        self._closed = False
        self._watchers: set[asyncio.Event] = set()
        self._poller: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- plumbing: everything sqlite goes through _call -----------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise ClosedError(f"store {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            result, wrote = await loop.run_in_executor(self._executor, self._job, fn, *args)
        except sqlite3.Error as exc:
            raise UnavailableError(f"sqlite store {self.path}: {exc}") from exc
        except NimbusError:
            self._wake()  # a failed op may still have committed a lease sweep
            raise
        if wrote:
            self._wake()
        return result

    def _job(self, fn: Callable[..., T], *args: Any) -> tuple[T, bool]:
        before = self._writes
        return fn(*args), self._writes != before

    def _wake(self) -> None:
        for event in self._watchers:
            event.set()

    def _write_tx(self, now: float, op: Callable[..., T], *args: Any) -> T:
        """Run ``op`` in one write transaction after sweeping expired leases.

        ``op`` checks before it writes, so a domain error (conflict, not
        found) still commits the sweep and nothing else."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks
        try:
            self._sweep_locked(now)
            try:
                result = op(*args)
            except NimbusError:
                conn.execute("COMMIT")
                raise
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _open(self) -> None:
        try:
            private_database(self.path)  # 0600, and so are its -wal and -shm
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot create {self.path}: {exc.strerror}") from exc
        conn = sqlite3.connect(self.path, isolation_level=None)  # we issue BEGIN ourselves
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not enable WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = FULL")  # acknowledged writes survive power loss
            conn.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("COMMIT")
            self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- worker-thread helpers (caller holds the write transaction) -----------

    def _bump(self) -> int:
        conn = self._db()
        rev: int
        rev, compacted = conn.execute("SELECT revision, compacted FROM meta").fetchone()
        rev += 1
        floor = rev - self._keep
        if floor > compacted:  # trim the change log; watchers older than this get a snapshot
            conn.execute("DELETE FROM changes WHERE revision <= ?", (floor,))
            compacted = floor
        conn.execute("UPDATE meta SET revision = ?, compacted = ?", (rev, compacted))
        self._writes += 1
        return rev

    def _put_locked(self, key: str, value: bytes, lease: int | None, keep_lease: bool) -> int:
        conn = self._db()
        if lease is not None and conn.execute(
                "SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise NotFoundError(f"lease {lease} does not exist or expired")
        rev = self._bump()
        value = bytes(value)
        conn.execute(
            "INSERT INTO kv (key, value, revision, lease) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "revision = excluded.revision"
            + ("" if keep_lease else ", lease = excluded.lease"),
            (key, value, rev, lease))
        conn.execute("INSERT INTO changes VALUES (?, ?, 'put', ?)", (rev, key, value))
        return rev

    def _delete_locked(self, key: str) -> None:
        rev = self._bump()
        self._db().execute("DELETE FROM kv WHERE key = ?", (key,))
        self._db().execute("INSERT INTO changes VALUES (?, ?, 'delete', x'')", (rev, key))

    def _revision_of(self, key: str) -> int | None:
        row = self._db().execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _drop_lease_locked(self, lease: int) -> None:
        conn = self._db()
        keys = [k for (k,) in conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key",
                                           (lease,))]
        for key in keys:
            self._delete_locked(key)
        conn.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def _sweep_locked(self, now: float) -> None:
        expired = [i for (i,) in self._db().execute(
            "SELECT id FROM leases WHERE expires_at <= ? ORDER BY id", (now,))]
        for lease in expired:
            self._drop_lease_locked(lease)

    def _maybe_sweep(self, now: float) -> None:
        # A cheap read first: most calls find nothing and need no write lock.
        if self._db().execute("SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1",
                              (now,)).fetchone() is not None:
            self._write_tx(now, lambda: None)

    # -- Store ----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        def run(now: float) -> Entry | None:
            self._maybe_sweep(now)
            row = self._db().execute("SELECT value, revision FROM kv WHERE key = ?",
                                     (key,)).fetchone()
            return None if row is None else Entry(key, bytes(row[0]), int(row[1]))
        return await self._call(run, self._clock.now())

    async def list(self, prefix: str) -> list[Entry]:
        def run(now: float) -> list[Entry]:
            self._maybe_sweep(now)
            where, args = _prefix_where(prefix)
            rows = self._db().execute(
                f"SELECT key, value, revision FROM kv WHERE {where} ORDER BY key", args)
            return [Entry(k, bytes(v), int(r)) for k, v, r in rows]
        return await self._call(run, self._clock.now())

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return await self._call(self._write_tx, self._clock.now(),
                                self._put_locked, key, value, lease, False)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        def op() -> int:
            if self._revision_of(key) is not None:
                raise ConflictError(f"{key} already exists")
            return self._put_locked(key, value, lease, False)
        return await self._call(self._write_tx, self._clock.now(), op)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        def op() -> int:
            current = self._revision_of(key)
            if current != revision:
                raise ConflictError(f"{key} is at revision {current}, not {revision}")
            return self._put_locked(key, value, None, True)
        return await self._call(self._write_tx, self._clock.now(), op)

    async def delete(self, key: str, *, revision: int | None = None) -> bool:
        def op() -> bool:
            current = self._revision_of(key)
            if revision is not None and current != revision:
                raise ConflictError(f"{key} is at revision {current}, not {revision}")
            if current is None:
                return False
            self._delete_locked(key)
            return True
        return await self._call(self._write_tx, self._clock.now(), op)

    async def grant_lease(self, ttl_s: float) -> int:
        now = self._clock.now()

        def op() -> int:
            cur = self._db().execute("INSERT INTO leases (ttl_s, expires_at) VALUES (?, ?)",
                                     (float(ttl_s), now + ttl_s))
            return int(cur.lastrowid or 0)
        return await self._call(self._write_tx, now, op)

    async def keepalive(self, lease: int) -> None:
        now = self._clock.now()

        def op() -> None:
            cur = self._db().execute("UPDATE leases SET expires_at = ? + ttl_s WHERE id = ?",
                                     (now, lease))
            if cur.rowcount == 0:
                raise NotFoundError(f"lease {lease} does not exist or expired")
        await self._call(self._write_tx, now, op)

    async def revoke(self, lease: int) -> None:
        await self._call(self._write_tx, self._clock.now(), self._drop_lease_locked, lease)

    async def sweep(self) -> None:
        """Expire every lease that is due by ``clock.now()`` (deterministic in tests)."""
        await self._call(self._maybe_sweep, self._clock.now())

    def watch(self, prefix: str, *, after: int = 0) -> AsyncIterator[WatchEvent]:
        if self._closed:
            raise ClosedError(f"store {self.path} is closed")
        return self._watch(prefix, after)

    async def _watch(self, prefix: str, after: int) -> AsyncIterator[WatchEvent]:
        wake = asyncio.Event()
        self._watchers.add(wake)
        self._ensure_poller()
        last = after
        try:
            while not self._closed:
                wake.clear()  # before reading: a write after the read sets it again
                try:
                    events, last = await self._call(self._read_changes, prefix, last)
                except ClosedError:
                    return
                for event in events:
                    if self._closed:  # closed while the consumer held the last event
                        return  # type: ignore[unreachable]  # mypy narrows across yield
                    yield event
                if not events:
                    await wake.wait()
        finally:
            self._watchers.discard(wake)

    def _read_changes(self, prefix: str, last: int) -> tuple[builtins.list[WatchEvent], int]:
        """Events under ``prefix`` after ``last``, and where to continue from."""
        conn = self._db()
        where, args = _prefix_where(prefix)
        conn.execute("BEGIN")  # one snapshot for meta and rows
        try:
            rev, compacted = conn.execute("SELECT revision, compacted FROM meta").fetchone()
            if last < compacted:  # history was trimmed: replay the current state instead
                rows = conn.execute(
                    f"SELECT 'put', key, value, revision FROM kv WHERE {where} AND revision > ? "
                    "ORDER BY revision", (*args, last)).fetchall()
                upto = rev
            else:
                rows = conn.execute(
                    f"SELECT kind, key, value, revision FROM changes WHERE revision > ? "
                    f"AND revision <= ? AND {where} ORDER BY revision LIMIT {WATCH_BATCH}",
                    (last, rev, *args)).fetchall()
                upto = rev if len(rows) < WATCH_BATCH else rows[-1][3]
        finally:
            conn.execute("COMMIT")
        events = [WatchEvent(kind, key, bytes(value), int(r)) for kind, key, value, r in rows]
        return events, max(last, int(upto))

    # -- background tasks -----------------------------------------------------

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_loop(), name=f"poll {self.path}")

    async def _poll_loop(self) -> None:
        # Another process's commit bumps data_version on our connection (ours don't).
        def changed() -> bool:
            version: int = self._db().execute("PRAGMA data_version").fetchone()[0]
            moved, self._data_version = version != self._data_version, version
            return moved
        while self._watchers and not self._closed:
            await asyncio.sleep(POLL_S)
            try:
                if await self._call(changed):
                    self._wake()
            except ClosedError:
                return
            except UnavailableError:
                log.warning("polling %s failed; will retry", self.path, exc_info=True)

    async def _sweep_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(SWEEP_S)
            try:
                await self.sweep()
            except ClosedError:
                return
            except UnavailableError:
                log.warning("lease sweep of %s failed; will retry", self.path, exc_info=True)

    async def aclose(self) -> None:
        """End watches and background tasks, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        for task in (self._sweeper, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        # Queued after every earlier job, so nothing uses the connection after it.
        with contextlib.suppress(sqlite3.Error):
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)
