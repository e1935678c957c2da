"""The node agent: one zygote, a pool per live function version, their logs."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
from pathlib import Path

from nimbus.errors import ClosedError, UnavailableError
from nimbus.observe.logs import LogSink
from nimbus.worker.instance import Instance, InstanceProtocol
from nimbus.worker.pool import FunctionPool
from nimbus.worker.target import Target
from nimbus.worker.zygote_client import ZygoteClient

log = logging.getLogger("nimbus.worker")

# Importing a handler module (and its requirements) may take a while.
READY_TIMEOUT_S = 30.0


class Worker:
    def __init__(self, state_dir: Path, logs: LogSink) -> None:
        self.state_dir = state_dir
        self.logs = logs
        self.zygote = ZygoteClient()
        self.pools: dict[tuple[str, int], FunctionPool] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._closed = False
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.zygote.start()

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
            pool = self.pools[target.key] = FunctionPool(target, self._start_instance)
        return pool

    async def _start_instance(self, pool: FunctionPool) -> Instance:
        target = pool.target
        instance_id = f"{target.function}-{target.version}-{self._prefix}-{next(self._ids)}"
        spec = target.instance_spec(instance_id, self.state_dir)
        pid, sock = await self.zygote.fork(spec)
        fn = target.function
        holder: list[Instance] = []

        def on_log(rid: str | None, stream: str, text: str) -> None:
            self.logs.write(fn, rid, stream, text)

        def on_lost() -> None:
            if holder:
                pool.lost(holder[0])
            shutil.rmtree(spec["tmp_dir"], ignore_errors=True)

        loop = asyncio.get_running_loop()
        try:
            _t, proto = await loop.connect_accepted_socket(
                lambda: InstanceProtocol(on_log, on_lost), sock=sock
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

    def discard(self, targets: list[Target]) -> None:
        """Stop the pools of ``targets`` (a deploy that failed after warming them)."""
        for t in targets:
            pool = self.pools.get(t.key)
            if pool is not None and pool.target == t:
                self._drain(self.pools.pop(t.key), 0.5)

    def _drain(self, pool: FunctionPool, grace_s: float) -> None:
        task = asyncio.get_running_loop().create_task(pool.drain(grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def instances(self) -> list[tuple[FunctionPool, Instance]]:
        return [(pool, inst) for pool in self.pools.values() for inst in pool.instances]

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Drain every pool, stop every instance, then the zygote. Idempotent."""
        if self._closed:
            return
        self._closed = True
        pools = list(self.pools.values())
        self.pools.clear()
        await asyncio.gather(*(p.drain(grace_s) for p in pools), *self._retiring,
                             return_exceptions=True)
        await self.zygote.aclose(grace_s)
        self.logs.close()
