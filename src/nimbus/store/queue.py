"""The queue seams: durable messages that are also invocation records.

Two protocols, one object may implement both:

* :class:`Delivery` moves work: ``send``, ``receive`` (a lease), ``begin``,
  and the settles ``ack`` / ``retry`` / ``release`` / ``dead_letter`` /
  ``fail``. The dispatcher needs nothing else.
* :class:`Records` answers about work: ``get``, ``records`` (by queue and
  status, newest first), ``stats`` (counts), ``redrive`` and
  ``purge_settled``. The control API and ``nimbus invocation(s)`` / ``dlq``
  use it.
* :class:`Queue` is both.

One message is one unit of async work (an async invocation, a queue or topic
message, a schedule tick). It is stored before ``send`` returns and kept,
with its outcome, after it is settled, so the same row answers
``nimbus invocation ID``. Statuses::

    queued ──receive──> running ──ack──────────> succeeded
      ^                   │ ──retry(delay)────> retrying ──receive──> running
      │                   │ ──release(delay)──> (back to queued/retrying, try not counted)
      │                   │ ──dead_letter─────> dead     (kept for redrive)
      │                   │ ──fail────────────> failed   (terminal, not kept for redrive)
      └────redrive─────── dead

Delivery is at-least-once: a received message is leased for
``visibility_s``; if it is not settled by then (its consumer died) it is
delivered again. Lease expiry is the only recovery the seam promises (a
backend with one owner, like the embedded SQLite queue, may offer more of
its own). Settling with a stale delivery (another consumer has it now)
raises ``ConflictError``.

**A try counts when the handler starts, not when a message is leased.**
``receive`` counts nothing: a consumer may lease far ahead of what it runs.
:meth:`Delivery.begin` marks the try of a delivery just before the handler is
handed the message; from then on the try counts whatever happens (it
survives the process being killed before the settle). The settle after a
begun try (ack, retry, dead_letter, fail) records it in ``attempts``;
``release`` does not (the handler did not run it). A lease that ends, or a
process that dies, before ``begin`` costs no try; one that ends after it
costs exactly that one try. So ``attempts`` in a record is the number of
times its handler began, plus at most one begun as the process died.

Every backend passes :func:`nimbus.testing.check_queue` (the SQLite one
also its manual-clock rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

STATUSES: tuple[str, ...] = ("queued", "running", "retrying", "succeeded", "failed", "dead")

DEFAULT_DEDUP_WINDOW_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send. ``dedup_key``: a second send of the same key to the
    same queue within the dedup window returns the first message's id."""

    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    id: str | None = None  # chosen by the queue when None
    delay_s: float = 0.0
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of a message. ``receipt`` identifies this delivery; it is
    opaque (each backend keeps what it needs to settle it there)."""

    id: str
    queue: str
    body: bytes
    attributes: dict[str, str]
    attempts: int  # the number of this delivery's try, once begun: tries begun before + 1
    enqueued_at: float
    receipt: object = field(compare=False)


@dataclass(frozen=True, slots=True)
class Record:
    """A message as ``nimbus invocation ID`` shows it."""

    id: str
    queue: str
    status: str
    attempts: int
    enqueued_at: float
    updated_at: float
    body: bytes
    attributes: dict[str, str]
    request_id: str | None = None
    result: bytes | None = None  # JSON, on success
    error: dict[str, Any] | None = None  # the last failure
    visible_at: float | None = None  # next delivery, for queued / retrying

    def to_dict(self, *, with_body: bool = True) -> dict[str, Any]:
        import orjson  # local: this module stays import-light for backends

        d: dict[str, Any] = {
            "id": self.id, "queue": self.queue, "status": self.status,
            "attempts": self.attempts, "enqueued_at": self.enqueued_at,
            "updated_at": self.updated_at, "attributes": self.attributes,
            "request_id": self.request_id, "error": self.error,
            "result": orjson.loads(self.result) if self.result else None,
        }
        if self.status in ("queued", "retrying") and self.visible_at is not None:
            d["next_attempt_at"] = self.visible_at
        if with_body:
            d["body"] = self.body.decode("utf-8", "replace")
        return d


@dataclass(frozen=True, slots=True)
class SendResult:
    id: str
    created: bool  # False: a duplicate of an earlier send (same dedup key)


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int  # deliverable now
    delayed: int  # waiting for a retry delay
    running: int
    dead: int
    succeeded: int
    failed: int


class Delivery(Protocol):
    """Durable named queues (a queue exists once something is sent to it).

    Methods raise ``ClosedError`` after :meth:`aclose` and
    ``UnavailableError`` (``__cause__`` set) when the backend fails.
    """

    async def send(self, queue: str, messages: list[Outgoing]) -> list[SendResult]:
        """Store ``messages`` durably before returning (on SQLite all or none;
        elsewhere each on its own: on an error, some may have been stored and
        a send again does not duplicate those with an ``id`` or dedup key)."""

    async def receive(self, queue: str, *, max_messages: int, visibility_s: float,
                      wait_s: float = 0.0) -> list[Message]:
        """Lease up to ``max_messages`` deliverable messages, oldest first.
        Waits up to ``wait_s`` for one to become deliverable. Counts no try."""

    async def begin(self, messages: list[Message]) -> None:
        """The handler is about to be handed these deliveries: each one's try
        counts from now on, even if the process dies before it is settled.
        Durable against the process being killed before it returns; call it
        right before the hand-over, never ahead of it."""

    async def ack(self, message: Message, *, result: bytes | None = None,
                  request_id: str | None = None) -> None:
        """The work is done: ``succeeded``, with its result (JSON bytes).
        This and the other settles count the delivery's try if it was begun."""

    async def retry(self, message: Message, *, delay_s: float, error: dict[str, Any],
                    request_id: str | None = None) -> None:
        """The try failed: deliver again after ``delay_s`` (``retrying``)."""

    async def release(self, message: Message, *, delay_s: float) -> None:
        """Not tried (e.g. throttled): deliver again after ``delay_s``; this
        delivery does not count as an attempt, even if it was begun."""

    async def dead_letter(self, message: Message, *, error: dict[str, Any],
                          request_id: str | None = None) -> None:
        """Give up and keep it for redrive (``dead``)."""

    async def fail(self, message: Message, *, error: dict[str, Any],
                   request_id: str | None = None) -> None:
        """Give up without keeping it for redrive (``failed``)."""

    async def aclose(self) -> None: ...


class Records(Protocol):
    """What happened to the messages: the invocation records."""

    async def get(self, message_id: str) -> Record | None: ...

    async def records(self, queue: str, *, status: str | None = None,
                      limit: int = 100) -> list[Record]:
        """Newest first."""

    async def redrive(self, queue: str, ids: list[str] | None = None) -> int:
        """Dead messages (all, or those of ``ids``) back to ``queued`` with
        their attempts reset; returns how many moved."""

    async def stats(self, queue: str) -> QueueStats:
        """Counts by status, without reading every record."""

    async def purge_settled(self, older_than: float) -> int:
        """Forget succeeded / failed messages settled before ``older_than``."""

    async def aclose(self) -> None: ...


class Queue(Delivery, Records, Protocol):
    """Both seams in one object (as the embedded SQLite queue is)."""
