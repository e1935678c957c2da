"""The control API's versions and aliases routes.

``GET /v1/functions/{name}/versions``, ``GET .../aliases``,
``PUT .../aliases/{alias}`` (body ``{"weights": {"7": 90, "8": 10}}``) and
``DELETE .../aliases/{alias}``. Writes are compare-and-set changes of the
app record (:func:`nimbus.rollout.records.change_app`); the answer comes
once this process's route table follows the change, so a request sent
after it sees the new weights here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from nimbus.errors import ConflictError, UserInputError
from nimbus.manifest.model import handler_text
from nimbus.rollout import records, traffic

MAX_BODY = 64 * 1024
SYNC_WAIT_S = 5.0

Handler = Callable[[Request], Awaitable[Response]]


def version_rows(app: dict[str, Any], stored: dict[int, dict[str, Any]],
                 fn: str) -> list[dict[str, Any]]:
    """Every version of ``fn`` still stored or named by the app record,
    newest first, with its share in each alias."""
    aliases = traffic.aliases_of(app, fn)
    stable = traffic.stable_version(app, fn)
    known = {**stored, **traffic.records_of(app, fn)}
    rows = []
    for version in sorted(known, reverse=True):
        rec = known[version]
        spec = rec.get("spec") or {}
        rows.append({
            "version": version,
            "digest": str(rec.get("digest", ""))[:12],
            "config_hash": str(rec.get("config_hash", ""))[:12],
            "created": rec.get("created"),
            "handler": handler_text(spec),
            "memory_mb": spec.get("memory_mb"), "timeout_s": spec.get("timeout_s"),
            "stable": version == stable,
            "shares": {a: w[version] for a, w in aliases.items() if version in w},
        })
    return rows


def alias_view(app: dict[str, Any], fn: str) -> dict[str, Any]:
    return {"function": fn, "app": app["name"], "stable": traffic.stable_version(app, fn),
            "aliases": {a: {str(v): w for v, w in sorted(ws.items())}
                        for a, ws in traffic.aliases_of(app, fn).items()},
            "routes": [{"method": r[0], "path": r[1], "alias": traffic.route_alias(r)}
                       for r in app.get("routes", ()) if r[2] == fn]}


async def refuse_during_rollout(store: Any, fn: str) -> None:
    """A ConflictError when a rollout of ``fn`` is running: it owns ``live``."""
    from nimbus.rollout import state

    entry = await store.get(state.key(fn))
    if entry is None:
        return
    try:
        rollout = orjson.loads(entry.value)
    except orjson.JSONDecodeError:
        return
    if isinstance(rollout, dict) and rollout.get("state") == state.RUNNING:
        raise ConflictError(
            f"a rollout of {fn} is running (rollout {rollout.get('id', '?')}: version "
            f"{rollout.get('from', '?')} -> {rollout.get('to', '?')}, "
            f"{rollout.get('strategy', '?')}); it moves the live alias itself: wait for it "
            f"to end, or stop it with `nimbus rollback {fn}`")


def handlers(platform: Any) -> dict[str, Handler]:
    from nimbus.control.api import _json, path_name, read_limited

    # read when a request needs it: a control API without a store (tests of
    # other routes) still builds
    store: Any = getattr(platform, "store", None)

    def alias_of(request: Request) -> str:
        return traffic.check_alias_name(request.path_params["alias"])

    async def followed(written: dict[str, Any]) -> None:
        """Wait (bounded) until this process's route table has ``written``."""
        key = f"apps/{written['name']}"
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await platform.routes.wait_for(lambda rs: rs.apps.get(key) == written,
                                           SYNC_WAIT_S)

    async def versions(request: Request) -> Response:
        fn = path_name(request)
        app, _ = await records.app_of(store, fn)
        stored = await records.version_records(store, fn)
        return _json({"function": fn, "app": app["name"],
                      "versions": version_rows(app, stored, fn)})

    async def aliases(request: Request) -> Response:
        fn = path_name(request)
        app, _ = await records.app_of(store, fn)
        return _json(alias_view(app, fn))

    async def set_alias(request: Request) -> Response:
        fn = path_name(request)
        alias = alias_of(request)
        raw = await read_limited(request, MAX_BODY)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UserInputError(f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict) or set(body) != {"weights"}:
            raise UserInputError('request body: expected {"weights": {"VERSION": WEIGHT, '
                                 '...}}, weights summing to 100')
        weights = traffic.check_weights(body["weights"])
        if alias == traffic.DEFAULT_ALIAS:
            await refuse_during_rollout(store, fn)
        app, _ = await records.app_of(store, fn)
        stored = {}
        if any(v not in traffic.records_of(app, fn) for v in weights):
            stored = await records.version_records(store, fn)
        written = await records.change_app(
            store, fn, lambda a: traffic.with_weights(a, fn, alias, weights, stored))
        await followed(written)
        return _json(alias_view(written, fn))

    async def remove_alias(request: Request) -> Response:
        fn = path_name(request)
        alias = alias_of(request)
        written = await records.change_app(
            store, fn, lambda a: traffic.without_alias(a, fn, alias))
        await followed(written)
        return _json(alias_view(written, fn))

    return {"versions": versions, "aliases": aliases, "set_alias": set_alias,
            "remove_alias": remove_alias}
