"""The instances of one function version, and how an invocation gets one.

Dispatch picks the ready instance with the fewest outstanding invocations.
When every instance is full the request is held (at most ``max_queue`` of
them, each until its deadline) and, if the pool may grow, one more instance
starts: simultaneous cold starts coalesce, a pool never starts more
instances than there are held requests. Held requests get slots in arrival
order as instances free up or become ready. Past ``max_concurrency`` (or
``max_instances x concurrency``) and the queue bound, requests are answered
429 with ``Retry-After``.

How many instances a pool keeps is the autoscaler's decision
(:mod:`nimbus.autoscale.decider`); the pool carries it out with
:meth:`FunctionPool.scale_to`. Instances chosen for removal take no new
requests and stop only after their in-flight ones finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nimbus.autoscale.decider import Decider, Decision, ScalingConfig
from nimbus.errors import ClosedError, InstanceDiedError, ThrottledError
from nimbus.observe import metrics, tracing
from nimbus.observe.platformlog import ThrottleNotes
from nimbus.worker.deps import BASE, DepSet
from nimbus.worker.instance import InitError, Instance
from nimbus.worker.target import Target

log = logging.getLogger("nimbus.worker")

Starter = Callable[["FunctionPool"], Awaitable[Instance]]

# How long a request may be held for an instance beyond its own timeout.
ACQUIRE_GRACE_S = 10.0
STOP_GRACE_S = 1.0
_clock = time.perf_counter


def scaling_config(target: Target) -> ScalingConfig:
    s = target.spec
    assert s.target_concurrency is not None and s.panic_window_s is not None  # resolved on load
    return ScalingConfig(
        target_concurrency=s.target_concurrency, max_instances=s.max_instances,
        min_instances=s.min_instances, stable_window_s=s.stable_window_s,
        panic_window_s=s.panic_window_s, scale_to_zero_after_s=s.scale_to_zero_after_s)


class FunctionPool:
    def __init__(self, target: Target, starter: Starter,
                 log: Callable[..., None] | None = None,
                 admit: Callable[[FunctionPool], None] | None = None) -> None:
        spec = target.spec
        self.target = target
        self.timeout_s = spec.timeout_s
        self.max_instances = spec.max_instances
        self.cap = min(spec.max_concurrency or spec.max_instances * spec.concurrency,
                       spec.max_instances * spec.concurrency)
        self.max_queue = spec.max_queue
        self.instances: list[Instance] = []
        self.deps: DepSet = BASE  # the zygote it forks from; set by the worker
        self.decider = Decider(scaling_config(target))
        self.decision: Decision | None = None
        self.retired = False
        # figures the autoscaler and `nimbus status` read
        self.in_flight = 0
        self.arrivals = 0  # since the autoscaler's last sample
        self.cold_starts = 0
        self.throttles = 0
        self._starter = starter
        self._admit = admit  # raises ThrottledError when the node has no room
        self._log = log
        self._throttle_notes = ThrottleNotes(self.log)
        self._starting = 0
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs to background work
        # this version's counters, bound once (see nimbus.observe.metrics)
        self.metrics = metrics.invocation_stats(target.function, target.version)
        self._cold = metrics.cold_start(target.function, target.version)
        # instance id -> (fork asked, READY) in ns, for the first traced
        # request it serves (its cold start span); only while tracing is on
        self._cold_spans: dict[str, tuple[int, int]] = {}

    # -- the request path ---------------------------------------------------

    async def invoke(self, rid: str, event: Any) -> Any:
        if tracing.on:
            return await self._invoke_traced(rid, event)
        self.arrivals += 1
        inst = self._pick() if self.in_flight < self.cap else None
        if inst is None:
            try:
                inst = await self._acquire_slow()  # its slot comes reserved
            except BaseException as exc:
                self.metrics.failed(exc)  # throttled, or its instance failed to start
                raise
        else:
            inst.outstanding += 1
            self.in_flight += 1
        t0 = _clock()
        try:
            result = await inst.invoke(rid, event, self.timeout_s)
        except BaseException as exc:
            self.metrics.failed(exc, _clock() - t0)
            raise
        else:
            self.metrics.succeeded(_clock() - t0)
            return result
        finally:
            inst.outstanding -= 1
            self.in_flight -= 1
            self._released(inst)

    async def _invoke_traced(self, rid: str, event: Any) -> Any:
        """:meth:`invoke` with its steps recorded as spans of the request
        (when it has one: see :func:`tracing.parent_of`)."""
        parent = tracing.parent_of(rid, event)
        self.arrivals += 1
        inst = self._pick() if self.in_flight < self.cap else None
        if inst is None:
            # held here, not in a coroutine of its own: one frame less for
            # every held request
            t0_ns = time.time_ns()
            try:
                inst = await self._acquire_slow()
            except BaseException as exc:
                if parent is not None:
                    self._held(parent, t0_ns, None, exc)
                self.metrics.failed(exc)
                raise
            if parent is not None:
                self._held(parent, t0_ns, inst, None)
        else:
            inst.outstanding += 1
            self.in_flight += 1
        t0 = _clock()
        t0_ns = time.time_ns()
        error = None
        try:
            result = await inst.invoke(rid, event, self.timeout_s)
        except BaseException as exc:
            self.metrics.failed(exc, _clock() - t0)
            error = f"{type(exc).__name__}: {exc}"
            raise
        else:
            self.metrics.succeeded(_clock() - t0)
            return result
        finally:
            inst.outstanding -= 1
            self.in_flight -= 1
            self._released(inst)
            if parent is not None:
                tracing.child(parent, "nimbus.invoke", t0_ns, time.time_ns(), error,
                              {"nimbus.instance": inst.id,
                               "nimbus.function": self.target.function,
                               "nimbus.version": self.target.version})

    async def _held_traced(self, parent: tracing.Span) -> Instance:
        t0 = time.time_ns()
        try:
            inst = await self._acquire_slow()
        except BaseException as exc:
            self._held(parent, t0, None, exc)
            raise
        self._held(parent, t0, inst, None)
        return inst

    def _held(self, parent: tracing.Span, t0: int, inst: Instance | None,
              exc: BaseException | None) -> None:
        """The hold span (and the cold start of the instance it got, if the
        instance was started for it)."""
        if inst is None:
            tracing.child(parent, "nimbus.hold", t0, time.time_ns(),
                          f"{type(exc).__name__}: {exc}")
            return
        tracing.child(parent, "nimbus.hold", t0, time.time_ns())
        if self._cold_spans:
            cold = self._cold_spans.pop(inst.id, None)
            if cold is not None:
                tracing.child(parent, "nimbus.cold_start", cold[0], cold[1],
                              attrs={"nimbus.instance": inst.id})

    # The same, for callers that answer from a callback (the frame server):
    # no coroutine and no task per invocation when an instance is free.

    def start(self, rid: str, event: Any, timeout_s: float | None = None
              ) -> asyncio.Future[Any] | None:
        """Hand the invocation to a free instance now and return its future
        (the pool's figures are settled when it is done), or None when it
        would have to wait: then :meth:`start_when_free`. ``timeout_s``
        may shorten the function's timeout, never lengthen it."""
        if self.in_flight >= self.cap:
            return None
        inst = self._pick()
        if inst is None:
            return None
        self.arrivals += 1
        inst.outstanding += 1
        self.in_flight += 1
        if tracing.on:
            return self._traced_run(inst, rid, event, timeout_s, None)
        return self._run(inst, rid, event, timeout_s)

    async def start_when_free(self, rid: str, event: Any,
                              timeout_s: float | None = None) -> asyncio.Future[Any]:
        """Wait as :meth:`invoke` does for an instance (held, bounded, may
        start one), then hand it the invocation and return its future.
        Cancelling while it waits leaves no trace: the invocation never ran."""
        if tracing.on:
            return await self._start_when_free_traced(rid, event, timeout_s)
        self.arrivals += 1
        inst = self._pick() if self.in_flight < self.cap else None
        if inst is None:
            try:
                inst = await self._acquire_slow()
            except BaseException as exc:
                self.metrics.failed(exc)  # cancelled while held: not counted
                raise
        else:
            inst.outstanding += 1
            self.in_flight += 1
        return self._run(inst, rid, event, timeout_s)

    async def _start_when_free_traced(self, rid: str, event: Any,
                                      timeout_s: float | None) -> asyncio.Future[Any]:
        parent = tracing.parent_of(rid, event)
        self.arrivals += 1
        inst = self._pick() if self.in_flight < self.cap else None
        if inst is None:
            try:
                inst = await (self._held_traced(parent) if parent is not None
                              else self._acquire_slow())
            except BaseException as exc:
                self.metrics.failed(exc)
                raise
        else:
            inst.outstanding += 1
            self.in_flight += 1
        return self._traced_run(inst, rid, event, timeout_s, parent)

    def _traced_run(self, inst: Instance, rid: str, event: Any, timeout_s: float | None,
                    parent: tracing.Span | None) -> asyncio.Future[Any]:
        """:meth:`_run` with the instance call as a span (the callers that
        answer from a callback: a worker serving remote gateways)."""
        if parent is None:
            parent = tracing.parent_of(rid, event)
        t0 = time.time_ns()
        fut = self._run(inst, rid, event, timeout_s)
        if parent is not None:
            attrs = {"nimbus.instance": inst.id, "nimbus.function": self.target.function,
                     "nimbus.version": self.target.version}

            def done(f: asyncio.Future[Any]) -> None:
                exc = None if f.cancelled() else f.exception()
                tracing.child(parent, "nimbus.invoke", t0, time.time_ns(),
                              None if exc is None else f"{type(exc).__name__}: {exc}", attrs)
            fut.add_done_callback(done)
        return fut

    def _run(self, inst: Instance, rid: str, event: Any,
             timeout_s: float | None) -> asyncio.Future[Any]:
        # the slot on ``inst`` is already counted
        limit = self.timeout_s if timeout_s is None or not 0 < timeout_s < self.timeout_s \
            else timeout_s
        try:
            fut = inst.invoke(rid, event, limit)
        except BaseException as exc:
            inst.outstanding -= 1
            self.in_flight -= 1
            self._released(inst)
            self.metrics.failed(exc)
            raise
        t0 = _clock()
        fut.add_done_callback(lambda f: self._finished(inst, f, t0))
        return fut

    def _finished(self, inst: Instance, fut: asyncio.Future[Any], t0: float) -> None:
        inst.outstanding -= 1
        self.in_flight -= 1
        self._released(inst)
        if fut.cancelled():
            return  # its caller gave up: the answer, if any, went nowhere
        exc = fut.exception()
        if exc is None:
            self.metrics.succeeded(_clock() - t0)
        else:
            self.metrics.failed(exc, _clock() - t0)

    def _pick(self) -> Instance | None:
        best = None
        low = 1 << 30
        for inst in self.instances:
            n = inst.outstanding
            if n < low and n < inst.capacity:
                best, low = inst, n
                if n == 0:
                    break
        return best

    async def _acquire_slow(self) -> Instance:
        if self.retired and not self.instances and not self._starting:
            raise ClosedError(f"{self.target.function} version {self.target.version} was retired")
        # Requests within the cap may wait for an instance to start; past the
        # cap, at most max_queue wait for a slot to free.
        if self.in_flight + len(self._waiters) >= self.cap + self.max_queue:
            self._throttled("at the concurrency limit with the queue full")
            raise ThrottledError(
                f"{self.target.function} is at its concurrency limit ({self.cap}) and "
                f"{len(self._waiters)} requests are waiting", retry_after_s=1)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Instance] = loop.create_future()
        self._waiters.append(waiter)
        if self._may_grow() and self._starting < len(self._waiters):
            self._start_one()
        # A bare timer rather than asyncio.wait_for: held requests are common
        # under load, and wait_for costs a task wake-up more per request.
        timer = loop.call_later(self.timeout_s + ACQUIRE_GRACE_S, _expire, waiter)
        try:
            return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # handed a slot in the same instant we gave up: give it back
                inst = waiter.result()
                inst.outstanding -= 1
                self.in_flight -= 1
                self._released(inst)
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                self._throttled("held until their deadline")
                raise ThrottledError(
                    f"no instance of {self.target.function} became free in time") from None
            raise
        finally:
            timer.cancel()

    def _throttled(self, reason: str) -> None:
        self.throttles += 1
        self._throttle_notes.hit(reason)

    def _may_grow(self) -> bool:
        n = len(self.instances) + self._starting
        return (not self.retired and n < self.max_instances
                and n * self.target.spec.concurrency < self.cap)

    def _released(self, inst: Instance) -> None:
        """Give ``inst``'s free slots to held requests, oldest first."""
        if inst.draining or not inst.alive:
            return
        while inst.outstanding < inst.capacity and self.in_flight < self.cap and self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                inst.outstanding += 1  # reserved now, so no one else takes it
                self.in_flight += 1
                w.set_result(inst)

    # -- growth, shrinking and loss -------------------------------------------

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_one(self) -> None:
        # Admission is decided here, synchronously, before the start is
        # counted: a start the node cannot afford never shows as "starting".
        try:
            if self._admit is not None:
                self._admit(self)
        except ThrottledError as exc:
            log.warning("not starting %s v%d: %s", self.target.function,
                        self.target.version, exc)
            self._throttle_notes.hit("no room on this node for another instance")
            self._fail_waiters(exc)
            return
        self._starting += 1
        self._background(self._start())

    def _fail_waiters(self, exc: BaseException) -> None:
        """A start failed: the held requests fail too, unless other instances
        are there or on their way to take them."""
        if self.instances or self._starting:
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(exc if isinstance(exc, Exception)
                                else InstanceDiedError("instance start failed"))

    async def _start(self) -> None:
        t0 = _clock()
        t0_ns = time.time_ns()
        try:
            inst = await self._starter(self)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiters
            self._starting -= 1
            log.warning("starting %s v%d failed: %s", self.target.function,
                        self.target.version, exc)
            if not isinstance(exc, InitError):  # that one wrote its own line
                self.log(None, "platform", f"an instance failed to start: {exc}", "ERROR")
            self._fail_waiters(exc)
            return
        self._starting -= 1
        self.cold_starts += 1
        self._cold.observe(_clock() - t0)
        if tracing.on and self._waiters:  # the first held request takes it
            self._cold_spans[inst.id] = (t0_ns, time.time_ns())
        if self.retired and not self._waiters:
            await inst.stop(STOP_GRACE_S)
            return
        self.instances.append(inst)
        self._released(inst)

    async def ensure_warm(self) -> Instance:
        """Start one instance now (deploy warm-up); raises if it fails to start."""
        if self._admit is not None:
            self._admit(self)
        self._starting += 1
        t0 = _clock()
        try:
            inst = await self._starter(self)
        finally:
            self._starting -= 1
        self.cold_starts += 1
        self._cold.observe(_clock() - t0)
        self.instances.append(inst)
        return inst

    def lost(self, inst: Instance) -> None:
        """The instance's process went away (crash, timeout kill, memory)."""
        self._cold_spans.pop(inst.id, None)
        if inst in self.instances:
            self.instances.remove(inst)
        if self._waiters and not self._starting and self._may_grow():
            self._start_one()  # the held requests need somewhere to go

    def scale_to(self, desired: int) -> None:
        """Carry out the autoscaler's decision: start instances up to
        ``desired``, or retire the idlest down to it (they drain first)."""
        current = len(self.instances) + self._starting
        limit = min(self.max_instances, -(-self.cap // self.target.spec.concurrency))
        for _ in range(min(desired, limit) - current):
            self._start_one()
        surplus = len(self.instances) - max(desired, 0)
        if surplus > 0:
            # idle first; among equals the least recently started
            victims = sorted(self.instances, key=lambda i: (i.outstanding, i.started_at))
            for inst in victims[:surplus]:
                self._retire_instance(inst)

    def place(self, n: int) -> None:
        """Placement mode: the region's leader wants ``n`` instances here.
        The pool starts or retires instances to match and, until told
        otherwise, never grows past ``n`` on its own (held requests wait for
        a slot instead of starting an instance the leader did not place)."""
        if n < 0:
            raise ValueError(f"instance count cannot be negative, was: {n!r}")
        self.max_instances = min(self.target.spec.max_instances, n)
        self.scale_to(n)

    def _retire_instance(self, inst: Instance) -> None:
        inst.draining = True
        self.instances.remove(inst)
        self._background(self._stop_when_idle(inst))

    async def _stop_when_idle(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s + STOP_GRACE_S
        while inst.outstanding and inst.alive and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await inst.stop(STOP_GRACE_S)

    def log(self, rid: str | None, stream: str, text: str, level: str | None = None,
            fields: dict[str, Any] | None = None) -> None:
        """A line in this function's logs."""
        if self._log is not None:
            self._log(rid, stream, text, level, fields)

    @property
    def held(self) -> int:
        """Requests waiting for an instance."""
        return len(self._waiters)

    @property
    def starting(self) -> int:
        """Instances being started."""
        return self._starting

    def take_arrivals(self) -> int:
        n, self.arrivals = self.arrivals, 0
        return n

    def stats(self) -> dict[str, Any]:
        d = self.decision
        return {
            "concurrency": self.in_flight, "held": len(self._waiters),
            "ready": len(self.instances), "starting": self._starting,
            "desired": d.desired if d else None, "panic": d.panic if d else False,
            "stable_concurrency": round(d.stable_concurrency, 2) if d else 0.0,
            "cold_starts": self.cold_starts, "throttles": self.throttles,
        }

    # -- shutdown -----------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """Take no new requests from routing; finish the held and in-flight
        ones (up to their timeout plus ``grace_s``), then stop every instance."""
        self.retired = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s + ACQUIRE_GRACE_S + grace_s
        while (self.in_flight or self._waiters) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for w in self._waiters:
            if not w.done():
                w.set_exception(ClosedError("function version retired"))
        self._waiters.clear()
        insts = list(self.instances)
        self.instances.clear()
        for inst in insts:
            inst.draining = True
        await asyncio.gather(*(i.stop(grace_s) for i in insts))
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _expire(waiter: asyncio.Future[Instance]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
