"""SQLiteStore and FileBlobs: the contract suites plus what only a file can do."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nimbus.clock import ManualClock
from nimbus.errors import UnavailableError, UserInputError
from nimbus.store.base import Store, WatchEvent
from nimbus.store.files import FileBlobs, open_file_blobs
from nimbus.store.registry import open_blobs, open_store
from nimbus.store.sqlite import SQLiteStore, open_sqlite_store
from nimbus.testing import check_blobs, check_store
from nimbus.testing.store_contract import check_store_pair

T = TypeVar("T")
WAIT_S = 5.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one async test body with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, 60))


async def within(aw: Any) -> Any:
    return await asyncio.wait_for(aw, WAIT_S)


async def idle_next(w: AsyncIterator[WatchEvent]) -> asyncio.Future[WatchEvent]:
    """Ask for the next event, and let the watcher catch up and start waiting
    (so the test covers waking a waiting watcher; the pause length is not
    load-bearing for correctness)."""
    pending = asyncio.ensure_future(w.__anext__())
    await asyncio.sleep(0.15)
    assert not pending.done()
    return pending


def test_store_contract(tmp_path: Path) -> None:
    counter = itertools.count()

    async def make_store(clock: ManualClock | None = None) -> Store:
        return await open_sqlite_store(tmp_path / f"s{next(counter)}.db", clock=clock)

    run(check_store(make_store))


def test_store_contract_on_the_real_clock(tmp_path: Path) -> None:
    counter = itertools.count()

    async def make_store() -> Store:
        return await open_sqlite_store(tmp_path / f"s{next(counter)}.db")

    run(check_store(make_store, real_clock=True, ttl_s=0.6))


def test_two_stores_on_one_file_pass_the_pair_contract(tmp_path: Path) -> None:
    """Two SQLiteStore objects on one file (as two processes have): campaigns,
    watches and compare-and-set races between them, on the wall clock."""
    counter = itertools.count()

    async def make_pair() -> tuple[Store, Store]:
        path = tmp_path / f"p{next(counter)}.db"
        return await open_sqlite_store(path), await open_sqlite_store(path)

    run(check_store_pair(make_pair, ttl_s=0.6))


def test_blobs_contract(tmp_path: Path) -> None:
    counter = itertools.count()

    async def make_blobs() -> FileBlobs:
        return await open_file_blobs(tmp_path / f"b{next(counter)}")

    run(check_blobs(make_blobs))


def test_data_survives_reopen(tmp_path: Path) -> None:
    async def body() -> None:
        path = tmp_path / "store.db"
        s = await open_sqlite_store(path)
        rev = await s.put("apps/a", b"A")
        term = await s.campaign("apps/b", b"B", 3600)
        assert term is not None
        await s.aclose()
        s = await open_sqlite_store(path)
        try:
            assert [(e.key, e.value) for e in await s.list("apps/")] == [
                ("apps/a", b"A"), ("apps/b", b"B")]
            assert (await s.get("apps/a")).revision == rev  # type: ignore[union-attr]
            assert await s.put("apps/c", b"C") > rev + 1, "revisions continue after reopen"
            term = await s.renew("apps/b", term, 3600)  # the campaign survived too
            await s.resign("apps/b", term)
            assert await s.get("apps/b") is None
        finally:
            await s.aclose()
    run(body())


def test_second_store_on_same_file_sees_writes(tmp_path: Path) -> None:
    async def body() -> None:
        path = tmp_path / "shared.db"
        a = await open_sqlite_store(path)
        b = await open_sqlite_store(path)
        try:
            w = a.watch("apps/")
            pending = await idle_next(w)
            rev = await b.put("apps/x", b"1")
            ev = await within(pending)
            assert (ev.kind, ev.key, ev.value, ev.revision) == ("put", "apps/x", b"1", rev)
            assert await b.delete("apps/x")
            ev = await within(w.__anext__())
            assert (ev.kind, ev.key) == ("delete", "apps/x")
            # Both sides allocate from the same counter.
            assert await a.put("apps/y", b"2") > ev.revision
            await w.aclose()
        finally:
            await a.aclose()
            await b.aclose()
    run(body())


def test_other_process_writes_wake_watchers(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from nimbus.store.sqlite import open_sqlite_store
        async def main():
            s = await open_sqlite_store(Path({str(path)!r}))
            await s.put("apps/child", b"hi")
            await s.aclose()
        asyncio.run(main())
    """)

    async def body() -> None:
        s = await open_sqlite_store(path)
        try:
            w = s.watch("apps/")
            pending = await idle_next(w)
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            ev = await within(pending)
            assert (ev.kind, ev.key, ev.value) == ("put", "apps/child", b"hi")
            await w.aclose()
        finally:
            await s.aclose()
    run(body())


def test_expiry_in_one_store_reaches_watchers_of_another(tmp_path: Path) -> None:
    async def body() -> None:
        clock = ManualClock()
        path = tmp_path / "shared.db"
        a = await open_sqlite_store(path, clock=clock)
        b = await open_sqlite_store(path, clock=clock)
        try:
            rev = await a.campaign("nodes/n1", b"", 5)
            assert rev is not None
            w = b.watch("nodes/", after=rev)
            pending = await idle_next(w)
            clock.advance(6)
            await a.sweep()
            ev = await within(pending)
            assert (ev.kind, ev.key) == ("delete", "nodes/n1")
            await w.aclose()
        finally:
            await a.aclose()
            await b.aclose()
    run(body())


def test_trimmed_history_resets_the_watch(tmp_path: Path) -> None:
    async def body() -> None:
        s = await open_sqlite_store(tmp_path / "s.db", keep_changes=3)
        try:
            first = await s.put("k/a", b"1")
            await s.put("k/b", b"1")
            await s.put("k/gone", b"1")
            await s.delete("k/gone")
            for i in range(5):
                last = await s.put("k/b", str(i).encode())
            # History from `first` is trimmed (the delete of k/gone is lost): the
            # watcher is told to re-list, then gets what happens from now on.
            w = s.watch("k/", after=first)
            ev = await within(w.__anext__())
            assert (ev.kind, ev.revision) == ("reset", first)
            live = await s.put("k/c", b"new")
            ev = await within(w.__anext__())
            assert (ev.key, ev.revision) == ("k/c", live)
            await w.aclose()
            # A recent `after` still gets the exact log, deletes included.
            w = s.watch("k/", after=last - 1)
            ev = await within(w.__anext__())
            assert (ev.key, ev.revision) == ("k/b", last)
            await w.aclose()
        finally:
            await s.aclose()
    run(body())


def test_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError) as info:
        run(open_sqlite_store(tmp_path / "no" / "such" / "dir" / "s.db"))
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_corrupt_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(UnavailableError) as info:
        run(open_sqlite_store(path))
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_driver_errors_during_use_are_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        s = await open_sqlite_store(tmp_path / "s.db")
        try:
            # Simulate the disk going away under us: the driver raises, we translate.
            await s._call(lambda: s._db().execute("DROP TABLE kv"))
            with pytest.raises(UnavailableError) as info:
                await s.put("k", b"v")
            assert isinstance(info.value.__cause__, sqlite3.Error)
            with pytest.raises(UnavailableError):
                await s.get("k")
        finally:
            await s.aclose()
    run(body())


def test_corrupt_blob_is_detected_and_repaired_by_put(tmp_path: Path) -> None:
    async def body() -> None:
        blobs = await open_file_blobs(tmp_path / "blobs")
        data = b"bundle bytes"
        digest = await blobs.put(data)
        path = tmp_path / "blobs" / "sha256" / digest[:2] / digest
        assert path.read_bytes() == data
        path.write_bytes(b"bundle bytez")
        with pytest.raises(UnavailableError, match="corrupt"):
            await blobs.get(digest)
        assert await blobs.put(data) == digest
        assert await blobs.get(digest) == data
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
        await blobs.aclose()
    run(body())


def test_registry_opens_backends_by_name(tmp_path: Path) -> None:
    async def body() -> None:
        s = await open_store("sqlite", tmp_path / "a.db")
        assert isinstance(s, SQLiteStore)
        await s.put("k", b"v")
        await s.aclose()
        s = await open_store(f"sqlite://{tmp_path / 'a.db'}")
        assert (await s.get("k")).value == b"v"  # type: ignore[union-attr]
        await s.aclose()
        with pytest.raises(UserInputError):
            await open_store("nosuch", tmp_path / "b.db")
        blobs = await open_blobs(tmp_path / "blobs")
        digest = await blobs.put(b"x")
        assert digest == hashlib.sha256(b"x").hexdigest()
        await blobs.aclose()
    run(body())


def test_file_with_leases_is_migrated_to_campaigns(tmp_path: Path) -> None:
    """A store.db written before campaigns (a leases table, a lease column)
    opens: a leased key keeps its lease's expiry, a key whose lease is gone
    expires at once, unleased keys stay."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL,
                         lease INTEGER NULL);
        CREATE INDEX kv_lease ON kv (lease) WHERE lease IS NOT NULL;
        CREATE TABLE leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl_s REAL NOT NULL,
                             expires_at REAL NOT NULL);
        CREATE TABLE changes (revision INTEGER PRIMARY KEY, key TEXT NOT NULL,
                              kind TEXT NOT NULL, value BLOB NOT NULL);
        CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL,
                           compacted INTEGER NOT NULL);
        INSERT INTO meta VALUES (1, 3, 0);
        INSERT INTO leases VALUES (7, 5.0, 1700000010.0);
        INSERT INTO kv VALUES ('apps/a', x'41', 1, NULL);
        INSERT INTO kv VALUES ('schedules/leader', x'6e', 2, 7);
        INSERT INTO kv VALUES ('orphan', x'', 3, 99);
    """)
    conn.close()

    async def body() -> None:
        clock = ManualClock(1_700_000_000.0)
        s = await open_sqlite_store(path, clock=clock)
        try:
            assert [e.key for e in await s.list("")] == ["apps/a", "schedules/leader"]
            assert await s.renew("schedules/leader", 2, 5) > 3
            assert await s.campaign("schedules/leader", b"x", 5) is None
            clock.advance(6)
            assert [e.key for e in await s.list("")] == ["apps/a"]
        finally:
            await s.aclose()
        s = await open_sqlite_store(path, clock=clock)  # opening again changes nothing
        try:
            assert [e.key for e in await s.list("")] == ["apps/a"]
        finally:
            await s.aclose()
    run(body())


def test_watch_survives_a_failing_read_and_says_reset(tmp_path: Path) -> None:
    async def body() -> None:
        s = await open_sqlite_store(tmp_path / "s.db")
        try:
            r1 = await s.put("w/a", b"1")
            w = s.watch("w/")
            ev = await within(w.__anext__())
            assert (ev.kind, ev.key, ev.revision) == ("put", "w/a", r1)
            # The change log disappears under the watch: reads fail until it is back.
            await s._call(lambda: s._db().execute("ALTER TABLE changes RENAME TO changes_away"))
            pending = asyncio.ensure_future(w.__anext__())
            await asyncio.sleep(0.3)
            assert not pending.done(), "a failing watch must keep trying, not end"
            await s._call(lambda: s._db().execute("ALTER TABLE changes_away RENAME TO changes"))
            ev = await within(pending)
            assert (ev.kind, ev.revision) == ("reset", r1)
            r2 = await s.put("w/b", b"2")
            ev = await within(w.__anext__())
            assert (ev.kind, ev.key, ev.revision) == ("put", "w/b", r2)
            await w.aclose()
            await w.aclose()  # idempotent
            with pytest.raises(StopAsyncIteration):
                await w.__anext__()
        finally:
            await s.aclose()
    run(body())
