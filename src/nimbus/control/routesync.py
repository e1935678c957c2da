"""Keeps the gateway's route table and the worker's pools true to the store.

Watches ``apps/`` (never polls per request): on every change it rebuilds the
whole route table from the live app records, swaps it into the gateway in
one assignment, and retires the pools of versions nothing routes to any more
(they drain: in-flight invocations finish first).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait
from nimbus.control.deploy import target_from_record
from nimbus.gateway.app import Gateway, Invoker
from nimbus.gateway.router import Router
from nimbus.store.base import Store
from nimbus.worker.pool import FunctionPool
from nimbus.worker.worker import Worker

log = logging.getLogger("nimbus.control")


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
        entries = await self.store.list("apps/")
        after = max((e.revision for e in entries), default=0)
        for e in entries:
            self.apps[e.key] = orjson.loads(e.value)
        self._rebuild()
        self._task = asyncio.create_task(self._watch(after))

    async def _watch(self, after: int) -> None:
        async for ev in self.store.watch("apps/", after=after):
            if ev.kind == "put":
                self.apps[ev.key] = orjson.loads(ev.value)
            else:
                self.apps.pop(ev.key, None)
            try:
                self._rebuild()
            except Exception:  # noqa: BLE001 - keep serving the last good table
                log.exception("could not rebuild routes after revision %d", ev.revision)

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
