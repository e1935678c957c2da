"""A small, fast HTTP/1.1 client for load: kept-alive connections to one
host, httptools to parse answers, no per-request allocation beyond the
answer. A load generator in Python must cost much less than what it
measures, or its own queueing shows up as the platform's latency."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httptools


class ResponseError(Exception):
    """The connection broke or the answer could not be parsed; ``cause`` is
    ``connect``, ``reset`` or ``bad_response``."""

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause


class _StaleConnection(Exception):
    pass


class Answer:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer] | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = True
        self.closed = False
        self.got_bytes = False

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseError("bad_response", str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ResponseError("reset", str(exc or "connection closed")))

    # httptools
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        answer = Answer(self.status, self.headers, b"".join(self.body))
        self.headers, self.body = {}, []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _fail(self, exc: ResponseError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Client:
    """Requests to one ``http://host:port``; the caller bounds each with a
    deadline (a request cut short closes its connection)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://host[:port], got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authority = parts.netloc.encode()
        self.idle: list[_Conn] = []

    async def request(self, method: str, path: str,
                      headers: dict[str, str] | None = None) -> Answer:
        """One request. A kept-alive connection the server closed just as it
        was reused (reset before a byte of the answer) is the race every
        HTTP client meets; as browsers do, the request is sent once more on
        a new connection, for ``GET`` only."""
        try:
            return await self._request(method, path, headers, reuse=True)
        except _StaleConnection:
            return await self._request(method, path, headers, reuse=False)

    async def _request(self, method: str, path: str, headers: dict[str, str] | None,
                       reuse: bool) -> Answer:
        conn = None
        while reuse and self.idle:
            c = self.idle.pop()
            if not c.closed:
                conn = c
                break
        if conn is None:
            loop = asyncio.get_running_loop()
            try:
                _, conn = await loop.create_connection(_Conn, self.host, self.port)
            except OSError as exc:
                raise ResponseError("connect", str(exc)) from None
        assert conn.transport is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nhost: ".encode() + self.authority
                + f"\r\ncontent-length: 0\r\n{extra}\r\n".encode())
        reused = conn.got_bytes
        conn.got_bytes = False
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.transport.write(head)
        try:
            answer = await conn.waiter
        except ResponseError as exc:
            conn.close()
            if exc.cause == "reset" and reused and not conn.got_bytes and method == "GET":
                raise _StaleConnection from exc
            raise
        except BaseException:
            conn.close()
            raise
        conn.waiter = None
        if conn.keep_alive and not conn.closed:
            self.idle.append(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()
