"""The control-plane parts of each kind of process, wired together.

A ``nimbus worker``, ``nimbus gateway`` or ``nimbus controller`` process
builds one of these beside its data-path parts, calls ``start()`` once its
own serving is up and ``aclose()`` first when it stops (so the region
forgets it before it drains, and nobody sends it new work meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nimbus.cluster.demand import DemandReporter, Shares
from nimbus.cluster.keys import ClusterStore
from nimbus.cluster.leader import ControlLoop
from nimbus.cluster.nodes import NodeWatch, Registration, worker_directory_watch
from nimbus.cluster.reconcile import Reconciler
from nimbus.store.base import Blobs
from nimbus.worker.worker import Worker

Info = Callable[[], dict[str, Any]]


def _merged(*parts: Info | None) -> Info:
    def info() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in parts:
            if part is not None:
                out.update(part())
        return out
    return info


class WorkerAgent:
    """A worker's registration (with its ready instances and budget) and
    the reconciler that keeps its pools at its placement. ``info`` adds the
    process's own fields (``frames``: the address gateways connect to)."""

    def __init__(self, store: ClusterStore, blobs: Blobs, worker: Worker, worker_id: str,
                 state_dir: Path, *, info: Info | None = None, ttl_s: float = 3.0) -> None:
        self.reconciler = Reconciler(store, blobs, worker, worker_id, state_dir,
                                     on_change=self._ready_changed)
        self.registration = Registration(store, "worker", worker_id,
                                         _merged(info, self.reconciler.info), ttl_s=ttl_s)

    def _ready_changed(self) -> None:
        self.registration.refresh()

    async def start(self) -> None:
        await self.reconciler.start()
        await self.registration.start()

    async def aclose(self) -> None:
        await self.registration.aclose()  # gateways stop sending work here first
        await self.reconciler.aclose()


class GatewayAgent:
    """A gateway's registration, its demand reports, its view of the
    workers (fed into ``directory``: ``update(id, address, ready)`` and
    ``remove(id)``) and of its shares of region-wide caps."""

    def __init__(self, store: ClusterStore, gateway_id: str,
                 invokers: Callable[[], Mapping[str, Any]], directory: Any, *,
                 info: Info | None = None, ttl_s: float = 3.0,
                 interval_s: float = 0.5, shares: Shares | None = None) -> None:
        self.registration = Registration(store, "gateway", gateway_id, info, ttl_s=ttl_s)
        self.demand = DemandReporter(store, gateway_id, invokers, interval_s=interval_s)
        self.workers: NodeWatch = worker_directory_watch(store, directory)
        self.shares = shares or Shares(store, gateway_id)

    def share(self, target: str, cap: int) -> int:
        """This gateway's part of ``cap`` for ``target`` (``"fn@v"``)."""
        return self.shares.share(target, cap)

    def nudge(self) -> None:
        """Report demand now (a request is held with no ready instance)."""
        self.demand.nudge()

    async def start(self) -> None:
        await self.workers.start()
        await self.shares.start()
        await self.registration.start()
        await self.demand.start()

    async def aclose(self) -> None:
        await self.registration.aclose()
        await self.demand.aclose()
        await self.shares.aclose()
        await self.workers.aclose()


class ControllerAgent:
    """A controller's registration and the leader's control loop (which
    runs only while this controller leads). ``on_gain``/``on_loss`` start
    and stop other leader-only work (the event scheduler)."""

    def __init__(self, store: ClusterStore, node_id: str, *, info: Info | None = None,
                 ttl_s: float = 3.0, tick_s: float = 0.5,
                 on_gain: Callable[[int], None] | None = None,
                 on_loss: Callable[[], None] | None = None) -> None:
        self.registration = Registration(store, "controller", node_id, info, ttl_s=ttl_s)
        self.loop = ControlLoop(store, node_id, ttl_s=ttl_s, tick_s=tick_s, on_gain=on_gain,
                                on_loss=on_loss)

    @property
    def is_leader(self) -> bool:
        return self.loop.is_leader

    async def start(self) -> None:
        await self.registration.start()
        await self.loop.start()

    async def aclose(self) -> None:
        await self.loop.aclose()  # resigns: a standby leads at once
        await self.registration.aclose()
