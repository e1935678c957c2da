"""Store operation latencies: SQLite (one file) and NATS (a local 3-server
cluster, replicas 3, sync always). Prints figures; asserts nothing.

    .venv/bin/python -m bench.store [--ops N]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from nimbus.natsd import NatsCluster
from nimbus.store.base import Store
from nimbus.store.nats_conn import close_nats, connect_nats
from nimbus.store.nats_store import open_nats_store
from nimbus.store.sqlite import open_sqlite_store


async def timed(n: int, op: Callable[[int], Awaitable[object]]) -> str:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return (f"p50 {statistics.median(samples):6.2f} ms  "
            f"p99 {samples[min(len(samples) - 1, int(len(samples) * 0.99))]:6.2f} ms")


async def measure(name: str, s: Store, n: int) -> None:
    for i in range(100):
        await s.put(f"apps/k{i:03d}", b"x" * 200)
    rev = {"r": await s.put("cas", b"0")}

    async def update(i: int) -> None:
        rev["r"] = await s.update("cas", str(i).encode(), rev["r"])

    term = {"t": await s.campaign("leader", b"me", 5)}

    async def renew(i: int) -> None:
        term["t"] = await s.renew("leader", term["t"] or 0, 5)

    w = s.watch("w/", after=await s.put("w/start", b""))

    async def put_seen(i: int) -> None:
        await s.put(f"w/{i}", b"v")
        await w.__anext__()

    print(f"{name}:")
    print(f"  put              {await timed(n, lambda i: s.put(f'p/{i}', b'v'))}")
    print(f"  get              {await timed(n, lambda i: s.get('cas'))}")
    print(f"  update (CAS)     {await timed(n, update)}")
    print(f"  renew            {await timed(n, renew)}")
    print(f"  put -> watch     {await timed(n, put_seen)}")
    print(f"  list 100 keys    {await timed(max(1, n // 5), lambda i: s.list('apps/'))}")
    await w.aclose()


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        s = await open_sqlite_store(Path(d) / "store.db")
        try:
            await measure("sqlite (synchronous=FULL)", s, n)
        finally:
            await s.aclose()
        password = secrets.token_urlsafe(24)
        cluster = NatsCluster(Path(d) / "nats", password, size=3)
        cluster.start()
        try:
            nc = await connect_nats(cluster.urls.split(","), password)
            s = await open_nats_store(nc, region="bench")
            try:
                await measure("nats (3 servers, R3, sync always)", s, n)
            finally:
                await s.aclose()
                await close_nats(nc)
        finally:
            cluster.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ops", type=int, default=200)
    asyncio.run(main(p.parse_args().ops))
