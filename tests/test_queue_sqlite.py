"""The SQLite queue: the contract suite, group commit and crash recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nimbus.clock import ManualClock
from nimbus.errors import ConflictError
from nimbus.store.queue import Outgoing
from nimbus.store.sqlite_queue import open_sqlite_queue
from nimbus.testing import check_queue


def test_contract(tmp_path: Path) -> None:
    async def open_queue(clock: ManualClock):  # type: ignore[no-untyped-def]
        return await open_sqlite_queue(tmp_path / "queue.db", clock=clock)

    asyncio.run(check_queue(open_queue))


def test_concurrent_sends_share_commits_and_all_land(tmp_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            results = await asyncio.gather(*(q.send("a", [Outgoing(str(i).encode())])
                                             for i in range(500)))
            assert len({r[0].id for r in results}) == 500
            got = await q.receive("a", max_messages=1000, visibility_s=30)
            assert sorted(int(m.body) for m in got) == list(range(500))
        finally:
            await q.aclose()
    asyncio.run(main())


def test_one_failing_job_does_not_undo_its_batch(tmp_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            await q.send("a", [Outgoing(b"x")])
            [m] = await q.receive("a", max_messages=1, visibility_s=30)
            await q.ack(m)
            outcomes = await asyncio.gather(
                q.ack(m), q.send("a", [Outgoing(b"y")]), return_exceptions=True)
            assert isinstance(outcomes[0], ConflictError)
            assert (await q.receive("a", max_messages=5, visibility_s=30))[0].body == b"y"
        finally:
            await q.aclose()
    asyncio.run(main())


def test_recover_redelivers_what_a_dead_owner_leased(tmp_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        await q.send("a", [Outgoing(b"x")])
        [m] = await q.receive("a", max_messages=1, visibility_s=3600)
        await q.aclose()  # as if the process died holding the lease
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            assert await q.receive("a", max_messages=1, visibility_s=30) == []
            assert await q.recover() == 1
            [again] = await q.receive("a", max_messages=1, visibility_s=30)
            assert again.id == m.id and again.attempts == 2
        finally:
            await q.aclose()
    asyncio.run(main())


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    from nimbus.errors import UnavailableError

    async def main() -> None:
        with pytest.raises(UnavailableError, match="sqlite queue"):
            await open_sqlite_queue(tmp_path / "missing" / "q.db")
    asyncio.run(main())
