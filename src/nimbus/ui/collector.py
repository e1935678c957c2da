"""Where the dashboard's frames come from, once a second.

``nimbus up``: the process's own metrics registry (no HTTP, no text).
A region's controller: its own registry plus every worker's and gateway's
``metrics`` URL (from their node records), scraped with the region token
as Bearer, in parallel, each with a deadline; a node that does not answer
is left out of that frame (its counters then look reset, which the history
counts as no increase rather than a drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nimbus.observe import metrics
from nimbus.region import region
from nimbus.ui.history import FamilyLike, Frame, History, frame_from

log = logging.getLogger("nimbus.ui")

INTERVAL_S = 1.0          # nimbus up: its own figures, read in-process
SCRAPE_INTERVAL_S = 2.0   # a region's controller: every worker and gateway over HTTP
SCRAPE_TIMEOUT_S = 0.8
MAX_SCRAPE_BYTES = 8 * 1024 * 1024

Families = Iterable[FamilyLike]
Source = Callable[[], Awaitable[list[Families]]]


async def own_families() -> Families:
    """The families of this process's metrics the pages draw, read the way
    its ``/metrics`` reads them (the async backlog first, cached as for a
    scrape), without the rest: no memory readings of every instance, no
    store and queue histograms. A sample stays a fraction of a millisecond
    on the loop that serves requests, however many instances run."""
    c = metrics.COLLECTOR
    await c.refresh()
    reg = region()
    out: list[FamilyLike] = []
    # the invocation counters are kept per function version by the pools
    out += metrics.invocation_families(metrics.all_invocation_stats(), reg)
    if c.worker is not None:
        out += metrics.pool_families(list(c.worker.pools.values()), reg)
    elif c.invokers is not None:
        out += metrics.held_families(list(c.invokers()), reg)
    if c.async_reader is not None:
        out += metrics.async_families(c.async_figures, reg)
    out += metrics.COLD_STARTS.collect()
    out += metrics.ASYNC_DEAD_LETTERS.collect()
    return out


def local_source() -> Source:
    async def read() -> list[Families]:
        return [await own_families()]
    return read


class Scraper:
    """The local registry plus each of ``urls()``'s ``/metrics``, scraped
    with ``token``; :attr:`last` says how each URL's last scrape went."""

    def __init__(self, urls: Callable[[], list[str]], token: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.urls = urls
        self.clock = clock
        self.client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S,
                                        headers={"authorization": f"Bearer {token}"})
        self.last: dict[str, dict[str, Any]] = {}

    async def _one(self, url: str) -> Families | None:
        error = None
        families = None
        try:
            r = await self.client.get(url.rstrip("/") + "/metrics")
            if r.status_code != 200:
                error = f"answered {r.status_code}"
            elif len(r.content) > MAX_SCRAPE_BYTES:
                error = f"answered {len(r.content)} bytes, over {MAX_SCRAPE_BYTES}"
            else:
                families = list(text_string_to_metric_families(r.text))
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        except ValueError as exc:
            error = f"not exposition text: {exc}"[:200]
        self.last[url] = {"ok": error is None, "error": error, "at": self.clock()}
        return families

    async def read(self) -> list[Families]:
        urls = self.urls()
        for gone in set(self.last) - set(urls):
            del self.last[gone]
        got = await asyncio.gather(*(self._one(u) for u in urls))
        return [await own_families(), *(g for g in got if g is not None)]

    async def aclose(self) -> None:
        await self.client.aclose()


class Collector:
    """Samples ``source`` every ``interval_s`` into ``history``."""

    def __init__(self, source: Source, history: History, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.history = history
        self.interval_s = interval_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> Frame:
        t = self.clock()
        frame = Frame(t, {})
        for families in await self.source():
            frame_from(families, t, frame)
        self.history.add(frame)
        return frame

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            try:
                await asyncio.wait_for(self.sample(), max(self.interval_s, SCRAPE_TIMEOUT_S * 2))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the dashboard must not stop sampling
                log.warning("dashboard: a metrics sample failed", exc_info=True)
            await asyncio.sleep(max(0.05, start + self.interval_s - loop.time()))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
