"""Connections from the edge to gateways: raw asyncio protocols parsing
responses with httptools, kept alive in one pool per gateway.

One :class:`Upstream` carries one exchange at a time. Its response head is
awaited (``head``); body bytes are buffered until the proxy commits to the
response, then written straight through a sink (the client's connection),
with back-pressure both ways. Everything that can go wrong before the
response head raises :class:`UpstreamFailure`, saying whether any byte of
the request may have reached the gateway (``sent``) and whether it is a
passive health signal (refused, reset, connect timeout).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import cast

import httptools

from nimbus.edge.prober import split_url

IDLE_S = 3.0            # under the gateway's keep-alive (5 s): we close first, never race it
MAX_IDLE_PER_POOL = 1024
MAX_UNCOMMITTED = 1 << 20  # body bytes held before the proxy commits to a response


class UpstreamFailure(Exception):
    def __init__(self, reason: str, *, sent: bool, passive: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.passive = passive


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a gateway."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._write_ready: asyncio.Future[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.uses = 0
        self.wrote = False
        self._reset()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.sink: Callable[[bytes], None] | None = None
        self.complete = False
        self.head_request = False
        self.until_close = False
        self.active = False
        self.dirty = False   # the request was not sent whole: never reused
        self.keep_alive = False
        self.received = 0    # body bytes so far (the stall watchdog watches it)
        self.deadline = 0.0  # for the response head (0: none); the edge's sweep checks
        self.deadline_passive = False

    # -- exchange --------------------------------------------------------
    def start(self, head_request: bool) -> None:
        if self.head.done() or self.done.done():
            self._reset()
        self.uses += 1
        self.wrote = False
        self.head_request = head_request
        self.active = True

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():  # closed, its connection_lost not delivered yet
            raise UpstreamFailure(f"connection to {self.pool.url} closed", sent=self.wrote,
                                  passive=False)
        t.write(data)
        self.wrote = True

    async def drain(self, timeout_s: float) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._write_ready), timeout_s)
            except TimeoutError:
                raise UpstreamFailure(f"gateway {self.pool.url} took no request bytes for "
                                      f"{timeout_s:g} s", sent=True, passive=False) from None

    def watch(self, stall_s: float) -> asyncio.TimerHandle:
        """Fail the exchange when no response body byte arrives for
        ``stall_s`` (a stalled gateway, or a client that stopped reading)."""
        seen = self.received

        def check() -> None:
            nonlocal seen
            if self.complete or self.closed:
                return
            if self.received == seen:
                self.fail(UpstreamFailure(f"response stalled for {stall_s:g} s", sent=True,
                                          passive=False))
                return
            seen = self.received
            self._watch = self.loop.call_later(stall_s, check)

        self._watch = self.loop.call_later(stall_s, check)
        return self._watch

    def unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def commit(self, sink: Callable[[bytes], None]) -> None:
        """From now on body bytes go to ``sink``; what came before goes first."""
        for chunk in self.chunks:
            sink(chunk)
        self.chunks = []
        self.sink = sink
        if self.buffered > MAX_UNCOMMITTED and self.transport is not None:
            self.transport.resume_reading()
        self.buffered = 0

    def deadline_passed(self) -> None:
        if not self.head.done():
            self.fail(UpstreamFailure("no response head in time", sent=True,
                                      passive=self.deadline_passive))

    def reusable(self) -> bool:
        return (self.complete and not self.closed and not self.head_request and not self.dirty
                and not self.until_close and self.keep_alive)

    def fail(self, failure: UpstreamFailure) -> None:
        """Abort the exchange (gateway went down, client left, a deadline)."""
        self._fail(failure)
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort() if abort else self.transport.close()
        self.pool.forget(self)

    def _fail(self, failure: UpstreamFailure) -> None:
        if not self.head.done():
            self.head.set_exception(failure)
            self.head.exception()  # retrieved here: the waiter may be gone
        if not self.done.done():
            self.done.set_exception(failure)
            self.done.exception()

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: the connection is not sane
            self.close(abort=True)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamFailure(f"bad response from gateway: {exc}", sent=True,
                                      passive=False))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active and self.until_close and self.head.done() and exc is None:
            self.on_message_complete()
        elif self.active and not self.complete:
            why = "connection reset" if exc is not None or not self.head.done() else \
                "connection closed mid-response"
            # On a connection opened for this request it is a signal about the
            # gateway; on a reused one the gateway may just have dropped an idle
            # connection (its own limits): the next connect tells, refused or not.
            self._fail(UpstreamFailure(f"{why} by gateway {self.pool.url}", sent=True,
                                       passive=self.uses <= 1))
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self.pool.forget(self)

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._write_ready = None

    # -- httptools callbacks ---------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer: wait for the real one
            self.headers = []
            return
        self.deadline = 0.0
        self.keep_alive = self.parser.should_keep_alive()  # (it forgets once complete)
        framed = any(n in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        self.until_close = not framed and self.status not in (204, 304)
        if not self.head.done():
            self.head.set_result(None)
        if self.head_request:  # no body follows; the parser does not know: not reused
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.received += len(body)
        if self.sink is not None:
            self.sink(body)
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > MAX_UNCOMMITTED and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 or self.complete:
            return
        self.complete = True
        self.active = False
        if not self.done.done():
            self.done.set_result(None)


class Pool:
    """Kept-alive connections to one gateway (LIFO: the warmest first)."""

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self.url = url
        self.host, self.port = split_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.loop = asyncio.get_running_loop()
        self.idle: list[Upstream] = []
        self.busy: set[Upstream] = set()
        self.connects = 0

    async def acquire(self) -> Upstream:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S and \
                    conn.transport is not None and not conn.transport.is_closing():
                self.busy.add(conn)
                return conn
            conn.close()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Upstream(self), self.host, self.port),
                self.connect_timeout_s)
        except TimeoutError:
            raise UpstreamFailure(f"connect to {self.url} timed out after "
                                  f"{self.connect_timeout_s:g} s", sent=False,
                                  passive=True) from None
        except OSError as exc:
            raise UpstreamFailure(f"connect to {self.url} failed: "
                                  f"{exc.strerror or exc}", sent=False, passive=True) from None
        self.connects += 1
        self.busy.add(conn)
        return conn

    def release(self, conn: Upstream) -> None:
        self.busy.discard(conn)
        if conn.reusable() and len(self.idle) < MAX_IDLE_PER_POOL:
            conn.idle_since = time.monotonic()
            conn.active = False
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: Upstream) -> None:
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def abort_waiting(self, reason: str) -> int:
        """The gateway went down: exchanges still waiting for their response
        head fail now (to be retried elsewhere); idle connections are dropped."""
        n = 0
        for conn in list(self.busy):
            if not conn.head.done():
                conn.fail(UpstreamFailure(reason, sent=True, passive=False))
                n += 1
        for conn in self.idle[:]:
            conn.close()
        return n

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn.close()
