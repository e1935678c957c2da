"""The store keys of the region's control plane, and a watched key range.

    nodes/<role>/<id>          campaign key (ttl): a live node and its info
    leader/controller          campaign key (ttl): the controller that leads
    demand/<gateway id>        campaign key (ttl): a gateway's demand per target
    placement/<worker id>      {"fn@version": n}: what the worker should run
    shares/<fn>/<version>      {"shares": {gateway id: n}, "cap": c}: each gateway's part of
                               the target's max_concurrency
    status/<worker id>/<fn>/<version>  {"state": "failed", "error": ...}
    warm/<fn>/<version>        campaign key (ttl): a deploy asks for one instance

Targets are named ``"fn@version"`` in values; in keys they are
``<fn>/<version>``, characters every backend takes in a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nimbus.aio import cancel_and_wait
from nimbus.cluster.placement import parse_target_key
from nimbus.errors import ClosedError, NimbusError
from nimbus.store.base import Entry, Store

log = logging.getLogger("nimbus.cluster")

NODES = "nodes/"
LEADER = "leader/controller"
DEMAND = "demand/"
PLACEMENT = "placement/"
SHARES = "shares/"
STATUS = "status/"
WARM = "warm/"


async def resign_quietly(store: Store, key: str, revision: int | None) -> None:
    """Give up a campaign key this process holds, on the way out: a store
    that does not answer is logged (the key then expires by itself)."""
    if revision is None:
        return
    try:
        await store.resign(key, revision)
    except NimbusError as exc:
        log.warning("could not resign %s: %s", key, exc)


def node_key(role: str, node_id: str) -> str:
    return f"{NODES}{role}/{node_id}"


def placement_key(worker_id: str) -> str:
    return f"{PLACEMENT}{worker_id}"


def target_path(target: str) -> str:
    """``"fn@3"`` -> ``"fn/3"`` (the form targets take in keys)."""
    fn, version = parse_target_key(target)
    return f"{fn}/{version}"


def target_of_path(path: str) -> str:
    """``"fn/3"`` -> ``"fn@3"``; ``ValueError`` if it is not one."""
    fn, _, version = path.rpartition("/")
    key = f"{fn}@{version}"
    parse_target_key(key)
    return key


def status_key(worker_id: str, target: str) -> str:
    return f"{STATUS}{worker_id}/{target_path(target)}"


def share_key(target: str) -> str:
    return f"{SHARES}{target_path(target)}"


def warm_key(target: str) -> str:
    return f"{WARM}{target_path(target)}"


# What the control plane needs of the store: all of it.
ClusterStore = Store


RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)


class KeyWatch:
    """The live entries under ``prefix``, kept by a watch.

    ``start`` lists the prefix, then follows the changes. A ``reset`` event
    (events may have been missed) and a store error both lead to listing
    the prefix again: the entries are never knowingly stale for long.
    ``on_change(watch)`` runs after every change that was applied, and
    ``on_event(kind, key, value)`` for every single put or delete.
    """

    def __init__(self, store: ClusterStore, prefix: str,
                 on_change: Callable[[KeyWatch], None] | None = None,
                 on_event: Callable[[str, str, bytes], None] | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.entries: dict[str, Entry] = {}
        self.on_change = on_change
        self.on_event = on_event
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        after = await self._relist()
        self._task = asyncio.get_running_loop().create_task(self._run(after))

    async def _relist(self) -> int:
        entries = await self.store.list(self.prefix)
        self.entries = {e.key: e for e in entries}
        self._changed()
        return max((e.revision for e in entries), default=0)

    def _changed(self) -> None:
        self.changed.set()
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # noqa: BLE001 - a bad callback must not stop the watch
                log.exception("watch callback for %s failed", self.prefix)

    async def _run(self, after: int) -> None:
        failures = 0
        while True:
            watch = self.store.watch(self.prefix, after=after)
            try:
                async for ev in watch:
                    failures = 0
                    if ev.kind == "reset":
                        after = await self._relist()
                        continue
                    after = max(after, ev.revision)
                    if ev.kind == "put":
                        self.entries[ev.key] = Entry(ev.key, ev.value, ev.revision)
                    else:
                        self.entries.pop(ev.key, None)
                    if self.on_event is not None:
                        try:
                            self.on_event(ev.kind, ev.key, ev.value)
                        except Exception:  # noqa: BLE001
                            log.exception("watch event callback for %s failed", self.prefix)
                    self._changed()
                return  # the watch ended: the store closed
            except ClosedError:
                return
            except Exception as exc:  # noqa: BLE001 - follow again after a pause
                log.warning("watch on %s failed (%s); listing again", self.prefix, exc)
                await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                with contextlib.suppress(Exception):
                    after = await self._relist()
            finally:
                with contextlib.suppress(Exception):
                    await watch.aclose()

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
