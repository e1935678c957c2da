"""The edge's HTTP front: clients in, gateways of several regions out.

Per request: find the app (Host or route), order its regions by policy and
health, send it to the least-in-flight up gateway of the first region over a
kept-alive connection, and stream the answer back with ``X-Nimbus-Region``.
When the gateway fails before the response head (refused, reset, it went
down while we waited, a 502/503 it made itself) the request goes to another
up gateway of the region, else to the next region, if it may run twice
(idempotent, and its body is held for replay) and the retry budget allows;
otherwise the client gets 502 ``RegionFailed`` naming the region. A request
that never reached a gateway (connect refused or timed out) may always go
on: it did not run.

Raw asyncio protocols and httptools on both sides; uvloop when present.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httptools
import orjson

from nimbus.edge.apps import App, AppRefresher, AppTable, ControlRegion, EdgeSpec
from nimbus.edge.budget import RetryBudget
from nimbus.edge.health import HealthBook, HealthConfig
from nimbus.edge.metrics import (
    CONTENT_TYPE,
    METRICS_PATH,
    NO_REGION,
    REGIONS_PATH,
    EdgeMetrics,
    MetricsAuth,
)
from nimbus.edge.policy import region_order
from nimbus.edge.prober import Prober
from nimbus.edge.types import ClusterLike
from nimbus.edge.upstream import Pool, Upstream, UpstreamFailure
from nimbus.gateway.responses import GATEWAY_ERROR_HEADER
from nimbus.ids import new_id
from nimbus.observe import tracing
from nimbus.observe.metrics import is_loopback

log = logging.getLogger("nimbus.edge")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
NOT_A_HEALTH_SIGNAL = frozenset({"TooManyConnections"})  # load shedding: retry, not down
STOP_TASK_TRIES = 6  # a stopping edge cancels its background tasks this often, 0.5 s apart
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"content-length", b"expect",
                        b"x-forwarded-for"})
RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                           b"trailer", b"transfer-encoding", b"upgrade", b"content-length"})
REASONS = {200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
           304: b"Not Modified", 400: b"Bad Request", 401: b"Unauthorized",
           403: b"Forbidden", 404: b"Not Found",
           413: b"Payload Too Large", 429: b"Too Many Requests",
           431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
           504: b"Gateway Timeout"}


@dataclass(frozen=True)
class EdgeConfig:
    health: HealthConfig = HealthConfig()
    connect_timeout_s: float = 0.5
    response_timeout_s: float = 960.0     # to a response head (functions may run 15 min)
    max_replay_bytes: int = 1 << 20       # idempotent bodies up to this are held for replay
    body_timeout_s: float = 60.0          # a client's request body, between chunks
    header_timeout_s: float = 10.0
    keep_alive_s: float = 60.0
    max_header_bytes: int = 64 * 1024
    retry_ratio: float = 0.2
    retry_min_per_s: float = 10.0
    apps_interval_s: float = 2.0
    grace_s: float = 10.0
    max_connections: int = 10_000         # client connections held at once
    metrics_token: str | None = None      # Bearer token for /_nimbus/metrics (None: loopback only)


class ClientGone(Exception):
    pass


class RequestBody:
    """A request body as it arrives: a queue with back-pressure on the client."""

    HIGH = 256 * 1024

    def __init__(self, conn: ClientConn) -> None:
        self.conn = conn
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.finished = False
        self.failed = False
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.HIGH:
            self.conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()

    def fail(self) -> None:
        self.failed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self, timeout_s: float) -> bytes | None:
        """The next chunk, or None at the end."""
        while not self.chunks:
            if self.failed:
                raise ClientGone()
            if self.finished:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout_s)
            except TimeoutError:
                raise ClientGone() from None
        chunk = self.chunks.popleft()
        self.size -= len(chunk)
        if self.size <= self.HIGH:
            self.conn.resume_reading()
        return chunk

    async def read_all(self, timeout_s: float) -> bytes:
        parts = []
        while (chunk := await self.read(timeout_s)) is not None:
            parts.append(chunk)
        return b"".join(parts)


class Request:
    __slots__ = ("method", "url", "headers", "names", "keep_alive", "body", "has_body",
                 "chunked", "length", "host", "version")

    def __init__(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, body: RequestBody, version: str,
                 names: list[bytes] | None = None) -> None:
        self.method = method
        self.url = url
        self.headers = headers  # names in lower case
        # the names as the client wrote them, forwarded as written (a REST
        # event behind the edge shows them as API Gateway would)
        self.names = names if names is not None else [n for n, _v in headers]
        self.keep_alive = keep_alive
        self.body = body
        self.version = version
        self.host: bytes | None = None
        self.length: int | None = None
        self.chunked = False
        for n, v in headers:
            if n == b"host":
                self.host = v.split(b":", 1)[0].lower() if not v.startswith(b"[") else v
            elif n == b"content-length":
                self.length = int(v)
            elif n == b"transfer-encoding" and b"chunked" in v.lower():
                self.chunked = True
        self.has_body = self.chunked or bool(self.length)


class ClientConn(asyncio.Protocol):
    """One client connection: requests parsed in order, answered in order."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.loop = edge.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "-"
        self.pipeline: deque[Request] = deque()
        self.parsing: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.reading_paused = False
        self.upstream: Upstream | None = None   # the exchange streaming to us now
        self._write_ready: asyncio.Future[None] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self.deadline = 0.0    # close when idle past this (0: none); the edge's sweep checks
        self.last_active = 0.0
        self.busy = False

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "-"
        self._arm(self.edge.config.header_timeout_s)
        if len(self.edge.connections) >= self.edge.config.max_connections \
                and not self.edge.make_room():
            self.write(json_response(503, {
                "errorType": "TooManyConnections",
                "errorMessage": "the edge holds as many connections as it may; try again"},
                b"edge", keep_alive=False))
            self.close()
            return
        self.edge.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(501, "NotImplemented", "protocol upgrades are not supported")
        except (httptools.HttpParserError, ValueError) as exc:
            if self._header_bytes > self.edge.config.max_header_bytes:
                self._reject(431, "HeadersTooLarge", "request line and headers are over "
                             f"{self.edge.config.max_header_bytes} bytes")
            else:
                self._reject(400, "BadRequest", f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.edge.connections.discard(self)
        if self.parsing is not None:
            self.parsing.body.fail()
        for req in self.pipeline:
            req.body.fail()
        if self.upstream is not None:
            self.upstream.fail(UpstreamFailure("client left", sent=True, passive=False))
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        if self.task is not None and not self.busy:
            self.task.cancel()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    async def drain(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            await self._write_ready

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- timers ------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        now = self.loop.time()
        self.deadline = now + seconds
        self.last_active = now

    def expire(self) -> None:
        """Past the deadline: a head that never completed, or idle too long."""
        self.deadline = 0.0
        if not self.busy and not self.pipeline and self.transport is not None:
            self.close()

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._names: list[bytes] = []
        self._header_bytes = 0
        if not self.busy:
            self._arm(self.edge.config.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.edge.config.max_header_bytes:
            raise ValueError("request head over the limit")
        self._headers.append((name.lower(), value))
        self._names.append(name)

    def on_headers_complete(self) -> None:
        self.deadline = 0.0
        p = self.parser
        req = Request(p.get_method(), self._url, self._headers, p.should_keep_alive(),
                      RequestBody(self), p.get_http_version(), self._names)
        if req.has_body and any(n == b"expect" and v.lower() == b"100-continue"
                                for n, v in req.headers):
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.parsing = req
        self.pipeline.append(req)
        if len(self.pipeline) > 8:
            self.pause_reading()
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.body.feed(body)

    def on_message_complete(self) -> None:
        if self.parsing is not None:
            self.parsing.body.finish()
            self.parsing = None

    # -- serving ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        t = self.transport
        if not self.closed and t is not None and not t.is_closing():
            t.write(data)  # (a closing transport's connection_lost may not have run yet)

    async def _serve(self) -> None:
        try:
            while self.pipeline and not self.closed:
                req = self.pipeline[0]
                self.busy = True
                try:
                    keep = await self.edge.handle(self, req)
                except ClientGone:
                    keep = False
                self.busy = False
                self.pipeline.popleft()
                if not req.body.finished:  # its body was not all read: cannot go on
                    keep = False
                self.resume_reading()
                if not keep or not req.keep_alive or self.edge.draining:
                    self.close()
                    return
            if not self.closed:
                self._arm(self.edge.config.keep_alive_s)
        except Exception:  # noqa: BLE001 - a bug of ours: end this connection, not the edge
            log.exception("edge: request from %s failed", self.peer)
            self.abort()
        finally:
            self.busy = False
            self.task = None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _reject(self, status: int, error_type: str, message: str) -> None:
        if self.busy or self.pipeline:  # mid-exchange: nothing sane to say
            self.abort()
            return
        self.write(json_response(status, {"errorType": error_type, "errorMessage": message},
                                 b"edge", keep_alive=False))
        self.close()


def json_response(status: int, body: Any, region: bytes, keep_alive: bool,
                  head_only: bool = False) -> bytes:
    data = orjson.dumps(body)
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-nimbus-region: %s\r\n%s\r\n") % (
        status, REASONS.get(status, b"Status"), len(data), region,
        b"" if keep_alive else b"connection: close\r\n")
    return head if head_only else head + data


_URL = re.compile(r"(?:gateway )?\bhttps?://\S+")


def without_urls(reason: str) -> str:
    """``reason`` with any gateway URL in it said as "a gateway"."""
    return _URL.sub("a gateway", reason)


def gateway_failure(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> str | None:
    """The errorType of a 502/503 the gateway itself made because it could
    not serve (it marks those with ``x-nimbus-error: gateway``, a header no
    function can set), or None for anything else (a function's own answer,
    a throttle, an instance that died running the request)."""
    if status not in (502, 503) or (GATEWAY_ERROR_HEADER, b"gateway") not in headers:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "Unavailable"
    kind = data.get("errorType") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) and kind else "Unavailable"


def _may_be_gateway_error(up: Upstream) -> bool:
    if up.status not in (502, 503):
        return False
    return (GATEWAY_ERROR_HEADER, b"gateway") in up.headers


class Edge:
    def __init__(self, cluster: ClusterLike, config: EdgeConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.config = config or EdgeConfig()
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.book = HealthBook(cluster, self.config.health, self.clock())
        self.book.on_down.append(self._gateway_down)
        self.order = tuple(cluster.regions)
        self.region_bytes = {name: name.encode() for name in self.order}
        self.gateway_region = {gw: name for name, r in cluster.regions.items()
                               for gw in r.gateways}
        self.pools = {gw: Pool(gw, self.config.connect_timeout_s) for gw in self.gateway_region}
        self.budget = RetryBudget(self.config.retry_ratio, self.config.retry_min_per_s)
        self.apps = AppTable()
        self.rng = rng or random.Random()
        self.connections: set[ClientConn] = set()
        self.draining = False
        self.started = time.time()
        self.stats = {"requests": 0, "retries": 0, "region_failed": 0, "budget_denied": 0}
        self.metrics = EdgeMetrics(self.order, self.book)
        self.metrics_auth = MetricsAuth(self.config.metrics_token, "127.0.0.1")
        self._codes = self.metrics.requests          # region -> status -> answers
        self._retries = self.metrics.retries
        self._failovers = self.metrics.failovers
        self.prober = Prober(cluster, self.book, self.config.health, clock=self.clock)
        self._tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None
        self.refresher: AppRefresher | None = None
        self._orders: dict[str | None, tuple[int, EdgeSpec | None, list[str]]] = {}

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await self.loop.create_server(lambda: ClientConn(self), host, port,
                                                    reuse_address=True, backlog=1024)
        # what was bound decides (``127.1`` and ``localhost`` are loopback too)
        bound = [sock.getsockname()[0] for sock in self.server.sockets]
        self.metrics_auth = MetricsAuth(
            self.config.metrics_token,
            bound[0] if bound and all(is_loopback(a) for a in bound) else host)
        self._tasks.append(self.loop.create_task(self.prober.run()))
        self._tasks.append(self.loop.create_task(self._sweep()))
        regions: Mapping[str, ControlRegion] = self.cluster.regions  # type: ignore[assignment]
        if all(hasattr(r, "control") for r in regions.values()):
            refresher = AppRefresher(regions, self.apps, self.config.apps_interval_s)
            self.refresher = refresher
            self._tasks.append(self.loop.create_task(refresher.run()))
        sock = self.server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def stop(self, grace_s: float) -> None:
        """Stop taking connections, let requests in flight finish (up to
        ``grace_s``), then close everything."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            if not c.busy and not c.pipeline:
                c.close()
        deadline = self.loop.time() + grace_s
        while any(c.busy or c.pipeline for c in self.connections) \
                and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            c.abort()
        # cancelled until they end, with a deadline: a task that lost a
        # cancellation (it landed as something it awaited finished) is
        # cancelled again rather than waited for forever
        pending = {t for t in self._tasks if not t.done()}
        for _ in range(STOP_TASK_TRIES):
            if not pending:
                break
            for t in pending:
                t.cancel()
            _done, pending = await asyncio.wait(pending, timeout=0.5)
        if pending:
            log.warning("%d background tasks did not end when cancelled", len(pending))
        for pool in self.pools.values():
            pool.close()

    async def _sweep(self) -> None:
        """One timer for every deadline: response heads (every 0.1 s) and idle
        or slow-headed client connections (every 0.5 s). Cheaper than a timer
        per request armed and cancelled on the request path."""
        n = 0
        while True:
            await asyncio.sleep(0.1)
            now = self.loop.time()
            for pool in self.pools.values():
                for up in [u for u in pool.busy if 0 < u.deadline < now]:
                    up.deadline_passed()
            n += 1
            if n % 5 == 0:
                for c in [c for c in self.connections if 0 < c.deadline < now]:
                    c.expire()

    def make_room(self) -> bool:
        """Close the client connection idle the longest (False: all are busy)."""
        idle = [c for c in self.connections if not c.busy and not c.pipeline]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        self.connections.discard(oldest)
        oldest.close()
        return True

    def add_task(self, coro: Any) -> None:
        """Run ``coro`` beside the edge; cancelled when it stops."""
        self._tasks.append(self.loop.create_task(coro))

    def _gateway_down(self, gateway: str) -> None:
        pool = self.pools.get(gateway)
        if pool is not None:
            n = pool.abort_waiting(f"gateway {gateway} went down before answering")
            if n:
                log.info("edge: %d requests in flight to %s moved on", n, gateway)

    # -- the request path ----------------------------------------------------------
    async def handle(self, conn: ClientConn, req: Request) -> bool:
        """Answer one request; False when the client connection must end."""
        url = req.url
        if url.startswith(b"/_nimbus/"):
            return await self._own(conn, req)
        now = self.clock()
        self.stats["requests"] += 1
        self.budget.record_request(now)
        path = url.split(b"?", 1)[0].decode("latin-1")
        app = self.apps.lookup(req.host, req.method.decode("latin-1"), path)
        order = self._region_order(app)
        idempotent = req.method in IDEMPOTENT or any(n == b"idempotency-key"
                                                     for n, _ in req.headers)
        body: bytes | None = None
        if not req.has_body:
            body = b""
        elif idempotent and req.length is not None \
                and req.length <= self.config.max_replay_bytes:
            body = await req.body.read_all(self.config.body_timeout_s)
        replayable = idempotent and body is not None
        if tracing.on:
            return await self._traced(conn, req, order, idempotent, body, app)
        head = self._request_head(req, conn.peer, body)
        failed: list[tuple[str, str]] = []
        for region, gateway in self._candidates(order):
            if failed:
                if not self.budget.try_spend(self.clock()):
                    self.stats["budget_denied"] += 1
                    break
                self.stats["retries"] += 1
                last = failed[-1][0]
                self._retries[last] += 1
                if region != last:
                    self._failovers[last] += 1
            try:
                return await self._attempt(conn, req, region, gateway, head, body, failed)
            except UpstreamFailure as f:
                if conn.closed:
                    raise ClientGone() from None
                failed.append((region, f.reason))
                if f.passive:
                    self.book.passive_failure(gateway, f.reason, self.clock())
                if f.sent and not replayable:
                    break  # it may have run: never a second run behind the client's back
        return self._failed_answer(conn, req, order, failed, app, body)

    def _failed_answer(self, conn: ClientConn, req: Request, order: list[str],
                       failed: list[tuple[str, str]], app: App | None,
                       body: bytes | None) -> bool:
        """The 502 when no region answered; False when the connection must end."""
        self.stats["region_failed"] += 1
        if failed:
            region, reason = failed[-1]
        elif order:
            region, reason = order[0], "no gateway to send to"
        else:
            region = "-"
            reason = (f"app {app.name if app else '?'} names no region of this edge's "
                      f"cluster file ({', '.join(self.order)})")
        codes = self._codes.get(region)
        if codes is None:
            codes = self._codes[NO_REGION]
        codes[502] = codes.get(502, 0) + 1
        conn.write(json_response(502, {
            "errorType": "RegionFailed",
            # clients learn the region and what went wrong, not where the
            # region's gateways are (that is for /_nimbus/regions and the log)
            "errorMessage": (f"region {region} failed: {without_urls(reason)}"
                             if failed or order else reason),
            "region": region,
            "tried": [r for r, _ in failed],
        }, region.encode(), req.keep_alive, head_only=req.method == b"HEAD"))
        # when the rest of the body was not read, the connection ends
        return req.body.finished or body is not None

    async def _traced(self, conn: ClientConn, req: Request, order: list[str],
                      idempotent: bool, body: bytes | None, app: App | None) -> bool:
        """:meth:`handle`'s loop with a span for the request and one per try
        of a region (the try's ``traceparent`` goes to the gateway)."""
        trace_id, parent_id, state = tracing.extract(req.headers)
        span = tracing.start("nimbus.edge.request", new_id(), trace_id=trace_id,
                             parent_id=parent_id, kind=tracing.KIND_SERVER,
                             attrs={"http.request.method": req.method.decode("latin-1"),
                                    "url.path": req.url.split(b"?", 1)[0].decode("latin-1")})
        span.tracestate = state
        replayable = idempotent and body is not None
        failed: list[tuple[str, str]] = []
        error: str | None = None
        try:
            for region, gateway in self._candidates(order):
                if failed:
                    if not self.budget.try_spend(self.clock()):
                        self.stats["budget_denied"] += 1
                        break
                    self.stats["retries"] += 1
                attempt = tracing.start("nimbus.edge.try", span.attrs["nimbus.request_id"],
                                        span, kind=tracing.KIND_CLIENT,
                                        attrs={"nimbus.region": region,
                                               "nimbus.gateway": gateway,
                                               "nimbus.attempt": len(failed) + 1,
                                               "nimbus.retry": bool(failed)})
                attempt.tracestate = state
                head = self._request_head(req, conn.peer, body, attempt)
                try:
                    done = await self._attempt(conn, req, region, gateway, head, body, failed,
                                               span)
                except UpstreamFailure as f:
                    tracing.end(attempt, f.reason)
                    if conn.closed:
                        raise ClientGone() from None
                    failed.append((region, f.reason))
                    if f.passive:
                        self.book.passive_failure(gateway, f.reason, self.clock())
                    if f.sent and not replayable:
                        break
                    continue
                except BaseException as exc:
                    tracing.end(attempt, type(exc).__name__)
                    raise
                tracing.end(attempt)
                span.attrs["nimbus.region"] = region
                return done
            error = f"no region answered ({len(failed)} tried)"
            return self._failed_answer(conn, req, order, failed, app, body)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            tracing.end(span, error)

    def _candidates(self, order: list[str]) -> Iterator[tuple[str, str]]:
        """Where to try, lazily (health moves as attempts fail): each region
        in order, its up gateways least-in-flight first; a region with none
        up gets one try at its least busy gateway, as a last resort."""
        book = self.book
        for region in order:
            tried: set[str] = set()
            while True:
                gateway = book.pick_gateway(region, 0.0, tried)
                if gateway is None and not tried:
                    gateway = book.any_gateway(region, 0.0)
                if gateway is None:
                    break
                tried.add(gateway)
                yield region, gateway

    def _region_order(self, app: App | None) -> list[str]:
        """region_order, remembered per app until health changes (weighted
        draws anew for every request). The list is shared: do not modify."""
        spec = app.spec if app is not None else None
        book = self.book
        if spec is not None and spec.policy == "weighted":
            return region_order(spec, self.order, book.up_regions(0.0), book.latencies(),
                                self.rng)
        key = app.name if app is not None else None
        hit = self._orders.get(key)
        if hit is not None and hit[0] == book.version and hit[1] is spec:
            return hit[2]
        order = region_order(spec, self.order, book.up_regions(0.0), book.latencies(), self.rng)
        if len(self._orders) > 10_000:
            self._orders.clear()
        self._orders[key] = (book.version, spec, order)
        return order

    def _request_head(self, req: Request, peer: str, body: bytes | None,
                      span: tracing.Span | None = None) -> bytes:
        """The request line and headers for a gateway; with ``span``, its W3C
        context replaces the client's."""
        parts = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
        xff = None
        for (n, v), written in zip(req.headers, req.names, strict=True):
            if n in HOP_BY_HOP:
                if n == b"x-forwarded-for":
                    xff = v
                continue
            if span is not None and (n == b"traceparent" or n == b"tracestate"):
                continue
            parts += (written, b": ", v, b"\r\n")
        if span is not None:
            parts += (b"traceparent: ", span.traceparent.encode(), b"\r\n")
            if span.tracestate:
                parts += (b"tracestate: ", span.tracestate.encode("latin-1"), b"\r\n")
        peer_b = peer.encode()
        parts += (b"x-forwarded-for: ", xff + b", " + peer_b if xff else peer_b, b"\r\n")
        if body is not None:
            if body or req.method not in (b"GET", b"HEAD"):
                parts.append(b"content-length: %d\r\n" % len(body))
        elif req.length is not None:
            parts.append(b"content-length: %d\r\n" % req.length)
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _attempt(self, conn: ClientConn, req: Request, region: str, gateway: str,
                       head: bytes, body: bytes | None,
                       failed: list[tuple[str, str]], span: tracing.Span | None = None) -> bool:
        pool = self.pools[gateway]
        was_up = self.book.gateway_up(gateway, 0.0)
        up = await pool.acquire()
        self.book.begin(gateway)
        committed = False
        try:
            up.start(head_request=req.method == b"HEAD")
            if body is not None:
                up.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    up.write(body)
            else:
                up.write(head)
                await self._stream_body(req, up)
            timeout = self.config.response_timeout_s if was_up else \
                3 * self.config.health.timeout_s
            if not up.head.done():
                up.deadline = self.loop.time() + timeout
                up.deadline_passive = not was_up
                await up.head
            if _may_be_gateway_error(up):
                await asyncio.wait_for(asyncio.shield(up.done), self.config.health.timeout_s)
                kind = gateway_failure(up.status, up.headers, b"".join(up.chunks))
                if kind is not None:
                    if kind not in NOT_A_HEALTH_SIGNAL:
                        self.book.gateway_error(gateway, f"{up.status} {kind}", self.clock())
                    raise UpstreamFailure(f"gateway answered {up.status} {kind}", sent=True,
                                          passive=False)
            committed = True
            if span is not None:
                for n, v in up.headers:  # the gateway's request id: `nimbus trace` finds us
                    if n == b"x-nimbus-request-id":
                        span.attrs["nimbus.request_id"] = v.decode("latin-1")
                span.attrs["http.response.status_code"] = up.status
            await self._respond(conn, req, region, up, failed)
            return True
        except TimeoutError:
            raise UpstreamFailure("gateway error answer incomplete", sent=True,
                                  passive=False) from None
        except UpstreamFailure:
            if committed:  # the answer had begun: nothing to retry, the client sees it cut
                conn.abort()
                raise ClientGone() from None
            raise
        finally:
            self.book.end(gateway)
            conn.upstream = None
            if up.complete and not up.closed:
                pool.release(up)
            else:
                up.close(abort=True)

    async def _stream_body(self, req: Request, up: Upstream) -> None:
        chunked = req.length is None
        timeout = self.config.body_timeout_s
        while True:
            if up.closed:
                raise UpstreamFailure(f"gateway {up.pool.url} closed while the request "
                                      "body was sent", sent=True, passive=True)
            chunk = await req.body.read(timeout)
            if chunk is None:
                if chunked:
                    up.write(b"0\r\n\r\n")
                return
            if chunked:
                up.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                up.write(chunk)
            await up.drain(timeout)
            if up.head.done():  # answered before the whole body (e.g. 413): stop sending
                up.dirty = True
                return

    async def _respond(self, conn: ClientConn, req: Request, region: str, up: Upstream,
                       failed: list[tuple[str, str]]) -> None:
        status = up.status
        codes = self._codes[region]
        codes[status] = codes.get(status, 0) + 1
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Status"))]
        length: bytes | None = None
        for n, v in up.headers:
            if n in RESPONSE_DROP:
                if n == b"content-length":
                    length = v
                continue
            parts += (n, b": ", v, b"\r\n")
        parts += (b"x-nimbus-region: ", self.region_bytes[region], b"\r\n")
        if failed:
            parts += (b"x-nimbus-retried-from: ",
                      ",".join(r for r, _ in failed).encode(), b"\r\n")
        no_body = req.method == b"HEAD" or status in (204, 304)
        chunked = False
        if length is not None:
            parts += (b"content-length: ", length, b"\r\n")
        keep = req.keep_alive and not self.draining
        if length is None and not no_body:
            if req.version == "1.0":  # no chunked framing: the end of the body is the close
                keep = req.keep_alive = False
            else:
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if not keep:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        # a complete small answer: one write
        if up.complete and not chunked:
            parts += up.chunks
            up.chunks = []
            conn.write(b"".join(parts))
            return
        conn.write(b"".join(parts))
        transport = conn.transport
        if transport is None or conn.closed:
            raise ClientGone()
        write = conn.write
        if chunked:
            def sink(data: bytes) -> None:
                if data:
                    write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            sink = write
        conn.upstream = up
        up.commit(sink)
        if conn.closed:
            raise ClientGone()
        up.watch(self.config.body_timeout_s)
        try:
            await up.done
        finally:
            up.unwatch()
        if chunked:
            write(b"0\r\n\r\n")
        if not conn.closed:
            try:
                await asyncio.wait_for(conn.drain(), self.config.body_timeout_s)
            except TimeoutError:
                raise ClientGone() from None

    async def _own(self, conn: ClientConn, req: Request) -> bool:
        path = req.url.split(b"?", 1)[0]
        now = self.clock()
        await req.body.read_all(self.config.body_timeout_s)
        if path == METRICS_PATH:
            return self._metrics(conn, req)
        if path == REGIONS_PATH and self._denied(conn, req, "region views"):
            return True
        if path == b"/_nimbus/health":
            up = sorted(self.book.up_regions(now))
            status = 503 if self.draining else 200
            body: Any = {"status": "draining" if self.draining else "ok", "regions_up": up}
        elif path == REGIONS_PATH:
            status = 200
            body = self.book.snapshot(now)
            body.update(order=list(self.order), stats=self.stats,
                        budget_denied=self.budget.denied,
                        apps={a.name: (None if a.spec is None else {
                            "names": a.spec.names, "policy": a.spec.policy,
                            "weights": a.spec.weights}) for a in self.apps.by_name.values()},
                        apps_from=self.refresher.loaded_from if self.refresher else None)
        else:
            status = 404
            body = {"errorType": "NotFound",
                    "errorMessage": f"{path.decode('latin-1')} is reserved for nimbus"}
        conn.write(json_response(status, body, b"edge", req.keep_alive,
                                 head_only=req.method == b"HEAD"))
        return True

    def _denied(self, conn: ClientConn, req: Request, what: str) -> bool:
        """Answer 401/403 (and say so) when the caller may not read ``what``."""
        denied = self.metrics_auth.check(req.headers, what)
        if denied is None:
            return False
        status, message = denied
        conn.write(json_response(status, {
            "errorType": "Unauthorized" if status == 401 else "Forbidden",
            "errorMessage": message}, b"edge", req.keep_alive,
            head_only=req.method == b"HEAD"))
        return True

    def _metrics(self, conn: ClientConn, req: Request) -> bool:
        if self._denied(conn, req, "metrics"):
            return True
        data = self.metrics.exposition()
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"cache-control: no-store\r\n%s\r\n") % (
            CONTENT_TYPE, len(data), b"" if req.keep_alive else b"connection: close\r\n")
        conn.write(head if req.method == b"HEAD" else head + data)
        return True


class Background(threading.Thread):
    """A coroutine (the deploy converger) on a loop and thread of its own, so
    its file reads and pushes never stall the request path's loop."""

    def __init__(self, factory: Any) -> None:
        super().__init__(name="nimbus-edge-background", daemon=True)
        self.factory = factory
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None

    def run(self) -> None:
        loop = self.loop = asyncio.new_event_loop()
        try:
            self.task = loop.create_task(self.factory())
            loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - it must not take the edge down
            log.exception("edge: background work stopped")
        finally:
            loop.close()

    def stop(self, timeout_s: float) -> None:
        loop, task = self.loop, self.task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # closed in between
                pass
        self.join(timeout_s)


async def serve(cluster: ClusterLike, host: str, port: int, config: EdgeConfig,
                ready: Any = None, background: Any = None) -> None:
    """Run an edge until SIGTERM or SIGINT, then drain for ``config.grace_s``.
    ``background``: a coroutine function run beside it (the deploy converger)."""
    edge = Edge(cluster, config)
    bound = await edge.start(host, port)
    side = Background(background) if background is not None else None
    if side is not None:
        side.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(edge, bound)
    try:
        await stop.wait()
        await edge.stop(config.grace_s)
    finally:
        if side is not None:
            side.stop(2.0)


def run(cluster: ClusterLike, host: str, port: int, config: EdgeConfig,
        ready: Any = None, background: Any = None) -> None:
    try:
        import uvloop
        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(cluster, host, port, config, ready, background))
