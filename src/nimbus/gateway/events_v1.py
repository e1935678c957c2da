"""API Gateway REST API (payload 1.0, Lambda proxy integration) events and responses.

The shapes a REST API's Lambda proxy integration sends and reads, for routes
declared with ``payload: "1.0"``. Pure functions over the ASGI scope and the
body, tested without a server; the gateway picks them per route when the
route table is built (:class:`RestRoute`), so 2.0 routes never look here.

Where AWS's answer depends on how the API is reached, nimbus answers as a
REST API behind a custom domain whose base path maps to the stage: the URL
has no stage in it, so ``path`` and ``requestContext.path`` are both the path
the client sent, and ``requestContext.stage`` is :data:`STAGE` (``Prod``, the
stage of SAM's implicit API).
"""

from __future__ import annotations

import zlib
from typing import Any
from urllib.parse import unquote_plus

import orjson

from nimbus.gateway.events import API_ID, _clf_time, encode_body
from nimbus.gateway.responses import (
    _FRAMING,
    JSON,
    NO_BODY,
    Headers,
    Response,
    _decode_b64,
    _header,
    _invalid,
)
from nimbus.worker.target import ACCOUNT

STAGE = "Prod"
# The keys a proxy response may have; any other makes it malformed (502).
RESPONSE_KEYS = frozenset(("statusCode", "headers", "multiValueHeaders", "body",
                           "isBase64Encoded"))
# What API Gateway answers when the function failed or its answer is malformed.
ERROR_BODY = orjson.dumps({"message": "Internal server error"})
ERROR_TYPE_HEADER = b"x-amzn-errortype"


class RestRoute:
    """A route target that speaks payload 1.0: the function's invoker (a pool
    or a Split) with what the event needs of the route, fixed when the route
    table is built."""

    __slots__ = ("inner", "resource", "resource_id", "target")

    def __init__(self, inner: Any, resource: str, method: str) -> None:
        self.inner = inner
        self.target = inner.target  # the function version (a Split's: its stable one)
        self.resource = resource  # the path template, e.g. /users/{id}
        # API Gateway names each resource with a short id; this one is stable per route.
        self.resource_id = f"{zlib.crc32(f'{method} {resource}'.encode()):08x}"[:6]

    async def invoke(self, rid: str, event: Any) -> Any:
        return await self.inner.invoke(rid, event)

    def log(self, rid: str | None, stream: str, text: str, level: str | None = None) -> None:
        self.inner.log(rid, stream, text, level)


def _identity(source_ip: str, user_agent: str | None) -> dict[str, Any]:
    return {
        "accessKey": None, "accountId": None, "apiKey": None, "apiKeyId": None,
        "caller": None, "cognitoAuthenticationProvider": None,
        "cognitoAuthenticationType": None, "cognitoIdentityId": None,
        "cognitoIdentityPoolId": None, "principalOrgId": None, "sourceIp": source_ip,
        "user": None, "userAgent": user_agent, "userArn": None,
    }


def parse_query_multi(raw: str) -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    """(queryStringParameters, multiValueQueryStringParameters): the last
    value of each key, and all of them in order; both None without a query."""
    multi: dict[str, list[str]] = {}
    for part in raw.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        multi.setdefault(unquote_plus(k), []).append(unquote_plus(v))
    if not multi:
        return None, None
    return {k: vs[-1] for k, vs in multi.items()}, multi


_TRACE_NAMES = ((b"traceparent", "traceparent"), (b"tracestate", "tracestate"))


def rest_event(
    scope: dict[str, Any],
    body: bytes,
    *,
    resource: str,
    resource_id: str,
    path_params: dict[str, str] | None,
    request_id: str,
    now_s: float,
    spellings: dict[bytes, str] | None = None,
) -> dict[str, Any]:
    """The event a REST API's Lambda proxy integration sends for this request;
    ``spellings``, when given, gets each header's lower-case name mapped to
    its key in the event's ``headers`` (for :func:`header`)."""
    # Header names as the client wrote them (API Gateway's REST APIs keep
    # their case; HTTP APIs lower it), when the server kept them. One name
    # in several spellings is one repeated header, under its first spelling.
    pairs = scope["headers"]
    names = scope.get("header_names")
    if names is None or len(names) != len(pairs):
        names = [n for n, _v in pairs]
    headers: dict[str, str] = {}
    multi_headers: dict[str, list[str]] = {}
    shown = {} if spellings is None else spellings  # lower-case name -> its key here
    for raw_name, (lower, raw_value) in zip(names, pairs, strict=True):
        value = raw_value.decode("latin-1")
        name = shown.get(lower)
        if name is None:
            name = shown[lower] = raw_name.decode("latin-1")
            multi_headers[name] = [value]
        else:
            multi_headers[name].append(value)
        headers[name] = value  # the last value, as API Gateway's `headers`
    # The W3C trace headers are nimbus's to read (the handler's context joins
    # the trace): under their lower-case names, whatever the client wrote.
    for lower, plain in _TRACE_NAMES:
        name = shown.get(lower)
        if name is not None and name != plain:
            headers[plain] = headers.pop(name)
            multi_headers[plain] = multi_headers.pop(name)
            shown[lower] = plain
    raw_qs = scope.get("query_string", b"").decode("latin-1")
    query, multi_query = parse_query_multi(raw_qs) if raw_qs else (None, None)
    method = scope["method"]
    path = scope["path"]
    client = scope.get("client")
    host = headers[shown[b"host"]] if b"host" in shown else "localhost"
    content_type = headers[shown[b"content-type"]] if b"content-type" in shown else None
    text, is_b64 = encode_body(body, content_type) if body else (None, False)
    return {
        "resource": resource,
        "path": path,
        "httpMethod": method,
        "headers": headers or None,
        "multiValueHeaders": multi_headers or None,
        "queryStringParameters": query,
        "multiValueQueryStringParameters": multi_query,
        "pathParameters": path_params or None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": resource_id,
            "resourcePath": resource,
            "httpMethod": method,
            "extendedRequestId": request_id,
            "requestTime": _clf_time(now_s),
            "path": path,
            "accountId": ACCOUNT,
            "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
            "stage": STAGE,
            "domainPrefix": host.split(".", 1)[0],
            "requestTimeEpoch": int(now_s * 1000),
            "requestId": request_id,
            "identity": _identity(client[0] if client else "",
                                  headers[shown[b"user-agent"]] if b"user-agent" in shown
                                  else None),
            "domainName": host,
            "apiId": API_ID,
        },
        "body": text,
        "isBase64Encoded": is_b64,
    }


def header(event: dict[str, Any], spellings: dict[bytes, str], lower: bytes) -> str | None:
    """The (last) value of the header named ``lower`` in any spelling."""
    name = spellings.get(lower)
    return None if name is None else event["headers"][name]


def put_trace_context(event: dict[str, Any], spellings: dict[bytes, str],
                      traceparent: str, tracestate: str) -> None:
    """Put the gateway span's W3C context in place of the client's (which
    :func:`rest_event` already keeps under the lower-case names)."""
    headers = event["headers"]
    if headers is None:
        headers = event["headers"] = {}
        event["multiValueHeaders"] = {}
    multi = event["multiValueHeaders"]
    for name, value in (("traceparent", traceparent), ("tracestate", tracestate)):
        if value:
            headers[name] = value
            multi[name] = [value]
            spellings[name.encode()] = name
        else:
            headers.pop(name, None)
            multi.pop(name, None)
            spellings.pop(name.encode(), None)


def rest_response(result: Any) -> Response:
    """A proxy response as a REST API reads it. Unlike payload 2.0 there is
    no shortcut: anything but an object with an integer ``statusCode``, a
    string (or null) ``body`` and string-valued ``headers`` /
    list-valued ``multiValueHeaders`` is malformed (HandlerError; the
    gateway answers it with :func:`error_response`)."""
    if type(result) is not dict:
        raise _invalid(f"a payload 1.0 response must be an object with statusCode, "
                       f"got {type(result).__name__}")
    extra = result.keys() - RESPONSE_KEYS
    if extra:
        raise _invalid(f"a payload 1.0 response may only have the keys "
                       f"{', '.join(sorted(RESPONSE_KEYS))}; it has {', '.join(sorted(extra))}")
    status = result.get("statusCode")
    if type(status) is str and status.isascii() and status.isdigit():
        status = int(status)
    if type(status) is not int:
        raise _invalid(f"statusCode must be an integer, got {status!r}")
    if not 100 <= status <= 599:
        raise _invalid(f"statusCode {status} is not an HTTP status")
    single = result.get("headers")
    multi = result.get("multiValueHeaders")
    if single is not None and type(single) is not dict:
        raise _invalid("headers must be an object of header names to values")
    if multi is not None and type(multi) is not dict:
        raise _invalid("multiValueHeaders must be an object of header names to lists of values")
    headers: Headers = []
    seen: set[tuple[bytes, bytes]] = set()
    for k, vs in (multi or {}).items():
        if type(vs) is not list:
            raise _invalid(f"multiValueHeaders {k!r} must be a list of values")
        for v in vs:
            pair = _scalar_header(k, v)
            seen.add(pair)
            headers.append(pair)
    # Both given: merged, a name-value pair that multiValueHeaders has is not repeated.
    for k, v in (single or {}).items():
        pair = _scalar_header(k, v)
        if pair not in seen:
            headers.append(pair)
    headers = [h for h in headers if h[0] not in _FRAMING]
    body = result.get("body")
    if body is not None and type(body) is not str:
        raise _invalid(f"body must be a string (or null), got {type(body).__name__}: "
                       "serialise it first, e.g. json.dumps")
    is_b64 = result.get("isBase64Encoded", False)
    if type(is_b64) is not bool:
        raise _invalid(f"isBase64Encoded must be true or false, got {is_b64!r}")
    if not any(name == b"content-type" for name, _v in headers):
        headers.append((b"content-type", JSON))  # API Gateway's default
    if status in NO_BODY or body is None:
        return status, headers, b""
    return status, headers, _decode_b64(body) if is_b64 else body.encode()


def _scalar_header(name: object, value: object) -> tuple[bytes, bytes]:
    if type(value) not in (str, int, float, bool):
        raise _invalid(f"header {name!r}: a value must be a string, got {type(value).__name__}")
    if type(value) is bool:
        value = "true" if value else "false"
    return _header(name, value)


def error_response() -> Response:
    """API Gateway's own answer when the function failed or answered malformed."""
    return 502, [(b"content-type", JSON), (ERROR_TYPE_HEADER, b"InternalServerErrorException")], \
        ERROR_BODY

