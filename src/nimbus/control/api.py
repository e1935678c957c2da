"""The control API: deploy, invoke, list, logs, status. Bearer-token auth.

Served on its own port beside the gateway. Errors are JSON
``{"errorType", "errorMessage"}`` with the status from the gateway's table.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

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
from nimbus.ids import new_id
from nimbus.observe.logs import LogReader
from nimbus.observe.memory import memory_of
from nimbus.store.queue import STATUSES

if TYPE_CHECKING:
    from nimbus.control.server import Platform

MAX_BUNDLE_UPLOAD = 250 * 1024 * 1024
MAX_INVOKE_PAYLOAD = 6 * 1024 * 1024


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def _error(exc: BaseException) -> Response:
    status = 400 if isinstance(exc, ManifestError) else status_for(exc)
    body = {"errorType": type(exc).__name__, "errorMessage": str(exc)}
    return _json(body, status)


def create_control_app(platform: Platform) -> Starlette:
    token = platform.token

    def authorized(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    async def read_limited(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit}")
        body = await request.body()
        if len(body) > limit:
            raise PayloadTooLargeError(f"body is over the limit of {limit} bytes")
        return body

    async def deploy(request: Request) -> Response:
        bundle = await read_limited(request, MAX_BUNDLE_UPLOAD)
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()

        def progress(message: str) -> None:
            lines.put_nowait(orjson.dumps({"progress": message}) + b"\n")

        async def run() -> None:
            try:
                result = await platform.deploy(bundle, progress,
                                               request.query_params.get("name"))
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
        name = request.path_params["name"]
        h = request.headers
        kind = invocation_type(h.get("x-nimbus-invocation-type") or h.get("x-amz-invocation-type")
                               or ("Event" if request.query_params.get("async") in ("1", "true")
                                   else None))
        raw = await read_limited(request, MAX_INVOKE_PAYLOAD)
        try:
            event = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            return _json({"errorType": "InvalidRequestContent",
                          "errorMessage": f"payload is not JSON: {exc}"}, 400)
        if kind == "Event":
            result = await platform.events.submit(
                name, raw if raw.strip() else b"{}",
                idempotency_key=request.headers.get("idempotency-key"))
            return _json({"invocationId": result.id, "function": name,
                          "duplicate": not result.created}, 202)
        pool = platform.routes.functions.get(name)
        if pool is None:
            raise NotFoundError(f"function {name!r} is not deployed")
        if kind == "DryRun":
            return Response(status_code=204)
        rid = new_id()
        try:
            result = await pool.invoke(rid, event)
        except NimbusError as exc:
            body = getattr(exc, "error", None) or {"errorType": type(exc).__name__,
                                                   "errorMessage": str(exc)}
            return _json({"requestId": rid, "version": pool.target.version, "error": body},
                         status_for(exc))
        return _json({"requestId": rid, "version": pool.target.version, "result": result})

    def view(rec: Any, function: str | None = None) -> dict[str, Any]:
        d = record_view(rec)
        if d["function"] is None:
            d["function"] = function or platform.events.queue_owner.get(
                rec.queue.partition("/")[2])
        return d

    def limit_of(request: Request) -> int:
        raw = request.query_params.get("limit", "50")
        if not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= 10_000:
            raise UserInputError(f"limit must be an integer from 1 to 10000, got {raw!r}")
        return int(raw)

    async def invocations(request: Request) -> Response:
        name = request.path_params["name"]
        status = request.query_params.get("status") or None
        if status is not None and status not in STATUSES:
            raise UserInputError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        recs = await platform.events.invocations(name, status=status, limit=limit_of(request))
        return _json([view(r, name) for r in recs])

    async def invocation(request: Request) -> Response:
        rec = await platform.events.invocation(request.path_params["id"])
        return _json(view(rec))

    async def dlq(request: Request) -> Response:
        name = request.path_params["name"]
        recs = await platform.events.invocations(name, status="dead", limit=limit_of(request))
        return _json([view(r, name) for r in recs])

    async def redrive(request: Request) -> Response:
        name = request.path_params["name"]
        raw = await read_limited(request, 1024 * 1024)
        ids = None
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise UserInputError(f"body is not JSON: {exc}") from None
            # a malformed body must not mean "everything"
            if not (isinstance(body, dict) and set(body) == {"ids"}
                    and isinstance(body["ids"], list)
                    and all(isinstance(i, str) for i in body["ids"])):
                raise UserInputError('expected no body (redrive every dead letter) or '
                                     '{"ids": ["invocation id", ...]}')
            ids = body["ids"]
        moved = await platform.events.redrive(name, ids)
        return _json({"redriven": moved})

    async def publish(request: Request) -> Response:
        name = request.path_params["name"]
        kind = request.query_params.get("kind") or None
        if kind not in (None, "queue", "topic"):
            raise UserInputError(f"kind must be queue or topic, got {kind!r}")
        raw = await read_limited(request, MAX_INVOKE_PAYLOAD)
        attrs = {}
        for item in request.query_params.getlist("attribute"):
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise UserInputError(f"attribute must be KEY=VALUE, got {item!r}")
            attrs[k] = v
        pub = await platform.events.publish(
            name, raw, kind=kind, attributes=attrs,
            subject=request.query_params.get("subject"),
            idempotency_key=request.headers.get("idempotency-key"))
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
                    "handler": f"{rec['spec']['module']}.{rec['spec']['callable']}",
                    "routes": [f"{r['method']} {r['path']}" for r in rec["spec"]["routes"]],
                    "memory_mb": rec["spec"]["memory_mb"], "timeout_s": rec["spec"]["timeout_s"],
                    "instances": len(pool.instances) if pool else 0,
                })
        return _json(sorted(out, key=lambda f: f["name"]))

    async def logs(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in platform.routes.functions:
            raise NotFoundError(f"function {name!r} is not deployed")
        rid = request.query_params.get("request_id") or None
        tail_s = request.query_params.get("tail")
        tail = None
        if tail_s:
            if not re.fullmatch(r"[0-9]{1,7}", tail_s) or not 1 <= int(tail_s) <= 1_000_000:
                raise UserInputError(f"tail must be an integer from 1 to 1000000, got {tail_s!r}")
            tail = int(tail_s)
        follow = request.query_params.get("follow") in ("1", "true")
        path = platform.worker.logs.path(name)
        platform.worker.logs.flush()
        # Disk reads run in a thread: a log of any size never stalls the loop.
        reader = await asyncio.to_thread(LogReader, path, request_id=rid)

        async def stream() -> AsyncIterator[bytes]:
            try:
                batches = reader.history(tail)
                while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                    if batch:
                        yield b"".join(orjson.dumps(rec) + b"\n" for rec in batch)
                while follow:
                    batch = await asyncio.to_thread(reader.more)
                    if batch:
                        yield b"".join(orjson.dumps(rec) + b"\n" for rec in batch)
                    else:
                        await asyncio.sleep(0.2)
            finally:
                reader.close()

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def status(request: Request) -> Response:
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
            "pid": os.getpid(), "uptime_s": round(time.time() - platform.started_at, 1),
            "gateway_url": platform.gateway_url, "control_url": platform.control_url,
            "state_dir": str(platform.state_dir), "requests": platform.gateway.requests,
            "memory": {"platform": memory_of(os.getpid())},
            "containment": contain.describe(),
            "zygotes": zygotes,
            "functions": fns,
        })

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    handlers = {"deploy": deploy, "invoke": invoke, "functions": functions,
                "logs": logs, "status": status, "invocations": invocations,
                "invocation": invocation, "dlq": dlq, "redrive": redrive, "publish": publish}

    def guarded(fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return _json({"errorType": "Unauthorized",
                              "errorMessage": "missing or wrong bearer token"}, 401)
            try:
                return await fn(request)
            except NimbusError as exc:
                return _error(exc)
        return endpoint

    g = {k: guarded(v) for k, v in handlers.items()}
    return Starlette(routes=[
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/deploy", g["deploy"], methods=["POST"]),
        Route("/v1/functions", g["functions"], methods=["GET"]),
        Route("/v1/functions/{name}/invoke", g["invoke"], methods=["POST"]),
        Route("/v1/functions/{name}/logs", g["logs"], methods=["GET"]),
        Route("/v1/status", g["status"], methods=["GET"]),
        Route("/v1/functions/{name}/invocations", g["invocations"], methods=["GET"]),
        Route("/v1/invocations/{id}", g["invocation"], methods=["GET"]),
        Route("/v1/functions/{name}/dlq", g["dlq"], methods=["GET"]),
        Route("/v1/functions/{name}/dlq/redrive", g["redrive"], methods=["POST"]),
        Route("/v1/publish/{name}", g["publish"], methods=["POST"]),
    ])
