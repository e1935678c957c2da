"""Region failover through the edge: SIGKILL a whole region under steady
load, again and again.

    python bench/failover.py [--kills 20] [--rate 200]

Two ``nimbus up`` regions (eu on 127.0.0.2, us on 127.0.0.3) behind
``nimbus edge``; the app has no ``regions:``, so failover in the cluster
file's order: eu takes every request while it is healthy. An open-loop
load of GETs runs through the edge at ``--rate`` per second the whole time.
Per kill: SIGKILL every process of eu; measure the time until the edge
stops sending to it (the last request its ``/_nimbus/regions`` counts for
eu's gateway, and when it reports eu down), and the requests that failed;
start eu again and wait until the edge sends it traffic again (after its
hysteresis). Prints each kill, then p50/p99 over all kills. Goal: detection
<= 1 s and 0 failed requests per kill (Route 53: ~70-150 s).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._edgeworld import edge_world  # noqa: E402
from nimbus.chaos.httpclient import Client, ResponseError  # noqa: E402
from nimbus.chaos.report import error_type, percentile  # noqa: E402

POLL_S = 0.02


class Load(threading.Thread):
    """Open-loop GETs at ``rate``/s: (sent, done, ok, region) per request."""

    def __init__(self, base: str, path: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.base, self.path, self.rate = base, path, rate
        self.records: list[tuple[float, float, bool, str | None]] = []
        self.causes: list[tuple[float, str]] = []  # (sent at, why) of each failure
        self.halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        inflight: set[asyncio.Task[None]] = set()
        # in flight at most: what the rate puts in flight within one 5 s
        # deadline, so only a request that would time out is not sent
        cap = max(16, min(1000, int(self.rate * 5)))
        client = Client(self.base)
        t0 = time.monotonic()
        i = 0
        while not self.halt.is_set():
            # behind schedule the due requests go at once, yielding each time
            await asyncio.sleep(max(0.0, t0 + i / self.rate - time.monotonic()))
            i += 1
            if len(inflight) >= cap:
                now = time.monotonic()
                self.records.append((now, now, False, None))
                self.causes.append((now, "not_sent_client_cap"))
                continue
            task = asyncio.create_task(self._one(client))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight, timeout=10)
        client.close()

    async def _one(self, client: Client) -> None:
        sent = time.monotonic()
        try:
            async with asyncio.timeout(5.0):
                r = await client.request("GET", self.path)
            ok, region = r.status == 200, r.headers.get("x-nimbus-region")
            if not ok:
                kind = error_type(r.body)
                self.causes.append((sent, f"http_{r.status}" + (f" {kind}" if kind else "")))
        except TimeoutError:
            ok, region = False, None
            self.causes.append((sent, "timeout"))
        except ResponseError as exc:
            ok, region = False, None
            self.causes.append((sent, exc.cause))
        self.records.append((sent, time.monotonic(), ok, region))

    def served_by(self, region: str, since: float) -> bool:
        return any(s >= since and ok and reg == region
                   for s, _d, ok, reg in reversed(self.records[-2000:]))


ADMIN = httpx.Client(timeout=1.0)  # one kept-alive client: a new one per poll costs the
                                   # load thread its GIL (an SSL context each time)


def edge_region(edge: str, region: str) -> tuple[bool | None, int | None]:
    """(up, requests sent to its gateways) from the edge's /_nimbus/regions."""
    try:
        doc: Any = ADMIN.get(edge + "/_nimbus/regions").json()
        r = doc["regions"][region]
        sent = sum(int(g.get("requests", 0)) for g in r.get("gateways", []))
        return bool(r["up"]), sent
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None, None


def wait(pred: Any, timeout_s: float, every_s: float = POLL_S) -> float | None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        time.sleep(every_s)
    return None


def one_kill(regions: list[Any], edge: str, load: Load) -> dict[str, float]:
    eu = regions[0]
    if wait(lambda: load.served_by("eu", time.monotonic() - 0.3), 30, 0.05) is None:
        raise SystemExit("the edge does not send traffic to eu")
    _, count = edge_region(edge, "eu")
    t_kill = time.monotonic()
    eu.kill()
    last_sent = t_kill
    down_at: float | None = None
    end = t_kill + 10.0
    while time.monotonic() < end:  # follow the edge's counters for a while
        up, sent = edge_region(edge, "eu")
        now = time.monotonic()
        if sent is not None and count is not None and sent > count:
            count, last_sent = sent, now
        if up is False and down_at is None:
            down_at = now
        if down_at is not None and now - max(down_at, last_sent) > 1.0:
            break
        time.sleep(POLL_S)
    eu.start()
    restarted = time.monotonic()
    back = wait(lambda: load.served_by("eu", restarted), 60, 0.05)
    settle = time.monotonic()
    failed = sum(1 for s, _d, ok, _r in load.records if not ok and t_kill - 1.0 <= s <= settle)
    slow = [d - s for s, d, ok, _r in load.records if ok and t_kill <= s <= settle]
    why = collections.Counter(c for s, c in load.causes if t_kill - 1.0 <= s <= settle)
    if why:
        print(f"    failures by cause: {dict(why)}", flush=True)
    return {"stopped_sending_s": last_sent - t_kill,
            "marked_down_s": float("nan") if down_at is None else down_at - t_kill,
            "failed": failed,
            "max_latency_s": max(slow, default=float("nan")),
            "back_s": float("nan") if back is None else back - t_kill}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    results = []
    with edge_world() as world:
        regions, edge = world.regions, world.edge
        load = Load(edge, "/hello", args.rate)
        load.start()
        try:
            time.sleep(2.0)
            for n in range(args.kills):
                r = one_kill(regions, edge, load)
                results.append(r)
                print(f"kill {n + 1:>2}: edge stopped sending after {r['stopped_sending_s']:.3f}s,"
                      f" marked down after {r['marked_down_s']:.3f}s, {r['failed']:.0f} failed, "
                      f"traffic back {r['back_s']:.2f}s after the kill; slowest answer "
                      f"{r['max_latency_s']:.3f}s", flush=True)
        finally:
            load.halt.set()
            load.join(15)
    total = len(load.records)
    failed = sum(1 for _s, _d, ok, _r in load.records if not ok)
    print(f"\n{len(results)} region kills under {args.rate:.0f} req/s through the edge "
          f"({total} requests, {failed} failed in all)")
    for key, label in (("stopped_sending_s", "detection (edge stops sending)"),
                       ("marked_down_s", "edge reports the region down"),
                       ("failed", "failed requests per kill"),
                       ("max_latency_s", "slowest answer around a kill"),
                       ("back_s", "traffic back after restart (from the kill)")):
        values = [r[key] for r in results if r[key] == r[key]]
        p50, p99 = percentile(values, 50), percentile(values, 99)
        if p50 is None or p99 is None:
            print(f"{label:44} no data")
            continue
        unit = "" if key == "failed" else "s"
        print(f"{label:44} p50 {p50:.3f}{unit}  p99 {p99:.3f}{unit}  "
              f"max {max(values):.3f}{unit}")
    det = [r["stopped_sending_s"] for r in results]
    p99 = percentile(det, 99) or float("nan")
    worst = max(r["failed"] for r in results) if results else float("nan")
    print(f"goal: detection <= 1 s ({'met' if p99 <= 1.0 else 'missed'} at p99 {p99:.3f}s), "
          f"0 failed per kill ({'met' if worst == 0 else 'missed'}: worst {worst:.0f}); "
          f"Route 53 health checks + DNS: ~70-150 s")
    print(f"(median detection {statistics.median(det):.3f}s)" if det else "")


if __name__ == "__main__":
    main()
