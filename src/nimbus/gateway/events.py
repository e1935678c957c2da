"""HTTP request -> API Gateway HTTP API (payload 2.0) event.

Pure functions over the ASGI scope and the body: tested without a server.
"""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import unquote_plus

from nimbus.worker.target import ACCOUNT

# Content types whose bodies are passed as text; everything else is base64,
# as API Gateway does for binary media.
_TEXT_TYPES = (
    "text/", "application/json", "application/xml", "application/javascript",
    "application/x-www-form-urlencoded", "application/graphql", "application/x-yaml",
    "application/yaml",
)
API_ID = "nimbus"

_time_cache: list[Any] = [0, ""]


def _clf_time(now_s: float) -> str:
    """``12/Mar/2020:19:03:58 +0000``, cached per second (it is on every request)."""
    sec = int(now_s)
    if _time_cache[0] != sec:
        _time_cache[0] = sec
        _time_cache[1] = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(sec))
    return str(_time_cache[1])


def is_text(content_type: str | None) -> bool:
    if not content_type:
        return True  # decided by whether the bytes are UTF-8
    ct = content_type.lower()
    return ct.startswith(_TEXT_TYPES) or ct.endswith(("+json", "+xml"))


def encode_body(body: bytes, content_type: str | None) -> tuple[str, bool]:
    """(body, isBase64Encoded) as API Gateway would pass them."""
    if is_text(content_type):
        try:
            return body.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), True


def parse_query(raw: str) -> dict[str, str]:
    """Query parameters, repeated keys comma-joined (payload 2.0)."""
    out: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        k, v = unquote_plus(k), unquote_plus(v)
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


def http_event(
    scope: dict[str, Any],
    body: bytes,
    *,
    route_key: str,
    path_params: dict[str, str] | None,
    request_id: str,
    now_s: float,
) -> dict[str, Any]:
    headers: dict[str, str] = {}
    cookies: list[str] | None = None
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "cookie":
            cookies = (cookies or []) + [c.strip() for c in value.split(";") if c.strip()]
            continue
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    raw_qs = scope.get("query_string", b"").decode("latin-1")
    method = scope["method"]
    path = scope["path"]
    client = scope.get("client")
    host = headers.get("host", "localhost")
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": scope.get("raw_path", b"").decode("latin-1") or path,
        "rawQueryString": raw_qs,
        "headers": headers,
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": API_ID,
            "domainName": host,
            "domainPrefix": host.split(".", 1)[0],
            "http": {
                "method": method,
                "path": path,
                "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
                "sourceIp": client[0] if client else "",
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": route_key,
            "stage": "$default",
            "time": _clf_time(now_s),
            "timeEpoch": int(now_s * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies is not None:
        event["cookies"] = cookies
    if raw_qs:
        event["queryStringParameters"] = parse_query(raw_qs)
    if path_params:
        event["pathParameters"] = path_params
    if body:
        event["body"], event["isBase64Encoded"] = encode_body(body, headers.get("content-type"))
    return event
