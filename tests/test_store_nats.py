"""The NATS store and blobs against a real 3-server cluster: the contract
suites (real clock, two clients), server-side expiry, and a watch that
survives the SIGKILL of the server its client is connected to."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nimbus.errors import ConflictError, UnavailableError, UserInputError
from nimbus.natsd import NatsCluster
from nimbus.store.base import Store, WatchEvent
from nimbus.store.nats_blobs import open_nats_blobs
from nimbus.store.nats_conn import close_nats, connect_nats, retry_read
from nimbus.store.nats_store import (
    NatsStore,
    decode_key,
    encode_key,
    open_nats_store,
    prefix_filter,
    ttl_header,
)
from nimbus.store.registry import MissingQueue, open_backend
from nimbus.testing import check_blobs, check_store
from nimbus.testing.store_contract import check_store_pair

T = TypeVar("T")
WAIT_S = 20.0
_regions = itertools.count()


def run(coro: Coroutine[Any, Any, T], deadline_s: float = 180) -> T:
    return asyncio.run(asyncio.wait_for(coro, deadline_s))


def fresh_region() -> str:
    return f"t{next(_regions)}-{secrets.token_hex(3)}"


def servers(c: NatsCluster) -> list[str]:
    return c.urls.split(",")


# -- pure: key mapping ---------------------------------------------------------

@pytest.mark.parametrize("key", [
    "apps/hello", "a", "", "a/", "/a", "a//b", "with.dot/x", "sp ace", "*/>", "ünï/cödé",
    "=3D", "=", "a=b", "UPPER/lower-_/09", "%/%2F",
])
def test_keys_map_to_valid_kv_keys_and_back(key: str) -> None:
    token = encode_key(key)
    assert decode_key(token) == key
    parts = token.split(".")
    assert all(parts), f"{key!r} -> {token!r} has an empty token"
    assert all(c.isalnum() and c.isascii() or c in "-_=." for c in token), token


def test_prefixes_become_subject_filters() -> None:
    assert prefix_filter("apps/") == "apps.>"
    assert prefix_filter("nodes/worker/") == "nodes.worker.>"
    assert prefix_filter("apps/he") == "apps.>"  # ends inside a segment: filtered after
    assert prefix_filter("a") == ">"
    assert prefix_filter("") == ">"
    assert prefix_filter("x.y/") == "x=2Ey.>"


def test_reads_are_asked_again_while_no_server_answers_and_give_up_at_their_deadline() -> None:
    import nats.errors

    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise nats.errors.TimeoutError
        return "read"

    assert asyncio.run(retry_read(flaky)) == "read"
    assert len(calls) == 3

    async def never() -> str:
        calls.append(1)
        raise nats.errors.NoRespondersError

    calls.clear()
    started = time.monotonic()
    with pytest.raises(nats.errors.NoRespondersError):
        asyncio.run(retry_read(never, within_s=0.3))
    assert time.monotonic() - started < 2 and 2 <= len(calls) <= 6

    async def refused() -> str:  # not a routing problem: raised at once, not retried
        calls.append(1)
        raise nats.errors.ConnectionClosedError

    calls.clear()
    with pytest.raises(nats.errors.ConnectionClosedError):
        asyncio.run(retry_read(refused))
    assert len(calls) == 1


def test_ttls_are_whole_seconds_rounded_up() -> None:
    assert ttl_header(0.2) == "1"
    assert ttl_header(1.0) == "1"
    assert ttl_header(1.01) == "2"
    with pytest.raises(ValueError):
        ttl_header(0)


# -- contracts -------------------------------------------------------------------

def test_store_contract_on_the_real_clock(cluster: NatsCluster) -> None:
    async def body() -> None:
        nc = await connect_nats(servers(cluster), cluster.password)

        async def make_store() -> Store:
            return await open_nats_store(nc, region=fresh_region())
        try:
            await check_store(make_store, real_clock=True, ttl_s=1.0)
        finally:
            await close_nats(nc)
    run(body(), 300)


def test_two_clients_pass_the_pair_contract(cluster: NatsCluster) -> None:
    async def body() -> None:
        ncs = [await connect_nats(servers(cluster), cluster.password) for _ in range(2)]

        async def make_pair() -> tuple[Store, Store]:
            region = fresh_region()
            return (await open_nats_store(ncs[0], region=region),
                    await open_nats_store(ncs[1], region=region))
        try:
            await check_store_pair(make_pair, ttl_s=1.0)
        finally:
            for nc in ncs:
                await close_nats(nc)
    run(body(), 300)


def test_blobs_contract(cluster: NatsCluster) -> None:
    async def body() -> None:
        nc = await connect_nats(servers(cluster), cluster.password)

        async def make_blobs() -> Any:
            return await open_nats_blobs(nc, region=fresh_region())
        try:
            await check_blobs(make_blobs)
        finally:
            await close_nats(nc)
    run(body())


def test_buckets_are_replicated_on_three_servers(cluster: NatsCluster) -> None:
    async def body() -> None:
        nc = await connect_nats(servers(cluster), cluster.password)
        try:
            region = fresh_region()
            store = await open_nats_store(nc, region=region)
            blobs = await open_nats_blobs(nc, region=region)
            js = nc.jetstream()
            info = await js.stream_info(f"KV_nimbus-{region}-store")
            assert info.config.num_replicas == 3
            assert info.config.allow_msg_ttl and info.config.subject_delete_marker_ttl
            assert info.config.max_msgs_per_subject == 1
            info = await js.stream_info(f"OBJ_nimbus-{region}-blobs")
            assert info.config.num_replicas == 3
            # A second opener finds the buckets and uses them as they are.
            again = await open_nats_store(nc, region=region)
            await store.put("k", b"v")
            assert (await again.get("k")).value == b"v"  # type: ignore[union-attr]
            for s in (store, again):
                await s.aclose()
            await blobs.aclose()
        finally:
            await close_nats(nc)
    run(body())


def test_processes_opening_a_new_region_at_once_share_one_bucket(cluster: NatsCluster) -> None:
    async def body() -> None:
        ncs = [await connect_nats(servers(cluster), cluster.password) for _ in range(3)]
        try:
            region = fresh_region()
            stores = await asyncio.gather(
                open_nats_store(ncs[0], region=region),
                open_nats_store(ncs[1], region=region, replicas=1),  # disagrees: loses
                open_nats_store(ncs[2], region=region))
            rev = await stores[1].put("k", b"v")
            for s in stores:
                assert (await s.get("k")).revision == rev  # type: ignore[union-attr]
                await s.aclose()
            blobs = await asyncio.gather(*(open_nats_blobs(nc, region=region) for nc in ncs))
            digest = await blobs[0].put(b"shared")
            for b in blobs:
                assert await b.get(digest) == b"shared"
                await b.aclose()
        finally:
            for nc in ncs:
                await close_nats(nc)
    run(body())


# -- behaviour only a server can show -----------------------------------------

def test_list_reads_only_the_prefix_and_sees_odd_keys(cluster: NatsCluster) -> None:
    async def body() -> None:
        nc = await connect_nats(servers(cluster), cluster.password)
        try:
            s = await open_nats_store(nc, region=fresh_region())
            for i in range(200):
                await s.put(f"other/{i:03d}", b"x")
            odd = ["apps/x.y", "apps/sp ace", "apps/ünï", "apps/a/b/c", "apps/=3D"]
            revs = {k: await s.put(k, k.encode()) for k in odd}
            got = await s.list("apps/")
            assert [e.key for e in got] == sorted(odd)
            assert all(e.value == e.key.encode() and e.revision == revs[e.key] for e in got)
            assert [e.key for e in await s.list("apps/a")] == ["apps/a/b/c"]
            assert len(await s.list("other/")) == 200
            await s.aclose()
        finally:
            await close_nats(nc)
    run(body())


def test_campaign_keys_expire_on_the_server(cluster: NatsCluster) -> None:
    """The holder's process is gone (its connection closed): the key still
    vanishes after its ttl, and another client sees the delete and wins."""
    async def body() -> None:
        region = fresh_region()
        holder_nc = await connect_nats(servers(cluster), cluster.password)
        other_nc = await connect_nats(servers(cluster), cluster.password)
        try:
            holder = await open_nats_store(holder_nc, region=region)
            other = await open_nats_store(other_nc, region=region)
            term = await holder.campaign("leader/x", b"holder", 1.0)
            assert term is not None
            w = other.watch("leader/", after=term)
            await holder.aclose()
            await close_nats(holder_nc)
            assert await other.campaign("leader/x", b"other", 1.0) is None
            started = time.monotonic()
            ev = await asyncio.wait_for(w.__anext__(), WAIT_S)
            assert (ev.kind, ev.key) == ("delete", "leader/x") and ev.revision > term
            assert time.monotonic() - started > 0.3, "expired long before its ttl"
            assert await other.get("leader/x") is None
            assert await other.campaign("leader/x", b"other", 1.0) is not None
            with pytest.raises(ConflictError):
                await other.renew("leader/x", term, 1.0)
            await w.aclose()
            await other.aclose()
        finally:
            await close_nats(other_nc)
            await close_nats(holder_nc)
    run(body())


def _connected_index(c: NatsCluster, nc: Any) -> int:
    port = nc.connected_url.port
    return next(i for i, s in enumerate(c.servers) if s.port == port)


async def _retry(what: str, fn: Any, deadline_s: float = 2 * WAIT_S) -> Any:
    """Call ``fn`` until it stops failing with UnavailableError (a cluster
    electing new leaders answers with errors for a moment)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await fn()
        except UnavailableError:
            if time.monotonic() > end:
                raise AssertionError(f"{what}: still failing after {deadline_s}s") from None
            await asyncio.sleep(0.2)


async def _next_of(w: Any, pred: Any, what: str) -> WatchEvent:
    end = time.monotonic() + WAIT_S
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"watch: no {what} within {WAIT_S}s")
        try:
            ev: WatchEvent = await asyncio.wait_for(w.__anext__(), left)
        except TimeoutError:
            raise AssertionError(f"watch: no {what} within {WAIT_S}s") from None
        if pred(ev):
            return ev


def test_watch_resets_and_keeps_delivering_after_its_server_is_killed(
        cluster: NatsCluster) -> None:
    async def body() -> None:
        region = fresh_region()
        nc = await connect_nats(servers(cluster), cluster.password)
        writer_nc = None
        victim = _connected_index(cluster, nc)
        try:
            s = await open_nats_store(nc, region=region)
            r1 = await s.put("apps/a", b"1")
            w = s.watch("apps/", after=0)
            ev = await asyncio.wait_for(w.__anext__(), WAIT_S)
            assert (ev.kind, ev.key, ev.revision) == ("put", "apps/a", r1)
            r1 = await s.put("apps/a", b"1 again")  # the subscription is live
            ev = await asyncio.wait_for(w.__anext__(), WAIT_S)
            assert (ev.kind, ev.key, ev.revision) == ("put", "apps/a", r1)
            killed = time.monotonic()
            cluster.kill(victim)
            ev = await _next_of(w, lambda e: e.kind == "reset", "reset")
            assert ev.revision == r1, "a reset names the last revision delivered"
            reset_after = time.monotonic() - killed
            assert _connected_index(cluster, nc) != victim, "the client must have moved"
            # A write by another client, after the failover, reaches the watch.
            writer_nc = await connect_nats(
                [u for i, u in enumerate(servers(cluster)) if i != victim], cluster.password)
            writer = await _retry("open the store after the kill",
                                  lambda: open_nats_store(writer_nc, region=region))
            r2 = await _retry("put after the kill", lambda: writer.put("apps/b", b"2"))
            ev = await _next_of(w, lambda e: e.kind != "reset", "the put of apps/b")
            assert (ev.kind, ev.key, ev.value, ev.revision) == ("put", "apps/b", b"2", r2)
            print(f"SIGKILL of the client's server: reset after {reset_after:.2f}s, "
                  f"the next event after {time.monotonic() - killed:.2f}s")
            r3 = await _retry("put", lambda: writer.put("apps/c", b"3"))
            ev = await _next_of(w, lambda e: e.kind != "reset", "the put of apps/c")
            assert (ev.key, ev.revision) == ("apps/c", r3)
            listed = await _retry("list", lambda: s.list("apps/"))
            assert [e.key for e in listed] == ["apps/a", "apps/b", "apps/c"]
            await w.aclose()
            await writer.aclose()
            await s.aclose()
        finally:
            if writer_nc is not None:
                await close_nats(writer_nc)
            await close_nats(nc)
            cluster.restart(victim)
            cluster.wait_healthy()
    run(body())


def test_watch_whose_consumer_vanishes_resets_and_goes_on(cluster: NatsCluster) -> None:
    """The server drops the watch's consumer (as when the server holding it
    dies while the client's own connection stays up): the watch notices (a
    status message or missing heartbeats), says reset, and delivers on."""
    async def body() -> None:
        nc = await connect_nats(servers(cluster), cluster.password)
        try:
            s = await open_nats_store(nc, region=fresh_region())
            w = s.watch("apps/")
            r1 = await s.put("apps/a", b"1")
            ev = await asyncio.wait_for(w.__anext__(), WAIT_S)
            assert (ev.kind, ev.revision) == ("put", r1)
            for _ in range(100):  # its first event may come before the consumer's name
                if w._consumer is not None:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.05)
            consumer = w._consumer  # type: ignore[attr-defined]
            assert consumer is not None
            await nc.jetstream().delete_consumer(s.stream, consumer)
            ev = await _next_of(w, lambda e: e.kind == "reset", "reset")
            assert ev.revision == r1
            r2 = await s.put("apps/b", b"2")
            ev = await _next_of(w, lambda e: e.kind != "reset", "the put of apps/b")
            assert (ev.kind, ev.key, ev.revision) == ("put", "apps/b", r2)
            for _ in range(100):  # as above: the new consumer's name may come after its event
                if w._consumer is not None:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.05)
            assert w._consumer not in (None, consumer)  # type: ignore[attr-defined]
            await w.aclose()
            await s.aclose()
        finally:
            await close_nats(nc)
    run(body())


def test_store_errors_are_nimbus_errors(cluster: NatsCluster) -> None:
    async def body() -> None:
        nc = await connect_nats(servers(cluster), cluster.password)
        s: NatsStore = await open_nats_store(nc, region=fresh_region())
        r = await s.put("k", b"v")
        with pytest.raises(ConflictError):
            await s.update("k", b"w", r + 1000)
        with pytest.raises(ConflictError):
            await s.create("k", b"w")
        await close_nats(nc)  # the connection goes away under the store
        from nimbus.errors import ClosedError
        with pytest.raises(ClosedError):
            await s.get("k")
        await s.aclose()
    run(body())


# -- open_backend --------------------------------------------------------------

def test_open_backend_on_nats(cluster: NatsCluster) -> None:
    async def body() -> None:
        b = await open_backend(cluster.store_url, region=fresh_region(), token=cluster.password)
        try:
            assert b.nc is not None and b.nc.is_connected
            rev = await b.store.put("apps/x", b"1")
            assert (await b.store.get("apps/x")).revision == rev  # type: ignore[union-attr]
            digest = await b.blobs.put(b"bundle")
            assert await b.blobs.get(digest) == b"bundle"
            if isinstance(b.queue, MissingQueue):
                with pytest.raises(UserInputError, match="nats_queue"):
                    await b.queue.send("q", [])
        finally:
            await b.aclose()
        assert b.nc.is_closed
        await b.aclose()  # idempotent
    run(body())


def test_open_backend_refuses_a_wrong_token(cluster: NatsCluster) -> None:
    with pytest.raises(UnavailableError, match="refused"):
        run(open_backend(cluster.store_url, region="x", token="wrong-" + "x" * 30), 60)


def test_open_backend_gives_up_on_nothing_listening(tmp_path: Path) -> None:
    from nimbus.natsd import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="connecting to NATS"):
        run(open_backend(url, region="x", token="t" * 32), 60)
    print(f"gave up after {time.monotonic() - started:.1f}s")
