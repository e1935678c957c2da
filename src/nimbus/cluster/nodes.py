"""Which nodes are alive: registrations (campaign keys) and watches over them.

A node holds ``nodes/<role>/<id>`` as a campaign key with a short ttl and
renews it every ttl/3 with fresh info (a worker's ready instances, its
budget). If the node stops (crash, partition, a frozen process) the key
expires and every watcher sees it go within the ttl: no failure detector
beyond the store's own timers, nothing to clean up by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait, wait_event
from nimbus.cluster.keys import NODES, ClusterStore, KeyWatch, node_key, resign_quietly
from nimbus.errors import ConflictError, NimbusError

log = logging.getLogger("nimbus.cluster")


class Registration:
    """Keeps ``nodes/<role>/<node_id>`` alive while the node runs.

    ``info()`` is called for every renewal and merged into the value (it
    cannot override ``id``/``role``). A lost key (expired during a pause,
    deleted) is campaigned for again at once. ``refresh()`` renews now, so a
    change (an instance became ready) is seen without waiting a period.
    """

    def __init__(self, store: ClusterStore, role: str, node_id: str,
                 info: Callable[[], dict[str, Any]] | None = None, ttl_s: float = 3.0) -> None:
        if not role or "/" in role or not node_id or "/" in node_id:
            raise ValueError(f"role and node id must be non-empty without '/', "
                             f"were: {role!r}, {node_id!r}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, was: {ttl_s!r}")
        self.store = store
        self.role = role
        self.node_id = node_id
        self.key = node_key(role, node_id)
        self.info = info or dict
        self.ttl_s = ttl_s
        self.revision: int | None = None
        self.started_at = time.time()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def value(self) -> bytes:
        base: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                                "started_at": self.started_at}
        base.update(self.info())
        base.update(id=self.node_id, role=self.role, at=time.time())
        return orjson.dumps(base)

    async def start(self) -> None:
        """Register now (so the node is visible when this returns), then
        keep the key alive in the background."""
        await self._once()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def refresh(self) -> None:
        self._wake.set()

    async def _once(self) -> None:
        value = self.value()
        if self.revision is not None:
            try:
                self.revision = await self.store.renew(self.key, self.revision, self.ttl_s,
                                                       value)
                return
            except ConflictError:
                log.warning("registration %s was lost; registering again", self.key)
                self.revision = None
        self.revision = await self.store.campaign(self.key, value, self.ttl_s)
        if self.revision is None:
            log.warning("registration %s is held by another process", self.key)

    async def _run(self) -> None:
        while True:
            await wait_event(self._wake, self.ttl_s / 3)
            self._wake.clear()
            try:
                await self._once()
            except NimbusError as exc:
                log.warning("could not renew %s: %s", self.key, exc)
            except Exception:  # noqa: BLE001 - e.g. a failing info(): keep trying
                log.exception("could not renew %s", self.key)

    async def aclose(self) -> None:
        """Stop renewing and give the key up (watchers see the node go now)."""
        await cancel_and_wait(self._task)
        self._task = None
        await resign_quietly(self.store, self.key, self.revision)
        self.revision = None


def _decode(value: bytes) -> dict[str, Any] | None:
    try:
        info = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


async def live_nodes(store: ClusterStore, role: str) -> dict[str, dict[str, Any]]:
    """The registered nodes of ``role`` now: id -> info."""
    out: dict[str, dict[str, Any]] = {}
    for e in await store.list(f"{NODES}{role}/"):
        info = _decode(e.value)
        if info is not None:
            out[e.key.rsplit("/", 1)[1]] = info
    return out


class NodeWatch:
    """The live nodes of one role, kept current by a watch.

    ``on_update(id, info)`` runs for a node that appeared or whose info
    changed, ``on_remove(id)`` for one that went; ``on_change(nodes)``
    after any change. A ``reset`` lists the nodes again and the callbacks
    see the difference, so a missed event never leaves a ghost behind.
    """

    def __init__(self, store: ClusterStore, role: str,
                 on_update: Callable[[str, dict[str, Any]], None] | None = None,
                 on_remove: Callable[[str], None] | None = None,
                 on_change: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> None:
        self.role = role
        self.nodes: dict[str, dict[str, Any]] = {}
        self.on_update = on_update
        self.on_remove = on_remove
        self.on_change = on_change
        self._watch = KeyWatch(store, f"{NODES}{role}/", on_change=self._sync)

    @property
    def changed(self) -> asyncio.Event:
        return self._watch.changed

    async def start(self) -> None:
        await self._watch.start()

    def _sync(self, watch: KeyWatch) -> None:
        now: dict[str, dict[str, Any]] = {}
        for key, e in watch.entries.items():
            info = _decode(e.value)
            if info is not None:
                now[key.rsplit("/", 1)[1]] = info
        gone = [i for i in self.nodes if i not in now]
        updated = [i for i, info in now.items() if self.nodes.get(i) != info]
        self.nodes = now
        for i in gone:
            if self.on_remove is not None:
                self.on_remove(i)
        for i in updated:
            if self.on_update is not None:
                self.on_update(i, now[i])
        if (gone or updated) and self.on_change is not None:
            self.on_change(now)

    async def aclose(self) -> None:
        await self._watch.aclose()


def worker_directory_watch(store: ClusterStore, directory: Any) -> NodeWatch:
    """A :class:`NodeWatch` on workers that keeps a gateway's worker
    directory current: ``directory.update(worker_id, address, ready)`` for
    a worker that appeared or changed (``address`` is its ``frames``
    address, ``ready`` its ready instances per ``"fn@v"``) and
    ``directory.remove(worker_id)`` for one that went. Call ``start()``."""

    def update(worker_id: str, info: dict[str, Any]) -> None:
        ready = info.get("ready")
        directory.update(worker_id, info.get("frames"),
                         {str(t): int(n) for t, n in ready.items()}
                         if isinstance(ready, dict) else {})

    return NodeWatch(store, "worker", on_update=update, on_remove=directory.remove)
