"""``Queue`` over one SQLite file, with group commit.

Contract (beyond :class:`nimbus.store.queue.Queue`, both its seams):

* Durability: WAL journal. A transaction that accepts work (send, redrive)
  commits with ``synchronous=FULL``: it is on disk before its coroutine
  returns. One that only moves accepted work along (receive, ack, retry,
  release, dead-letter) commits with ``NORMAL``: it survives the process
  dying (the OS has it), and a power cut can only undo it back to an earlier
  state of an accepted message, which is then run again: at-least-once
  still holds, nothing accepted is lost. The next FULL commit syncs it too.
* Group commit: every call becomes a job for one writer thread. Jobs made in
  one turn of the event loop are handed over together (one wake-up of the
  thread, not one per call); the thread takes all jobs waiting (up to
  ``BATCH``), runs each in its own savepoint inside
  one transaction, commits once and then answers them all. Under load one
  fsync covers hundreds of operations; alone, a job pays one commit as
  before. A job that fails (a stale receipt) rolls back its savepoint only.
* Reads (``get``, ``records``, ``stats``) run on a second thread with its own
  read-only connection, so they neither wait behind commits nor delay them.
* Tries begun (:meth:`SQLiteQueue.begin`) are marked in a journal beside
  the database (``<file>-tries``, one ``id receipt`` line per try, appended
  with one ``write`` before the handler is handed the message: no commit to
  wait for, and it survives the process being killed). The settle that
  follows counts the try in the same write that records its outcome. The
  journal is rewritten with only the unsettled marks once it passes
  ``JOURNAL_ROTATE_BYTES``.
* One owner: the embedded queue belongs to one ``nimbus up``. At start it
  calls :meth:`SQLiteQueue.recover`, which makes the messages leased by a
  previous (dead) process deliverable at once instead of after their lease,
  and counts the tries the journal says had begun (their runs were cut
  short: ``retrying`` with an ``Interrupted`` error).
* In-process sends wake receivers at once; other writers are noticed by
  polling every ``POLL_S`` while a receiver waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue as stdqueue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from nimbus.clock import Clock, SystemClock
from nimbus.errors import ClosedError, ConflictError, UnavailableError
from nimbus.ids import new_id
from nimbus.store.private import FILE_MODE, private_database, tighten
from nimbus.store.queue import (
    DEFAULT_DEDUP_WINDOW_S,
    Message,
    Outgoing,
    QueueStats,
    Record,
    SendResult,
)

BATCH = 512  # jobs per transaction at most
PURGE_CHUNK = 2000
POLL_S = 0.25  # how often a waiting receiver looks again
BUSY_TIMEOUT_MS = 5000
JOURNAL_SUFFIX = "-tries"
JOURNAL_ROTATE_BYTES = 1 << 20  # rewrite the journal with only unsettled marks past this

INTERRUPTED = "Interrupted"  # the errorType of a try cut short by nimbus stopping

# ``due`` is when the message is next deliverable (for running ones: when
# their lease ends), NULL once settled. ``deliveries`` counts every receive
# and is the receipt of the current one. ``attempts`` counts tries begun
# and settled (or recovered from the journal), never mere leases.
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    body BLOB NOT NULL,
    attributes BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    due REAL NULL,
    settled_at REAL NULL,
    dedup_key TEXT NULL,
    request_id TEXT NULL,
    result BLOB NULL,
    error BLOB NULL);
CREATE INDEX IF NOT EXISTS messages_due ON messages (queue, due) WHERE due IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_list ON messages (queue, status, seq);
CREATE INDEX IF NOT EXISTS messages_settled ON messages (settled_at) WHERE settled_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages (queue, dedup_key)
    WHERE dedup_key IS NOT NULL;
"""

_RECORD_COLS = ("id, queue, status, attempts, enqueued_at, updated_at, body, attributes, "
                "request_id, result, error, due")


def _record(row: tuple[Any, ...]) -> Record:
    return Record(id=row[0], queue=row[1], status=row[2], attempts=int(row[3]),
                  enqueued_at=float(row[4]), updated_at=float(row[5]), body=bytes(row[6]),
                  attributes=orjson.loads(row[7]), request_id=row[8],
                  result=bytes(row[9]) if row[9] is not None else None,
                  error=orjson.loads(row[10]) if row[10] is not None else None,
                  visible_at=float(row[11]) if row[11] is not None else None)


async def open_sqlite_queue(path: Path, *, clock: Clock | None = None,
                            dedup_window_s: float = DEFAULT_DEDUP_WINDOW_S) -> SQLiteQueue:
    q = SQLiteQueue(Path(path), clock or SystemClock(), dedup_window_s)
    q._thread.start()
    try:
        await q._call(q._open)
        q._open_journal()
        # the marks of tries begun by a previous process and never settled
        q._begun = await q._call(q._unsettled, q._read_marks())
        q._rotate_journal()  # keep only those
    except BaseException:
        await q.aclose()
        raise
    return q


class SQLiteQueue:
    """Use :func:`open_sqlite_queue`."""

    def __init__(self, path: Path, clock: Clock, dedup_window_s: float) -> None:
        self.path = path
        self._clock = clock
        self._window = dedup_window_s
        self._jobs: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()  # lists of jobs
        self._outbox: dict[asyncio.AbstractEventLoop, list[Any]] = {}  # not yet handed over
        self._thread = threading.Thread(target=self._run, name="nimbus-queue", daemon=True)
        self._conn: sqlite3.Connection | None = None  # the writer thread's only
        self._closed = False
        self._full = True  # the connection's synchronous setting
        self.commits = 0  # transactions committed, for tests and status
        self._orphans: set[asyncio.Future[None]] = set()  # give-backs in flight
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="nimbus-queue-read")
        self._read_conn: sqlite3.Connection | None = None  # the reader thread's only
        self._ready: dict[str, asyncio.Event] = {}
        self.journal = path.with_name(path.name + JOURNAL_SUFFIX)
        self._journal_fd: int | None = None
        self._journal_size = 0
        # deliveries begun and not yet settled: (id, receipt). Written on the
        # event loop; the writer thread only tests membership.
        self._begun: set[tuple[str, int]] = set()
        # called once, on the event loop, after the first send that stored a
        # message (the state folder notes that the queue now holds work)
        self.on_content: Callable[[], None] | None = None

    # -- the writer thread ------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, durable: bool = False) -> Any:
        """Run ``fn(*args)`` on the writer thread; ``durable``: commit with FULL sync."""
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        outbox = self._outbox.get(loop)
        if outbox is None:
            outbox = self._outbox[loop] = []
            loop.call_soon(self._hand_over, loop)
        outbox.append((fn, args, fut, loop, durable))
        return await fut

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._outbox.pop(loop, None)
        if jobs:
            self._jobs.put(jobs)

    def _run(self) -> None:
        while True:
            jobs = self._jobs.get()
            if jobs is None:
                break
            batch = list(jobs)
            while len(batch) < BATCH:
                try:
                    more = self._jobs.get_nowait()
                except stdqueue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                batch += more
            self._run_batch(batch)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run_batch(self, batch: list[Any]) -> None:
        outcomes: list[tuple[Any, bool, Any]] = []  # (fut, ok, value)
        conn = self._conn
        try:
            if conn is not None:
                full = any(job[4] for job in batch)
                if full != self._full:
                    conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
                    self._full = full
                conn.execute("BEGIN IMMEDIATE")
            for fn, args, fut, _loop, _durable in batch:
                if conn is None:  # only _open runs before the connection exists
                    outcomes.append((fut, True, fn(*args)))
                    conn = self._conn
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(*args)
                except Exception as exc:  # noqa: BLE001 - this job's caller gets it
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((fut, False, self._wrap(exc)))
                    continue
                conn.execute("RELEASE job")
                outcomes.append((fut, True, value))
            if conn is not None and conn.in_transaction:
                conn.execute("COMMIT")
                self.commits += 1
        except BaseException as exc:  # noqa: BLE001 - the whole batch failed; tell every caller
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = self._wrap(exc)
            outcomes = [(job[2], False, error) for job in batch]
        by_loop: dict[Any, list[tuple[Any, bool, Any]]] = {}
        for job, outcome in zip(batch, outcomes, strict=True):
            loop = job[3]
            by_loop.setdefault(loop, []).append(outcome)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle_futures, items)

    def _wrap(self, exc: BaseException) -> BaseException:
        if isinstance(exc, sqlite3.Error):
            err: BaseException = UnavailableError(f"sqlite queue {self.path}: {exc}")
            err.__cause__ = exc
            return err
        return exc

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _open(self) -> None:
        try:
            private_database(self.path)  # 0600, and so are its -wal and -shm
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot create {self.path}: {exc.strerror}") from exc
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not enable WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- the tries journal ------------------------------------------------------

    def _open_journal(self) -> None:
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         FILE_MODE)
            tighten(self.journal)
            self._journal_size = os.fstat(fd).st_size
        except OSError as exc:
            raise UnavailableError(f"sqlite queue {self.path}: cannot open its tries journal "
                                   f"{self.journal}: {exc.strerror}") from exc
        self._journal_fd = fd

    def _append_marks(self, data: bytes) -> None:
        fd = self._journal_fd
        if fd is None:
            raise ClosedError(f"queue {self.path} is closed")
        try:
            if self._journal_size + len(data) > JOURNAL_ROTATE_BYTES:
                self._rotate_journal()
                fd = self._journal_fd
                assert fd is not None
            view = memoryview(data)
            while view:  # one write in practice; an append is never interleaved
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise UnavailableError(f"sqlite queue {self.path}: cannot write its tries journal "
                                   f"{self.journal}: {exc.strerror}") from exc
        self._journal_size += len(data)

    def _rotate_journal(self) -> None:
        """Replace the journal by the marks of deliveries not yet settled
        (the others can no longer matter), atomically."""
        keep = b"".join(f"{mid} {receipt}\n".encode() for mid, receipt in list(self._begun))
        tmp = self.journal.with_name(self.journal.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            os.write(fd, keep)
            os.replace(tmp, self.journal)
        except BaseException:
            os.close(fd)
            raise
        old, self._journal_fd = self._journal_fd, fd
        self._journal_size = len(keep)
        if old is not None:
            os.close(old)

    def _unsettled(self, marks: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """The marks whose delivery is still the message's current one, unsettled."""
        conn = self._db()
        return {(mid, receipt) for mid, receipt in marks if conn.execute(
            "SELECT 1 FROM messages WHERE id = ? AND deliveries = ? AND status = 'running'",
            (mid, receipt)).fetchone()}

    def _read_marks(self) -> set[tuple[str, int]]:
        try:
            text = self.journal.read_bytes().decode("ascii", "replace")
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise UnavailableError(f"sqlite queue {self.path}: cannot read its tries journal "
                                   f"{self.journal}: {exc.strerror}") from exc
        marks = set()
        for line in text.splitlines():
            mid, _, receipt = line.partition(" ")
            if mid and receipt.isdigit():  # a line cut short by a crash is skipped
                marks.add((mid, int(receipt)))
        return marks

    # -- the reader thread --------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read on the reader thread's own connection: status pages and
        record lists never wait behind (or hold up) the writer's commits.
        It sees every write whose call has returned (WAL snapshot)."""
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._reader, self._read_job, fn)
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    def _read_job(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._read_conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = 1")
            self._read_conn = conn
        return fn(self._read_conn)

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    # -- helpers for the async side ---------------------------------------------

    def _event(self, queue: str) -> asyncio.Event:
        ev = self._ready.get(queue)
        if ev is None:
            ev = self._ready[queue] = asyncio.Event()
        return ev

    def _wake(self, queue: str) -> None:
        ev = self._ready.get(queue)
        if ev is not None:
            ev.set()

    # -- Queue ------------------------------------------------------------------

    async def send(self, queue: str, messages: list[Outgoing]) -> list[SendResult]:
        now = self._clock.now()
        results: list[SendResult] = await self._call(self._send_tx, queue, messages, now,
                                                     durable=True)
        self._wake(queue)
        if self.on_content is not None and any(r.created for r in results):
            note, self.on_content = self.on_content, None
            note()
        return results

    def _send_tx(self, queue: str, messages: list[Outgoing], now: float) -> list[SendResult]:
        conn = self._db()
        out = []
        for m in messages:
            mid = m.id or new_id()
            if m.id is not None and conn.execute(
                    "SELECT 1 FROM messages WHERE id = ?", (mid,)).fetchone():
                out.append(SendResult(mid, False))
                continue
            if m.dedup_key is not None:
                row = conn.execute("SELECT id, enqueued_at FROM messages WHERE queue = ? AND "
                                   "dedup_key = ?", (queue, m.dedup_key)).fetchone()
                if row is not None:
                    if float(row[1]) >= now - self._window:
                        out.append(SendResult(row[0], False))
                        continue
                    conn.execute("UPDATE messages SET dedup_key = NULL WHERE id = ?", (row[0],))
            conn.execute(
                "INSERT INTO messages (id, queue, status, body, attributes, enqueued_at, "
                "updated_at, due, dedup_key) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (mid, queue, bytes(m.body), orjson.dumps(m.attributes), now, now,
                 now + max(0.0, m.delay_s), m.dedup_key))
            out.append(SendResult(mid, True))
        return out

    async def receive(self, queue: str, *, max_messages: int, visibility_s: float,
                      wait_s: float = 0.0) -> list[Message]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        ev = self._event(queue)
        while True:
            ev.clear()  # before reading: a send after the read sets it again
            now = self._clock.now()
            job = asyncio.ensure_future(self._call(self._receive_tx, queue, max_messages,
                                                   visibility_s, now))
            try:
                msgs, next_due = await asyncio.shield(job)
            except asyncio.CancelledError:
                # The caller is gone but the lease may be taken: give it back
                # (not counted), rather than leave it to time out as a try.
                job.add_done_callback(self._give_back)
                raise
            remaining = deadline - loop.time()
            if msgs or remaining <= 0:
                return msgs  # type: ignore[no-any-return]
            pause = min(remaining, POLL_S)
            if next_due is not None:
                pause = min(pause, max(0.0, next_due - now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await ev.wait()

    def _receive_tx(self, queue: str, n: int, visibility_s: float,
                    now: float) -> tuple[list[Message], float | None]:
        conn = self._db()
        rows = conn.execute(
            "SELECT seq, id, body, attributes, attempts, deliveries, enqueued_at, status "
            "FROM messages WHERE queue = ? AND due IS NOT NULL AND due <= ? "
            "ORDER BY due, seq LIMIT ?", (queue, now, max(1, n))).fetchall()
        if not rows:
            nxt = conn.execute("SELECT MIN(due) FROM messages WHERE queue = ? AND "
                               "due IS NOT NULL", (queue,)).fetchone()[0]
            return [], (float(nxt) if nxt is not None else None)
        # A lease that ran out while its try had begun (and never settled)
        # still cost that try; a lease alone costs none.
        tried = [r[7] == "running" and (r[1], int(r[5])) in self._begun for r in rows]
        for r, t in zip(rows, tried, strict=True):
            if t:  # counted here; that delivery's settle (if any) is stale now
                self._begun.discard((r[1], int(r[5])))
        conn.executemany(
            "UPDATE messages SET status = 'running', attempts = attempts + ?, "
            "deliveries = deliveries + 1, due = ?, updated_at = ? WHERE seq = ?",
            [(int(t), now + visibility_s, now, r[0]) for r, t in zip(rows, tried, strict=True)])
        msgs = [Message(id=r[1], queue=queue, body=bytes(r[2]), attributes=orjson.loads(r[3]),
                        attempts=int(r[4]) + int(t) + 1, enqueued_at=float(r[6]),
                        receipt=int(r[5]) + 1)
                for r, t in zip(rows, tried, strict=True)]
        return msgs, None

    async def begin(self, messages: list[Message]) -> None:
        """The handler is about to run these deliveries: their tries count.
        One append to the journal (no commit to wait for); the settle counts
        the try in the database, :meth:`recover` if the process dies first."""
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")
        keys = [(m.id, _receipt(m)) for m in messages]
        self._append_marks(b"".join(f"{mid} {n}\n".encode() for mid, n in keys))
        self._begun.update(keys)

    async def _settle(self, m: Message, sets: str, args: tuple[Any, ...], *,
                      tried: bool = True) -> None:
        """``tried``: count the try if this delivery was begun (``release``
        passes False: the handler did not run it)."""
        key = (m.id, _receipt(m))
        counted = int(tried and key in self._begun)
        try:
            await self._call(self._settle_tx, m, f"attempts = attempts + ?, {sets}",
                             (counted, *args))
        except ConflictError:
            self._begun.discard(key)  # another delivery has it now
            raise
        self._begun.discard(key)

    def _give_back(self, job: asyncio.Future[Any]) -> None:
        if job.cancelled() or job.exception() is not None or self._closed:
            return
        for m in job.result()[0]:
            task = asyncio.ensure_future(self._release_quietly(m))
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)

    async def _release_quietly(self, m: Message) -> None:
        with contextlib.suppress(ClosedError, ConflictError, UnavailableError):
            await self.release(m, delay_s=0.0)  # if not, recover() at the next start

    def _settle_tx(self, m: Message, sets: str, args: tuple[Any, ...]) -> None:
        cur = self._db().execute(
            f"UPDATE messages SET {sets} WHERE id = ? AND deliveries = ? AND status = 'running'",
            (*args, m.id, m.receipt))
        if cur.rowcount == 0:
            raise ConflictError(f"message {m.id} was delivered again or settled since "
                                f"delivery {m.receipt}")

    async def ack(self, message: Message, *, result: bytes | None = None,
                  request_id: str | None = None) -> None:
        now = self._clock.now()
        await self._settle(message, "status = 'succeeded', due = NULL, settled_at = ?, "
                           "updated_at = ?, result = ?, request_id = COALESCE(?, request_id)",
                           (now, now, result, request_id))

    async def retry(self, message: Message, *, delay_s: float, error: dict[str, Any],
                    request_id: str | None = None) -> None:
        now = self._clock.now()
        await self._settle(message, "status = 'retrying', due = ?, updated_at = ?, error = ?, "
                           "request_id = COALESCE(?, request_id)",
                           (now + max(0.0, delay_s), now, orjson.dumps(error), request_id))
        self._wake(message.queue)

    async def release(self, message: Message, *, delay_s: float) -> None:
        now = self._clock.now()
        await self._settle(message, "status = CASE WHEN attempts > 0 THEN 'retrying' ELSE "
                           "'queued' END, due = ?, updated_at = ?",
                           (now + max(0.0, delay_s), now), tried=False)
        self._wake(message.queue)

    async def dead_letter(self, message: Message, *, error: dict[str, Any],
                          request_id: str | None = None) -> None:
        now = self._clock.now()
        await self._settle(message, "status = 'dead', due = NULL, updated_at = ?, error = ?, "
                           "request_id = COALESCE(?, request_id)",
                           (now, orjson.dumps(error), request_id))

    async def fail(self, message: Message, *, error: dict[str, Any],
                   request_id: str | None = None) -> None:
        now = self._clock.now()
        await self._settle(message, "status = 'failed', due = NULL, settled_at = ?, "
                           "updated_at = ?, error = ?, request_id = COALESCE(?, request_id)",
                           (now, now, orjson.dumps(error), request_id))

    async def get(self, message_id: str) -> Record | None:
        def run(conn: sqlite3.Connection) -> Record | None:
            row = conn.execute(f"SELECT {_RECORD_COLS} FROM messages WHERE id = ?",
                               (message_id,)).fetchone()
            return None if row is None else _record(row)
        return await self._read(run)  # type: ignore[no-any-return]

    async def records(self, queue: str, *, status: str | None = None,
                      limit: int = 100) -> list[Record]:
        def run(conn: sqlite3.Connection) -> list[Record]:
            where, args = "queue = ?", [queue]
            if status is not None:
                where += " AND status = ?"
                args.append(status)
            rows = conn.execute(f"SELECT {_RECORD_COLS} FROM messages WHERE {where} "
                                "ORDER BY seq DESC LIMIT ?", (*args, max(0, limit)))
            return [_record(r) for r in rows]
        return await self._read(run)  # type: ignore[no-any-return]

    async def redrive(self, queue: str, ids: list[str] | None = None) -> int:
        now = self._clock.now()

        def run() -> int:
            sql = ("UPDATE messages SET status = 'queued', attempts = 0, due = ?, "
                   "enqueued_at = ?, updated_at = ? WHERE queue = ? AND status = 'dead'")
            args: list[Any] = [now, now, now, queue]
            if ids is not None:
                sql += f" AND id IN ({','.join('?' * len(ids))})"
                args.extend(ids)
            if ids == []:
                return 0
            return int(self._db().execute(sql, args).rowcount)
        moved: int = await self._call(run, durable=True)
        if moved:
            self._wake(queue)
        return moved

    async def stats(self, queue: str) -> QueueStats:
        now = self._clock.now()

        def run(conn: sqlite3.Connection) -> QueueStats:
            counts = dict.fromkeys(("ready", "delayed", "running", "dead", "succeeded",
                                    "failed"), 0)
            for status, due_now, n in conn.execute(
                    "SELECT status, due <= ?, COUNT(*) FROM messages WHERE queue = ? "
                    "GROUP BY status, due <= ?", (now, queue, now)):
                if status == "running":
                    counts["running"] += n
                elif status in ("queued", "retrying"):
                    counts["ready" if due_now else "delayed"] += n
                else:
                    counts[status] += n
            return QueueStats(**counts)
        return await self._read(run)  # type: ignore[no-any-return]

    async def oldest_queued_at(self, queue: str) -> float | None:
        """When the oldest message still waiting for its first delivery was
        sent (None when none waits): one row read through an index."""
        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT enqueued_at FROM messages WHERE queue = ? AND status = 'queued' "
                "ORDER BY seq LIMIT 1", (queue,)).fetchone()
            return float(row[0]) if row else None
        return await self._read(run)  # type: ignore[no-any-return]

    async def purge_settled(self, older_than: float) -> int:
        """In chunks of ``PURGE_CHUNK``, each its own job: accepts and acks
        interleave instead of waiting behind one huge delete."""
        def run() -> int:
            return int(self._db().execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE "
                "settled_at IS NOT NULL AND settled_at < ? LIMIT ?)",
                (older_than, PURGE_CHUNK)).rowcount)
        total = 0
        while (n := await self._call(run)) > 0:
            total += n
            if n < PURGE_CHUNK:
                break
        return total

    async def recover(self) -> int:
        """Make every leased message deliverable now (its consumer is gone).
        A delivery whose try the journal says had begun counts that try (it
        was cut short): ``retrying`` with an ``Interrupted`` error. One
        merely leased goes back as it was (``queued``, or ``retrying``
        after earlier tries). Returns how many were leased."""
        now = self._clock.now()
        marks = set(self._begun)

        def run() -> int:
            conn = self._db()
            cut = 0
            for mid, receipt in marks:
                row = conn.execute("SELECT attempts FROM messages WHERE id = ? AND "
                                   "deliveries = ? AND status = 'running'",
                                   (mid, receipt)).fetchone()
                if row is None:
                    continue  # settled (or delivered again) before the end
                tries = int(row[0]) + 1
                error = {"errorType": INTERRUPTED,
                         "errorMessage": f"try {tries} was cut short: nimbus stopped while "
                                         "it ran"}
                conn.execute("UPDATE messages SET attempts = ?, status = 'retrying', error = ?, "
                             "due = ?, updated_at = ? WHERE id = ?",
                             (tries, orjson.dumps(error), now, now, mid))
                cut += 1
            n = conn.execute("UPDATE messages SET status = CASE WHEN attempts > 0 THEN "
                             "'retrying' ELSE 'queued' END, due = ? WHERE status = 'running'",
                             (now,)).rowcount
            return cut + int(n)
        moved: int = await self._call(run)
        # Committed: every mark is applied or stale, and none can match again.
        self._begun -= marks
        if self._journal_fd is not None:
            with contextlib.suppress(OSError):
                self._rotate_journal()
        return moved

    async def aclose(self) -> None:
        """Finish the jobs already queued, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ev in self._ready.values():
            ev.set()
        for loop in list(self._outbox):
            self._hand_over(loop)  # calls made before closing still run
        loop = asyncio.get_running_loop()
        if self._thread.is_alive():
            self._jobs.put(None)
            await loop.run_in_executor(None, self._thread.join, 10.0)
        if self._journal_fd is not None:  # kept: unsettled marks count at the next recover
            fd, self._journal_fd = self._journal_fd, None
            os.close(fd)
        with contextlib.suppress(RuntimeError):  # already shut down
            await loop.run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=False)


def _receipt(m: Message) -> int:
    """The delivery number a message from this queue carries as its receipt."""
    if not isinstance(m.receipt, int):
        raise ConflictError(f"message {m.id} was not delivered by a SQLite queue")
    return m.receipt


def _settle_futures(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue  # the caller was cancelled; the job still ran
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
