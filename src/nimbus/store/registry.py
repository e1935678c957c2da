"""Backends picked by URL: one region's store, blobs and queue.

:func:`open_backend` is what the processes of a region call::

    backend = await open_backend("nats://h1:4222,h2:4222,h3:4222",
                                 region="eu", token=token)
    ...
    await backend.aclose()

* ``sqlite:///abs/folder`` (or no URL, with ``state_dir``): the files
  ``nimbus up`` keeps in its state folder: ``store.db``, ``blobs/`` and
  ``queue.db``. ``nc`` is None.
* ``nats://host:port,host:port,...``: one NATS connection (user ``nimbus``,
  the region token as password, reconnecting forever) shared by the store
  (KV bucket ``nimbus-<region>-store``), the blobs (object store
  ``nimbus-<region>-blobs``) and the queue. Credentials never go in the URL.

The older :func:`open_store` / :func:`open_blobs` stay for callers that
open one backend by name: ``open_store("sqlite", path)`` or
``open_store("sqlite:///abs/store.db")``; an unknown name may also be an
import string ``"package.module:factory"`` (``async def factory(path,
**kwargs) -> Store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nimbus.errors import NimbusError, UserInputError
from nimbus.store.base import Blobs, Store

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from nimbus.store.queue import Queue

log = logging.getLogger("nimbus.store")

STORES = {"sqlite": "nimbus.store.sqlite:open_sqlite_store"}
NATS_QUEUE = "nimbus.store.nats_queue"
DEFAULT_NATS_PORT = 4222
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


# -- store URLs ---------------------------------------------------------------

@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL: ``scheme`` is ``sqlite`` (``path``, or None for
    the state folder) or ``nats`` (``servers``, as ``nats://host:port``)."""

    scheme: str
    path: Path | None = None
    servers: tuple[str, ...] = ()


def parse_store_url(url: str | None) -> StoreURL:
    """Check a store URL; ``UserInputError`` names the part that is wrong."""
    if url is None or url == "":
        return StoreURL("sqlite")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UserInputError(f"store URL {url!r}: expected sqlite:///folder or "
                             "nats://host:port[,host:port...]")
    if scheme == "sqlite":
        if rest == "":
            return StoreURL("sqlite")
        if not rest.startswith("/"):
            raise UserInputError(f"store URL {url!r}: the sqlite path must be absolute "
                                 f"(sqlite:///abs/folder), got {rest!r}")
        if "?" in rest or "#" in rest:
            raise UserInputError(f"store URL {url!r}: a sqlite URL takes no query or fragment")
        return StoreURL("sqlite", path=Path(rest))
    if scheme == "nats":
        return StoreURL("nats", servers=tuple(_parse_servers(url, rest)))
    raise UserInputError(f"store URL {url!r}: unknown scheme {scheme!r} (use sqlite:// or nats://)")


def _parse_servers(url: str, rest: str) -> list[str]:
    if "@" in rest:
        raise UserInputError(f"store URL {_redact(url)!r}: credentials do not go in the store URL; "
                             "the region token is the NATS password (--token-file)")
    servers: list[str] = []
    for i, part in enumerate(rest.split(","), 1):
        part = part.strip()
        if part.startswith("nats://"):  # nats://h1:1,nats://h2:2 is accepted too
            part = part[len("nats://"):]
        part = part.rstrip("/")
        if not part:
            raise UserInputError(f"store URL {url!r}: server {i} is empty")
        for bad in ("/", "?", "#"):
            if bad in part:
                raise UserInputError(f"store URL {url!r}: server {i} ({part!r}): a nats URL is "
                                     f"a list of host:port, nothing after it (found {bad!r})")
        host, port_s = part, str(DEFAULT_NATS_PORT)
        if not part.endswith("]") and ":" in part:  # "[::1]" alone has no port
            host, _, port_s = part.rpartition(":")
        if not _HOST.fullmatch(host):
            raise UserInputError(f"store URL {url!r}: server {i}: {host!r} is not a host name "
                                 "or address")
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise UserInputError(f"store URL {url!r}: server {i} ({part!r}): the port must be "
                                 "a number from 1 to 65535")
        servers.append(f"nats://{host}:{int(port_s)}")
    return servers


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


# -- backends -----------------------------------------------------------------

class MissingQueue:
    """Stands in for a queue this build cannot open: any use says why."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def __getattr__(self, name: str) -> Any:
        raise UserInputError(f"the queue is not available: {self._reason}")

    async def aclose(self) -> None:
        return None


@dataclass
class Backend:
    """A region's storage: ``store``, ``blobs``, ``queue``, and the NATS
    connection they share (None on SQLite). :meth:`aclose` closes them all."""

    store: Store
    blobs: Blobs
    queue: Queue
    nc: NATS | None = None
    url: StoreURL = field(default_factory=lambda: StoreURL("sqlite"))

    async def aclose(self) -> None:
        """Close the queue, blobs and store, then the connection. Idempotent."""
        for part in (self.queue, self.blobs, self.store):
            try:
                await part.aclose()
            except NimbusError:
                log.warning("closing %s failed", type(part).__name__, exc_info=True)
        if self.nc is not None:
            from nimbus.store.nats_conn import close_nats

            await close_nats(self.nc)


async def open_backend(url: str | None, *, region: str, token: str | None,
                       state_dir: Path | None = None) -> Backend:
    """Open the region's backend named by ``url`` (see the module doc).

    ``UserInputError`` for a bad URL, region or missing token or folder;
    ``UnavailableError`` when the backend cannot be reached."""
    parsed = parse_store_url(url)
    if parsed.scheme == "sqlite":
        folder = parsed.path or state_dir
        if folder is None:
            raise UserInputError("a sqlite store needs a state folder (sqlite:///abs/folder "
                                 "or --state-dir)")
        return _timed(await _open_sqlite(folder, parsed), "sqlite")
    if not token:
        raise UserInputError("a nats:// store needs the region token (--token-file): it is "
                             "the NATS password")
    return _timed(await _open_nats(parsed, region=region, token=token), "nats")


def _timed(backend: Backend, name: str) -> Backend:
    """The store's and queue's operations observed in the latency histograms."""
    from nimbus.observe.metrics import time_queue, time_store

    time_store(backend.store, name)
    time_queue(backend.queue, name)
    return backend


async def _open_sqlite(folder: Path, parsed: StoreURL) -> Backend:
    from nimbus.store.sqlite_queue import open_sqlite_queue

    if await asyncio.to_thread(folder.is_file):
        raise UserInputError(f"the sqlite store is a folder (store.db, blobs/, queue.db "
                             f"in it); {folder} is a file")
    store = await open_store("sqlite", folder / "store.db")
    try:
        blobs = await open_blobs(folder / "blobs")
        queue = await open_sqlite_queue(folder / "queue.db")
    except BaseException:
        await store.aclose()
        raise
    return Backend(store, blobs, queue, None, parsed)


async def _open_nats(parsed: StoreURL, *, region: str, token: str) -> Backend:
    from nimbus.store.nats_blobs import open_nats_blobs
    from nimbus.store.nats_conn import close_nats, connect_nats
    from nimbus.store.nats_store import check_region, open_nats_store

    check_region(region)
    nc = await connect_nats(list(parsed.servers), token, name=f"nimbus {region}")
    opened: list[Any] = []
    try:
        store = await open_nats_store(nc, region=region)
        opened.append(store)
        blobs = await open_nats_blobs(nc, region=region)
        opened.append(blobs)
        queue = await _open_nats_queue(nc, region)
    except BaseException:
        for part in reversed(opened):
            with contextlib.suppress(NimbusError):
                await part.aclose()
        await close_nats(nc)
        raise
    return Backend(store, blobs, queue, nc, parsed)


async def _open_nats_queue(nc: NATS, region: str) -> Queue:
    try:
        module = importlib.import_module(NATS_QUEUE)
    except ModuleNotFoundError as exc:
        if exc.name != NATS_QUEUE:
            raise
        log.warning("this build has no NATS queue (%s); the queue is unavailable", NATS_QUEUE)
        return MissingQueue(f"this build of nimbus has no {NATS_QUEUE}")
    queue: Queue = await module.open_nats_queue(nc, region=region)
    return queue


# -- single backends by name (older entry points) ------------------------------

def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"no store backend {target!r}") from exc


async def open_store(url_or_name: str, path: Path | str | None = None, **kwargs: Any) -> Store:
    """Open the backend named ``url_or_name`` (a key of :data:`STORES`, a
    ``name://path`` URL, or an import string) at ``path``."""
    name = url_or_name
    if "://" in url_or_name:
        name, _, rest = url_or_name.partition("://")
        path = path if path is not None else rest
    target = STORES.get(name, name)
    if ":" not in target:
        raise UserInputError(f"unknown store {name!r}; known: {', '.join(sorted(STORES))}")
    store: Store = await _load(target)(Path(path) if path is not None else None, **kwargs)
    return store


async def open_blobs(path: Path | str) -> Blobs:
    """Content-addressed blobs in the folder ``path``."""
    from nimbus.store.files import open_file_blobs

    return await open_file_blobs(Path(path))
