"""The control API: deploy, invoke, list, logs, status. Bearer-token auth.

Served on its own port beside the gateway; described by the OpenAPI 3
document at ``GET /v1/openapi.json`` (:mod:`nimbus.control.openapi`). Every
error is JSON ``{"errorType", "errorMessage"}`` with the status from the
gateway's table; every parameter is checked here, and a bad one is a 400
that names it and its rule.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from nimbus.control import aliases as alias_api
from nimbus.control import lambda_api, openapi
from nimbus.control.deploy import RolloutOptions
from nimbus.control.openapi import (
    MAX_ATTRIBUTES,
    MAX_ID_CHARS,
    MAX_INVOKE_BYTES,
    MAX_KEY_CHARS,
    MAX_LIMIT,
    MAX_REDRIVE_IDS,
    MAX_SUBJECT_CHARS,
    MAX_TAIL,
    NAME_PATTERN,
)
from nimbus.errors import (
    ManifestError,
    NimbusError,
    NotFoundError,
    PayloadTooLargeError,
    UserInputError,
)
from nimbus.events.service import record_view
from nimbus.gateway.app import invocation_type
from nimbus.gateway.responses import status_for
from nimbus.gateway.split import Split
from nimbus.ids import new_id
from nimbus.manifest.model import RegionsSpec, handler_text
from nimbus.observe import tracing
from nimbus.observe.logfilter import LogFilter, parse_level, parse_since
from nimbus.observe.logs import LogSink as FileLogSink
from nimbus.observe.memory import memory_of
from nimbus.observe.metrics import serve_metrics
from nimbus.observe.protocols import FileLogSource, LogSource, TraceSource
from nimbus.region import region
from nimbus.store.queue import STATUSES

if TYPE_CHECKING:
    from nimbus.control.server import Platform
    from nimbus.ui.dashboard import Dashboard

log = logging.getLogger("nimbus.control")

MAX_BUNDLE_UPLOAD = 250 * 1024 * 1024
MAX_INVOKE_PAYLOAD = MAX_INVOKE_BYTES
MAX_REDRIVE_BODY = 1024 * 1024

_NAME = re.compile(NAME_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BOOLS = {"1": True, "true": True, "0": False, "false": False}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def error_json(status: int, error_type: str, message: str,
               headers: dict[str, str] | None = None) -> Response:
    """The one shape of every error the control API answers."""
    return _json({"errorType": error_type, "errorMessage": message}, status, headers)


def _error(exc: BaseException) -> Response:
    status = 400 if isinstance(exc, ManifestError) else status_for(exc)
    # an unread request body is not drained: end the connection instead
    headers = {"connection": "close"} if status == 413 else None
    return error_json(status, type(exc).__name__, str(exc), headers)


# -- parameters: each a 400 naming the parameter and its rule ---------------------


def _bad(where: str, rule: str, got: object) -> UserInputError:
    shown = got if not isinstance(got, str) or len(got) <= 80 else got[:77] + "..."
    return UserInputError(f"{where} {rule}, got {shown!r}")


def query_int(request: Request, key: str, low: int, high: int,
              default: int | None = None) -> int | None:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12 and low <= int(raw) <= high):
        raise _bad(f"query parameter {key}", f"must be an integer from {low} to {high}", raw)
    return int(raw)


def query_bool(request: Request, key: str) -> bool:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return False
    value = _BOOLS.get(raw.lower())
    if value is None:
        raise _bad(f"query parameter {key}", "must be one of true, false, 1, 0", raw)
    return value


def query_text(request: Request, key: str, max_chars: int) -> str | None:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return None
    return _text(f"query parameter {key}", raw, max_chars)


def query_regions(request: Request) -> RegionsSpec | None:
    """``regions``: the app's routing as JSON (``{"names", "policy",
    "weights"}``), replacing its manifest's ``regions:``."""
    raw = query_text(request, "regions", 4096)
    if raw is None:
        return None
    try:
        return RegionsSpec.from_dict(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise UserInputError(f"query parameter regions is not JSON: {exc}") from None
    except ValueError as exc:
        raise UserInputError(f"query parameter {exc}") from None


def query_parameters(request: Request) -> dict[str, Any]:
    """``parameters``: a SAM template's parameter overrides, a JSON object of
    strings; as keyword arguments of a platform's deploy (none when absent)."""
    raw = query_text(request, "parameters", 4096)
    if raw is None:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UserInputError(f"query parameter parameters is not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UserInputError("query parameter parameters must be a JSON object of strings")
    return {"parameters": value} if value else {}


def query_rollout(request: Request) -> RolloutOptions:
    """``strategy``, ``rollback_on``, ``min_requests``: a deploy's rollout flags."""
    from nimbus.rollout.policy import MAX_MIN_REQUESTS

    return RolloutOptions(
        strategy=query_text(request, "strategy", 256),
        rollback_on=query_text(request, "rollback_on", 1024),
        min_requests=query_int(request, "min_requests", 1, MAX_MIN_REQUESTS)).check()


def query_since(request: Request, now: float) -> float | None:
    raw = query_text(request, "since", 64)
    if raw is None:
        return None
    try:
        return parse_since(raw, now)
    except ValueError as exc:
        raise _bad("query parameter since", str(exc), raw) from None


def query_level(request: Request) -> str | None:
    raw = query_text(request, "level", 16)
    if raw is None:
        return None
    try:
        return parse_level(raw)
    except ValueError as exc:
        raise _bad("query parameter level", str(exc), raw) from None


async def sse_events(batches: AsyncGenerator[list[dict[str, Any]], None]
                     ) -> AsyncIterator[bytes]:
    """Log records as Server-Sent Events: one ``log`` event per record, its
    data the record's JSON (one line: JSON escapes every newline)."""
    try:
        async for batch in batches:
            yield b"".join(b"event: log\ndata: " + orjson.dumps(rec) + b"\n\n"
                           for rec in batch)
    finally:
        await batches.aclose()


def header_text(request: Request, key: str, max_chars: int) -> str | None:
    raw = request.headers.get(key)
    if raw is None or raw == "":
        return None
    return _text(f"header {key}", raw, max_chars)


def _text(where: str, raw: str, max_chars: int) -> str:
    if len(raw) > max_chars or _CONTROL.search(raw):
        raise _bad(where, f"must be 1 to {max_chars} characters without control characters",
                   raw)
    return raw


def path_name(request: Request, key: str = "name") -> str:
    raw: str = request.path_params[key]
    if not _NAME.fullmatch(raw):
        raise _bad(f"path parameter {key}",
                   "must be 1 to 128 letters, digits, '_', '-' or '.'", raw)
    return raw


def path_id(request: Request, key: str = "id") -> str:
    raw: str = request.path_params[key]
    if not raw or len(raw) > MAX_ID_CHARS or _CONTROL.search(raw):
        raise _bad(f"path parameter {key}",
                   f"must be 1 to {MAX_ID_CHARS} characters without control characters", raw)
    return raw


async def read_limited(request: Request, limit: int, what: str = "request body") -> bytes:
    """The body, read as it arrives: 413 as soon as it passes ``limit``
    (before, when ``content-length`` says so), never buffered whole first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise _bad("header content-length", "must be a byte count", declared)
        if int(declared) > limit:
            raise PayloadTooLargeError(
                f"{what} of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def instances_of(pool: Any) -> int:
    """Ready instances behind a route target: a local pool's, or (a remote
    invoker in a region) every worker's."""
    if pool is None:
        return 0
    if hasattr(pool, "instances"):
        return len(pool.instances)
    return int(pool.stats().get("ready", 0))


def create_control_app(platform: Platform, log_source: LogSource | None = None,
                       dashboard: Dashboard | None = None,
                       trace_source: TraceSource | None = None) -> Starlette:
    """The control API of ``platform``. Logs are read from ``log_source``:
    by default this process's log files (``nimbus up``); a region's
    controller passes the region's (:mod:`nimbus.observe.natslogs`).
    ``dashboard``: served at ``/ui``; its signed-in pages may call the
    ``/v1`` routes with their session cookie (and the CSRF header)."""
    if log_source is None:
        sink = platform.worker.logs
        if not isinstance(sink, FileLogSink):
            raise TypeError("the control API needs a log_source when the worker's logs do "
                            f"not go to files (they go to {type(sink).__name__})")
        log_source = FileLogSource(sink)
    logs_from: LogSource = log_source
    token = platform.token.strip().encode()
    max_bundle = platform.max_bundle_bytes
    # A region's controller answers for the whole region (nodes, leader,
    # instances per worker, NATS); ``nimbus up`` for its own process tree.
    region_status = getattr(platform, "region_status", None)
    document = orjson.dumps(openapi.document(max_bundle_bytes=max_bundle))

    def authorized(request: Request) -> bool:
        """``Authorization: Bearer <token>``: the scheme in any case, one space,
        the token. An empty token (sent or configured) never authenticates."""
        got = request.headers.get("authorization")
        if got is None and dashboard is not None:
            return dashboard.api_allowed(request)
        if got is None or not token:
            return False
        scheme, _, credentials = got.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            return False
        return hmac.compare_digest(credentials.encode("latin-1"), token)

    async def deploy(request: Request) -> Response:
        name = query_text(request, "name", 256)
        regions = query_regions(request)
        rollout = query_rollout(request)
        parameters = query_parameters(request)
        bundle = await read_limited(request, max_bundle, "bundle")
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()

        def progress(message: str) -> None:
            lines.put_nowait(orjson.dumps({"progress": message}) + b"\n")

        async def run() -> None:
            try:
                result = await platform.deploy(bundle, progress, name, regions,
                                               rollout=rollout, **parameters)
                lines.put_nowait(orjson.dumps({"result": result}) + b"\n")
            except NimbusError as exc:
                lines.put_nowait(orjson.dumps(
                    {"error": {"errorType": type(exc).__name__, "errorMessage": str(exc)}}) + b"\n")
            except Exception as exc:  # noqa: BLE001 - reported, not raised into starlette
                lines.put_nowait(orjson.dumps(
                    {"error": {"errorType": "InternalError", "errorMessage": repr(exc)}}) + b"\n")
            finally:
                lines.put_nowait(None)

        task = asyncio.create_task(run())

        async def stream() -> AsyncIterator[bytes]:
            while (line := await lines.get()) is not None:
                yield line
            await task

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def invoke(request: Request) -> Response:
        name = path_name(request)
        asked = header_text(request, "x-nimbus-invocation-type", 64) or header_text(
            request, "x-amz-invocation-type", 64)
        kind = invocation_type(asked or ("Event" if query_bool(request, "async") else None))
        key = header_text(request, "idempotency-key", MAX_KEY_CHARS)
        raw = await read_limited(request, MAX_INVOKE_PAYLOAD, "payload")
        try:
            event = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            return error_json(400, "InvalidRequestContent", f"payload is not JSON: {exc}")
        qualifier = query_text(request, "qualifier", 64)
        if kind == "Event":
            result = await platform.events.submit(name, raw if raw.strip() else b"{}",
                                                  idempotency_key=key, qualifier=qualifier)
            return _json({"invocationId": result.id, "function": name,
                          "duplicate": not result.created}, 202)
        pool = platform.routes.invoker_for(name, qualifier)
        if isinstance(pool, Split):  # the version that runs it, chosen now
            pool = pool.pick(None)
        if kind == "DryRun":
            return Response(status_code=204)
        rid = new_id()
        try:
            result = await pool.invoke(rid, event)
        except NimbusError as exc:
            body = getattr(exc, "error", None) or {"errorType": type(exc).__name__,
                                                   "errorMessage": str(exc)}
            return _json({"errorType": body.get("errorType", type(exc).__name__),
                          "errorMessage": body.get("errorMessage", str(exc)),
                          "requestId": rid, "version": pool.target.version, "error": body},
                         status_for(exc))
        return _json({"requestId": rid, "version": pool.target.version, "result": result})

    def view(rec: Any, function: str | None = None) -> dict[str, Any]:
        d = record_view(rec)
        if d["function"] is None:
            d["function"] = function or platform.events.queue_owner.get(
                rec.queue.partition("/")[2])
        return d

    def limit_of(request: Request) -> int:
        return query_int(request, "limit", 1, MAX_LIMIT, 50)  # type: ignore[return-value]

    async def invocations(request: Request) -> Response:
        name = path_name(request)
        status = request.query_params.get("status") or None
        if status is not None and status not in STATUSES:
            raise UserInputError(f"unknown status {status!r}: query parameter status must be "
                                 f"one of {', '.join(STATUSES)}")
        recs = await platform.events.invocations(name, status=status, limit=limit_of(request))
        return _json([view(r, name) for r in recs])

    async def invocation(request: Request) -> Response:
        rec = await platform.events.invocation(path_id(request))
        return _json(view(rec))

    async def traces(request: Request) -> Response:
        rid = path_id(request)
        exporter = tracing.exporter()
        if trace_source is not None:  # a region: every process's spans in its stream
            spans = await trace_source.find(rid)
        elif exporter is not None:
            spans = await asyncio.to_thread(exporter.find, rid)
        else:  # tracing is off now: what earlier runs wrote may be there
            spans = await asyncio.to_thread(
                tracing.find_in_files, Path(platform.state_dir) / "traces", rid)
        if not spans:
            raise NotFoundError(
                f"no spans of request {rid!r}" + (
                    " (in the region's trace stream: its gateways and workers publish "
                    "spans there when started with --trace region, file or otlp)"
                    if trace_source is not None else "" if tracing.on else
                    " (tracing is off here: start nimbus up with --trace file, or "
                    "--otlp-endpoint URL)"))
        return _json({"request_id": rid, "spans": spans})

    async def dlq(request: Request) -> Response:
        name = path_name(request)
        recs = await platform.events.invocations(name, status="dead", limit=limit_of(request))
        return _json([view(r, name) for r in recs])

    async def redrive(request: Request) -> Response:
        name = path_name(request)
        raw = await read_limited(request, MAX_REDRIVE_BODY)
        ids = None
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise UserInputError(f"request body is not JSON: {exc}") from None
            # a malformed body must not mean "everything"
            if not (isinstance(body, dict) and set(body) == {"ids"}
                    and isinstance(body["ids"], list)
                    and all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS
                            for i in body["ids"])):
                raise UserInputError('request body: expected none (redrive every dead letter) '
                                     'or {"ids": ["invocation id", ...]}')
            if len(body["ids"]) > MAX_REDRIVE_IDS:
                raise _bad("request body ids", f"must hold at most {MAX_REDRIVE_IDS} ids",
                           f"{len(body['ids'])} ids")
            ids = body["ids"]
        moved = await platform.events.redrive(name, ids)
        return _json({"redriven": moved})

    async def publish(request: Request) -> Response:
        name = path_name(request)
        kind = request.query_params.get("kind") or None
        if kind not in (None, "queue", "topic"):
            raise _bad("query parameter kind", "must be queue or topic", kind)
        subject = query_text(request, "subject", MAX_SUBJECT_CHARS)
        key = header_text(request, "idempotency-key", MAX_KEY_CHARS)
        items = request.query_params.getlist("attribute")
        if len(items) > MAX_ATTRIBUTES:
            raise _bad("query parameter attribute", f"may be given at most {MAX_ATTRIBUTES} times",
                       f"{len(items)} attributes")
        attrs = {}
        for item in items:
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise _bad("query parameter attribute", "must be KEY=VALUE", item)
            attrs[_text("query parameter attribute's name", k, MAX_KEY_CHARS)] = v
        raw = await read_limited(request, MAX_INVOKE_PAYLOAD, "message")
        pub = await platform.events.publish(name, raw, kind=kind, attributes=attrs,
                                            subject=subject, idempotency_key=key)
        return _json({"messageId": pub.message_id, "kind": pub.kind,
                      "deliveries": [{"id": r.id, "duplicate": not r.created}
                                     for r in pub.deliveries]}, 202)

    async def functions(request: Request) -> Response:
        out = []
        for app in platform.routes.apps.values():
            for name, rec in app["functions"].items():
                pool = platform.routes.functions.get(name)
                out.append({
                    "name": name, "app": app["name"], "version": rec["version"],
                    "handler": handler_text(rec["spec"]),
                    "routes": [f"{r['method']} {r['path']}" for r in rec["spec"]["routes"]],
                    "memory_mb": rec["spec"]["memory_mb"], "timeout_s": rec["spec"]["timeout_s"],
                    "instances": instances_of(pool),
                })
        return _json(sorted(out, key=lambda f: f["name"]))

    async def logs(request: Request) -> Response:
        name = path_name(request)
        rid = query_text(request, "request_id", MAX_ID_CHARS)
        tail = query_int(request, "tail", 1, MAX_TAIL)
        follow = query_bool(request, "follow")
        narrow = LogFilter(since=query_since(request, time.time()),
                           level=query_level(request))
        # A function's logs outlive it: readable after its deploy failed or
        # it was removed, as long as they are kept.
        if name not in platform.routes.functions and not await logs_from.has_logs(name):
            raise NotFoundError(f"function {name!r} is not deployed and has no logs")
        # where the history ends is fixed now (an unreadable log is an error
        # answered here, not a response cut short); the records stream after
        batches = await logs_from.read(name, tail=tail, request_id=rid, follow=follow,
                                       match=None if narrow.empty else narrow.matches)
        if "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(sse_events(batches), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for batch in batches:
                    yield b"".join(orjson.dumps(rec) + b"\n" for rec in batch)
            finally:
                await batches.aclose()

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def status(request: Request) -> Response:
        if region_status is not None:
            return _json(await region_status())
        contain = platform.worker.containment
        fns = []
        for name, pool in sorted(platform.routes.functions.items()):
            fns.append({
                "name": name, "version": pool.target.version, **pool.stats(),
                "async": await platform.events.stats(name),
                "instances": [{"id": i.id, "pid": i.pid, "outstanding": i.outstanding,
                               "memory": memory_of(i.pid),
                               "cgroup_memory_bytes": contain.memory_bytes(i.pid)}
                              for i in pool.instances],
            })
        zygotes = [{"pid": z.pid, "preload": list(z.preload), "sys_path": list(z.sys_path),
                    "memory": memory_of(z.pid) if z.pid else None}
                   for z in platform.worker.zygotes.values()]
        return _json({
            "region": region(),
            "pid": os.getpid(), "uptime_s": round(time.time() - platform.started_at, 1),
            "gateway_url": platform.gateway_url, "control_url": platform.control_url,
            "state_dir": str(platform.state_dir), "requests": platform.gateway.requests,
            "memory": {"platform": memory_of(os.getpid())},
            "containment": contain.describe(),
            "http": {port: guard.stats() for port, guard in platform.guards.items()},
            "zygotes": zygotes,
            "functions": fns,
        })

    async def rollout_status(request: Request) -> Response:
        from nimbus.rollout import manage

        return _json(await manage.view(platform.store, path_name(request), time.time(),
                                       getattr(platform, "rollouts", None)))

    async def rollback(request: Request) -> Response:
        from nimbus.rollout import manage

        name = path_name(request)
        body = await read_limited(request, 4096)
        to = None
        if body.strip():
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise UserInputError(f"the body is not JSON: {exc}") from None
            if not isinstance(data, dict) or set(data) - {"to"}:
                raise UserInputError('the body must be {"to": VERSION} or empty')
            to = data.get("to")
            if to is not None and (type(to) is not int or not 1 <= to <= 10**9):
                raise _bad("to", "must be a version number (an integer of at least 1)", to)
        runner = getattr(platform, "rollouts", None)
        return _json(await manage.rollback(platform.store, name, to, time.time(),
                                           runner.note if runner is not None else None))

    async def health(request: Request) -> Response:
        return _json({"status": "ok", "region": region()})

    async def apps(request: Request) -> Response:
        """Each app with its bundle digest, routing and routes: what an edge
        or a cluster deploy needs to know of this region."""
        out = []
        for app in platform.routes.apps.values():
            records = app["functions"]
            out.append({
                "name": app["name"], "digest": app.get("digest"),
                "version": max((r["version"] for r in records.values()), default=0),
                "regions": app.get("regions"),
                "routes": [{"method": m, "path": p} for m, p, *_fn in app.get("routes", ())],
                "functions": sorted(records),
            })
        return _json(sorted(out, key=lambda a: a["name"]))

    # GET /metrics: its own auth (the token, or open on loopback), never a
    # JSON error shape: Prometheus reads the status alone.
    metrics_token: str | None = getattr(platform, "metrics_token", platform.token)

    async def metrics_endpoint(request: Request) -> Response:
        status, headers, body = await serve_metrics(request.headers, metrics_token)
        return Response(body, status_code=status, headers=dict(headers))

    async def openapi_json(request: Request) -> Response:
        return Response(document, media_type="application/json")

    handlers = {"deploy": deploy, "invoke": invoke, "functions": functions, "apps": apps,
                "logs": logs, "status": status, "invocations": invocations,
                "invocation": invocation, "traces": traces, "dlq": dlq, "redrive": redrive,
                "publish": publish, "rollout": rollout_status, "rollback": rollback,
                **alias_api.handlers(platform)}

    def guarded(fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return error_json(401, "Unauthorized", "missing or wrong bearer token "
                                  "(Authorization: Bearer <the token in the state folder>)",
                                  {"www-authenticate": "Bearer"})
            try:
                response: Response = await fn(request)
                return response
            except NimbusError as exc:
                return _error(exc)
            except ClientDisconnect:  # gone mid-body (or its body stalled): nobody to answer
                return error_json(400, "ClientDisconnect", "the client left mid-request")
            except Exception:  # a bug of ours: logged, answered in the one shape
                log.exception("control API %s %s failed", request.method, request.url.path)
                return error_json(500, "InternalError", "internal error (see the nimbus log)")
        return endpoint

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kinds = {404: "NotFoundError", 405: "MethodNotAllowedError"}
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}
        return error_json(exc.status_code, kinds.get(exc.status_code, "HTTPError"),
                          message.get(exc.status_code, str(exc.detail)),
                          dict(exc.headers) if exc.headers else None)

    g = {k: guarded(v) for k, v in handlers.items()}
    return Starlette(routes=[
        # the Lambda Invoke API: signed with SigV4, not the bearer token
        *lambda_api.routes(platform, logs_from),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/deploy", g["deploy"], methods=["POST"]),
        Route("/v1/functions", g["functions"], methods=["GET"]),
        Route("/v1/apps", g["apps"], methods=["GET"]),
        Route("/v1/functions/{name}/invoke", g["invoke"], methods=["POST"]),
        Route("/v1/functions/{name}/logs", g["logs"], methods=["GET"]),
        Route("/v1/status", g["status"], methods=["GET"]),
        Route("/v1/functions/{name}/invocations", g["invocations"], methods=["GET"]),
        Route("/v1/invocations/{id}", g["invocation"], methods=["GET"]),
        Route("/v1/traces/{id}", g["traces"], methods=["GET"]),
        Route("/v1/functions/{name}/dlq", g["dlq"], methods=["GET"]),
        Route("/v1/functions/{name}/dlq/redrive", g["redrive"], methods=["POST"]),
        Route("/v1/publish/{name}", g["publish"], methods=["POST"]),
        Route("/v1/functions/{name}/rollout", g["rollout"], methods=["GET"]),
        Route("/v1/functions/{name}/rollback", g["rollback"], methods=["POST"]),
        Route("/v1/functions/{name}/versions", g["versions"], methods=["GET"]),
        Route("/v1/functions/{name}/aliases", g["aliases"], methods=["GET"]),
        Route("/v1/functions/{name}/aliases/{alias}", g["set_alias"], methods=["PUT"]),
        Route("/v1/functions/{name}/aliases/{alias}", g["remove_alias"], methods=["DELETE"]),
        *(dashboard.routes() if dashboard is not None else ()),
    ], exception_handlers={HTTPException: http_error})
