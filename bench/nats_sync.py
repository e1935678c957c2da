"""What JetStream's file sync costs: acknowledged publishes per second to a
stream of 3 replicas, for several ``sync_interval`` settings.

    python bench/nats_sync.py [--messages 3000] [--size 256]
                              [--concurrency 1,16,128] [--sync always,10s,2m]

For each setting, a fresh local 3-server cluster (``nimbus.natsd``, on
127.0.0.1, data in a temp folder), one R3 file stream, then for each
concurrency level C: C tasks publish ``--messages`` messages in all, each
task waiting for every acknowledgement before its next publish (so C
publishes are in flight at a time). Printed: msgs/s per setting and level,
and each setting's ratio to ``always``.

``always``: every write is fsynced before it is acknowledged (nimbus's
default). A duration (``2m`` is nats-server's own default): writes go to
the OS page cache and are fsynced at that interval, so an acknowledgement
means "in the memory of a majority of servers". See docs/operations.md.
The figures are of this machine and disk: measure yours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from nimbus.natsd import NATS_USER, NatsCluster  # noqa: E402


async def measure(cluster: NatsCluster, levels: list[int], messages: int,
                  size: int) -> dict[int, float]:
    nc = await nats.connect(cluster.urls.split(","), user=NATS_USER,
                            password=cluster.password, connect_timeout=5)
    js = nc.jetstream(timeout=30)
    out: dict[int, float] = {}
    try:
        payload = os.urandom(size)
        for c in levels:
            name = f"bench-{c}"
            await js.add_stream(name=name, subjects=[f"bench.{c}"], num_replicas=3)
            # warm up: leader elected, connections to the replicas open
            for _ in range(20):
                await js.publish(f"bench.{c}", payload)
            each = [messages // c + (1 if i < messages % c else 0) for i in range(c)]

            async def publisher(n: int, subject: str = f"bench.{c}") -> None:
                for _ in range(n):
                    await js.publish(subject, payload)

            start = time.perf_counter()
            await asyncio.gather(*(publisher(n) for n in each))
            out[c] = messages / (time.perf_counter() - start)
            await js.delete_stream(name)
    finally:
        await nc.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256, help="payload bytes")
    ap.add_argument("--concurrency", default="1,16,128")
    ap.add_argument("--sync", default="always,10s,2m")
    args = ap.parse_args()
    try:
        levels = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        raise SystemExit(f"--concurrency must be integers separated by commas, "
                         f"got {args.concurrency!r}") from None
    if args.messages < 1 or any(c < 1 or c > args.messages for c in levels):
        raise SystemExit("--messages must be positive and at least each concurrency level")
    settings = [s.strip() for s in args.sync.split(",") if s.strip()]

    results: dict[str, dict[int, float]] = {}
    for sync in settings:
        with tempfile.TemporaryDirectory(prefix="nimbus-nats-sync-") as tmp:
            cluster = NatsCluster(Path(tmp), secrets.token_urlsafe(24), size=3, sync=sync)
            cluster.start()
            try:
                results[sync] = asyncio.run(measure(cluster, levels, args.messages,
                                                    args.size))
            finally:
                cluster.stop()
        print(f"sync_interval {sync:>7}: " + "  ".join(
            f"C={c}: {results[sync][c]:8.0f} msgs/s" for c in levels), flush=True)

    print(f"\n{args.messages} acknowledged publishes of {args.size} B to an R3 file stream, "
          f"3 servers on 127.0.0.1, {os.cpu_count()} CPUs")
    print(f"{'sync_interval':>14} " + " ".join(f"{'C=' + str(c):>12}" for c in levels))
    for sync, row in results.items():
        print(f"{sync:>14} " + " ".join(f"{row[c]:>12.0f}" for c in levels))
    if "always" in results:
        base = results["always"]
        print("\nratio to always")
        for sync, row in results.items():
            if sync != "always":
                print(f"{sync:>14} " + " ".join(f"{row[c] / base[c]:>11.1f}x" for c in levels))


if __name__ == "__main__":
    main()
