"""Handler result -> HTTP response, and nimbus errors -> HTTP statuses.

Pure functions: ``(status, headers, body)`` tuples with headers as a list of
``(bytes, bytes)`` pairs, ready for ASGI.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import orjson

from nimbus import errors as e

Headers = list[tuple[bytes, bytes]]
Response = tuple[int, Headers, bytes]

JSON = b"application/json"
# Set on an answer the gateway made because it could not serve (no instance
# reachable, shutting down, too many connections), never on a function's own
# answer (a function cannot set it): an edge in front retries such a request
# in another region.
GATEWAY_ERROR_HEADER = b"x-nimbus-error"
TEXT = b"text/plain; charset=utf-8"

# The one table that maps error classes to statuses; the first match wins,
# so subclasses come before their bases.
STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (e.RouteNotFoundError, 404),
    (e.MethodNotAllowedError, 405),
    (e.PayloadTooLargeError, 413),
    (e.ThrottledError, 429),
    (e.HandlerError, 500),
    (e.InvocationTimeoutError, 504),
    (e.InstanceDiedError, 502),
    (e.DeployError, 502),  # the handler failed to import: Lambda answers 502
    (e.UserInputError, 400),
    (e.NotFoundError, 404),
    (e.ConflictError, 409),
    (e.UnavailableError, 503),
    (e.ClosedError, 503),
    (e.NimbusError, 500),
)


def status_for(exc: BaseException) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: BaseException, request_id: str) -> Response:
    status = status_for(exc)
    headers: Headers = [(b"content-type", JSON)]
    if isinstance(exc, e.HandlerError):
        body = dict(exc.error)
        body.setdefault("requestId", request_id)
    elif isinstance(exc, e.InvocationError | e.UnavailableError | e.ClosedError | e.UserInputError
                    | e.NotFoundError | e.ConflictError):
        error = getattr(exc, "error", None)
        body = dict(error) if isinstance(error, dict) else {
            "errorMessage": str(exc) or type(exc).__name__,
            "errorType": type(exc).__name__.removesuffix("Error") or "Error",
        }
        body["requestId"] = request_id
    else:  # a bug of ours: never leak the internals
        body = {"errorMessage": "Internal Server Error", "errorType": "InternalError",
                "requestId": request_id}
    if isinstance(exc, e.MethodNotAllowedError) and exc.allowed:
        headers.append((b"allow", ", ".join(exc.allowed).encode()))
    if isinstance(exc, e.ThrottledError):
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    if isinstance(exc, e.UnavailableError | e.ClosedError) and not isinstance(
            exc, e.InstanceDiedError):
        headers.append((GATEWAY_ERROR_HEADER, b"gateway"))
    return status, headers, orjson.dumps(body)


def result_response(result: Any) -> Response:
    """Interpret a handler's return value as API Gateway v2 does."""
    if not (isinstance(result, dict) and "statusCode" in result):
        return 200, [(b"content-type", JSON)], orjson.dumps(result)
    try:
        status = int(result["statusCode"])
    except (TypeError, ValueError):
        raise e.HandlerError({
            "errorMessage": f"statusCode must be an integer, got {result['statusCode']!r}",
            "errorType": "Runtime.InvalidResponse",
        }) from None
    if not 100 <= status <= 599:
        raise e.HandlerError({"errorMessage": f"statusCode {status} is not an HTTP status",
                              "errorType": "Runtime.InvalidResponse"})
    headers: Headers = []
    has_type = False
    pairs: list[tuple[object, object]] = []
    raw_headers = result.get("headers")
    if isinstance(raw_headers, dict):
        pairs += raw_headers.items()
    multi = result.get("multiValueHeaders")  # payload 1.0 shape, accepted too
    if isinstance(multi, dict):
        pairs += [(k, v) for k, vs in multi.items() for v in (vs if isinstance(vs, list) else [vs])]
    pairs += [("set-cookie", c) for c in result.get("cookies") or ()]
    for k, v in pairs:
        name, value = _header(k, v)
        if name in _FRAMING:
            continue  # nimbus frames the response itself
        has_type = has_type or name == b"content-type"
        headers.append((name, value))
    body = result.get("body")
    if status in NO_BODY:
        return status, headers, b""
    if body is None:
        data = b""
    elif isinstance(body, str):
        data = _decode_b64(body) if result.get("isBase64Encoded") else body.encode()
    else:
        data = orjson.dumps(body)
        if not has_type:
            headers.append((b"content-type", JSON))
            has_type = True
    if not has_type:
        headers.append((b"content-type", TEXT))
    return status, headers, data


# Headers the gateway sets itself; a handler's own would frame the body twice.
_FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
            b"x-nimbus-request-id", GATEWAY_ERROR_HEADER}
NO_BODY = {204, 304} | set(range(100, 200))
# RFC 7230: a header name is a token; a value is visible characters, spaces and
# tabs (no other control characters: no CR, LF, NUL, DEL). ``fullmatch`` so a
# trailing newline never slips through as ``$`` would let it.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _invalid(message: str) -> e.HandlerError:
    return e.HandlerError({"errorMessage": message, "errorType": "Runtime.InvalidResponse"})


def _header(name: object, value: object) -> tuple[bytes, bytes]:
    try:
        n = str(name).lower().encode("latin-1")
        v = str(value).encode("latin-1")
    except UnicodeEncodeError:
        raise _invalid(f"header {name!r}: names and values must be latin-1 text") from None
    if not _TOKEN.fullmatch(n):
        raise _invalid(f"header name {name!r} is not a valid HTTP token")
    if _BAD_VALUE.search(v):
        raise _invalid(f"header {name!r}: its value has a control character "
                       "(only visible characters, spaces and tabs are allowed)")
    return n, v


def _decode_b64(body: str) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("isBase64Encoded is true but the body is not valid base64") from None
