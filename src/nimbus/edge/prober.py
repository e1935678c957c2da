"""Active health probes: every gateway's ``/_nimbus/health`` every
``interval_s``, each with a ``timeout_s`` deadline, over one kept-alive
connection per gateway (reopened after any failure). Results feed the
HealthBook; a timeout counts as a failure, so a hung gateway (its process
stopped, its network cut) is down after ``fall`` probes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from nimbus.edge.health import HealthBook, HealthConfig
from nimbus.edge.types import ClusterLike

PROBE_PATH = "/_nimbus/health"
MAX_PROBE_BODY = 64 * 1024


class ProbeFailed(Exception):
    pass


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://HOST:PORT`` base URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"gateway URL {url!r}: expected http://HOST:PORT")
    return parts.hostname, parts.port or 80


class _ProbeConnection:
    def __init__(self, url: str) -> None:
        self.host, self.port = split_url(url)
        self.hostport = f"{self.host}:{self.port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def probe(self) -> None:
        """One GET; raises ProbeFailed (or OSError) unless the answer is 200."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {PROBE_PATH} HTTP/1.1\r\nhost: {self.hostport}\r\n"
                          "user-agent: nimbus-edge-probe\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ProbeFailed(f"bad status line {lines[0][:80]!r}")
        status = int(status_line[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                close = True  # not expected from a health answer: do not reuse
        if length > MAX_PROBE_BODY:
            raise ProbeFailed(f"health answer of {length} bytes")
        if length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        if status != 200:
            raise ProbeFailed(f"health answered {status}")


class Prober:   # probes every gateway's /_nimbus/health every interval, feeds a HealthBook
    def __init__(self, cluster: ClusterLike, book: HealthBook, config: HealthConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.book = book
        self.config = config
        self.clock = clock
        self.urls = [url for region in cluster.regions.values() for url in region.gateways]
        self.rounds = 0

    async def run(self) -> None:      # until cancelled
        tasks = [asyncio.create_task(self._probe_loop(url)) for url in self.urls]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe_loop(self, url: str) -> None:
        conn = _ProbeConnection(url)
        interval = self.config.interval_s
        try:
            while True:
                start = self.clock()
                await self.probe_once(conn, url)
                self.rounds += 1
                await asyncio.sleep(max(0.0, start + interval - self.clock()))
        finally:
            conn.close()

    async def probe_once(self, conn: _ProbeConnection, url: str) -> None:
        start = time.perf_counter()  # (a loop's clock may tick in whole milliseconds)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a
            # cancellation that lands as the probe finishes, and this loop
            # would then run on after the edge stopped it
            async with asyncio.timeout(self.config.timeout_s):
                await conn.probe()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ProbeFailed, ValueError, TimeoutError) as exc:
            conn.close()
            reason = (f"probe timed out after {self.config.timeout_s:g} s"
                      if isinstance(exc, TimeoutError) else f"probe failed: {exc!s}"[:200])
            self.book.probe_failed(url, reason, self.clock())
            return
        latency = time.perf_counter() - start
        self.book.probe_ok(url, latency, self.clock())
