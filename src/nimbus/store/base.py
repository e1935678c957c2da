"""The storage seams: ``Store`` (keys with revisions) and ``Blobs`` (bundles).

Every backend implements these protocols and passes
:func:`nimbus.testing.check_store` / :func:`nimbus.testing.check_blobs`.
Backends translate their driver errors here, once: callers only ever see
:mod:`nimbus.errors` (``UnavailableError`` with ``__cause__``,
``ConflictError``, ``ClosedError``, ``NotFoundError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    revision: int  # store-wide, strictly increasing with every write


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under a watched prefix.

    ``put`` and ``delete`` carry the key, the value (``b""`` for deletes) and
    the revision of the change. ``reset`` (key ``""``, value ``b""``) says
    that events may have been missed: the watch lost its subscription (a
    reconnect, a store error, history that is gone) and subscribes again
    from the revision it had read up to (retrying with backoff while the
    store is down). The consumer re-``list``s the prefix, replaces what it
    knew, and goes on reading: every change made after that ``list`` still
    arrives, and changes from before it may arrive again (apply them in
    order and the state converges).
    ``revision`` of a reset is the revision the watch had read up to (its
    ``after`` if nothing yet)."""

    kind: Literal["put", "delete", "reset"]
    key: str
    value: bytes
    revision: int


class Watch(Protocol):
    """An async iterator of :class:`WatchEvent` that the consumer closes.

    It never ends on a store error: it yields ``reset`` and resubscribes
    (with backoff while the store stays unavailable). It ends only after
    :meth:`aclose` or when the store is closed."""

    def __aiter__(self) -> Watch: ...

    async def __anext__(self) -> WatchEvent: ...

    async def aclose(self) -> None:
        """Stop watching and release the subscription. Idempotent."""


class Store(Protocol):
    """Keys with revisions, compare-and-set, watches and TTL campaigns.

    Keys are ``/``-separated strings (prefixes end with ``/``); values are
    bytes. Every successful write gets a new revision, larger than every
    earlier one in this store. Methods raise ``ClosedError`` after
    :meth:`aclose`, ``UnavailableError`` (with ``__cause__``) when the
    backend fails.

    Campaigns are the only keys that expire. :meth:`campaign` takes a key
    that nobody holds and gives it a time to live; :meth:`renew` pushes that
    time out (the holder calls it well before ``ttl_s``, e.g. every
    ``ttl_s / 3``); a key that is not renewed vanishes ``ttl_s`` after its
    last write, and watchers see a ``delete`` for it. Any other write
    (``put``, ``create``, ``update``) makes a key permanent.
    """

    async def get(self, key: str) -> Entry | None:
        """The current entry, or None. Never raises for a missing key."""

    async def list(self, prefix: str) -> list[Entry]:
        """Entries whose key starts with ``prefix``, sorted by key."""

    async def put(self, key: str, value: bytes) -> int:
        """Write unconditionally; returns the new revision."""

    async def create(self, key: str, value: bytes) -> int:
        """Write only if the key does not exist; ``ConflictError`` otherwise."""

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-set: write only if the key's current revision is
        ``revision``; ``ConflictError`` if it moved or the key is missing."""

    async def delete(self, key: str, *, revision: int | None = None) -> bool:
        """Delete; True if a key was deleted. With ``revision``, only if the
        key is at that revision (``ConflictError`` otherwise). Idempotent
        without ``revision``."""

    async def campaign(self, key: str, value: bytes, ttl_s: float) -> int | None:
        """Take ``key`` if it is absent (or its time ran out): writes
        ``value`` with a time to live of ``ttl_s`` and returns the revision
        (the holder's term). None if the key exists: someone holds it."""

    async def renew(self, key: str, revision: int, ttl_s: float,
                    value: bytes | None = None) -> int:
        """Keep holding ``key``: if it is still at ``revision``, push its
        expiry to ``ttl_s`` from now (writing ``value`` if given, else the
        same value) and return the new revision, which the next ``renew``
        must pass. ``ConflictError`` if the key expired, was deleted or was
        written by anyone else: the campaign is lost."""

    async def resign(self, key: str, revision: int) -> None:
        """Give ``key`` up: delete it if it is still at ``revision``; do
        nothing otherwise (someone else holds it, or it is gone).
        Idempotent."""

    def watch(self, prefix: str, *, after: int = 0) -> Watch:
        """Events for keys under ``prefix`` with revision > ``after``, in
        revision order, then live ones as they happen. A watcher that starts
        from ``after=`` the largest revision of a ``list`` misses nothing
        (short of a ``reset``). A backend that cannot replay history from
        ``after`` may instead deliver the current entries newer than
        ``after`` as puts; one whose history is gone says ``reset``. Raises
        ``ClosedError`` once the store is closed."""

    async def aclose(self) -> None:
        """Release resources; ends active watches. Idempotent."""


class Blobs(Protocol):
    """Content-addressed bytes: the key of a blob is its sha256 hex digest."""

    async def put(self, data: bytes) -> str:
        """Store ``data``; returns its sha256 hex digest. Idempotent."""

    async def get(self, digest: str) -> bytes:
        """The blob's bytes; ``NotFoundError`` if absent. Verifies the digest
        and raises ``UnavailableError`` if the stored bytes are corrupt."""

    async def has(self, digest: str) -> bool:
        """True if the blob is stored."""

    async def aclose(self) -> None:
        """Release resources. Idempotent."""
