"""Connection limits for nimbus's HTTP ports (the gateway and the control API).

uvicorn's httptools protocol has no limit on how long a client may take to
send its request head, nor on the head's size, nor on how many connections a
port holds (``limit_concurrency`` answers 503 only once a request head has
arrived, so idle and half-sent connections still pile up until the process
runs out of file descriptors). :func:`guarded_protocol` subclasses it with:

- **a head deadline**: a connection that has not sent a complete request
  head ``header_timeout_s`` after it opened (or after its previous response)
  is closed (408 if part of a head came). Idle keep-alive connections are
  closed after ``keep_alive_s`` by uvicorn's own timer.
- **a head size cap**: past ``max_header_bytes`` of request line + headers,
  431 and the connection is closed; the bytes are never all buffered.
- **a body stall deadline**: a request body that stops arriving for
  ``header_timeout_s`` (while nimbus is ready to read it) ends the
  connection; the request is then not run.
- **a connection cap per port**: at the cap, a new connection takes the place
  of the connection that has waited longest for a request head (an idle or a
  slow client); when every connection has a request in flight, the new one
  gets 503 and is closed at once.

The bookkeeping is one dict per port of the connections waiting for a head,
in the order they started waiting (and one of the bodies in progress, by
their last read): a request costs a dict insert and a pop, and the sweep on
every tick (:meth:`ConnectionGuard.sweep`) looks only at the connections
whose deadline has passed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

import httptools
import orjson
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from nimbus.gateway.responses import Response
from nimbus.observe.metrics import HTTP

log = logging.getLogger("nimbus.http")

DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_CONTROL_MAX_CONNECTIONS = 256
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# File descriptors kept for everything that is not a client connection:
# instance sockets and pipes, zygotes, SQLite, log files, blobs.
RESERVED_FDS = 1024


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Limits of one HTTP port."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, was: {self.max_connections}")
        if not self.header_timeout_s > 0:
            raise ValueError(f"header_timeout_s must be positive, was: {self.header_timeout_s}")
        if not self.keep_alive_s > 0:
            raise ValueError(f"keep_alive_s must be positive, was: {self.keep_alive_s}")
        if self.max_header_bytes < 1024:
            raise ValueError(
                f"max_header_bytes must be at least 1024, was: {self.max_header_bytes}")


def _raw_response(status: int, reason: str, error_type: str, message: str,
                  extra: bytes = b"") -> bytes:
    body = orjson.dumps({"errorType": error_type, "errorMessage": message})
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n" % (status, reason.encode(), len(body), extra)) + body


class ConnectionGuard:
    """The state of one port: its limits, the connections waiting for a
    request head (oldest first) and counters for ``nimbus status``."""

    def __init__(self, name: str, limits: ConnectionLimits) -> None:
        self.name = name
        self.limits = limits
        self.waiting: dict[GuardedHttpToolsProtocol, float] = {}
        self.bodies: dict[GuardedHttpToolsProtocol, float] = {}  # by last read
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self.stalled = 0
        self.too_large = 0
        self.connections: set[Any] = set()  # uvicorn's set for this port, once serving
        self.busy_response = _raw_response(
            503, "Service Unavailable", "TooManyConnections",
            f"the {name} has {limits.max_connections} connections open, all busy; "
            "try again shortly", b"retry-after: 1\r\nx-nimbus-error: gateway\r\n")
        self.head_too_large = _raw_response(
            431, "Request Header Fields Too Large", "RequestHeaderFieldsTooLarge",
            f"the request line and headers are over {limits.max_header_bytes} bytes")
        self.head_timeout = _raw_response(
            408, "Request Timeout", "RequestTimeout",
            f"the request head was not complete within {limits.header_timeout_s:g} s")

    def admit(self, connections: set[Any]) -> bool:
        """Room for one more connection: under the cap, or by closing the
        connection that has waited longest for a request head."""
        self.connections = connections
        if len(connections) < self.limits.max_connections:
            return True
        waiting = self.waiting
        while waiting:
            victim = next(iter(waiting))
            del waiting[victim]
            if victim.evict():
                self.evicted += 1
                return True
        self.refused += 1
        return False

    def sweep(self, now: float) -> None:
        """Close the connections that have waited past the head deadline, and
        those whose request body has not moved for as long."""
        cutoff = now - self.limits.header_timeout_s
        waiting = self.waiting
        while waiting:
            proto, since = next(iter(waiting.items()))
            if since > cutoff:
                break
            del waiting[proto]
            if proto.expire():
                self.timed_out += 1
        bodies = self.bodies
        while bodies:
            proto, since = next(iter(bodies.items()))
            if since > cutoff:
                return
            del bodies[proto]
            if proto.flow is not None and proto.flow.read_paused:
                bodies[proto] = now  # nimbus is not reading: not the client's stall
            elif proto.expire_body():
                self.stalled += 1

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.connections),
                "max_connections": self.limits.max_connections,
                "waiting_for_head": len(self.waiting), "refused": self.refused,
                "evicted": self.evicted, "head_timeouts": self.timed_out,
                "body_stalls": self.stalled,
                "head_too_large": self.too_large}


# uvicorn's parser callbacks, called directly on the per-request path (a
# little cheaper than super() on every request)
_on_headers_complete = HttpToolsProtocol.on_headers_complete
_on_message_complete = HttpToolsProtocol.on_message_complete
_on_response_complete = HttpToolsProtocol.on_response_complete


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing an oversized head."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of one port's guard."""

    guard: ConnectionGuard  # set on the subclass made by guarded_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._reading_head = True
        self._in_body = False
        guard = self.guard
        if not guard.admit(self.connections):
            self.transport = transport
            transport.write(guard.busy_response)
            transport.close()
            return
        super().connection_made(transport)
        guard.waiting[self] = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.bodies.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, plus the head size check: a head still
        # incomplete past the cap is refused before more of it is buffered; a
        # complete one is measured in on_headers_complete.
        if self._reading_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_large_head()
            else:
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._reading_head:
            if (self._head_bytes > self.guard.limits.max_header_bytes
                    and not self.transport.is_closing()):
                self._refuse_large_head()
        else:  # the head is complete, its body still coming: watch its progress
            bodies = self.guard.bodies
            if self._in_body:
                del bodies[self]
            self._in_body = True
            bodies[self] = self.loop.time()

    def _refuse_large_head(self) -> None:
        self.guard.too_large += 1
        self._close_with(self.guard.head_too_large)

    def _head_size(self) -> int:
        """Request line and header lines with their CRLFs, as sent (less the
        blank line that ends the head)."""
        line = len(self.parser.get_method()) + 1 + len(self.url) + len(" HTTP/1.1\r\n")
        return line + sum(len(n) + len(v) + 4 for n, v in self.headers)

    def on_headers_complete(self) -> None:
        self.guard.waiting.pop(self, None)
        self._reading_head = False
        if (self._head_bytes > self.guard.limits.max_header_bytes
                and self._head_size() > self.guard.limits.max_header_bytes):
            raise _HeadTooLarge()  # the parser stops; data_received answers 431
        self._head_bytes = 0
        _on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._reading_head = True
        if self._in_body:
            self._in_body = False
            self.guard.bodies.pop(self, None)
        _on_message_complete(self)

    def on_response_complete(self) -> None:
        _on_response_complete(self)
        # uvicorn arms its keep-alive timer exactly when the connection is now
        # idle (no pipelined request started): from here it waits for a head.
        if self.timeout_keep_alive_task is not None:
            self.guard.waiting[self] = self.loop.time()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _close_with(self, response: bytes) -> None:
        if self._idle():  # never write into the middle of another response
            self.transport.write(response)
        self.transport.close()

    def evict(self) -> bool:
        """Closed to make room for a new connection (False: already closing)."""
        if self.transport.is_closing() or not self._idle():
            return False
        self.transport.close()
        # out of the server's set now, not when the loop later reports the
        # close: the newcomer takes its place and the count stays at the cap
        self.connections.discard(self)
        return True

    def expire(self) -> bool:
        """The head deadline passed: 408 if part of a head came, then close."""
        if self.transport.is_closing() or not self._idle():
            return False
        if self._head_bytes:
            self._close_with(self.guard.head_timeout)
        else:
            self.transport.close()
        return True


    def expire_body(self) -> bool:
        """The body stopped arriving: end the connection (the application
        sees a disconnect and runs nothing)."""
        self._in_body = False
        if self.transport.is_closing():
            return False
        self.transport.close()
        return True


class Responder(Protocol):
    """What the gateway port serves: the whole response to one request."""

    async def respond(self, scope: dict[str, Any], receive: Any) -> Response | None: ...


class _Exchange:
    """One request on a gateway connection. It stands where uvicorn's
    ``RequestResponseCycle`` does for the protocol's callbacks (``body``,
    ``more_body``, ``message_event``, ``disconnected``, ``keep_alive``,
    ``response_complete``), so uvicorn's body, pipelining, disconnect and
    shutdown handling apply unchanged; the response is written whole by
    :meth:`GatewayHttpProtocol._serve`, not through ASGI messages."""

    __slots__ = ("scope", "transport", "flow", "body", "more_body", "message_event",
                 "disconnected", "keep_alive", "response_complete", "waiting_for_100_continue",
                 "task")

    def __init__(self, scope: dict[str, Any], transport: asyncio.Transport, flow: Any,
                 keep_alive: bool, expect_100_continue: bool) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.body = bytearray()
        self.more_body = True
        self.message_event = asyncio.Event()
        self.disconnected = False
        self.keep_alive = keep_alive
        self.response_complete = False
        self.waiting_for_100_continue = expect_100_continue
        self.task: asyncio.Task[None] | None = None

    async def receive(self) -> dict[str, Any]:
        """ASGI's ``receive`` for the request body, as uvicorn's: ``100
        Continue`` on the first read if the client asked, reading resumed
        while nimbus waits for more (the body stall timer counts only then)."""
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message


_INTERNAL_ERROR = (b"HTTP/1.1 500 Internal Server Error\r\n"
                   b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
                   b"connection: close\r\n\r\nInternal Server Error")


def _trusted_hosts(app: Any) -> Any:
    """The proxy-trusted client addresses of uvicorn's ``ProxyHeadersMiddleware``
    around ``app`` (``--forwarded-allow-ips``), or None when it is off."""
    while app is not None:
        if isinstance(app, ProxyHeadersMiddleware):
            return app.trusted_hosts
        app = getattr(app, "app", None)
    return None


class GatewayHttpProtocol(GuardedHttpToolsProtocol):
    """The gateway port's protocol: the guarded httptools protocol whose
    parser callbacks go straight to :meth:`Responder.respond`, and whose
    response goes out as one write of bytes built here. No ASGI scope beyond
    the keys the event needs, no ASGI messages for the response, one socket
    write per response instead of two. Everything else (limits, body
    streaming and its caps, ``Expect: 100-continue``, pipelining, keep-alive,
    graceful shutdown, proxy headers from trusted addresses) is uvicorn's or
    the guard's, as on the control API port."""

    responder: Responder  # set on the subclass made by gateway_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._trusted = None  # the proxy-headers rule, if the peer is a trusted proxy
        self._forwarded = False
        super().connection_made(transport)
        trusted = _trusted_hosts(self.app)
        if trusted is not None and self.client is not None and self.client[0] in trusted:
            self._trusted = trusted

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.header_names: list[bytes] = []
        self._forwarded = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_names.append(name)  # as sent: REST (payload 1.0) events keep it
        name = name.lower()
        if name == b"expect":
            if value.lower() == b"100-continue":
                self.expect_100_continue = True
        elif name == b"x-forwarded-for":
            self._forwarded = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.guard.waiting.pop(self, None)
        self._reading_head = False
        if (self._head_bytes > self.guard.limits.max_header_bytes
                and self._head_size() > self.guard.limits.max_header_bytes):
            raise _HeadTooLarge()  # the parser stops; data_received answers 431
        self._head_bytes = 0
        parser = self.parser
        method = parser.get_method().decode("ascii")
        http_version = parser.get_http_version()
        if parser.should_upgrade() and self._should_upgrade():
            self.scope = {"type": "http", "method": method,  # type: ignore[typeddict-item]
                          "headers": self.headers}  # what uvicorn's upgrade hand-over reads
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        client = self.client
        if self._forwarded and self._trusted is not None and client is not None:
            client = self._forwarded_client(self._trusted, client)
        root = self.root_path
        scope = {"type": "http", "method": method, "http_version": http_version,
                 "path": root + path if root else path,
                 "raw_path": root.encode("ascii") + raw_path if root else raw_path,
                 "query_string": parsed_url.query or b"", "headers": self.headers,
                 "header_names": self.header_names, "client": client}
        exchange = _Exchange(scope, self.transport, self.flow,
                             http_version != "1.0" and parser.should_keep_alive(),
                             self.expect_100_continue)
        existing = self.cycle
        self.cycle = exchange  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._start_asgi_task(exchange, None)
        else:  # pipelined: uvicorn's on_response_complete starts it in turn
            self.flow.pause_reading()
            self.pipeline.appendleft((exchange, None))  # type: ignore[arg-type]

    def _forwarded_client(self, trusted: Any, client: tuple[str, int]) -> tuple[str, int]:
        """uvicorn's proxy-headers rule: a trusted peer's ``X-Forwarded-For``
        names the client."""
        values = [v for n, v in self.headers if n == b"x-forwarded-for"]
        host, port = trusted.get_trusted_client_address(
            b", ".join(values).decode("latin1"))
        return (host, port) if host else client

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn's graceful shutdown waits for ``tasks`` to empty; the task
        # leaves it as it ends (a done callback would cost a loop callback).
        cycle.task = task = self.loop.create_task(self._serve(cycle))
        self.tasks.add(task)

    async def _serve(self, exchange: _Exchange) -> None:
        try:
            response = await self.responder.respond(exchange.scope, exchange.receive)
            if response is not None and self.flow.write_paused:
                await self.flow.drain()  # the client is not reading: wait, as uvicorn does
        except Exception:  # a bug of ours: the client gets a 500
            log.exception("request failed")
            HTTP.count("", 500, 0, 21)
            if not exchange.disconnected:
                exchange.response_complete = True
                self.transport.write(_INTERNAL_ERROR)
                self.transport.close()
        else:
            if response is not None and not exchange.disconnected:  # else: nobody to answer
                self._write_response(exchange, response)
        finally:
            self.tasks.discard(exchange.task)

    def _write_response(self, exchange: _Exchange, response: Response) -> None:
        """The status line, headers and body in one write, framed as uvicorn
        frames an ASGI response."""
        status, headers, data = response
        keep_alive = exchange.keep_alive
        closing = False
        framed = False
        out = [STATUS_LINE[status]]
        for name, value in headers:
            if name == b"content-length" or name == b"transfer-encoding":
                framed = True
            elif name == b"connection" and b"close" in [
                    t.lower().strip() for t in value.split(b",")]:
                keep_alive = False
                closing = True
            out += (name, b": ", value, b"\r\n")
        if not keep_alive and not closing:
            out.append(b"connection: close\r\n")
        head_only = exchange.scope["method"] == "HEAD"
        if not framed and not head_only and status != 204 and status != 304:
            out.append(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")  # as uvicorn
        else:
            out.append(b"\r\n")
            if not head_only:
                out.append(data)
        self.transport.write(b"".join(out))
        exchange.response_complete = True
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()


def gateway_protocol(guard: ConnectionGuard,
                     responder: Responder) -> type[GatewayHttpProtocol]:
    """The gateway port's protocol class for uvicorn's ``Config(http=...)``."""
    return type(f"GatewayHttpProtocol_{guard.name.replace(' ', '_')}",
                (GatewayHttpProtocol,), {"guard": guard, "responder": responder})


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for uvicorn's ``Config(http=...)`` bound to ``guard``."""
    return type(f"GuardedHttpToolsProtocol_{guard.name.replace(' ', '_')}",
                (GuardedHttpToolsProtocol,), {"guard": guard})


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s",
                        soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fit_to_fds(gateway_max: int, control_max: int, fd_limit: int) -> tuple[int, int]:
    """Connection caps that fit in ``fd_limit`` file descriptors together with
    the reserve, the control API's first: a saturated gateway never takes the
    descriptors the operator needs to reach the control API."""
    reserve = min(RESERVED_FDS, fd_limit // 4)
    room = max(fd_limit - reserve, 2)
    control = max(1, min(control_max, room // 4))
    gateway = max(1, min(gateway_max, room - control))
    return gateway, control
