"""The gateway: an ASGI app that turns HTTP requests into invocations.

Per request: match the route (a dict lookup for static paths), read the body
up to the payload limit, encode the API Gateway v2 event, hand it to the
target's pool, turn the result (or the error, through one table) into the
response. Every response carries ``x-nimbus-request-id``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from nimbus.errors import HandlerError, NimbusError, PayloadTooLargeError, UserInputError
from nimbus.gateway.events import http_event
from nimbus.gateway.events_v1 import RestRoute, header, put_trace_context, rest_event, rest_response
from nimbus.gateway.events_v1 import error_response as rest_error_response
from nimbus.gateway.responses import JSON, NO_BODY, Response, error_response, result_response
from nimbus.gateway.router import Router
from nimbus.gateway.split import Split, sticky_key
from nimbus.ids import new_id
from nimbus.manifest.model import DEFAULT_PAYLOAD_LIMIT_BYTES
from nimbus.observe import tracing
from nimbus.observe.metrics import HTTP
from nimbus.region import region

log = logging.getLogger("nimbus.gateway")

REQUEST_ID_HEADER = b"x-nimbus-request-id"
INVOCATION_ID_HEADER = b"x-nimbus-invocation-id"
INVOCATION_TYPE_HEADERS = ("x-nimbus-invocation-type", "x-amz-invocation-type")
INVOCATION_TYPE_NAMES = tuple(h.encode() for h in INVOCATION_TYPE_HEADERS)
RESERVED_PREFIX = "/_nimbus/"


INVOCATION_TYPES = {"requestresponse": "RequestResponse", "event": "Event", "dryrun": "DryRun"}


def invocation_type(value: str | None) -> str:
    """Lambda's invocation type from a header value (any case): the default
    ``RequestResponse`` (wait for the result), ``Event`` (async) or ``DryRun``."""
    if value is None:
        return "RequestResponse"
    kind = INVOCATION_TYPES.get(value.strip().lower())
    if kind is None:
        raise UserInputError(f"invocation type {value!r} is not supported: use Event "
                             "(async), DryRun (check only) or RequestResponse (the default)")
    return kind


class ClientGone(Exception):
    """The client hung up before its request body was complete."""


class AsyncSubmitter(Protocol):
    """Where ``X-Nimbus-Invocation-Type: Event`` requests go (the events service)."""

    async def submit(self, function: str, event: bytes, *, idempotency_key: str | None = None,
                     source: str = "invoke", qualifier: str | None = None,
                     version: int | None = None) -> Any: ...


class Invoker(Protocol):
    """What a route points at: something that runs one invocation."""

    target: Any  # the function version it runs (``.function``, ``.version``)

    async def invoke(self, rid: str, event: Any) -> Any: ...

    def log(self, rid: str | None, stream: str, text: str, level: str | None = None) -> None:
        """Add a line to the function's logs (for errors only the gateway sees)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_body_bytes: int = DEFAULT_PAYLOAD_LIMIT_BYTES

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, was: {self.max_body_bytes}")


class Gateway:
    def __init__(self, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self.router: Router[Invoker] = Router()
        self.events: AsyncSubmitter | None = None
        self.requests = 0
        # Set when the process begins to stop: health answers 503 so that
        # edges stop sending here while requests in flight finish.
        self.draining = False

    def set_router(self, router: Router[Invoker]) -> None:
        self.router = router  # swapped whole: requests in flight keep the old one

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The gateway as an ASGI app (tests, embedding); ``nimbus up`` serves
        :meth:`respond` straight from its HTTP protocol instead."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        response = await self.respond(scope, receive)
        if response is None:
            return
        status, headers, data = response
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def respond(self, scope: dict[str, Any], receive: Any) -> Response | None:
        """The whole response to one HTTP request, framing headers included
        (``x-nimbus-request-id``, ``content-length``), or None when the client
        hung up before its body was complete (nobody to answer). ``scope``
        has the ASGI HTTP scope's keys the event needs; ``receive`` is ASGI's."""
        self.requests += 1
        rid = new_id()
        span = _begin_span(rid, scope) if tracing.on else None
        function = ""  # no route matched
        received = 0
        try:
            path = scope["path"]
            if path.startswith(RESERVED_PREFIX):
                status, headers, data = self._reserved(scope)
            else:
                match = self.router.match(scope["method"], path)
                if type(match.target) is RestRoute:  # payload 1.0: its own event and answer
                    return await self._respond_v1(scope, receive, match.target,
                                                  match.path_params, rid, span)
                function = match.target.target.function
                body = await self._read_body(scope, receive)
                received = len(body)
                event = http_event(scope, body, route_key=match.route_key,
                                   path_params=match.path_params, request_id=rid,
                                   now_s=time.time())
                ev_headers = event["headers"]
                if span is not None:
                    span.attrs["nimbus.function"] = function
                    tracing.inject(span, ev_headers)
                if ((INVOCATION_TYPE_HEADERS[0] in ev_headers
                        or INVOCATION_TYPE_HEADERS[1] in ev_headers) and (kind := invocation_type(
                        ev_headers.get(INVOCATION_TYPE_HEADERS[0])
                        or ev_headers.get(INVOCATION_TYPE_HEADERS[1]))) != "RequestResponse"):
                    status, headers, data = await self._not_now(
                        match.target, event, kind, ev_headers.get("idempotency-key"))
                    headers.append((REQUEST_ID_HEADER, rid.encode()))
                    headers.append((b"content-length", str(len(data)).encode()))
                    if span is not None:
                        _end_span(span, rid, status)
                    HTTP.count(function, status, received, len(data))
                    return status, headers, data
                result = await match.target.invoke(rid, event)
                try:
                    status, headers, data = result_response(result)
                except HandlerError as exc:  # the handler's answer is malformed
                    match.target.log(rid, "platform", f"{exc.error['errorType']}: {exc}")
                    raise
        except ClientGone:
            if span is not None:
                _end_span(span, rid, 499)
            return None  # nobody to answer; the handler never ran on a partial body
        except NimbusError as exc:
            status, headers, data = error_response(exc, rid)
            if status == 413:  # the rest of the body is not read: end the connection
                headers.append((b"connection", b"close"))
        except Exception as exc:  # noqa: BLE001 - a bug of ours; the client gets a 500
            log.exception("request %s failed", rid)
            status, headers, data = error_response(exc, rid)
        return _finish(status, headers, data, rid, span, function, received)

    async def _respond_v1(self, scope: dict[str, Any], receive: Any, route: RestRoute,
                          path_params: dict[str, str] | None, rid: str,
                          span: tracing.Span | None) -> Response | None:
        """:meth:`respond` for a payload 1.0 (REST API) route: its event, its
        response rules, and API Gateway's 502 when the function fails."""
        function = route.target.function
        received = 0
        try:
            body = await self._read_body(scope, receive)
            received = len(body)
            spellings: dict[bytes, str] = {}  # header names as this event spells them
            event = rest_event(scope, body, resource=route.resource,
                               resource_id=route.resource_id, path_params=path_params,
                               request_id=rid, now_s=time.time(), spellings=spellings)
            if span is not None:
                span.attrs["nimbus.function"] = function
                put_trace_context(event, spellings, span.traceparent, span.tracestate)
            asked = (header(event, spellings, INVOCATION_TYPE_NAMES[0])
                     or header(event, spellings, INVOCATION_TYPE_NAMES[1]))
            if asked is not None and (kind := invocation_type(asked)) != "RequestResponse":
                status, headers, data = await self._not_now(
                    route, event, kind, header(event, spellings, b"idempotency-key"))
            else:
                result = await route.invoke(rid, event)
                try:
                    status, headers, data = rest_response(result)
                except HandlerError as exc:  # the handler's answer is malformed
                    route.log(rid, "platform", f"{exc.error['errorType']}: {exc}")
                    raise
        except ClientGone:
            if span is not None:
                _end_span(span, rid, 499)
            return None
        except HandlerError:
            status, headers, data = rest_error_response()
        except NimbusError as exc:
            status, headers, data = error_response(exc, rid)
            if status == 413:
                headers.append((b"connection", b"close"))
        except Exception as exc:  # noqa: BLE001 - a bug of ours; the client gets a 500
            log.exception("request %s failed", rid)
            status, headers, data = error_response(exc, rid)
        return _finish(status, headers, data, rid, span, function, received)

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    raise PayloadTooLargeError(
                        f"request body of {declared} bytes is over the limit of {limit} bytes")
                break
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(
                        f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _not_now(self, target: Any, event: dict[str, Any], kind: str,
                       idempotency_key: str | None) -> tuple[
            int, list[tuple[bytes, bytes]], bytes]:
        """An HTTP request that asked not to wait (``kind``): ``Event`` stores
        it and answers 202 with the invocation id; ``DryRun`` only checks it."""
        if kind == "DryRun":
            return 204, [], b""
        if self.events is None:
            raise UserInputError("async invocations are not available here")
        function = target.target.function
        if type(target) is RestRoute:
            target = target.inner
        # Pinned now: the version this route's alias picks for this client.
        chosen = target.pick(sticky_key(event)) if type(target) is Split else target
        result = await self.events.submit(function, orjson.dumps(event),
                                          idempotency_key=idempotency_key,
                                          source="http", version=chosen.target.version)
        body = {"invocationId": result.id, "function": function,
                "duplicate": not result.created}
        return 202, [(b"content-type", JSON), (INVOCATION_ID_HEADER, result.id.encode())], \
            orjson.dumps(body)

    def _reserved(self, scope: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if scope["path"] == "/_nimbus/health" and scope["method"] in ("GET", "HEAD"):
            if self.draining:
                return 503, [(b"content-type", JSON)], orjson.dumps(
                    {"status": "draining", "region": region()})
            return 200, [(b"content-type", JSON)], orjson.dumps(
                {"status": "ok", "region": region()})
        return 404, [(b"content-type", JSON)], orjson.dumps(
            {"errorMessage": f"{scope['path']} is reserved for nimbus", "errorType": "NotFound"})


def _begin_span(rid: str, scope: dict[str, Any]) -> tracing.Span:
    """The request's span, under the client's ``traceparent`` when it sent one."""
    trace_id, parent_id, state = tracing.extract(scope["headers"])
    span = tracing.start("nimbus.request", rid, trace_id=trace_id, parent_id=parent_id,
                         kind=tracing.KIND_SERVER,
                         attrs={"http.request.method": scope["method"],
                                "url.path": scope["path"], "nimbus.region": region()})
    span.tracestate = state
    tracing.active[rid] = span
    return span


def _end_span(span: tracing.Span, rid: str, status: int) -> None:
    tracing.active.pop(rid, None)
    span.attrs["http.response.status_code"] = status
    tracing.end(span, f"HTTP {status}" if status >= 500 else None)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _finish(status: int, headers: list[tuple[bytes, bytes]], data: bytes, rid: str,
            span: tracing.Span | None, function: str, received: int) -> Response:
    """A response's last headers (request id, length), its span ended and
    its counts taken: the same for every payload format."""
    headers.append((REQUEST_ID_HEADER, rid.encode()))
    if data or status not in NO_BODY:
        headers.append((b"content-length", str(len(data)).encode()))
    if span is not None:
        _end_span(span, rid, status)
    HTTP.count(function, status, received, len(data))
    return status, headers, data
