"""Keeps the gateway's route table and the worker's pools true to the store.

Watches ``apps/`` (never polls per request): on every change it rebuilds the
whole route table from the live app records, swaps it into the gateway in
one assignment, and retires the pools of versions nothing references any
more (they drain: in-flight invocations finish first).

Every version an app record references (the stable one, and any version an
alias names, even at weight 0) has a pool: a rollout's both versions stay
warm, and moving an alias back needs no cold start. A route points at its
alias's invoker: the one version's pool, or a :class:`Split` when two or
more versions take traffic. ``on_change`` gets each function's ``live``
invoker (what async work and schedules run on).

A ``reset`` from the watch (events may have been missed: a reconnect, a
store error) makes it list ``apps/`` again and replace what it knew. If
anything in the loop fails, it lists again and watches anew after a pause:
the route table is never left to go stale silently. Only the store closing
ends it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait
from nimbus.control.deploy import target_from_record
from nimbus.errors import ClosedError, NotFoundError, UnavailableError
from nimbus.gateway.app import Gateway, Invoker
from nimbus.gateway.events_v1 import RestRoute
from nimbus.gateway.router import Router
from nimbus.gateway.split import Split
from nimbus.rollout import traffic
from nimbus.store.base import Store, WatchEvent
from nimbus.worker.pool import FunctionPool
from nimbus.worker.worker import Worker

log = logging.getLogger("nimbus.control")
RETRY_S = (0.2, 5.0)  # pause before watching again after a failure, doubling up to the cap


class RouteSync:
    def __init__(self, store: Store, gateway: Gateway, worker: Worker,
                 on_change: Callable[[dict[str, FunctionPool]], None] | None = None) -> None:
        self.store = store
        self.on_change = on_change  # told the live pools after every rebuild
        self.gateway = gateway
        self.worker = worker
        self.apps: dict[str, dict[str, Any]] = {}
        self.functions: dict[str, FunctionPool] = {}  # the stable version's pool per function
        self.live: dict[str, Invoker] = {}  # per function, what its live alias runs
        self.versions: dict[str, dict[int, FunctionPool]] = {}  # every referenced version
        self.invokers: dict[tuple[str, str], Invoker] = {}  # (function, alias) when aliased
        self._splits: dict[tuple[Any, ...], Split] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        after = await self._relist()
        self._task = asyncio.create_task(self._watch(after), name="routesync")

    async def _relist(self) -> int:
        """Replace what we know of ``apps/`` with the store's; returns the
        revision to watch from."""
        entries = await self.store.list("apps/")
        self.apps = {e.key: orjson.loads(e.value) for e in entries}
        self._rebuild()
        return max((e.revision for e in entries), default=0)

    async def _watch(self, after: int) -> None:
        delay = RETRY_S[0]
        while True:
            try:
                watch = self.store.watch("apps/", after=after)
                try:
                    async for ev in watch:
                        delay = RETRY_S[0]
                        after = await self._apply(ev, after)
                finally:
                    await watch.aclose()
                return  # a watch ends only when the store closes: we are shutting down
            except ClosedError:
                return  # the store closed: we are shutting down
            except Exception as exc:  # noqa: BLE001 - the route table must keep following
                log.warning("the watch of apps/ failed (%s); watching again in %.1fs", exc, delay,
                            exc_info=not isinstance(exc, UnavailableError))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_S[1])
            try:  # we may have missed anything: start over from a fresh list
                after = await self._relist()
            except ClosedError:
                return
            except Exception as exc:  # noqa: BLE001
                log.warning("could not list apps/ (%s); will try again", exc,
                            exc_info=not isinstance(exc, UnavailableError))

    async def _apply(self, ev: WatchEvent, after: int) -> int:
        if ev.kind == "reset":
            log.info("the watch of apps/ was reset; listing apps/ again")
            return await self._relist()
        if ev.kind == "put":
            self.apps[ev.key] = orjson.loads(ev.value)
        else:
            self.apps.pop(ev.key, None)
        try:
            self._rebuild()
        except Exception:  # noqa: BLE001 - keep serving the last good table
            log.exception("could not rebuild routes after revision %d", ev.revision)
        return max(after, ev.revision)

    def _rebuild(self) -> None:
        routes: list[tuple[str, str, Invoker]] = []
        functions: dict[str, FunctionPool] = {}  # the stable version's pool
        live: dict[str, Invoker] = {}  # what the live alias runs: a pool or a Split
        versions: dict[str, dict[int, FunctionPool]] = {}
        invokers: dict[tuple[str, str], Invoker] = {}
        splits: dict[tuple[Any, ...], Split] = {}
        for app in self.apps.values():
            name = app["name"]
            if "aliases" not in app and "versions" not in app:  # nothing split: one pool each
                for fn, rec in app["functions"].items():
                    pool = self.worker.pool(target_from_record(name, rec))
                    functions[fn] = live[fn] = pool
                    versions[fn] = {pool.target.version: pool}
            else:
                for fn, rec in app["functions"].items():
                    pools = {v: self.worker.pool(target_from_record(name, r))
                             for v, r in traffic.records_of(app, fn).items()}
                    versions[fn] = pools
                    functions[fn] = pools[int(rec["version"])]
                    for alias, weights in traffic.aliases_of(app, fn).items():
                        invokers[(fn, alias)] = self._invoker(
                            fn, alias, weights, pools, functions[fn], splits)
                    live[fn] = invokers[(fn, traffic.DEFAULT_ALIAS)]
            for route in app["routes"]:
                fn = route[2]
                alias = traffic.route_alias(route)
                target = invokers.get((fn, alias)) or live[fn]
                if alias != traffic.DEFAULT_ALIAS and (fn, alias) not in invokers:
                    log.warning("route %s %s names alias %r of %s, which is not set; "
                                "it serves the live alias", route[0], route[1], alias, fn)
                if traffic.route_payload(route) == "1.0":  # decided here, once per route
                    target = RestRoute(target, route[1], route[0])
                routes.append((route[0], route[1], target))
        self.gateway.set_router(Router(routes))
        self.functions = functions
        self.live = live
        self.versions = versions
        self.invokers = invokers
        self._splits = splits
        self.worker.retire({p.target.key for pools in versions.values() for p in pools.values()})
        if self.on_change is not None:
            self.on_change(live)  # type: ignore[arg-type]
        self.synced.set()

    def _invoker(self, fn: str, alias: str, weights: dict[int, int],
                 pools: dict[int, FunctionPool], stable: FunctionPool,
                 splits: dict[tuple[Any, ...], Split]) -> Invoker:
        """One alias's invoker: the pool of its one version taking traffic,
        or a Split (the same object as before while nothing about it changed:
        work waiting for a slot keeps its target)."""
        serving = [v for v, w in weights.items() if w > 0]
        if len(serving) == 1:
            return pools[serving[0]]
        key = (fn, alias, tuple(sorted(weights.items())),
               tuple(id(pools[v]) for v in sorted(weights)), id(stable))
        split = self._splits.get(key)
        if split is None:
            split = Split(alias, [(v, w, pools[v]) for v, w in weights.items()], stable)
        splits[key] = split
        return split

    def invoker_for(self, fn: str, qualifier: str | None) -> Invoker:
        """What runs ``fn`` for a qualifier: None (``live``), a version
        number or an alias name; NotFoundError naming the aliases and versions."""
        if not qualifier:
            inv = self.live.get(fn)
            if inv is None:
                raise NotFoundError(f"function {fn!r} is not deployed")
            return inv
        pools = self.versions.get(fn)
        if pools is None:
            raise NotFoundError(f"function {fn!r} is not deployed")
        if qualifier.isdigit() and int(qualifier) in pools:
            return pools[int(qualifier)]
        inv = self.invokers.get((fn, qualifier))
        if inv is None and qualifier == traffic.DEFAULT_ALIAS:
            inv = self.live[fn]
        if inv is not None:
            return inv
        aliases = [traffic.DEFAULT_ALIAS] + sorted(
            a for f, a in self.invokers if f == fn and a != traffic.DEFAULT_ALIAS)
        raise NotFoundError(
            f"function {fn!r} has no version or alias {qualifier!r}; its aliases: "
            f"{', '.join(aliases)}; its versions: {', '.join(str(v) for v in sorted(pools))}")

    async def wait_for(self, predicate: Any, timeout_s: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds (e.g. a deploy became live)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self.synced.clear()
                await self.synced.wait()

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
