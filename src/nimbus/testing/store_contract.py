"""Contract suites every ``Store`` and ``Blobs`` backend must pass.

Call them from a backend's tests::

    async def make_store(clock: ManualClock | None = None) -> Store:
        return await open_my_store(..., clock=clock)

    asyncio.run(check_store(make_store))

``make_store(clock=None)`` returns a fresh, empty, open store each call. When
given a ``ManualClock`` the store must measure campaign expiry by
``clock.now()``; after the suite advances that clock, an expired key must
be gone by the next read (``get``/``list``) or by ``await store.sweep()``,
which the suite calls when the store has it. A backend that keeps time on a
server instead runs ``check_store(make_store, real_clock=True)``: campaigns
are then checked with short TTLs against the wall clock.

``check_store_pair(make_pair)`` checks what two clients of one store see of
each other (campaigns, watches, compare-and-set races), on the wall clock.

The suites close every store they make. A failure raises ``AssertionError``
naming the broken rule; every wait has a deadline, so a broken backend fails
instead of hanging. Waits are bounded but never asserted to be short.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nimbus.clock import ManualClock
from nimbus.errors import ClosedError, ConflictError, NotFoundError
from nimbus.store.base import Blobs, Store, WatchEvent

MakeStore = Callable[..., Awaitable[Store]]
MakePair = Callable[[], Awaitable[tuple[Store, Store]]]
MakeBlobs = Callable[[], Awaitable[Blobs]]
WAIT_S = 5.0
EXPIRY_SLACK_S = 10.0  # a campaign key must be gone this long after its ttl at the latest


async def _next(watch: AsyncIterator[WatchEvent], what: str) -> WatchEvent:
    try:
        return await asyncio.wait_for(watch.__anext__(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"watch: no event within {WAIT_S}s, expected {what}") from None
    except StopAsyncIteration:
        raise AssertionError(f"watch ended early, expected {what}") from None


async def _idle_next(watch: AsyncIterator[WatchEvent]) -> asyncio.Future[WatchEvent]:
    """Ask for the next event and give the watcher time to catch up and wait.

    The pause only makes the "waiting watcher is woken" path the one tested;
    correctness never depends on its length."""
    pending = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.1)
    assert not pending.done(), f"watch: unexpected event {pending.result()}"
    return pending


async def _await(pending: asyncio.Future[WatchEvent], what: str) -> WatchEvent:
    try:
        return await asyncio.wait_for(pending, WAIT_S)
    except TimeoutError:
        raise AssertionError(f"watch: no event within {WAIT_S}s, expected {what}") from None


async def _expect(watch: AsyncIterator[WatchEvent],
                  *want: tuple[str, str, bytes, int | None]) -> list[WatchEvent]:
    """The next events must be ``want``; a None revision means any newer one."""
    got: list[WatchEvent] = []
    for kind, key, value, rev in want:
        ev = await _next(watch, f"{kind} {key}@{rev}")
        assert (ev.kind, ev.key, ev.value) == (kind, key, value), \
            f"watch: got {ev}, expected {kind} {key} {value!r}"
        assert rev is None or ev.revision == rev, f"watch: got {ev}, expected revision {rev}"
        assert not got or ev.revision > got[-1].revision, f"watch out of order: {got[-1]}, {ev}"
        got.append(ev)
    return got


async def _raises(exc: type[BaseException], what: str, aw: Awaitable[Any]) -> None:
    try:
        await aw
    except exc:
        return
    raise AssertionError(f"{what}: expected {exc.__name__}")


async def _sweep(store: Store) -> None:
    sweep = getattr(store, "sweep", None)
    if sweep is not None:
        await sweep()


async def _basics(s: Store) -> None:
    assert await s.get("nope") is None, "get of a missing key must return None"
    r1 = await s.put("a", b"1")
    e = await s.get("a")
    assert e is not None and (e.key, e.value, e.revision) == ("a", b"1", r1), f"put/get: got {e}"
    revs = [r1, await s.put("b", b"2"), await s.put("a", b"3"), await s.create("c", b"4")]
    revs.append(await s.update("c", b"5", revs[-1]))
    await s.delete("b")
    revs.append(await s.put("b", b"6"))
    assert revs == sorted(set(revs)), f"revisions must strictly increase: {revs}"
    assert revs[-1] > revs[-2] + 1, "a delete must take a revision of its own"
    await s.put("empty", b"")
    e = await s.get("empty")
    assert e is not None and e.value == b"", "an empty value must round-trip"


async def _cas(s: Store) -> None:
    r = await s.create("k", b"v1")
    await _raises(ConflictError, "create of an existing key", s.create("k", b"v2"))
    assert (await s.get("k")).value == b"v1", "a failed create must not write"  # type: ignore[union-attr]
    r2 = await s.update("k", b"v2", r)
    assert r2 > r, "update must return a newer revision"
    await _raises(ConflictError, "update at a stale revision", s.update("k", b"v3", r))
    await _raises(ConflictError, "update of a missing key", s.update("missing", b"x", r2))
    assert await s.get("missing") is None, "a failed update must not create the key"
    await _raises(ConflictError, "delete at a stale revision", s.delete("k", revision=r))
    assert await s.get("k") is not None, "a failed delete must keep the key"
    assert await s.delete("k", revision=r2) is True, "delete at the current revision"
    assert await s.get("k") is None, "deleted key must be gone"
    assert await s.delete("k") is False, "delete of a missing key returns False"
    await _raises(ConflictError, "delete of a missing key at a revision",
                  s.delete("k", revision=r2))
    await s.put("k", b"again")
    assert await s.delete("k") is True, "unconditional delete returns True"


async def _list(s: Store) -> None:
    for key in ["a/2", "a/1", "ab", "a/3/x", "b/1", "A/1"]:
        await s.put(key, key.encode())
    got = [e.key for e in await s.list("a/")]
    assert got == ["a/1", "a/2", "a/3/x"], f"list('a/') must be sorted and exact: {got}"
    assert [e.value for e in await s.list("a/")] == [b"a/1", b"a/2", b"a/3/x"]
    assert [e.key for e in await s.list("a")] == ["a/1", "a/2", "a/3/x", "ab"]
    assert [e.key for e in await s.list("")] == ["A/1", "a/1", "a/2", "a/3/x", "ab", "b/1"]
    assert await s.list("zzz") == [], "list of an unused prefix must be empty"
    for e in await s.list(""):
        assert e == await s.get(e.key), f"list and get disagree on {e.key}"


async def _replay(watch: AsyncIterator[WatchEvent],
                  log: list[tuple[str, str, bytes, int | None]]) -> list[WatchEvent]:
    """Read events until the last change of ``log`` arrives. They must be
    ``log`` in order, or ``log`` with superseded changes left out (a backend
    may keep only the latest change of each key), never one twice."""
    final = log[-1]
    got: list[WatchEvent] = []
    while True:
        ev = await _next(watch, f"the changes up to {final}")
        got.append(ev)
        if (ev.kind, ev.key, ev.value) == final[:3] and final[3] in (None, ev.revision):
            break
    at = 0
    for ev in got:
        while at < len(log) and not (
                (ev.kind, ev.key, ev.value) == log[at][:3] and log[at][3] in (None, ev.revision)):
            at += 1
        assert at < len(log), f"watch: {ev} is not one of the changes, or out of order: {got}"
        at += 1
    revs = [ev.revision for ev in got]
    assert revs == sorted(set(revs)), f"watch: revisions must increase: {got}"
    last_of = {key: (kind, value) for kind, key, value, _ in log}
    seen = {ev.key: (ev.kind, ev.value) for ev in got}
    assert seen == last_of, f"watch: the last change of every key must arrive: {got}"
    return got


async def _watch(s: Store) -> None:
    start = await s.put("other", b"x")
    w = s.watch("w/", after=start)
    r1 = await s.put("w/a", b"1")
    await s.put("elsewhere", b"no")
    r2 = await s.put("w/b", b"2")
    await s.delete("w/a")
    r4 = await s.put("w/b", b"3")
    events = await _replay(w, [("put", "w/a", b"1", r1), ("put", "w/b", b"2", r2),
                               ("delete", "w/a", b"", None), ("put", "w/b", b"3", r4)])
    r3 = next(ev.revision for ev in events if ev.kind == "delete")
    assert r2 < r3 < r4, f"the delete's revision {r3} must fall between {r2} and {r4}"
    pending = await _idle_next(w)  # a write must wake a watcher that is waiting
    r5 = await s.put("w/live", b"L")
    ev = await _await(pending, "the live put of w/live")
    assert (ev.kind, ev.key, ev.value, ev.revision) == ("put", "w/live", b"L", r5), ev
    r6 = await s.put("w/live", b"M")
    r7 = await s.put("w/live", b"N")
    await _replay(w, [("put", "w/live", b"M", r6), ("put", "w/live", b"N", r7)])
    await w.aclose()
    # Replay: a watcher from an old revision gets what it missed, in order.
    w = s.watch("w/", after=r2)
    await _replay(w, [("delete", "w/a", b"", r3), ("put", "w/b", b"3", r4),
                      ("put", "w/live", b"L", r5), ("put", "w/live", b"M", r6),
                      ("put", "w/live", b"N", r7)])
    await w.aclose()
    w = s.watch("w/")  # after=0: from the beginning
    await _replay(w, [("put", "w/a", b"1", r1), ("put", "w/b", b"2", r2),
                      ("delete", "w/a", b"", r3), ("put", "w/b", b"3", r4),
                      ("put", "w/live", b"L", r5), ("put", "w/live", b"M", r6),
                      ("put", "w/live", b"N", r7)])
    await w.aclose()


async def _watch_from_list(s: Store) -> None:
    """list + watch(after=max revision) reconstructs state under concurrent writes."""
    halfway = asyncio.Event()

    async def writer() -> None:
        for i in range(60):
            key = f"c/k{i % 7}"
            await (s.delete(key) if i % 5 == 4 else s.put(key, str(i).encode()))
            if i == 20:
                halfway.set()
            await asyncio.sleep(0)
        await s.put("c/zz-done", b"")

    task = asyncio.create_task(writer())
    try:
        await asyncio.wait_for(halfway.wait(), WAIT_S)  # list while writes keep coming
        entries = await s.list("c/")
        state = {e.key: e.value for e in entries}
        w = s.watch("c/", after=max((e.revision for e in entries), default=0))
        while "c/zz-done" not in state:
            ev = await _next(w, "the writer's events")
            if ev.kind == "put":
                state[ev.key] = ev.value
            else:
                state.pop(ev.key, None)
        await asyncio.wait_for(task, WAIT_S)
        final = {e.key: e.value for e in await s.list("c/")}
        assert state == final, f"list+watch missed writes:\n got {state}\n want {final}"
        await w.aclose()
    finally:
        task.cancel()


async def _watch_ends_on_close(s: Store) -> None:
    seen: list[WatchEvent] = []

    async def consume() -> None:
        async for ev in s.watch("x/"):
            seen.append(ev)

    task = asyncio.create_task(consume())
    await s.put("x/1", b"1")
    for _ in range(100):  # let the watcher get the event and start waiting
        if seen:
            break
        await asyncio.sleep(0.01)
    await s.aclose()
    try:
        await asyncio.wait_for(task, WAIT_S)
    except TimeoutError:
        raise AssertionError("watch must end when the store closes") from None
    assert [e.key for e in seen] == ["x/1"], f"watch before close saw {seen}"


async def _campaigns(s: Store, clock: ManualClock) -> None:
    r1 = await s.campaign("l/lead", b"me", 10)
    assert r1 is not None, "campaign of a free key must win"
    e = await s.get("l/lead")
    assert e is not None and (e.value, e.revision) == (b"me", r1), f"campaign wrote {e}"
    assert await s.campaign("l/lead", b"you", 10) is None, "a held key must not be taken"
    assert (await s.get("l/lead")).value == b"me", "a lost campaign must not write"  # type: ignore[union-attr]
    await s.put("l/keep", b"k")
    w = s.watch("l/", after=r1)
    await _next(w, "put l/keep")
    clock.advance(6)
    r2 = await s.renew("l/lead", r1, 10)  # now expires at 16
    assert r2 > r1, "renew must return a newer revision"
    assert (await s.get("l/lead")).value == b"me", "renew without a value keeps it"  # type: ignore[union-attr]
    await _raises(ConflictError, "renew at a stale revision", s.renew("l/lead", r1, 10))
    clock.advance(6)
    await _sweep(s)
    assert [e.key for e in await s.list("l/")] == ["l/keep", "l/lead"], \
        "renew must push the expiry out"
    r3 = await s.renew("l/lead", r2, 10, value=b"me2")  # expires at 22
    assert (await s.get("l/lead")).value == b"me2", "renew with a value writes it"  # type: ignore[union-attr]
    await _expect(w, ("put", "l/lead", b"me", r2), ("put", "l/lead", b"me2", r3))
    clock.advance(11)
    await _sweep(s)
    assert await s.get("l/lead") is None, "a campaign key must vanish ttl_s after its last write"
    assert [e.key for e in await s.list("l/")] == ["l/keep"], "only permanent keys stay"
    ev = await _next(w, "delete l/lead")
    assert (ev.kind, ev.key) == ("delete", "l/lead") and ev.revision > r3, \
        f"expiry must emit a delete: {ev}"
    await _raises(ConflictError, "renew of an expired key", s.renew("l/lead", r3, 10))
    r4 = await s.campaign("l/lead", b"you", 10)
    assert r4 is not None and r4 > ev.revision, "an expired key can be taken again"

    late = await s.campaign("l/late", b"", 5)
    assert late is not None
    clock.advance(6)  # expired but not swept: renew must still refuse, reads hide it
    await _raises(ConflictError, "renew after expiry", s.renew("l/late", late, 5))
    assert await s.get("l/late") is None, "an expired key must be gone on read"
    late2 = await s.campaign("l/late", b"next", 5)
    assert late2 is not None, "an expired (unswept) key can be taken"

    await s.resign("l/lead", r1)  # not ours any more: nothing happens
    assert (await s.get("l/lead")).value == b"you", "resign at another revision must not delete"  # type: ignore[union-attr]
    await s.resign("l/lead", r4)
    assert await s.get("l/lead") is None, "resign must delete the holder's key"
    await s.resign("l/lead", r4)  # idempotent
    await s.resign("l/never", 1)

    p = await s.campaign("l/perm", b"", 5)
    assert p is not None
    await s.put("l/perm", b"mine now")
    clock.advance(60)
    await _sweep(s)
    assert (await s.get("l/perm")).value == b"mine now", "put must make a key permanent"  # type: ignore[union-attr]
    await _raises(ConflictError, "renew of a key someone overwrote", s.renew("l/perm", p, 5))
    await s.put("l/plain", b"x")
    assert await s.campaign("l/plain", b"y", 5) is None, "a permanent key is never free"
    await w.aclose()


async def _closed(s: Store) -> None:
    await s.put("k", b"v")
    await s.aclose()
    await s.aclose()  # idempotent
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: s.get("k"), "list": lambda: s.list(""), "put": lambda: s.put("k", b""),
        "create": lambda: s.create("n", b""), "update": lambda: s.update("k", b"", 1),
        "delete": lambda: s.delete("k"), "campaign": lambda: s.campaign("c", b"", 5),
        "renew": lambda: s.renew("c", 1, 5), "resign": lambda: s.resign("c", 1),
    }
    for name, call in calls.items():
        await _raises(ClosedError, f"{name} after aclose", call())

    async def first_event() -> None:
        await s.watch("").__anext__()
    await _raises(ClosedError, "watch after aclose", first_event())


async def _wait_for(what: str, deadline_s: float, probe: Callable[[], Awaitable[bool]],
                    every_s: float = 0.1) -> None:
    end = time.monotonic() + deadline_s
    while not await probe():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline_s}s")
        await asyncio.sleep(every_s)


async def _next_kind(watch: AsyncIterator[WatchEvent], kind: str, key: str,
                     deadline_s: float) -> WatchEvent:
    """The next ``kind`` event of ``key``, skipping others (a real clock may
    interleave the renewals of other keys)."""
    end = time.monotonic() + deadline_s
    while True:
        left = end - time.monotonic()
        try:
            ev = await asyncio.wait_for(watch.__anext__(), max(left, 0.01))
        except TimeoutError:
            raise AssertionError(f"watch: no {kind} of {key} within {deadline_s}s") from None
        if (ev.kind, ev.key) == (kind, key):
            return ev


async def _campaigns_real(s: Store, ttl_s: float) -> None:
    """Campaigns against the wall clock: short TTLs, bounded waits."""
    expiry_wait = ttl_s + EXPIRY_SLACK_S
    r = await s.campaign("rc/lead", b"me", ttl_s)
    assert r is not None, "campaign of a free key must win"
    w = s.watch("rc/", after=r)
    renewed_at = time.monotonic()
    end = renewed_at + 2.5 * ttl_s  # renewing every ttl/4 keeps it well past one ttl
    while time.monotonic() < end:
        await asyncio.sleep(ttl_s / 4)
        r = await s.renew("rc/lead", r, ttl_s)
        renewed_at = time.monotonic()
    e = await s.get("rc/lead")
    assert e is not None and (e.value, e.revision) == (b"me", r), \
        f"a renewed campaign must stay: {e}"
    ev = await _next_kind(w, "delete", "rc/lead", expiry_wait)
    gone_after = time.monotonic() - renewed_at
    assert gone_after >= ttl_s / 2, f"the key vanished {gone_after:.2f}s after its renewal"
    assert ev.revision > r, f"the expiry must take a newer revision: {ev}"
    assert await s.get("rc/lead") is None, "an expired campaign key must be gone"
    await _raises(ConflictError, "renew after expiry", s.renew("rc/lead", r, ttl_s))
    r2 = await s.campaign("rc/lead", b"next", ttl_s)
    assert r2 is not None and r2 > ev.revision, "an expired key can be taken again"
    await s.resign("rc/lead", r2)
    assert await s.get("rc/lead") is None, "resign must delete the holder's key"
    ev = await _next_kind(w, "delete", "rc/lead", WAIT_S)
    # put makes a campaign key permanent: it outlives a key campaigned after it
    p = await s.campaign("rc/perm", b"", ttl_s)
    assert p is not None
    await s.put("rc/perm", b"mine")
    q = await s.campaign("rc/probe", b"", ttl_s)
    assert q is not None
    await _next_kind(w, "delete", "rc/probe", expiry_wait)
    e = await s.get("rc/perm")
    assert e is not None and e.value == b"mine", "put must make a campaign key permanent"
    await w.aclose()


async def check_store(make_store: MakeStore, *, real_clock: bool = False,
                      ttl_s: float = 1.0) -> None:
    """Run every Store rule against fresh stores from ``make_store``.

    By default campaigns are checked on a ``ManualClock`` passed to
    ``make_store(clock=...)``. With ``real_clock`` they are checked against
    the wall clock with TTLs of ``ttl_s`` (keep it short: the suite waits for
    expiries) and ``make_store()`` gets no clock."""
    for check in (_basics, _cas, _list, _watch, _watch_from_list, _watch_ends_on_close,
                  _closed):
        store = await make_store()
        try:
            await check(store)
        finally:
            await store.aclose()
    if real_clock:
        store = await make_store()
        try:
            await _campaigns_real(store, ttl_s)
        finally:
            await store.aclose()
        return
    clock = ManualClock()
    store = await make_store(clock=clock)
    try:
        await _campaigns(store, clock)
    finally:
        await store.aclose()


# -- two clients on one store ------------------------------------------------

async def _pair_campaigns(a: Store, b: Store, ttl_s: float) -> None:
    expiry_wait = ttl_s + EXPIRY_SLACK_S
    ra = await a.campaign("p/lead", b"a", ttl_s)
    assert ra is not None, "the first campaign must win"
    assert await b.campaign("p/lead", b"b", ttl_s) is None, "a held key must not be taken"
    seen = await b.get("p/lead")
    assert seen is not None and (seen.value, seen.revision) == (b"a", ra), \
        f"the other client must see the holder: {seen}"
    # b held a key once and lost it: resigning with its old term does nothing
    rb = await b.campaign("p/old", b"b", ttl_s)
    assert rb is not None
    await b.resign("p/old", rb)
    ra_old = await a.campaign("p/old", b"a", ttl_s)
    assert ra_old is not None, "a resigned key is free"
    await b.resign("p/old", rb)
    assert (await a.get("p/old")) is not None, "resign by a non-holder must not delete"
    await _raises(ConflictError, "renew by a non-holder", b.renew("p/old", rb, ttl_s))
    await a.resign("p/old", ra_old)
    # while a renews, b never wins; when a stops, b wins after the expiry
    w = b.watch("p/", after=ra)
    end = time.monotonic() + 2 * ttl_s
    while time.monotonic() < end:
        await asyncio.sleep(ttl_s / 4)
        ra = await a.renew("p/lead", ra, ttl_s)
        assert await b.campaign("p/lead", b"b", ttl_s) is None, \
            "a renewed key must not be taken"
    await _next_kind(w, "delete", "p/lead", expiry_wait)
    rb = await b.campaign("p/lead", b"b", ttl_s)
    assert rb is not None, "an expired key must be free for the other client"
    await _raises(ConflictError, "renew by the old holder", a.renew("p/lead", ra, ttl_s))
    await a.resign("p/lead", ra)  # no longer a's: nothing happens
    e = await a.get("p/lead")
    assert e is not None and (e.value, e.revision) == (b"b", rb), f"b must hold it: {e}"
    await b.resign("p/lead", rb)
    assert await a.get("p/lead") is None, "the holder's resign must free the key"
    await w.aclose()


async def _pair_watch(a: Store, b: Store, ttl_s: float) -> None:
    start = await a.put("q/start", b"")
    w = a.watch("q/", after=start)
    pending = await _idle_next(w)
    rb = await b.put("q/x", b"from b")
    ev = await _await(pending, "b's write, seen by a's watch")
    assert (ev.kind, ev.key, ev.value, ev.revision) == ("put", "q/x", b"from b", rb), ev
    assert await b.delete("q/x") is True
    ev = await _next(w, "b's delete")
    assert (ev.kind, ev.key) == ("delete", "q/x") and ev.revision > rb, ev
    ra = await a.put("q/y", b"from a")
    assert ra > ev.revision, "both clients take revisions from one sequence"
    await w.aclose()


async def _pair_races(a: Store, b: Store, ttl_s: float) -> None:
    for i in range(10):
        key = f"r/k{i}"
        base = await a.put(key, b"base")
        got = await asyncio.gather(a.update(key, b"a", base), b.update(key, b"b", base),
                                   return_exceptions=True)
        wins = [(who, r) for who, r in zip("ab", got, strict=True) if isinstance(r, int)]
        losses = [r for r in got if isinstance(r, ConflictError)]
        assert len(wins) == 1 and len(losses) == 1, \
            f"exactly one of two updates at one revision must win: {got}"
        e = await b.get(key)
        assert e is not None and (e.value, e.revision) == (wins[0][0].encode(), wins[0][1]), \
            f"the winner's value must stay: {e}, winners {wins}"
        got = await asyncio.gather(a.create(f"r/c{i}", b"a"), b.create(f"r/c{i}", b"b"),
                                   return_exceptions=True)
        assert sum(isinstance(r, int) for r in got) == 1 and \
            sum(isinstance(r, ConflictError) for r in got) == 1, \
            f"exactly one of two creates must win: {got}"
        terms = await asyncio.gather(a.campaign(f"r/l{i}", b"a", ttl_s),
                                     b.campaign(f"r/l{i}", b"b", ttl_s), return_exceptions=True)
        assert sorted(isinstance(r, int) for r in terms) == [False, True] and None in terms, \
            f"exactly one of two campaigns must win: {terms}"


async def check_store_pair(make_pair: MakePair, *, ttl_s: float = 1.0) -> None:
    """Rules between two clients (two store objects, as two processes would
    have) of one store: ``make_pair()`` returns both, on a fresh, empty store
    each call. Campaigns run on the wall clock with TTLs of ``ttl_s``."""
    for check in (_pair_campaigns, _pair_watch, _pair_races):
        a, b = await make_pair()
        try:
            await check(a, b, ttl_s)
        finally:
            await a.aclose()
            await b.aclose()


async def check_blobs(make_blobs: MakeBlobs) -> None:
    """Run every Blobs rule against fresh blob stores from ``make_blobs``."""
    b = await make_blobs()
    try:
        data = b"hello blobs"
        digest = await b.put(data)
        assert digest == hashlib.sha256(data).hexdigest(), "put must return the sha256 hex"
        assert await b.put(data) == digest, "put must be idempotent"
        assert await b.get(digest) == data, "get must return the stored bytes"
        assert await b.has(digest) is True, "has must see a stored blob"
        empty = await b.put(b"")
        assert await b.get(empty) == b"", "the empty blob must round-trip"
        big = bytes(range(256)) * 4096
        assert await b.get(await b.put(big)) == big, "a 1 MiB blob must round-trip"
        missing = hashlib.sha256(b"never stored").hexdigest()
        assert await b.has(missing) is False, "has must be False for a missing blob"
        await _raises(NotFoundError, "get of a missing blob", b.get(missing))
        await _raises(NotFoundError, "get of a non-digest", b.get("../../etc/passwd"))
        assert await b.has("not-a-digest") is False, "has of a non-digest is False"
    finally:
        await b.aclose()
    await b.aclose()  # idempotent
    await _raises(ClosedError, "blobs put after aclose", b.put(b"x"))
    await _raises(ClosedError, "blobs get after aclose", b.get(digest))
    await _raises(ClosedError, "blobs has after aclose", b.has(digest))
