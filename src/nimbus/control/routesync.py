"""Keeps the gateway's route table and the worker's pools true to the store.

Watches ``apps/`` (never polls per request): on every change it rebuilds the
whole route table from the live app records, swaps it into the gateway in
one assignment, and retires the pools of versions nothing routes to any more
(they drain: in-flight invocations finish first).

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
from nimbus.errors import ClosedError, UnavailableError
from nimbus.gateway.app import Gateway, Invoker
from nimbus.gateway.router import Router
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
        self.functions: dict[str, FunctionPool] = {}  # live pool per function name
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
        functions: dict[str, FunctionPool] = {}
        for app in self.apps.values():
            for name, rec in app["functions"].items():
                functions[name] = self.worker.pool(target_from_record(app["name"], rec))
            for method, path, fn in app["routes"]:
                routes.append((method, path, functions[fn]))
        self.gateway.set_router(Router(routes))
        self.functions = functions
        self.worker.retire({p.target.key for p in functions.values()})
        if self.on_change is not None:
            self.on_change(functions)
        self.synced.set()

    async def wait_for(self, predicate: Any, timeout_s: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds (e.g. a deploy became live)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self.synced.clear()
                await self.synced.wait()

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
