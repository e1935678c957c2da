"""Talking to one region's control API: push a bundle, list its apps, probe it.

Every call has a deadline, and every failure is sorted into what it means
for a cluster deploy:

- ``deployed``: the region runs the bundle now;
- ``refused``: the region answered and said no (HTTP 4xx, or a manifest or
  deploy error in its deploy stream); repeating the same bundle will not
  help, so the operator must act;
- ``unreachable``: connection refused, timed out, reset, or the control
  answered 5xx / nonsense: the region may come back, and the push is
  repeated then;
- ``busy``: the region is deploying the same app for someone else (another
  converger): the push is repeated, within its deadline, until it is free.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from nimbus.multiregion.clusterfile import RegionEntry

DEPLOYED, REFUSED, UNREACHABLE, BUSY = "deployed", "refused", "unreachable", "busy"
BUSY_PAUSE_S = 0.5
# Refusals from a deploy stream that are about the region's state right now
# rather than the app: worth repeating later.
_TRANSIENT = ("another deploy of",)


@dataclass(frozen=True, slots=True)
class PushResult:
    region: str
    outcome: str              # DEPLOYED | REFUSED | UNREACHABLE
    version: int | None = None
    digest: str | None = None
    changed: bool = False
    message: str = ""
    # (function, version, changed) for each function of the deployed app
    functions: tuple[tuple[str, int, bool], ...] = ()


def _auth(region: RegionEntry) -> dict[str, str]:
    return {"authorization": f"Bearer {region.token}"}


def describe(exc: BaseException) -> str:
    """A short reason for a failed connection: ``connection refused``, ``timed out``."""
    if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError | TimeoutError):
        return "timed out"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            if cause.errno == errno.ECONNREFUSED:
                return "connection refused"
            if cause.errno == errno.ECONNRESET:
                return "connection reset"
            return cause.strerror or str(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0][:200]


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        if isinstance(body, dict):
            return str(body.get("errorMessage") or body)
        return str(body)
    except ValueError:
        return r.text[:300]


async def push_bundle(client: httpx.AsyncClient, region: RegionEntry, app: str, bundle: bytes,
                      override: dict[str, Any] | None, timeout_s: float,
                      extra: dict[str, str] | None = None,
                      parameters: dict[str, str] | None = None) -> PushResult:
    """Deploy ``bundle`` as ``app`` to ``region`` within ``timeout_s``;
    ``extra``: more deploy parameters (a rollout's ``strategy``...);
    ``parameters``: a SAM template's parameter overrides."""
    params = {"name": app, **(extra or {})}
    if override is not None:
        params["regions"] = orjson.dumps(override).decode()
    if parameters:
        params["parameters"] = orjson.dumps(parameters).decode()
    try:
        async with asyncio.timeout(timeout_s):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                result = await _push(client, region, params, bundle)
                if result.outcome != BUSY or deadline - loop.time() < 2 * BUSY_PAUSE_S:
                    return result
                await asyncio.sleep(BUSY_PAUSE_S)
    except TimeoutError:
        return PushResult(region.name, UNREACHABLE,
                          message=f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return PushResult(region.name, UNREACHABLE, message=describe(exc))


async def _push(client: httpx.AsyncClient, region: RegionEntry, params: dict[str, str],
                bundle: bytes) -> PushResult:
    url = f"{region.control}/v1/deploy"
    headers = {**_auth(region), "content-type": "application/zip"}
    async with client.stream("POST", url, content=bundle, params=params,
                             headers=headers) as r:
        if r.status_code >= 400:
            await r.aread()
            msg = f"{_error_message(r)} (HTTP {r.status_code})"
            outcome = REFUSED if r.status_code < 500 else UNREACHABLE
            return PushResult(region.name, outcome, message=msg)
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            try:
                msg_obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                return PushResult(region.name, UNREACHABLE,
                                  message=f"unexpected answer: {line[:200]!r}")
            if "error" in msg_obj:
                err = msg_obj["error"]
                text = str(err.get("errorMessage", err))
                kind = err.get("errorType", "")
                if any(t in text for t in _TRANSIENT):
                    return PushResult(region.name, BUSY, message=text)
                return PushResult(region.name,
                                  UNREACHABLE if kind == "InternalError" else REFUSED,
                                  message=text)
            if "result" in msg_obj:
                res = msg_obj["result"]
                fns = res.get("functions") or []
                version = max((int(f["version"]) for f in fns), default=0)
                return PushResult(region.name, DEPLOYED, version=version,
                                  digest=res.get("digest"),
                                  changed=any(f.get("changed") for f in fns),
                                  functions=tuple((str(f.get("name")), int(f["version"]),
                                                   bool(f.get("changed"))) for f in fns))
    return PushResult(region.name, UNREACHABLE,
                      message="the deploy stream ended without a result")


@dataclass(frozen=True, slots=True)
class RegionApps:
    region: str
    apps: dict[str, dict[str, Any]] | None   # None: not reachable
    error: str = ""


async def list_apps(client: httpx.AsyncClient, region: RegionEntry,
                    timeout_s: float) -> RegionApps:
    """``GET /v1/apps`` of ``region``: its apps by name, or why not."""
    try:
        r = await client.get(f"{region.control}/v1/apps", headers=_auth(region),
                             timeout=timeout_s)
    except httpx.HTTPError as exc:
        return RegionApps(region.name, None, describe(exc))
    if r.status_code != 200:
        return RegionApps(region.name, None, f"{_error_message(r)} (HTTP {r.status_code})")
    try:
        body = r.json()
        return RegionApps(region.name, {a["name"]: a for a in body})
    except (ValueError, KeyError, TypeError):
        return RegionApps(region.name, None, f"unexpected answer: {r.text[:200]!r}")


@dataclass(frozen=True, slots=True)
class GatewayHealth:
    url: str
    ok: bool
    detail: str          # "ok", "draining (HTTP 503)", "connection refused"
    region: str | None = None


async def gateway_health(client: httpx.AsyncClient, url: str,
                         timeout_s: float) -> GatewayHealth:
    try:
        r = await client.get(f"{url}/_nimbus/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        return GatewayHealth(url, False, describe(exc))
    region = None
    try:
        body = r.json()
        region = body.get("region") if isinstance(body, dict) else None
    except ValueError:
        pass
    if r.status_code == 200:
        return GatewayHealth(url, True, "ok", region)
    what = "draining" if r.status_code == 503 else "unhealthy"
    return GatewayHealth(url, False, f"{what} (HTTP {r.status_code})", region)
