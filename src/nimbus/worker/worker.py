"""The node agent: a zygote per dependency set, a pool per live function
version, their logs."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from nimbus.errors import ClosedError, ThrottledError, UnavailableError
from nimbus.observe.protocols import LogSink
from nimbus.worker.autoscaler import Autoscaler, AutoscalerConfig
from nimbus.worker.budget import NodeBudget, Usage, admit
from nimbus.worker.containment import Containment
from nimbus.worker.deps import BASE, DepSet, dependency_set
from nimbus.worker.instance import Instance, InstanceProtocol
from nimbus.worker.pool import FunctionPool
from nimbus.worker.target import Target
from nimbus.worker.tmpwatch import TmpWatch
from nimbus.worker.zygote_client import ZygoteClient

log = logging.getLogger("nimbus.worker")

# Importing a handler module (and its requirements) may take a while.
READY_TIMEOUT_S = 30.0
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Worker:
    def __init__(self, state_dir: Path, logs: LogSink, budget: NodeBudget | None = None,
                 autoscaler: AutoscalerConfig | None = None,
                 containment: Containment | None = None, node_id: str | None = None,
                 autoscale: bool = True) -> None:
        """``autoscale=False``: the region's leader decides how many instances
        each pool has (placement, see :mod:`nimbus.cluster.reconcile`); the
        worker's own autoscaler does not run, so the two never fight."""
        self.state_dir = state_dir
        self.autoscale = autoscale
        self.autoscaler: Autoscaler | None = None
        self.logs = logs
        self.budget = budget or NodeBudget()
        self._autoscaler_config = autoscaler or AutoscalerConfig()
        self.containment = containment or Containment.create(state_dir, "rlimits")
        self.zygotes: dict[DepSet, ZygoteClient] = {
            BASE: ZygoteClient(contain=self.containment.zygote_config(()))}
        self.pools: dict[tuple[str, int], FunctionPool] = {}
        self._ids = itertools.count(1)
        # Instance ids are unique region-wide: they carry the node's id (a
        # worker process of its own gets one; alone, the pid is enough).
        if node_id is not None and not _NODE_ID.fullmatch(node_id):
            raise ValueError(f"node id {node_id!r} must be 1-64 letters, digits, '.', '_' or "
                             "'-' (it names instances, their folders and cgroups)")
        self.node_id = node_id or f"{os.getpid():x}"
        self._closed = False
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.zygotes[BASE].start()
        if self.autoscale:
            self.autoscaler = Autoscaler(self.pools, self._autoscaler_config)
            self.autoscaler.start()
        self.tmp_watch = TmpWatch(
            self.pools, lambda inst: self.containment.instance_tmp(inst.id, inst.pid))
        self.tmp_watch.start()

    def _make_room(self, pool: FunctionPool) -> None:
        """Apply the node budget before ``pool`` starts one more instance:
        reclaim idle instances of functions above their fair share, or
        refuse (ThrottledError)."""
        for _ in range(len(self.pools) + 1):
            usages = [Usage(p, len(p.instances) + p.starting + int(p is pool),
                            sum(1 for i in p.instances if not i.outstanding),
                            p.target.spec.memory_mb, p.in_flight + p.held)
                      for p in self.pools.values()]
            verdict = admit(self.budget, usages, pool)
            if verdict.verdict == "start":
                return
            if verdict.verdict == "deny":
                raise ThrottledError(f"cannot start {pool.target.function}: {verdict.reason}")
            victim = verdict.victim
            assert isinstance(victim, FunctionPool)
            victim.scale_to(len(victim.instances) - 1)  # takes an idle one first
        raise ThrottledError(f"cannot start {pool.target.function}: node budget full")

    def _zygote_for(self, deps: DepSet) -> ZygoteClient:
        z = self.zygotes.get(deps)
        if z is None:  # started by its first fork
            z = self.zygotes[deps] = ZygoteClient(
                deps.sys_path, deps.preload, self.containment.zygote_config(deps.venvs))
        return z

    def pool(self, target: Target) -> FunctionPool:
        """The pool for ``target``, created on first use (no instance yet)."""
        if self._closed:
            raise ClosedError("worker is closed")
        pool = self.pools.get(target.key)
        if pool is not None and pool.target != target:
            # A number reused after a failed deploy: the old pool runs other code.
            self._drain(self.pools.pop(target.key), 0.5)
            pool = None
        if pool is None:
            fn = target.function
            pool = self.pools[target.key] = FunctionPool(
                target, self._start_instance,
                functools.partial(self.logs.write, fn),
                admit=self._make_room)
            pool.deps = dependency_set(target, self.state_dir, self.containment)
        return pool

    async def _start_instance(self, pool: FunctionPool) -> Instance:
        target = pool.target
        instance_id = f"{target.function}-{target.version}-{self.node_id}-{next(self._ids)}"
        spec = target.instance_spec(instance_id, self.state_dir, self.containment)
        pid, sock = await self._zygote_for(pool.deps).fork(spec)
        holder: list[Instance] = []

        def on_lost() -> None:
            if holder:
                pool.lost(holder[0])
            # Whatever the instance started goes with it, and its /tmp.
            self._later(self.containment.release(instance_id, pid))

        loop = asyncio.get_running_loop()
        try:
            _t, proto = await loop.connect_accepted_socket(
                lambda: InstanceProtocol(pool.log, on_lost), sock=sock
            )
        except OSError as exc:
            sock.close()
            raise UnavailableError("could not attach to the new instance") from exc
        inst = Instance(instance_id, pid, target.key, proto, target.spec.concurrency)
        holder.append(inst)
        try:
            await asyncio.wait_for(asyncio.shield(proto.ready), READY_TIMEOUT_S)
        except BaseException:
            inst.kill()
            raise
        log.info("instance %s started (pid %d)", instance_id, pid)
        return inst

    def retire(self, keep: set[tuple[str, int]], grace_s: float = 1.0) -> None:
        """Drain and stop the pools of every version not in ``keep``."""
        for key in [k for k in self.pools if k not in keep]:
            self._drain(self.pools.pop(key), grace_s)
        live = {p.deps for p in self.pools.values()}
        for deps in [d for d in self.zygotes if d not in live and d != BASE]:
            # Its instances die with it (PDEATHSIG): stop it only after every
            # drain under way has finished.
            self._later(self._close_after_drains(self.zygotes.pop(deps), grace_s))

    async def _close_after_drains(self, zygote: ZygoteClient, grace_s: float) -> None:
        draining = [t for t in self._retiring if t is not asyncio.current_task()]
        await asyncio.gather(*draining, return_exceptions=True)
        await zygote.aclose(grace_s)
        await self.containment.prune()

    def discard(self, targets: list[Target]) -> None:
        """Stop the pools of ``targets`` (a deploy that failed after warming them)."""
        for t in targets:
            pool = self.pools.get(t.key)
            if pool is not None and pool.target == t:
                self._drain(self.pools.pop(t.key), 0.5)

    def _drain(self, pool: FunctionPool, grace_s: float) -> None:
        pool.retired = True  # from now, not when the drain's task first runs
        self._later(pool.drain(grace_s))

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Drain every pool, stop every instance, then the zygote. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.autoscaler is not None:
            await self.autoscaler.aclose()
        await self.tmp_watch.aclose()
        pools = list(self.pools.values())
        self.pools.clear()
        await asyncio.gather(*(p.drain(grace_s) for p in pools), *self._retiring,
                             return_exceptions=True)
        await asyncio.gather(*(z.aclose(grace_s) for z in self.zygotes.values()))
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.containment.aclose()
        self.logs.close()
