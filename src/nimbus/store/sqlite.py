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
* Campaign keys carry an ``expires_at`` measured by ``clock.now()`` (a
  ``ManualClock`` in unit tests). Expired keys (each a delete event) are
  removed by a sweeper every ``SWEEP_S``, before reads and writes, and by
  :meth:`SQLiteStore.sweep` on demand; a read never returns an expired key.
  ``put``/``create``/``update`` clear ``expires_at`` (the key is permanent).
* Watches never end on a driver error: they retry with backoff and, once a
  read works again, yield ``reset``. A watcher whose ``after`` is older than
  the trimmed log gets ``reset`` and continues from the current revision.
* Several ``SQLiteStore`` objects (threads, processes) may share one file:
  revisions come from one counter in the file, compare-and-set and
  campaigns are decided inside one write transaction.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import sqlite3
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from nimbus.aio import wait_event
from nimbus.clock import Clock, SystemClock
from nimbus.errors import ClosedError, ConflictError, NimbusError, UnavailableError
from nimbus.store.base import Entry, Watch, WatchEvent
from nimbus.store.private import private_database

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.05  # how often watchers look for other processes' writes
SWEEP_S = 0.2  # how often expired campaign keys are swept
RETRY_S = (0.05, 2.0)  # a failing watch retries after this much, doubling up to the cap
BUSY_TIMEOUT_MS = 5000  # wait this long for another process's write lock
WATCH_BATCH = 1000  # changes read per watcher query

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL,
    expires_at REAL NULL);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL, compacted INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (1, 0, 0);
"""
EXPIRY_INDEX = ("CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) "
                "WHERE expires_at IS NOT NULL")


def _migrate_leases(conn: sqlite3.Connection) -> None:
    """Files written before campaigns had a ``leases`` table and a ``lease``
    column: each leased key keeps its lease's expiry (a key whose lease is
    gone expires at once), and the lease table goes."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(kv)")}
    if "expires_at" not in columns:
        conn.execute("ALTER TABLE kv ADD COLUMN expires_at REAL NULL")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "lease" in columns and "leases" in tables:
        conn.execute("UPDATE kv SET expires_at = coalesce((SELECT l.expires_at FROM leases l "
                     "WHERE l.id = kv.lease), 0), lease = NULL WHERE lease IS NOT NULL")
    conn.execute("DROP INDEX IF EXISTS kv_lease")
    conn.execute("DROP TABLE IF EXISTS leases")


def _prefix_where(prefix: str) -> tuple[str, tuple[object, ...]]:
    """SQL matching keys that start with ``prefix`` (exact, case-sensitive).

    A key range lets sqlite use the primary-key index; ``substr`` keeps it
    exact (LIKE would be case-insensitive and treat ``%``/``_`` specially)."""
    if not prefix:
        return "1", ()
    return "key >= ? AND substr(key, 1, ?) = ?", (prefix, len(prefix), prefix)


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, was: {ttl_s}")


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
            self._wake()  # a failed op may still have committed an expiry sweep
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
        """Run ``op`` in one write transaction after sweeping expired campaign keys.

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
            _migrate_leases(conn)
            conn.execute(EXPIRY_INDEX)
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

    def _put_locked(self, key: str, value: bytes, expires_at: float | None = None) -> int:
        rev = self._bump()
        value = bytes(value)
        self._db().execute(
            "INSERT INTO kv (key, value, revision, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "revision = excluded.revision, expires_at = excluded.expires_at",
            (key, value, rev, expires_at))
        self._db().execute("INSERT INTO changes VALUES (?, ?, 'put', ?)", (rev, key, value))
        return rev

    def _delete_locked(self, key: str) -> None:
        rev = self._bump()
        self._db().execute("DELETE FROM kv WHERE key = ?", (key,))
        self._db().execute("INSERT INTO changes VALUES (?, ?, 'delete', x'')", (rev, key))

    def _revision_of(self, key: str) -> int | None:
        row = self._db().execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _sweep_locked(self, now: float) -> None:
        expired = [k for (k,) in self._db().execute(
            "SELECT key FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "ORDER BY expires_at, key", (now,))]
        for key in expired:
            self._delete_locked(key)

    def _maybe_sweep(self, now: float) -> None:
        # A cheap read first: most calls find nothing and need no write lock.
        if self._db().execute("SELECT 1 FROM kv WHERE expires_at IS NOT NULL "
                              "AND expires_at <= ? LIMIT 1", (now,)).fetchone() is not None:
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

    async def put(self, key: str, value: bytes) -> int:
        return await self._call(self._write_tx, self._clock.now(), self._put_locked, key, value)

    async def create(self, key: str, value: bytes) -> int:
        def op() -> int:
            if self._revision_of(key) is not None:
                raise ConflictError(f"{key} already exists")
            return self._put_locked(key, value)
        return await self._call(self._write_tx, self._clock.now(), op)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        def op() -> int:
            current = self._revision_of(key)
            if current != revision:
                raise ConflictError(f"{key} is at revision {current}, not {revision}")
            return self._put_locked(key, value)
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

    async def campaign(self, key: str, value: bytes, ttl_s: float) -> int | None:
        _check_ttl(ttl_s)
        now = self._clock.now()

        def op() -> int | None:  # expired keys were swept by _write_tx first
            if self._revision_of(key) is not None:
                return None
            return self._put_locked(key, value, now + ttl_s)
        return await self._call(self._write_tx, now, op)

    async def renew(self, key: str, revision: int, ttl_s: float,
                    value: bytes | None = None) -> int:
        _check_ttl(ttl_s)
        now = self._clock.now()

        def op() -> int:
            row = self._db().execute("SELECT value, revision FROM kv WHERE key = ?",
                                     (key,)).fetchone()
            if row is None or int(row[1]) != revision:
                held = "gone" if row is None else f"at revision {row[1]}"
                raise ConflictError(f"campaign {key} lost: it is {held}, not at {revision}")
            return self._put_locked(key, bytes(row[0]) if value is None else value,
                                    now + ttl_s)
        return await self._call(self._write_tx, now, op)

    async def resign(self, key: str, revision: int) -> None:
        def op() -> None:
            if self._revision_of(key) == revision:
                self._delete_locked(key)
        await self._call(self._write_tx, self._clock.now(), op)

    async def sweep(self) -> None:
        """Delete every campaign key due by ``clock.now()`` (deterministic in tests)."""
        await self._call(self._maybe_sweep, self._clock.now())

    def watch(self, prefix: str, *, after: int = 0) -> Watch:
        if self._closed:
            raise ClosedError(f"store {self.path} is closed")
        return _SQLiteWatch(self, prefix, after)

    def _read_changes(self, prefix: str, last: int) -> tuple[builtins.list[WatchEvent], int]:
        """Events under ``prefix`` after ``last``, and where to continue from.
        A single ``reset`` if the log no longer reaches back to ``last``."""
        conn = self._db()
        where, args = _prefix_where(prefix)
        conn.execute("BEGIN")  # one snapshot for meta and rows
        try:
            rev, compacted = conn.execute("SELECT revision, compacted FROM meta").fetchone()
            if last < compacted:  # history was trimmed: the consumer must re-list
                return [WatchEvent("reset", "", b"", last)], int(rev)
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
                log.warning("expiry sweep of %s failed; will retry", self.path, exc_info=True)

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


class _SQLiteWatch:
    """Reads the change log after ``last``; woken by in-process writes and by
    the poller. Retries a failing read with backoff, then says ``reset``."""

    def __init__(self, store: SQLiteStore, prefix: str, after: int) -> None:
        self._store = store
        self._prefix = prefix
        self._last = after
        self._closed = False
        self._wake = asyncio.Event()
        self._gen = self._run()
        self._busy = False  # a consumer is inside __anext__

    def __aiter__(self) -> _SQLiteWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._closed:
            raise StopAsyncIteration
        self._busy = True
        try:
            return await self._gen.__anext__()
        finally:
            self._busy = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()  # a consumer waiting in __anext__ ends
        if not self._busy:
            await self._gen.aclose()

    def _ended(self) -> bool:
        return self._closed or self._store._closed

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        store = self._store
        store._watchers.add(self._wake)
        store._ensure_poller()
        delay, failed = RETRY_S[0], False
        try:
            while not self._ended():
                self._wake.clear()  # before reading: a write after the read sets it again
                try:
                    events, upto = await store._call(store._read_changes, self._prefix,
                                                     self._last)
                except ClosedError:
                    return
                except UnavailableError:
                    log.warning("watch of %r on %s failed; retrying in %.2fs", self._prefix,
                                store.path, delay, exc_info=True)
                    failed = True
                    await wait_event(self._wake, delay)  # aclose cuts it short
                    delay = min(delay * 2, RETRY_S[1])
                    continue
                if failed:
                    failed, delay = False, RETRY_S[0]
                    yield WatchEvent("reset", "", b"", self._last)
                for event in events:
                    if self._ended():  # closed while the consumer held the last event
                        return
                    self._last = max(self._last, event.revision)
                    yield event
                self._last = upto
                if not events:
                    await self._wake.wait()
        finally:
            store._watchers.discard(self._wake)
