"""Running queued work: one consumer per subscription, each with its own slots.

A consumer runs at most as many invocations at once as its function may
(the pool's cap: ``max_concurrency`` or ``max_instances x concurrency``;
for queue triggers, that many batches). It leases ahead of that, so the
next invocation starts the moment a slot frees instead of after a queue
round trip: as many as its slots get through in ``LEASE_WAIT_BUDGET_S`` at
the run time it has observed (:func:`lease_ahead`), and the lease covers
that wait. A message whose lease could run out before its run would end is
given back (released, not counted) instead of run. Each message is
settled after its invocation, outside the slot (the settle's disk write
overlaps the next run and shares its commit with the others): ack with
the result, retry later with backoff, release when throttled (not
counted), or dead-letter; the message row is also the invocation record,
so settling and recording are one write.

A try counts when its handler starts, not when its message is leased: the
message's try is begun (:meth:`Delivery.begin`) in its slot, right before the
pool is handed it. Work given back before that (lease too short, stopping,
throttled, redeployed) costs no try; a run cut short after it (nimbus
killed or stopped) costs exactly that one. A delivery that arrives with its
tries already used up (its last run was cut short) is given up without
running, so a function with ``retries: N`` runs at most N + 1 times.
Destinations are sent before the settlement, so a crash at any point
repeats work instead of losing it (at-least-once; a repeated destination is
dropped by its dedup key).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from nimbus.errors import (
    ClosedError,
    ConflictError,
    NimbusError,
    ThrottledError,
    UnavailableError,
)
from nimbus.events.names import Subscription, invoke_queue, topic_queue, user_queue
from nimbus.events.retry import RetryPolicy, next_retry, too_old
from nimbus.events.shapes import destination_record, sns_event, sqs_event
from nimbus.gateway.split import Split
from nimbus.ids import new_id
from nimbus.observe import metrics, tracing
from nimbus.store.queue import Delivery, Message, Outgoing
from nimbus.worker.pool import ACQUIRE_GRACE_S

if TYPE_CHECKING:
    from nimbus.clock import Clock
    from nimbus.manifest.model import FunctionSpec
    from nimbus.worker.pool import FunctionPool

log = logging.getLogger("nimbus.events")

PIN = "nimbus.version"  # the attribute of an async invocation pinned to a version
WAIT_S = 5.0  # one receive's long-poll
VISIBILITY_MARGIN_S = 20.0  # beyond timeout_s: a held request may wait for an instance
RELEASE_DELAY_S = 0.05  # a retired pool's message goes to the new version
NO_FUNCTION_DELAY_S = 5.0
BEGIN_FAILED_DELAY_S = 1.0  # the try could not be marked: given back, not run
MAX_LEASE = 256
LEASE_WAIT_BUDGET_S = 30.0  # how long a leased message may wait for a slot
RUN_S_WEIGHT = 0.2  # of the latest run in the moving average of run time


def lease_ahead(cap: int, run_s: float | None, timeout_s: float) -> int:
    """How many messages (or batches) a consumer holds leased: what its
    ``cap`` slots get through in ``LEASE_WAIT_BUDGET_S`` at the observed run
    time (the timeout until a run is observed), capped at ``MAX_LEASE``, and
    never fewer than ``cap``."""
    per_run = max(run_s if run_s is not None else timeout_s, 1e-4)
    return max(cap, min(MAX_LEASE, int(cap * LEASE_WAIT_BUDGET_S / per_run)))


def run_bound_s(timeout_s: float) -> float:
    """The longest a started invocation can take: the pool may hold it for an
    instance (``timeout_s + ACQUIRE_GRACE_S``), then it runs (``timeout_s``)."""
    return 2 * timeout_s + ACQUIRE_GRACE_S + VISIBILITY_MARGIN_S


def lease_s(timeout_s: float) -> float:
    """The visibility of a lease: the wait for a slot, then one invocation."""
    return LEASE_WAIT_BUDGET_S + run_bound_s(timeout_s)


class GiveBack(Exception):
    """Not run: the message goes back to its queue after ``delay_s``, not
    counted as a try (its lease could end before the run would, the
    dispatcher is stopping, or its try could not be marked as begun)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s


class TooOld(Exception):
    """Not run: older than the function's ``max_event_age_s``."""


class Slots:
    """A function's running async invocations, shared by all its consumers:
    at most ``cap`` at once, handed on in arrival order. Learns the run time
    (a moving average of completed runs) that sets how far ahead to lease.
    :meth:`close` gives back every waiter at once."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.run_s: float | None = None
        self.closed = False
        self._free = cap
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def call(self, until: float, timeout_s: float,
                   invoke: Callable[[], Awaitable[Any]]) -> Any:
        """``await invoke()`` in a slot. Raises :class:`GiveBack`, without
        running it, when closed or when the lease (ending at loop time
        ``until``) could run out before the invocation would end."""
        if self.closed:
            raise GiveBack()
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._hand_on()  # a slot was handed to us; pass it on
                raise
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            if self.closed or start + run_bound_s(timeout_s) > until:
                raise GiveBack()
            timed = True
            try:
                return await invoke()
            except (ThrottledError, ClosedError, GiveBack):
                timed = False  # not a run: would drag the average to zero
                raise
            finally:
                if timed:
                    took = loop.time() - start
                    self.run_s = took if self.run_s is None else (
                        self.run_s + (took - self.run_s) * RUN_S_WEIGHT)
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    def close(self) -> None:
        self.closed = True
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(GiveBack())


def policy_of(spec: FunctionSpec) -> RetryPolicy:
    return RetryPolicy(spec.retries, spec.retry_delay_s, spec.max_event_age_s)


def error_body(exc: BaseException) -> dict[str, Any]:
    error = getattr(exc, "error", None)
    if isinstance(error, dict):
        return dict(error)
    name = type(exc).__name__
    if isinstance(exc, NimbusError):
        name = name.removesuffix("Error") or name
    return {"errorType": name, "errorMessage": str(exc) or name}


class Dispatcher:
    """Runs subscriptions against the live pools (``pools()``)."""

    def __init__(self, queue: Delivery, pools: Callable[[], dict[str, FunctionPool]],
                 clock: Clock,
                 version_of: Callable[[str, int], Any | None] | None = None,
                 alias_of: Callable[[str, str], Any | None] | None = None,
                 topic_subs: Callable[[], dict[str, list[str]]] | None = None) -> None:
        self.queue = queue
        self._pools = pools
        self._topic_subs = topic_subs  # topic -> its subscribers (topic destinations)
        self._version_of = version_of  # a referenced version's invoker (pinned work)
        self._alias_of = alias_of  # an alias's invoker (triggers that name one)
        self._clock = clock
        self._consumers: dict[str, _Consumer] = {}
        self._slots: dict[str, Slots] = {}
        self.stopping = False

    def sync(self, subs: dict[str, Subscription]) -> None:
        """Start consumers for new subscriptions; stop those that went away
        (their running invocations finish and settle)."""
        for name in list(self._consumers):
            if name not in subs or self._consumers[name].sub != subs[name]:
                self._consumers.pop(name).stop()
        for name, sub in subs.items():
            if name not in self._consumers:
                metrics.async_known(sub.function)
                c = self._consumers[name] = _Consumer(self, sub)
                c.start()

    def slots_for(self, function: str, cap: int) -> Slots:
        """The function's slots; new ones if its cap changed (a redeploy):
        work already waiting finishes under the old ones."""
        slots = self._slots.get(function)
        if slots is None or slots.cap != cap:
            slots = self._slots[function] = Slots(cap)
        return slots

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop: no new receives; work not yet started goes back to its queue
        at once (not counted); running invocations get ``grace_s`` to finish
        and settle (one whose instance the pools' closing takes away counts
        its try, ``Interrupted``). What is still running after that stays
        leased with its try begun: that try counts, and the message is
        delivered again when its lease ends (sooner on the embedded queue,
        whose next start recovers what it had leased)."""
        self.stopping = True
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for c in consumers:
            c.stop()
        for slots in self._slots.values():
            slots.close()
        await asyncio.gather(*(c.wait_idle(grace_s) for c in consumers))

    # -- one message / one batch ----------------------------------------------

    async def run_one(self, sub: Subscription, m: Message, slots: Slots, until: float) -> None:
        pool = self._pools().get(sub.function)
        if pool is None:
            await self._release([m], NO_FUNCTION_DELAY_S)
            return
        spec = pool.target.spec
        if sub.kind == "topic":
            payload: Any = sns_event(m, sub.source, sub.function)
        else:
            payload = orjson.loads(m.body)
        policy = policy_of(spec)

        async def start() -> Any:  # in the slot: the age counts the wait for it
            live = self._live(sub, pool)
            if too_old(policy, enqueued_at=m.enqueued_at, now=self._clock.now()):
                raise TooOld()
            await self._begin([m])
            pin = m.attributes.get(PIN)
            if pin is not None:
                live = self._pinned(sub, live, m, pin)
            elif spec.trigger_alias and (sub.kind != "invoke"
                                         or m.attributes.get("nimbus.source") == "schedule"):
                live = self._triggered(sub, live, spec.trigger_alias)
            if tracing.on:
                return await _traced_attempt(live, m, payload)
            return await live.invoke(m.id, payload)
        if m.attempts > spec.retries + 1 and not too_old(
                policy, enqueued_at=m.enqueued_at, now=self._clock.now()):
            await self._give_up(sub, spec, m, payload, "RetriesExhausted",
                                _spent_error(spec, m), tried=False)
            return
        try:
            if too_old(policy, enqueued_at=m.enqueued_at, now=self._clock.now()):
                raise TooOld()
            result = await slots.call(until, spec.timeout_s, start)
        except TooOld:
            await self._give_up(sub, spec, m, payload, "EventAgeExceeded", _too_old_error(spec),
                                tried=False)
            return
        except Exception as exc:  # noqa: BLE001 - sorted below; nothing is lost either way
            delay = self._not_run_delay(exc)
            if delay is not None:
                await self._release([m], delay)
            else:
                await self._failed(sub, spec, m, payload, self._error_of(exc, m.id, sub))
            return
        if spec.on_success:
            await self._destination(spec.on_success, sub, m, "Success", payload, result,
                                    error=False)
        await self._settle(self.queue.ack(m, result=orjson.dumps(result), request_id=m.id))

    async def run_batch(self, sub: Subscription, msgs: list[Message], rid: str, slots: Slots,
                        until: float) -> None:
        pool = self._pools().get(sub.function)
        if pool is None:
            await self._release(msgs, NO_FUNCTION_DELAY_S)
            return
        spec = pool.target.spec
        policy = policy_of(spec)
        spent = [m for m in msgs if m.attempts > spec.retries + 1]
        fresh = [m for m in msgs if m.attempts <= spec.retries + 1]
        expired: list[Message] = []

        def split() -> None:  # move what is past its age from fresh to expired
            nonlocal fresh
            now = self._clock.now()
            old = {m.id for m in fresh if too_old(policy, enqueued_at=m.enqueued_at, now=now)}
            if old:
                expired.extend(m for m in fresh if m.id in old)
                fresh = [m for m in fresh if m.id not in old]

        async def start() -> Any:  # in the slot: the age counts the wait for it
            live = self._live(sub, pool)
            split()
            if not fresh:
                raise TooOld()
            await self._begin(fresh)
            if spec.trigger_alias:
                live = self._triggered(sub, live, spec.trigger_alias)
            return await live.invoke(rid, sqs_event(fresh, sub.source, self._clock.now()))
        for m in spent:
            await self._give_up(sub, spec, m, None, "RetriesExhausted", _spent_error(spec, m),
                                tried=False)
        split()
        try:
            if not fresh:
                raise TooOld()
            result = await slots.call(until, spec.timeout_s, start)
        except TooOld:
            result = None
        except Exception as exc:  # noqa: BLE001 - sorted below; nothing is lost either way
            delay = self._not_run_delay(exc)
            if delay is not None:
                await self._release(fresh, delay)
                return
            error = self._error_of(exc, rid, sub)
            await asyncio.gather(*(self._failed(sub, spec, m, None, error, rid) for m in fresh))
            return
        finally:
            for m in expired:
                await self._give_up(sub, spec, m, None, "EventAgeExceeded", _too_old_error(spec),
                                    tried=False)
        if not fresh:
            return
        failed, problem = batch_failures(result, {m.id for m in fresh},
                                         spec.report_batch_failures)
        if problem:
            error = {"errorType": "InvalidBatchResponse", "errorMessage": problem}
        else:
            error = {"errorType": "BatchItemFailure",
                     "errorMessage": f"reported in batchItemFailures by request {rid}"}
        await asyncio.gather(*(
            self._failed(sub, spec, m, None, error, rid) if m.id in failed
            else self._settle(self.queue.ack(m, request_id=rid)) for m in fresh))

    def _not_run_delay(self, exc: BaseException) -> float | None:
        """When an invocation that did not really run goes back to its queue
        (not counted as a try), or None: it ran, and failed."""
        if isinstance(exc, GiveBack):
            return exc.delay_s
        if isinstance(exc, ThrottledError):
            return _jitter(exc.retry_after_s)
        if isinstance(exc, ClosedError):  # a retired pool: the new version takes it
            return RELEASE_DELAY_S
        return None

    async def _begin(self, msgs: list[Message]) -> None:
        """Count the tries of ``msgs``: their handler is handed them next."""
        try:
            await self.queue.begin(msgs)
        except NimbusError as exc:
            if isinstance(exc, ClosedError):
                raise
            log.warning("could not mark the try of %s as begun: %s", msgs[0].id, exc)
            raise GiveBack(BEGIN_FAILED_DELAY_S) from exc

    def _error_of(self, exc: BaseException, rid: str, sub: Subscription) -> dict[str, Any]:
        if self.stopping and isinstance(exc, UnavailableError):
            # the instance went away with the pools closing: the run was cut
            # short, and its try counts (as after a crash)
            return {"errorType": "Interrupted",
                    "errorMessage": f"the try was cut short: nimbus stopped while it ran "
                                    f"({exc})"}
        if isinstance(exc, NimbusError):
            return error_body(exc)
        log.error("invocation %s of %s failed in nimbus", rid, sub.function, exc_info=exc)
        return {"errorType": "InternalError", "errorMessage": repr(exc)}

    async def _release(self, msgs: list[Message], delay_s: float) -> None:
        await asyncio.gather(*(self._settle(self.queue.release(m, delay_s=delay_s))
                               for m in msgs))

    async def _failed(self, sub: Subscription, spec: FunctionSpec, m: Message, payload: Any,
                      error: dict[str, Any], rid: str | None = None) -> None:
        verdict = next_retry(policy_of(spec), attempts=m.attempts, enqueued_at=m.enqueued_at,
                             now=self._clock.now(), rand=random.random())
        if verdict.delay_s is not None:
            if await self._settle(self.queue.retry(m, delay_s=verdict.delay_s, error=error,
                                                   request_id=rid or m.id)):
                metrics.async_retried(sub.function)
            self._note(sub.function, rid or m.id, retry_line(m.id, m.attempts, verdict.delay_s,
                                                            error), "WARNING")
            return
        await self._give_up(sub, spec, m, payload, "RetriesExhausted",
                            {**error, "nimbusReason": verdict.reason}, rid)

    async def _give_up(self, sub: Subscription, spec: FunctionSpec, m: Message, payload: Any,
                       condition: str, error: dict[str, Any], rid: str | None = None, *,
                       tried: bool = True) -> None:
        """``tried``: this delivery's try ran (False: given up without running)."""
        if spec.on_failure and sub.kind != "queue":
            await self._destination(spec.on_failure, sub, m, condition, payload, error,
                                    error=True, tries=m.attempts if tried else m.attempts - 1)
        if spec.dead_letter_to and sub.kind != "queue":
            await self._dead_letter_to(spec.dead_letter_to, m, payload, error, rid)
        if spec.dead_letter:
            if await self._settle(self.queue.dead_letter(m, error=error,
                                                         request_id=rid or m.id)):
                metrics.async_dead_lettered(sub.function)
        else:
            await self._settle(self.queue.fail(m, error=error, request_id=rid or m.id))
        self._note(sub.function, rid or m.id, give_up_line(
            m.id, m.attempts if tried else m.attempts - 1, spec.dead_letter, error), "ERROR")

    async def _dead_letter_to(self, ref: str, m: Message, payload: Any, error: dict[str, Any],
                              rid: str | None) -> None:
        """Lambda's dead-letter queue: the event as it was, with the request id
        and the error in its message attributes."""
        attrs = {"RequestID": rid or m.id, "ErrorCode": "200",
                 "ErrorMessage": str(error.get("errorMessage", ""))[:1024],
                 "nimbus.source": "dead-letter", "nimbus.from": m.id}
        dedup = f"dead-letter:{m.id}:{m.enqueued_at!r}"
        await self._send_to(ref, Outgoing(orjson.dumps(payload), attrs, dedup_key=dedup),
                            f"{m.id}-dead-letter")

    async def _send_to(self, ref: str, out: Outgoing, message_id: str) -> None:
        """``out`` to a queue, a function (its async invocations) or every
        subscriber of a topic."""
        kind, _, name = ref.partition(":")
        if kind == "topic":  # every subscriber gets it, as a publish does
            subs = self._topic_subs() if self._topic_subs is not None else {}
            out.attributes["nimbus.message_id"] = message_id
            await asyncio.gather(*(self.queue.send(topic_queue(name, fn), [out])
                                   for fn in subs.get(name, ())))
            return
        target = invoke_queue(name) if kind == "function" else user_queue(name)
        await self.queue.send(target, [out])

    async def _destination(self, ref: str, sub: Subscription, m: Message, condition: str,
                           payload: Any, response: Any, *, error: bool,
                           tries: int | None = None) -> None:
        record = destination_record(request_id=m.id, function=sub.function,
                                    condition=condition,
                                    attempts=m.attempts if tries is None else tries,
                                    payload=payload,
                                    response=response, now=self._clock.now(), error=error)
        # The dedup key makes a repeat (after a crash before the ack) a no-op.
        dedup = f"destination:{m.id}:{m.enqueued_at!r}:{condition}"
        attrs = {"nimbus.source": "destination", "nimbus.from": m.id}
        await self._send_to(ref, Outgoing(orjson.dumps(record), attrs, dedup_key=dedup),
                            f"{m.id}-{condition}")

    async def _settle(self, op: Awaitable[None]) -> bool:
        """Whether it settled (False: our lease ran out; the next delivery settles it)."""
        try:
            await op
        except ConflictError as exc:
            log.warning("could not settle: %s", exc)
            return False
        return True

    def _note(self, function: str, rid: str, text: str, level: str) -> None:
        """A platform line in ``function``'s logs (if it is served here)."""
        pool = self._pools().get(function)
        if pool is not None:
            pool.log(rid, "platform", text, level)

    def _triggered(self, sub: Subscription, live: Any, alias: str) -> Any:
        """What a trigger naming ``alias`` runs: the alias's invoker, or
        ``live`` while the alias is not set (a platform line says so)."""
        chosen = self._alias_of(sub.function, alias) if self._alias_of is not None else None
        if chosen is None:
            self._note(sub.function, "", f"{sub.kind} trigger names alias {alias!r}, which is "
                       "not set; it runs the live alias", "WARNING")
            return live
        return chosen

    def _pinned(self, sub: Subscription, live: Any, m: Message, pin: str) -> Any:
        """The invoker of the version ``m`` was pinned to when it was
        accepted, while the function still references it; else the live
        alias's pick, with a platform line saying so."""
        try:
            version = int(pin)
        except ValueError:
            version = 0
        if live.target.version == version and not isinstance(live, Split):
            return live
        chosen = live.for_version(version) if isinstance(live, Split) else None
        if chosen is None and self._version_of is not None:
            chosen = self._version_of(sub.function, version)
        if chosen is not None:
            return chosen
        chosen = live.pick(None) if isinstance(live, Split) else live
        self._note(sub.function, m.id,
                   f"async invocation {m.id} was accepted for version {pin}, which is no "
                   f"longer deployed; it runs on version {chosen.target.version}", "WARNING")
        return chosen

    def _live(self, sub: Subscription, pool: FunctionPool) -> FunctionPool:
        """``pool``, if it still serves the function: work that waited for a
        slot across a redeploy goes to the new version instead."""
        if self._pools().get(sub.function) is not pool:
            raise ClosedError(f"{sub.function} was redeployed")
        return pool


def retry_line(invocation: str, tries: int, delay_s: float, error: dict[str, Any]) -> str:
    """The platform line of an async try that failed and will be tried again."""
    return (f"async invocation {invocation} failed on try {tries} "
            f"({error.get('errorType')}: {error.get('errorMessage')}); "
            f"retrying in {delay_s:.1f} s")


def give_up_line(invocation: str, tries: int, dead_letter: bool,
                 error: dict[str, Any]) -> str:
    """The platform line of an async invocation given up on."""
    where = "dead-lettered" if dead_letter else "failed for good (dead_letter: false)"
    why = error.get("nimbusReason")
    return (f"async invocation {invocation} {where} after {tries} "
            f"{'try' if tries == 1 else 'tries'} ({error.get('errorType')}: "
            f"{error.get('errorMessage')})" + (f"; {why}" if why else ""))
async def _traced_attempt(pool: FunctionPool, m: Message, payload: Any) -> Any:
    """One try of an async invocation as a span: under the span of the request
    that submitted it when the stored event carries its ``traceparent``, with
    the time from accepted to started as ``nimbus.queue_wait`` on the first."""
    remote = tracing.remote_parent(payload)
    now = time.time_ns()
    span = tracing.start("nimbus.async.attempt", m.id, trace_id=remote[0] if remote else 0,
                         parent_id=remote[1] if remote else 0, start_ns=now,
                         attrs={"nimbus.function": pool.target.function,
                                "nimbus.attempt": m.attempts, "nimbus.retry": m.attempts > 1})
    if m.attempts <= 1:
        tracing.child(span, "nimbus.queue_wait", min(int(m.enqueued_at * 1e9), now), now)
    tracing.active[m.id] = span
    try:
        result = await pool.invoke(m.id, payload)
    except BaseException as exc:
        tracing.end(span, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        tracing.active.pop(m.id, None)
    tracing.end(span)
    return result


def batch_failures(result: Any, ids: set[str], report: bool = True) -> tuple[set[str], str]:
    """The ``batchItemFailures`` of a queue handler's result: (failed ids, problem).

    A result without the key means every message succeeded; a malformed
    list fails the whole batch, as Lambda does. ``report`` False (a function
    without ReportBatchItemFailures): the key is not read, as on Lambda."""
    if not report or not isinstance(result, dict) or "batchItemFailures" not in result:
        return set(), ""
    items = result["batchItemFailures"]
    if items is None:
        return set(), ""
    if not isinstance(items, list):
        return ids, "batchItemFailures must be a list of {itemIdentifier: messageId}"
    failed = set()
    for item in items:
        mid = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not isinstance(mid, str) or mid not in ids:
            return ids, f"batchItemFailures names {mid!r}, which is not a messageId of the batch"
        failed.add(mid)
    return failed, ""


def _spent_error(spec: FunctionSpec, m: Message) -> dict[str, Any]:
    return {"errorType": "Interrupted",
            "errorMessage": f"no try left: {m.attempts - 1} of {spec.retries + 1} already "
                            "begun, the last one cut short (nimbus stopped while it ran)",
            "nimbusReason": f"retries exhausted (retries: {spec.retries})"}


def _too_old_error(spec: FunctionSpec) -> dict[str, Any]:
    return {"errorType": "EventAgeExceeded",
            "errorMessage": f"not run: older than max_event_age_s ({spec.max_event_age_s:g} s)"}


def _jitter(seconds: float) -> float:
    return max(0.01, seconds) * (0.5 + random.random() / 2)


class _Consumer:
    def __init__(self, dispatcher: Dispatcher, sub: Subscription) -> None:
        self.d = dispatcher
        self.sub = sub
        self.running = 0  # leased work not yet settled: waiting, running or settling
        self._free = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"consume {self.sub.queue}")

    def stop(self) -> None:
        # A flag as well as the cancel: a cancel that lands as a receive
        # completes can be swallowed by a library's wait_for (Python 3.11),
        # and the loop would go on receiving; the flag ends it at the top.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def wait_idle(self, grace_s: float) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._work:
            _done, late = await asyncio.wait(self._work, timeout=grace_s)
            for task in late:  # still running: stays leased, delivered again on start
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)

    async def _loop(self) -> None:
        sub, q = self.sub, self.d.queue
        while not self._stopping:
            pool = self.d._pools().get(sub.function)
            if pool is None:
                await asyncio.sleep(NO_FUNCTION_DELAY_S)
                continue
            spec = pool.target.spec
            slots = self.d.slots_for(sub.function, max(1, pool.cap))
            held = lease_ahead(slots.cap, slots.run_s, spec.timeout_s)
            # refill when half the room is free: fewer, fuller receives
            while self.running > held - max(1, held // 2):
                self._free.clear()
                await self._free.wait()
            batch = spec.batch_size if sub.kind == "queue" else 1
            want = min(MAX_LEASE, (held - self.running) * batch)
            vis = lease_s(spec.timeout_s)
            until = asyncio.get_running_loop().time() + vis
            try:
                msgs = await q.receive(sub.queue, max_messages=want, visibility_s=vis,
                                       wait_s=WAIT_S)
                if batch > 1 and msgs and spec.max_batching_window_s > 0 and len(msgs) < batch:
                    msgs += await self._fill(len(msgs), batch, vis,
                                             spec.max_batching_window_s)
            except ClosedError:
                return
            except UnavailableError as exc:  # the store is slow or failing over: one line
                log.warning("receive from %s failed (%s); retrying", sub.queue, exc)
                await asyncio.sleep(1.0)
                continue
            except NimbusError:
                log.warning("receive from %s failed; retrying", sub.queue, exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if sub.kind != "queue":  # one event per invocation
                for m in msgs:
                    self._spawn(self.d.run_one(sub, m, slots, until))
            else:  # SQS-shaped batches, of one message too
                for i in range(0, len(msgs), batch):
                    self._spawn(self.d.run_batch(sub, msgs[i:i + batch], new_id(),
                                                 slots, until))

    async def _fill(self, have: int, batch: int, vis: float, window_s: float) -> list[Message]:
        """Wait up to the batching window for the batch to fill."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window_s
        more: list[Message] = []
        while have + len(more) < batch and (left := deadline - loop.time()) > 0:
            more += await self.d.queue.receive(self.sub.queue,
                                               max_messages=batch - have - len(more),
                                               visibility_s=vis, wait_s=left)
        return more

    def _spawn(self, coro: Any) -> None:
        self.running += 1
        task = asyncio.create_task(coro)
        self._work.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        self.running -= 1
        self._free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("work on %s failed", self.sub.queue, exc_info=task.exception())
