"""The async side of the platform: accept work, run it, answer questions about it.

``Events`` is what the gateway, the control API and the scheduler talk to:

* :meth:`Events.submit` stores an async invocation (after which the caller
  answers 202) and :meth:`Events.publish` a queue or topic message;
* :meth:`Events.sync` follows the deployed functions (called by route sync
  on every change): it starts and stops the dispatcher's consumers and
  knows which function consumes which queue and topic;
* records, dead letters and redrive for ``nimbus invocations`` / ``dlq``.

It holds the queue through its two seams: work is sent and run through
``Delivery`` (the dispatcher sees nothing else), records, counts and
redrive go through ``Records``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nimbus.errors import NotFoundError, PayloadTooLargeError, UnavailableError, UserInputError
from nimbus.events.dispatch import PIN, Dispatcher
from nimbus.events.names import Subscription, invoke_queue, topic_queue, user_queue
from nimbus.gateway.split import Split
from nimbus.ids import new_id
from nimbus.observe.metrics import AsyncFigures
from nimbus.store.queue import (
    DEFAULT_DEDUP_WINDOW_S,
    Delivery,
    Outgoing,
    Queue,
    Record,
    Records,
    SendResult,
)

if TYPE_CHECKING:
    from nimbus.clock import Clock
    from nimbus.worker.pool import FunctionPool

log = logging.getLogger("nimbus.events")

DEFAULT_ASYNC_MAX_BYTES = 256 * 1024
RECORD_RETENTION_S = 24 * 3600.0  # succeeded / failed records; dead ones stay until redriven
PURGE_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Published:
    message_id: str
    kind: str  # "queue" or "topic"
    deliveries: list[SendResult]


class Events:
    def __init__(self, queue: Queue, clock: Clock, *,
                 max_bytes: int = DEFAULT_ASYNC_MAX_BYTES,
                 retention_s: float = max(RECORD_RETENTION_S, DEFAULT_DEDUP_WINDOW_S),
                 consume: bool = True) -> None:
        """``consume=False``: accept and answer for async work, run none of it
        (a region's controllers: its gateways consume)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, was: {max_bytes}")
        self.queue = queue
        self.delivery: Delivery = queue
        self.records: Records = queue
        self.clock = clock
        self.consume = consume
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.pools: dict[str, FunctionPool] = {}
        self.queue_owner: dict[str, str] = {}  # queue name -> consuming function
        self.topic_subs: dict[str, list[str]] = {}  # topic -> subscribed functions
        # (function, qualifier) -> its invoker; set by whoever follows the
        # aliases (route sync's ``invoker_for``)
        self.resolve: Callable[[str, str], Any] | None = None
        self.dispatcher = Dispatcher(self.delivery, lambda: self.pools, clock,
                                     version_of=self._version_of, alias_of=self._alias_of,
                                     topic_subs=lambda: self.topic_subs)
        self.on_sync: list[Callable[[dict[str, FunctionPool]], None]] = []
        self._purger: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._purger = asyncio.create_task(self._purge_loop(), name="purge records")

    # -- following the deployed functions ---------------------------------------

    def sync(self, pools: dict[str, FunctionPool]) -> None:
        subs: dict[str, Subscription] = {}
        owner: dict[str, str] = {}
        topics: dict[str, list[str]] = {}
        for fn, pool in sorted(pools.items()):
            spec = pool.target.spec
            subs[invoke_queue(fn)] = Subscription(invoke_queue(fn), fn, "invoke", fn)
            if spec.queue:
                if spec.queue in owner:  # two apps claim it: the first (by name) keeps it
                    log.error("queue %s is consumed by %s and %s; only %s gets its messages",
                              spec.queue, owner[spec.queue], fn, owner[spec.queue])
                    continue
                owner[spec.queue] = fn
                subs[user_queue(spec.queue)] = Subscription(user_queue(spec.queue), fn,
                                                            "queue", spec.queue)
            for t in spec.topics:
                topics.setdefault(t, []).append(fn)
                subs[topic_queue(t, fn)] = Subscription(topic_queue(t, fn), fn, "topic", t)
        self.pools, self.queue_owner, self.topic_subs = dict(pools), owner, topics
        self.dispatcher.sync(subs if self.consume else {})
        for listener in self.on_sync:
            listener(self.pools)

    def _version_of(self, function: str, version: int) -> Any | None:
        """The invoker of one referenced version of ``function``, if any."""
        if self.resolve is None:
            return None
        try:
            return self.resolve(function, str(version))
        except NotFoundError:
            return None

    def _alias_of(self, function: str, alias: str) -> Any | None:
        """The invoker of one alias of ``function``, if it is set."""
        if self.resolve is None:
            return None
        try:
            return self.resolve(function, alias)
        except NotFoundError:
            return None

    def _pool(self, function: str) -> FunctionPool:
        pool = self.pools.get(function)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "none"
            raise NotFoundError(f"function {function!r} is not deployed (functions: {known})")
        return pool

    def _queues_of(self, function: str) -> list[str]:
        spec = self._pool(function).target.spec
        names = [invoke_queue(function)]
        if spec.queue and self.queue_owner.get(spec.queue) == function:
            names.append(user_queue(spec.queue))
        names += [topic_queue(t, function) for t in spec.topics]
        return names

    def _check_size(self, body: bytes, what: str) -> None:
        if len(body) > self.max_bytes:
            raise PayloadTooLargeError(
                f"{what} of {len(body)} bytes is over the async limit of {self.max_bytes} "
                "bytes (nimbus up --async-max-bytes)")

    # -- accepting work -------------------------------------------------------------

    async def submit(self, function: str, event: bytes, *, idempotency_key: str | None = None,
                     source: str = "invoke", qualifier: str | None = None,
                     version: int | None = None) -> SendResult:
        """Store one async invocation of ``function``; durable on return.

        It is pinned to a version (attribute ``nimbus.version``) when the
        caller named one (``qualifier``: a version number or an alias name;
        ``version``: the one a gateway's route picked) or when ``live`` splits
        traffic: the version is chosen now, at accept time, and a retry runs
        on the same one."""
        live = self._pool(function)
        self._check_size(event, "async invocation payload")
        attrs = {"nimbus.source": source}
        if qualifier:
            if self.resolve is None:
                raise UserInputError("qualifiers are not available here")
            chosen = self.resolve(function, qualifier)
            version = (chosen.pick(None) if isinstance(chosen, Split) else chosen).target.version
            attrs[PIN] = str(version)
        elif version is not None:
            if isinstance(live, Split) or live.target.version != version:
                attrs[PIN] = str(version)
        elif isinstance(live, Split):
            attrs[PIN] = str(live.pick(None).target.version)
        out = Outgoing(event, attrs,
                       dedup_key=f"idem:{idempotency_key}" if idempotency_key else None)
        [result] = await self.delivery.send(invoke_queue(function), [out])
        return result

    async def publish(self, name: str, body: bytes, *, kind: str | None = None,
                      attributes: dict[str, str] | None = None, subject: str | None = None,
                      idempotency_key: str | None = None) -> Published:
        """A message to the queue or topic ``name``: one delivery to the queue's
        consumer, or one per subscriber of the topic (each with its own queue)."""
        self._check_size(body, "message")
        is_queue, is_topic = name in self.queue_owner, name in self.topic_subs
        if kind is None:
            if is_queue and is_topic:
                raise UserInputError(f"{name!r} is both a queue and a topic; say which "
                                     "(--queue or --topic)")
            kind = "queue" if is_queue else "topic" if is_topic else None
        if kind not in ("queue", "topic") or (kind == "queue" and not is_queue) or (
                kind == "topic" and not is_topic):
            what = {"queue": "queue", "topic": "topic"}.get(kind or "", "queue or topic")
            raise NotFoundError(
                f"no {what} {name!r}: no deployed function has 'queue: {name}' or "
                f"'topic: {name}' (queues: {', '.join(sorted(self.queue_owner)) or 'none'}; "
                f"topics: {', '.join(sorted(self.topic_subs)) or 'none'})")
        attrs = dict(attributes or {})
        reserved = sorted(k for k in attrs if k.startswith("nimbus."))
        if reserved:
            raise UserInputError(f"attribute names starting with 'nimbus.' are nimbus's own: "
                                 f"{', '.join(reserved)}")
        dedup = f"idem:{idempotency_key}" if idempotency_key else None
        if kind == "queue":
            [r] = await self.delivery.send(user_queue(name), [Outgoing(body, attrs,
                                                                    dedup_key=dedup)])
            return Published(r.id, "queue", [r])
        message_id = new_id()
        attrs["nimbus.message_id"] = message_id
        if subject is not None:
            attrs["nimbus.subject"] = subject
        # Sent together: the embedded queue commits them in one transaction.
        sent = await asyncio.gather(*(
            self.delivery.send(topic_queue(name, fn), [Outgoing(body, attrs, dedup_key=dedup)])
            for fn in self.topic_subs[name]))
        results = [r for [r] in sent]
        if not results[0].created:  # a repeat: answer with the first message's id
            first = await self.records.get(results[0].id)
            if first is not None:
                message_id = first.attributes.get("nimbus.message_id", message_id)
        return Published(message_id, "topic", results)

    # -- records and dead letters ---------------------------------------------------

    async def invocation(self, invocation_id: str) -> Record:
        rec = await self.records.get(invocation_id)
        if rec is None:
            raise NotFoundError(f"no invocation {invocation_id!r} (records of finished "
                                f"invocations are kept {self.retention_s / 3600:g} h)")
        return rec

    async def invocations(self, function: str, *, status: str | None = None,
                          limit: int = 50) -> list[Record]:
        out: list[Record] = []
        for q in self._queues_of(function):
            out += await self.records.records(q, status=status, limit=limit)
        out.sort(key=lambda r: r.enqueued_at, reverse=True)
        return out[:limit]

    async def redrive(self, function: str, ids: list[str] | None = None) -> int:
        moved = 0
        for q in self._queues_of(function):
            moved += await self.records.redrive(q, ids)
        if ids is not None and moved < len(ids):
            dead = {r.id for r in await self.invocations(function, status="dead", limit=10_000)}
            missing = [i for i in ids if i not in dead]
            if missing and moved == 0:
                raise NotFoundError(f"no dead letters of {function} with id "
                                    f"{', '.join(missing)}")
        return moved

    async def stats(self, function: str) -> dict[str, int]:
        total = dict.fromkeys(("ready", "delayed", "running", "dead", "succeeded", "failed"), 0)
        for q in self._queues_of(function):
            s = await self.records.stats(q)
            for k in total:
                total[k] += getattr(s, k)
        return total

    async def backlog(self, function: str) -> AsyncFigures:
        """``function``'s async work for the metrics: waiting, running,
        waiting for a retry, dead; and how long the oldest has waited (when
        the queue can tell cheaply)."""
        out = AsyncFigures()
        oldest_at: float | None = None
        oldest_of = getattr(self.records, "oldest_queued_at", None)
        for q in self._queues_of(function):
            s = await self.records.stats(q)
            out.queued += s.ready
            out.running += s.running
            out.retrying += s.delayed
            out.dead += s.dead
            if oldest_of is not None and s.ready:
                at = await oldest_of(q)
                if at is not None and (oldest_at is None or at < oldest_at):
                    oldest_at = at
        if oldest_of is not None:  # else unknown: the metric is left out
            out.oldest_queued_age_s = 0.0 if oldest_at is None else max(
                0.0, self.clock.now() - oldest_at)
        return out

    # -- housekeeping ---------------------------------------------------------------

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_EVERY_S)
            try:
                n = await self.records.purge_settled(self.clock.now() - self.retention_s)
                if n:
                    log.info("forgot %d settled invocation records", n)
            except Exception as exc:  # noqa: BLE001 - housekeeping must not die
                log.warning("purging records failed (%s)", exc,
                            exc_info=not isinstance(exc, UnavailableError))

    async def aclose(self, grace_s: float = 5.0) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        await self.dispatcher.aclose(grace_s)


def record_view(rec: Record, *, with_body: bool = True) -> dict[str, Any]:
    """A record as the API shows it: which function and trigger it belongs to."""
    d = rec.to_dict(with_body=with_body)
    kind, _, rest = rec.queue.partition("/")
    d["trigger"] = {"fn": "invoke", "q": "queue", "topic": "topic"}.get(kind, kind)
    d["function"] = rest.rsplit("/", 1)[-1] if kind != "q" else None
    d["source"] = rec.attributes.get("nimbus.source", d["trigger"])
    return d
