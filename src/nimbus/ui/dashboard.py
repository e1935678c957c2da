"""The web dashboard at ``/ui``: login, the pages, their data.

Static files (``static/``: HTML, one script, one style sheet) are served as
they are: no build step. The page reads the JSON under ``/ui/api/`` (made
here from the metrics history) and calls the control API's own ``/v1``
routes (status, functions, logs, async records, redrive) with its session
cookie and the CSRF header (see :mod:`nimbus.ui.auth`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from nimbus.control.openapi import NAME_PATTERN
from nimbus.errors import NimbusError, UserInputError
from nimbus.manifest.model import handler_text
from nimbus.rollout import state, traffic
from nimbus.rollout.records import app_of
from nimbus.rollout.window import Window
from nimbus.ui import history as h
from nimbus.ui.auth import COOKIE, CSRF_HEADER, Sessions, cookie_header
from nimbus.ui.collector import INTERVAL_S, Collector, Source
from nimbus.ui.edgeview import EdgeView

OVERVIEW_STEP_S = 10.0     # sparklines: 90 points over 15 minutes
DETAIL_STEP_S = 5.0        # a function's charts: 180 points
RATE_WINDOW_S = 60.0       # "rate", "errors", "throttles" in the table: the last minute
LATENCY_WINDOW_S = 300.0   # p50/p99 in the table: the last 5 minutes
MAX_LOGIN_BODY = 4096
_NAME = re.compile(NAME_PATTERN)
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
}


def _static(name: str) -> bytes:
    return resources.files("nimbus.ui").joinpath("static", name).read_bytes()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json",
                    headers=SECURITY_HEADERS)


class Dashboard:
    """Everything behind ``/ui``. ``versions(fn)`` lists a function's
    version records (newest first); ``store``, when given, is read for a
    function's rollout and aliases."""

    def __init__(self, token: str, source: Source, *,
                 versions: Callable[[str], Any] | None = None,
                 store: Any = None,
                 region: str = "", edge: EdgeView | None = None,
                 scrapes: Callable[[], dict[str, Any]] | None = None,
                 interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.sessions = Sessions(token)
        self.history = h.History()
        self.collector = Collector(source, self.history, interval_s=interval_s, clock=clock)
        self.versions = versions
        self.store = store
        self.region = region
        self.edge = edge
        self.scrapes = scrapes
        self.clock = clock
        self._pages = {name: _static(name) for name in ("index.html", "login.html")}
        self._files = {name: _static(name) for name in STATIC}

    def start(self) -> None:
        self.collector.start()
        if self.edge is not None:
            self.edge.start()

    async def aclose(self) -> None:
        await self.collector.aclose()
        if self.edge is not None:
            await self.edge.aclose()

    # -- auth ------------------------------------------------------------------
    def signed_in(self, request: Request) -> bool:
        return self.sessions.valid(request.cookies.get(COOKIE), self.clock())

    def api_allowed(self, request: Request) -> bool:
        """A control API call made by the page: a live session and the CSRF
        header (any method)."""
        return request.headers.get(CSRF_HEADER) == "1" and self.signed_in(request)

    # -- pages -------------------------------------------------------------------
    def _page(self, name: str, status: int = 200, swap: tuple[bytes, bytes] | None = None,
              headers: dict[str, str] | None = None) -> Response:
        body = self._pages[name]
        if swap is not None:
            body = body.replace(*swap)
        return Response(body, status, media_type="text/html; charset=utf-8",
                        headers={**SECURITY_HEADERS, **(headers or {})})

    async def index(self, request: Request) -> Response:
        if not self.signed_in(request):
            return RedirectResponse("/ui/login", 303, headers=SECURITY_HEADERS)
        return self._page("index.html")

    async def login_form(self, request: Request) -> Response:
        if self.signed_in(request):
            return RedirectResponse("/ui", 303, headers=SECURITY_HEADERS)
        return self._page("login.html")

    async def login(self, request: Request) -> Response:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_LOGIN_BODY:
                return self._page("login.html", 413, (b"<!--error-->",
                                  b'<p class="error">That is not a token.</p>'))
        given = parse_qs(raw.decode("latin-1")).get("token", [""])[0]
        if not self.sessions.token_ok(given):
            return self._page("login.html", 401, (
                b"<!--error-->", b'<p class="error" id="login-error">Wrong token: use the '
                b"one in the state folder's <code>token</code> file.</p>"))
        sid = self.sessions.open(self.clock())
        secure = request.url.scheme == "https"
        return RedirectResponse("/ui", 303, headers={
            **SECURITY_HEADERS,
            "set-cookie": cookie_header(sid, secure, self.sessions.session_s)})

    async def logout(self, request: Request) -> Response:
        if request.headers.get(CSRF_HEADER) != "1":
            return _json({"errorType": "Forbidden",
                          "errorMessage": f"header {CSRF_HEADER}: 1 is required"}, 403)
        self.sessions.close(request.cookies.get(COOKIE))
        return Response(status_code=204, headers={
            **SECURITY_HEADERS,
            "set-cookie": cookie_header("", request.url.scheme == "https", 0)})

    async def static(self, request: Request) -> Response:
        name = request.path_params["file"]
        # the style sheet holds no data and styles the login page too
        if name != "app.css" and not self.signed_in(request):
            return _json({"errorType": "Unauthorized", "errorMessage": "sign in at /ui/login"},
                         401)
        body = self._files.get(name)
        if body is None:
            return _json({"errorType": "NotFoundError", "errorMessage": f"no file {name}"}, 404)
        return Response(body, media_type=STATIC[name], headers=SECURITY_HEADERS)

    # -- data ----------------------------------------------------------------------
    def _data(self, fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not self.signed_in(request):
                return _json({"errorType": "Unauthorized",
                              "errorMessage": "sign in at /ui/login"}, 401)
            try:
                return _json(await fn(request))
            except UserInputError as exc:
                return _json({"errorType": "UserInputError", "errorMessage": str(exc)}, 400)
        return endpoint

    async def overview(self, request: Request) -> dict[str, Any]:
        return overview(self.history, self.clock(), self.region)

    async def function(self, request: Request) -> dict[str, Any]:
        name = request.path_params["name"]
        if not _NAME.fullmatch(name):
            raise UserInputError(f"path parameter name must be 1 to 128 letters, digits, "
                                 f"'_', '-' or '.', got {name[:80]!r}")
        out = function_detail(self.history, name, self.clock())
        out["versions"] = await self.versions(name) if self.versions is not None else []
        out["rollout"] = None
        out["aliases"] = {}
        if self.store is not None:
            out["rollout"] = await function_rollout(self.store, name, self.clock())
            out["aliases"] = await function_aliases(self.store, name)
            with_shares(out["versions"], out["aliases"])
        return out

    async def scrape_view(self, request: Request) -> dict[str, Any]:
        """How the last scrape of each node's metrics went (a region's
        controller; empty for ``nimbus up``, which reads its own)."""
        return self.scrapes() if self.scrapes is not None else {}

    async def edge_view(self, request: Request) -> dict[str, Any]:
        if self.edge is None:
            return {"configured": False}
        return {"configured": True, **self.edge.snapshot()}

    def routes(self) -> list[Route]:
        return [
            Route("/ui", self.index, methods=["GET"]),
            Route("/ui/", self.index, methods=["GET"]),
            Route("/ui/login", self.login_form, methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", self.logout, methods=["POST"]),
            Route("/ui/static/{file}", self.static, methods=["GET"]),
            Route("/ui/api/overview", self._data(self.overview), methods=["GET"]),
            Route("/ui/api/functions/{name}", self._data(self.function), methods=["GET"]),
            Route("/ui/api/edge", self._data(self.edge_view), methods=["GET"]),
            Route("/ui/api/scrapes", self._data(self.scrape_view), methods=["GET"]),
        ]


# -- the JSON the pages draw: pure, ``now`` given ------------------------------------


def overview(history: h.History, now: float, region: str = "") -> dict[str, Any]:
    times = h.boundaries(now, h.SPAN_S, OVERVIEW_STEP_S)[1:]
    latest = history.at(now)
    rows = []
    for fn in history.functions():
        point = latest.functions.get(fn) if latest is not None else None
        minute = h.window(history, fn, RATE_WINDOW_S, now)
        slow = h.window(history, fn, LATENCY_WINDOW_S, now)
        series = list(h.steps(history, fn, now, h.SPAN_S, OVERVIEW_STEP_S))
        rows.append({
            "name": fn,
            "versions": sorted(point.versions) if point is not None else [],
            "invocations": point.invocations if point is not None else 0,
            "errors": point.errors if point is not None else 0,
            "throttles": point.outcomes.get("throttled", 0.0) if point is not None else 0,
            "rate": round(minute.rate, 4),
            "error_rate": round(minute.error_rate, 4),
            "throttles_1m": minute.throttled,
            "p50": h.rounded(slow.p50), "p99": h.rounded(slow.p99),
            "instances": point.instance_count if point is not None else 0,
            "spark": {
                "rate": [None if s is None else round(s.rate, 4) for _, s in series],
                "errors": [None if s is None else round(s.error_rate, 4) for _, s in series],
                "p99": [None if s is None else h.rounded(s.p99) for _, s in series],
                "instances": h.gauge_series(history, fn, now, "instance_count",
                                            h.SPAN_S, OVERVIEW_STEP_S),
            },
        })
    return {"now": now, "region": region, "step_s": OVERVIEW_STEP_S, "times": times,
            "sampled_at": latest.t if latest is not None else None, "functions": rows}


def function_detail(history: h.History, fn: str, now: float) -> dict[str, Any]:
    times = h.boundaries(now, h.SPAN_S, DETAIL_STEP_S)[1:]
    series = [s for _, s in h.steps(history, fn, now, h.SPAN_S, DETAIL_STEP_S)]
    latest = history.at(now)
    point = latest.functions.get(fn) if latest is not None else None

    def of(attr: str) -> list[float | None]:
        return h.gauge_series(history, fn, now, attr, h.SPAN_S, DETAIL_STEP_S)

    def each(get: Callable[[h.Step], float | None]) -> list[float | None]:
        return [None if s is None else get(s) for s in series]

    return {
        "name": fn, "now": now, "step_s": DETAIL_STEP_S, "times": times,
        "known": point is not None,
        "totals": {
            "invocations": point.invocations if point else 0,
            "outcomes": dict(point.outcomes) if point else {},
            "cold_starts": point.cold_starts if point else 0,
            "instances": dict(point.instances) if point else {},
            "in_flight": point.in_flight if point else 0,
            "held": point.held if point else 0,
            "desired": point.desired if point else 0,
            "ready": point.ready if point else 0,
            "async": dict(point.async_status) if point else {},
            "dead_letters": point.dead_letters if point else 0,
            "versions": sorted(point.versions) if point else [],
        },
        "series": {
            "invocations": each(lambda s: round(s.rate, 4)),
            "errors": each(lambda s: round(s.error_rate, 4)),
            "throttled": each(lambda s: round(s.throttled / s.seconds, 4) if s.seconds else 0.0),
            "p50": each(lambda s: h.rounded(s.p50)),
            "p90": each(lambda s: h.rounded(s.p90)),
            "p99": each(lambda s: h.rounded(s.p99)),
            "in_flight": of("in_flight"),
            "held": of("held"),
            "instances": of("instance_count"),
            "desired": of("desired"),
        },
    }


MAX_VERSIONS_SHOWN = 20


async def function_versions(store: Any, fn: str, live: Any) -> list[dict[str, Any]]:
    """``fn``'s version records in ``store``, newest first (at most
    ``MAX_VERSIONS_SHOWN``), each marked live or not (``live``: the route
    target's pool or invoker, None when not deployed)."""
    live_version = live.target.version if live is not None else None
    out = []
    for entry in reversed(await store.list(f"functions/{fn}/versions/")):
        try:
            rec = orjson.loads(entry.value)
            version = int(rec["version"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        spec = rec.get("spec") or {}
        out.append({"version": version, "created": rec.get("created"),
                    "digest": str(rec.get("digest", ""))[:12],
                    "handler": handler_text(spec),
                    "memory_mb": spec.get("memory_mb"), "timeout_s": spec.get("timeout_s"),
                    "live": version == live_version})
        if len(out) >= MAX_VERSIONS_SHOWN:
            break
    return out


MAX_DECISIONS_SHOWN = 50


async def function_rollout(store: Any, fn: str, now: float) -> dict[str, Any] | None:
    """``fn``'s latest rollout as ``GET /v1/functions/{fn}/rollout`` shows it
    (None when it never had one), its history cut to the last
    :data:`MAX_DECISIONS_SHOWN` decisions, each one's canary and baseline
    figures as :meth:`nimbus.rollout.window.Window.figures` gives them."""
    entry = await store.get(state.key(fn))
    if entry is None:
        return None
    try:
        rec = orjson.loads(entry.value)
        view = state.steps_view(rec, now)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
        return None
    history = view.get("history") or []
    view["decisions"] = len(history)
    view["history"] = [_decision(d) for d in history[-MAX_DECISIONS_SHOWN:]
                       if isinstance(d, dict)]
    return view


def _decision(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for side in ("canary", "baseline"):
        w = d.get(side)
        if isinstance(w, dict) and "buckets" in w:  # a window, not its figures
            try:
                out[side] = Window.from_dict(w).figures()
            except (TypeError, ValueError):
                out[side] = None
    return out


async def function_aliases(store: Any, fn: str) -> dict[str, dict[str, int]]:
    """``fn``'s aliases (``live`` first) -> version -> weight, from its app
    record; {} when it has none (not deployed)."""
    try:
        app, _ = await app_of(store, fn)
        aliases = traffic.aliases_of(app, fn)
    except (NimbusError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}
    return {alias: {str(v): w for v, w in weights.items()}
            for alias, weights in aliases.items()}


def with_shares(versions: list[dict[str, Any]], aliases: dict[str, dict[str, int]]) -> None:
    """Mark each version with its share in each alias that names it."""
    for v in versions:
        key = str(v.get("version"))
        v["shares"] = {alias: weights[key] for alias, weights in aliases.items()
                       if key in weights}
