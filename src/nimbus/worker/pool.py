"""The instances of one function version, and how an invocation gets one.

Dispatch picks the ready instance with the fewest outstanding invocations.
When every instance is full and the pool may grow, it starts one more; the
request waits (with a deadline) for whichever frees first: the new
instance or a busy one. Simultaneous cold starts coalesce: a pool never
starts more instances than there are waiting requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nimbus.errors import ClosedError, InstanceDiedError, ThrottledError
from nimbus.worker.instance import Instance
from nimbus.worker.target import Target

log = logging.getLogger("nimbus.worker")

Starter = Callable[["FunctionPool"], Awaitable[Instance]]

# How long a request may wait for an instance beyond its own timeout.
ACQUIRE_GRACE_S = 10.0


class FunctionPool:
    def __init__(self, target: Target, starter: Starter) -> None:
        self.target = target
        self.timeout_s = target.spec.timeout_s
        self.max_instances = target.spec.max_instances
        self.instances: list[Instance] = []
        self._starter = starter
        self._starting = 0
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        self.retired = False
        self.cold_starts = 0
        self.last_start_error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs to start tasks

    # -- the request path ---------------------------------------------------

    async def invoke(self, rid: str, event: Any) -> Any:
        inst = self._pick()
        if inst is None:
            inst = await self._acquire_slow()  # its slot comes reserved
        else:
            inst.outstanding += 1
        try:
            return await inst.invoke(rid, event, self.timeout_s)
        finally:
            inst.outstanding -= 1
            self._released(inst)

    def _pick(self) -> Instance | None:
        best = None
        low = 1 << 30
        for inst in self.instances:
            n = inst.outstanding
            if n < low and n < inst.capacity and not inst.draining:
                best, low = inst, n
                if n == 0:
                    break
        return best

    async def _acquire_slow(self) -> Instance:
        if self.retired:
            raise ClosedError(f"{self.target.function} version {self.target.version} was retired")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Instance] = loop.create_future()
        self._waiters.append(waiter)
        if len(self.instances) + self._starting < self.max_instances and \
                self._starting < len(self._waiters):
            self._start_one()
        try:
            return await asyncio.wait_for(waiter, self.timeout_s + ACQUIRE_GRACE_S)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # handed a slot in the same instant we gave up: give it back
                inst = waiter.result()
                inst.outstanding -= 1
                self._released(inst)
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise ThrottledError(
                    f"no instance of {self.target.function} became free in time") from None
            raise

    def _hand_over(self, inst: Instance) -> bool:
        """Give one of ``inst``'s free slots to the oldest waiting request."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                inst.outstanding += 1  # reserved now, so no one else takes it
                w.set_result(inst)
                return True
        return False

    def _released(self, inst: Instance) -> None:
        if inst.draining or not inst.alive:
            return
        while inst.outstanding < inst.capacity and self._hand_over(inst):
            pass

    # -- growth and loss ----------------------------------------------------

    def _start_one(self) -> None:
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        try:
            inst = await self._starter(self)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiters
            self._starting -= 1
            self.last_start_error = exc
            log.warning("starting %s v%d failed: %s", self.target.function,
                        self.target.version, exc)
            if self.instances or self._starting:
                return  # the waiting requests still have instances to wait for
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(exc if isinstance(exc, Exception)
                                    else InstanceDiedError("instance start failed"))
            return
        self._starting -= 1
        self.cold_starts += 1
        if self.retired:
            await inst.stop(0.5)
            return
        self.instances.append(inst)
        self._released(inst)  # its free slots go to the waiting requests

    async def ensure_warm(self) -> Instance:
        """Start one instance now (deploy warm-up); raises if it fails to start."""
        inst = await self._starter(self)
        self.cold_starts += 1
        self.instances.append(inst)
        return inst

    def lost(self, inst: Instance) -> None:
        """The instance's process went away (crash, timeout kill, memory)."""
        if inst in self.instances:
            self.instances.remove(inst)
        if not inst.draining and not self.retired and not self.instances and not self._starting:
            # Replace it now so that the next request finds a warm instance.
            self._start_one()

    # -- shutdown -----------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """Take no new requests; stop each instance once its invocations end
        (or after their timeout plus ``grace_s``)."""
        self.retired = True
        for w in self._waiters:
            if not w.done():
                w.set_exception(ClosedError("function version retired"))
        self._waiters.clear()
        insts = list(self.instances)
        for inst in insts:
            inst.draining = True
        deadline = asyncio.get_running_loop().time() + self.timeout_s + grace_s
        while any(i.outstanding and i.alive for i in insts):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(*(i.stop(grace_s) for i in insts))
        self.instances.clear()
