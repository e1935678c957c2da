"""``Blobs`` on a NATS JetStream object store bucket, ``nimbus-<region>-blobs``.

* An object's name is its sha256 hex digest; ``put`` of bytes already
  stored writes nothing (content addressed: same name, same bytes).
* ``get`` re-hashes what it read and raises ``UnavailableError`` on a
  mismatch (NATS checks its own digest of the chunks too).
* A digest that is not 64 lowercase hex characters names no blob.
* Reads of the object's description go to the stream leader, so a blob put
  by one process is there for the next, whichever server it asks.
* Every call has a deadline (``OP_TIMEOUT_S``, plus time per MiB); driver
  errors become ``UnavailableError`` with ``__cause__``. Reads are asked
  again while a stream elects a new leader (a server died).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.object_store import ObjectStore

from nimbus.errors import ClosedError, NotFoundError, UnavailableError
from nimbus.store.nats_conn import retry_read
from nimbus.store.nats_store import (
    BUCKET_READY_S,
    CREATE_AGAIN,
    STREAM_NOT_FOUND,
    _api_code,
    _describe,
    check_region,
    cluster_replicas,
)

log = logging.getLogger("nimbus.store")
T = TypeVar("T")

_DIGEST = re.compile(r"[0-9a-f]{64}")
OP_TIMEOUT_S = 30.0
PER_MIB_S = 5.0  # added to the deadline for each MiB moved
CORRUPT_AFTER_S = 10.0  # a blob that reads wrong this long is corrupt (not a replica behind)


async def open_nats_blobs(nc: NATS, *, region: str, replicas: int | None = None) -> NatsBlobs:
    """The region's blobs on ``nc``, creating the bucket if needed."""
    blobs = NatsBlobs(nc, check_region(region))
    await blobs._ensure_bucket(replicas)
    return blobs


class NatsBlobs:
    """Use :func:`open_nats_blobs`."""

    def __init__(self, nc: NATS, region: str) -> None:
        self.nc = nc
        self.bucket = f"nimbus-{region}-blobs"
        self._js = nc.jetstream(timeout=10.0)
        self._obs: ObjectStore | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed or self.nc.is_closed:
            raise ClosedError(f"blobs {self.bucket} are closed")

    async def _call(self, what: str, aw: Awaitable[T], size: int = 0) -> T:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S + PER_MIB_S * size / 2**20):
                return await aw
        except nats.errors.ConnectionClosedError as exc:
            raise ClosedError(f"blobs {self.bucket}: the connection is closed") from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            if self._closed or self.nc.is_closed:
                raise ClosedError(f"blobs {self.bucket} are closed") from exc
            raise UnavailableError(f"blobs {self.bucket}: {what}: {_describe(exc)}") from exc

    async def _ensure_bucket(self, replicas: int | None) -> None:
        config = api.ObjectStoreConfig(
            description=f"nimbus bundles ({self.bucket})", storage=api.StorageType.FILE,
            replicas=replicas or cluster_replicas(self.nc))
        # As for the store: a bucket being created by another process may not
        # answer yet, and of two creators one finds the name taken.
        deadline = time.monotonic() + BUCKET_READY_S
        while True:
            try:
                self._obs = await self._call("open the bucket", self._js.object_store(self.bucket))
                return
            except UnavailableError as exc:
                if isinstance(exc.__cause__, nats.js.errors.BucketNotFoundError) \
                        or _api_code(exc) == STREAM_NOT_FOUND:
                    try:
                        self._obs = await self._call("create the bucket",
                                                     self._js.create_object_store(
                                                         self.bucket, config=config))
                        log.info("created the blob bucket %s (replicas %d)", self.bucket,
                                 config.replicas)
                        return
                    except UnavailableError as exc2:
                        exc = exc2
                if _api_code(exc) not in CREATE_AGAIN \
                        or time.monotonic() > deadline:
                    raise exc from exc.__cause__
                await asyncio.sleep(0.2)

    def _store(self) -> ObjectStore:
        self._check_open()
        assert self._obs is not None
        return self._obs

    async def _info(self, digest: str) -> api.ObjectInfo | None:
        try:
            return await self._call(f"look up {digest}",
                                    retry_read(lambda: self._store().get_info(digest)))
        except UnavailableError as exc:
            if isinstance(exc.__cause__, nats.js.errors.ObjectNotFoundError):
                return None
            raise

    async def put(self, data: bytes) -> str:
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        info = await self._info(digest)
        if info is not None and info.size == len(data):
            return digest  # same name, same bytes
        await self._call(f"put {digest}", self._store().put(digest, data), len(data))
        return digest

    async def get(self, digest: str) -> bytes:
        if not _DIGEST.fullmatch(digest):
            self._check_open()
            raise NotFoundError(f"no blob {digest!r} (not a sha256 hex digest)")
        info = await self._info(digest)
        if info is None:
            raise NotFoundError(f"no blob {digest}")

        async def read() -> bytes:
            result = await self._store().get(digest)
            data = bytes(result.data or b"")
            if hashlib.sha256(data).hexdigest() != digest:
                raise nats.js.errors.DigestMismatchError
            return data

        # Chunks are read by a consumer on one replica: one still catching up
        # with a blob just put answers short, which reads as a digest
        # mismatch. Asked again, it has them; still wrong after the retries:
        # the blob is corrupt.
        try:
            return await self._call(f"get {digest}", retry_read(
                read, within_s=CORRUPT_AFTER_S, also=(nats.js.errors.DigestMismatchError,)),
                info.size or 0)
        except UnavailableError as exc:
            if isinstance(exc.__cause__, nats.js.errors.ObjectNotFoundError):
                raise NotFoundError(f"no blob {digest}") from None
            if isinstance(exc.__cause__, nats.js.errors.DigestMismatchError):
                raise UnavailableError(f"blob {digest} is corrupt in {self.bucket}") from exc
            raise

    async def has(self, digest: str) -> bool:
        if not _DIGEST.fullmatch(digest):
            self._check_open()
            return False
        return await self._info(digest) is not None

    async def aclose(self) -> None:
        self._closed = True
