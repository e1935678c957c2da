"""The SQLite queue: the contract suite, group commit and crash recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nimbus.clock import ManualClock
from nimbus.errors import ConflictError
from nimbus.store.queue import Outgoing
from nimbus.store.sqlite_queue import PURGE_CHUNK, open_sqlite_queue
from nimbus.testing import check_queue, check_queue_realtime, check_queue_shared


def test_contract(tmp_path: Path) -> None:
    async def open_queue(clock: ManualClock):  # type: ignore[no-untyped-def]
        return await open_sqlite_queue(tmp_path / "queue.db", clock=clock)

    asyncio.run(check_queue(open_queue))


def test_contract_real_clock(tmp_path: Path) -> None:
    async def open_queue():  # type: ignore[no-untyped-def]
        return await open_sqlite_queue(tmp_path / "queue.db")

    asyncio.run(check_queue_realtime(open_queue))


def test_two_clients_of_one_file(tmp_path: Path) -> None:
    async def open_queue():  # type: ignore[no-untyped-def]
        return await open_sqlite_queue(tmp_path / "queue.db")

    asyncio.run(check_queue_shared(open_queue))


def test_concurrent_sends_share_commits_and_all_land(tmp_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            before = q.commits
            results = await asyncio.gather(*(q.send("a", [Outgoing(str(i).encode())])
                                             for i in range(500)))
            assert len({r[0].id for r in results}) == 500
            assert q.commits - before <= 5, "500 sends made together share a few commits"
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
    """A dead owner's leases are deliverable at once; the try it had begun
    counts (cut short: retrying, Interrupted), the one it had only leased not."""
    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        sent = await q.send("a", [Outgoing(b"ran"), Outgoing(b"waited")])
        ran, _waited = await q.receive("a", max_messages=2, visibility_s=3600)
        await q.begin([ran])
        await q.aclose()  # as if the process died holding the leases
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            assert await q.receive("a", max_messages=1, visibility_s=30) == []
            assert await q.recover() == 2
            rec = await q.get(ran.id)
            assert rec is not None and (rec.status, rec.attempts) == ("retrying", 1), rec
            assert rec.error is not None and rec.error["errorType"] == "Interrupted", rec
            other = await q.get(sent[1].id)
            assert other is not None and (other.status, other.attempts) == ("queued", 0), other
            again = {m.id: m.attempts
                     for m in await q.receive("a", max_messages=2, visibility_s=30)}
            assert again == {ran.id: 2, sent[1].id: 1}
        finally:
            await q.aclose()
        q = await open_sqlite_queue(tmp_path / "q.db")  # recovered once: not counted again
        try:
            assert await q.recover() == 2
            assert {m.id: m.attempts
                    for m in await q.receive("a", max_messages=2, visibility_s=30)} == again
        finally:
            await q.aclose()
    asyncio.run(main())


def test_the_tries_journal_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its size limit the journal keeps only the marks of unsettled tries."""
    import nimbus.store.sqlite_queue as sq

    monkeypatch.setattr(sq, "JOURNAL_ROTATE_BYTES", 2000)

    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            await q.send("j", [Outgoing(b"x") for _ in range(200)])
            msgs = await q.receive("j", max_messages=200, visibility_s=60)
            for m in msgs[:-1]:
                await q.begin([m])
                await q.ack(m)
            await q.begin([msgs[-1]])  # running
            marks = (tmp_path / "q.db-tries").read_text().split("\n")
            assert len(marks) < 60, "rotated, not one line per try ever made"
            assert f"{msgs[-1].id} {msgs[-1].receipt}" in marks
            assert oct((tmp_path / "q.db-tries").stat().st_mode & 0o777) == "0o600"
        finally:
            await q.aclose()
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            assert await q.recover() == 1
            assert (await q.get(msgs[-1].id)).attempts == 1  # type: ignore[union-attr]
            assert (await q.get(msgs[0].id)).attempts == 1  # type: ignore[union-attr]
        finally:
            await q.aclose()
    asyncio.run(main())


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    from nimbus.errors import UnavailableError

    async def main() -> None:
        with pytest.raises(UnavailableError, match="sqlite queue"):
            await open_sqlite_queue(tmp_path / "missing" / "q.db")
    asyncio.run(main())


def test_purging_settled_records_goes_in_chunks_and_keeps_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        clock = ManualClock(1000.0)
        q = await open_sqlite_queue(tmp_path / "q.db", clock=clock)
        try:
            await q.send("p", [Outgoing(b"x") for _ in range(PURGE_CHUNK + 500)])
            msgs = await q.receive("p", max_messages=PURGE_CHUNK + 500, visibility_s=60)
            await asyncio.gather(*(q.ack(m) for m in msgs[:-3]))  # 3 stay running
            await q.send("p", [Outgoing(b"new")])
            clock.advance(10)
            commits = q.commits
            assert await q.purge_settled(older_than=clock.now()) == PURGE_CHUNK + 497
            assert q.commits - commits >= 2, "more than one chunk, each its own commit"
            s = await q.stats("p")
            assert (s.running, s.ready, s.succeeded) == (3, 1, 0)
        finally:
            await q.aclose()
    asyncio.run(main())


def test_a_cancelled_receive_gives_its_lease_back_uncounted(tmp_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite_queue(tmp_path / "q.db")
        try:
            await q.send("c", [Outgoing(b"x")])
            waiter = asyncio.create_task(q.receive("c", max_messages=1, visibility_s=600))
            await asyncio.sleep(0)  # the receive job is on its way to the writer
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            got = await q.receive("c", max_messages=1, visibility_s=600, wait_s=5)
            assert len(got) == 1, "the message was not left leased by the cancelled call"
            assert got[0].attempts == 1, "the cancelled delivery does not count as a try"
        finally:
            await q.aclose()
    asyncio.run(main())
