"""Handler result -> HTTP response, and nimbus errors -> HTTP statuses.

Pure functions: ``(status, headers, body)`` tuples with headers as a list of
``(bytes, bytes)`` pairs, ready for ASGI.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from nimbus import errors as e

Headers = list[tuple[bytes, bytes]]
Response = tuple[int, Headers, bytes]

JSON = b"application/json"
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
    elif isinstance(exc, e.InvocationError | e.UnavailableError | e.ClosedError | e.DeployError):
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
    raw_headers = result.get("headers")
    if isinstance(raw_headers, dict):
        for k, v in raw_headers.items():
            name = str(k).lower().encode("latin-1")
            has_type = has_type or name == b"content-type"
            headers.append((name, str(v).encode("latin-1")))
    multi = result.get("multiValueHeaders")  # payload 1.0 shape, accepted too
    if isinstance(multi, dict):
        for k, vs in multi.items():
            name = str(k).lower().encode("latin-1")
            has_type = has_type or name == b"content-type"
            for v in vs if isinstance(vs, list) else [vs]:
                headers.append((name, str(v).encode("latin-1")))
    for cookie in result.get("cookies") or ():
        headers.append((b"set-cookie", str(cookie).encode("latin-1")))
    body = result.get("body")
    if body is None:
        data = b""
    elif isinstance(body, str):
        data = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    elif isinstance(body, bytes):
        data = body
    else:
        data = orjson.dumps(body)
        if not has_type:
            headers.append((b"content-type", JSON))
            has_type = True
    if not has_type:
        headers.append((b"content-type", TEXT))
    return status, headers, data
