"""One HTTP port of a region process (a gateway's, or a controller's control
API), with the same hostile-client limits as ``nimbus up``'s ports."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from nimbus.control.server import _bind, _Server, _url_host
from nimbus.gateway.connections import (
    DEFAULT_CONTROL_MAX_CONNECTIONS,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    ConnectionGuard,
    ConnectionLimits,
    gateway_protocol,
    guarded_protocol,
    raise_fd_limit,
)

log = logging.getLogger("nimbus")

METRICS_MAX_CONNECTIONS = 64


def metrics_app(token: str | None) -> Any:
    """An ASGI app serving ``GET /metrics`` (404 elsewhere)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from nimbus.observe.metrics import serve_metrics

    async def metrics(request: Request) -> Response:
        status, headers, body = await serve_metrics(request.headers, token)
        return Response(body, status_code=status, headers=dict(headers))

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])


class HttpServer:
    def __init__(self, app: Any, name: str, host: str, port: int, *, grace_s: float,
                 max_connections: int, fast: bool = False) -> None:
        self.app = app
        self.fast = fast  # a gateway port: parser callbacks straight to Gateway.respond
        self.host = host
        self.port = port
        self.grace_s = grace_s
        fd_limit = raise_fd_limit()
        cap = min(max_connections, max(64, fd_limit - 1024))
        self.guard = ConnectionGuard(name, ConnectionLimits(
            max_connections=cap, header_timeout_s=DEFAULT_HEADER_TIMEOUT_S,
            keep_alive_s=DEFAULT_KEEP_ALIVE_S, max_header_bytes=DEFAULT_MAX_HEADER_BYTES))
        self.url = ""
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_gateway(cls, app: Any, host: str, port: int, grace_s: float) -> HttpServer:
        return cls(app, "gateway", host, port, grace_s=grace_s,
                   max_connections=DEFAULT_MAX_CONNECTIONS, fast=True)

    @classmethod
    def for_control(cls, app: Any, host: str, port: int, grace_s: float) -> HttpServer:
        return cls(app, "control API", host, port, grace_s=grace_s,
                   max_connections=DEFAULT_CONTROL_MAX_CONNECTIONS)

    @classmethod
    def for_metrics(cls, host: str, port: int, token: str | None) -> HttpServer:
        """The metrics port of a worker or gateway: ``GET /metrics`` alone,
        with the region token as Bearer (``token`` None: open)."""
        return cls(metrics_app(token), "metrics port", host, port, grace_s=1.0,
                   max_connections=METRICS_MAX_CONNECTIONS)

    async def start(self) -> None:
        sock = _bind(self.host, self.port)
        self.url = f"http://{_url_host(self.host)}:{sock.getsockname()[1]}"
        protocol = (gateway_protocol(self.guard, self.app) if self.fast
                    else guarded_protocol(self.guard))
        config = uvicorn.Config(
            self.app, http=protocol, lifespan="off", access_log=False, log_level="warning",
            timeout_graceful_shutdown=int(self.grace_s), loop="none",
            timeout_keep_alive=int(DEFAULT_KEEP_ALIVE_S), server_header=False,
            date_header=False)
        self._server = _Server(config, self.guard)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._task.done():
                    await self._task
                    raise RuntimeError(f"the HTTP server on {self.url} stopped during start")
                await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._server = None
