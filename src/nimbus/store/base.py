"""The storage seams: ``Store`` (keys with revisions) and ``Blobs`` (bundles).

Every backend implements these protocols and passes
:func:`nimbus.testing.check_store` / :func:`nimbus.testing.check_blobs`.
Backends translate their driver errors here, once: callers only ever see
:mod:`nimbus.errors` (``UnavailableError`` with ``__cause__``,
``ConflictError``, ``ClosedError``, ``NotFoundError``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    revision: int  # store-wide, strictly increasing with every write


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for deletes
    revision: int


class Store(Protocol):
    """Keys with revisions, compare-and-set, watches and leases.

    Keys are ``/``-separated strings; values are bytes. Every successful write
    gets a new revision, larger than every earlier one in this store.
    Methods raise ``ClosedError`` after :meth:`aclose`.
    """

    async def get(self, key: str) -> Entry | None:
        """The current entry, or None. Never raises for a missing key."""

    async def list(self, prefix: str) -> list[Entry]:
        """Entries whose key starts with ``prefix``, sorted by key."""

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write unconditionally; returns the new revision. With ``lease``,
        the key is deleted when the lease expires or is revoked; raises
        ``NotFoundError`` for an unknown or expired lease."""

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write only if the key does not exist; ``ConflictError`` otherwise."""

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-set: write only if the key's current revision is
        ``revision``; ``ConflictError`` if it moved or the key is missing."""

    async def delete(self, key: str, *, revision: int | None = None) -> bool:
        """Delete; True if a key was deleted. With ``revision``, only if the
        key is at that revision (``ConflictError`` otherwise). Idempotent
        without ``revision``."""

    def watch(self, prefix: str, *, after: int = 0) -> AsyncIterator[WatchEvent]:
        """Events for keys under ``prefix`` with revision > ``after``, in
        revision order, then live ones as they happen, until the store closes
        (the iterator then ends) or the caller stops iterating. A watcher that
        starts from ``after=entry.revision`` of a ``list`` misses nothing."""

    async def grant_lease(self, ttl_s: float) -> int:
        """A new lease id that expires ``ttl_s`` seconds from now."""

    async def keepalive(self, lease: int) -> None:
        """Push the lease's expiry ``ttl_s`` from now; ``NotFoundError`` if it
        already expired or was revoked."""

    async def revoke(self, lease: int) -> None:
        """Expire the lease now, deleting its keys. Idempotent."""

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
