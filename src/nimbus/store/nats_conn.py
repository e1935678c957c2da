"""One NATS connection per process, and who wants to hear that it came back.

:func:`connect_nats` opens the connection a region's backends share: user
``nimbus`` with the region token as password, reconnecting forever with
short waits, a bounded connect timeout, and pings often enough that a dead
peer is noticed in seconds. :func:`connection_events` lets any number of
listeners (every store watch) hear about disconnects and reconnects, on a
connection made here or anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from nimbus.errors import UnavailableError
from nimbus.natsd import NATS_USER

T = TypeVar("T")

log = logging.getLogger("nimbus.nats")

CONNECT_TIMEOUT_S = 3  # per server tried
RECONNECT_WAIT_S = 0.5  # between rounds over the server list
PING_INTERVAL_S = 5  # with 2 outstanding pings: a silent peer is dropped after ~10 s
FIRST_CONNECT_ROUNDS = 2  # tries per server before the first connect gives up
FIRST_CONNECT_TIMEOUT_S = 30.0

Listener = Callable[[], None]


class ConnectionEvents:
    """Plain callbacks run on every disconnect / reconnect of one connection."""

    def __init__(self) -> None:
        self.on_disconnect: list[Listener] = []
        self.on_reconnect: list[Listener] = []

    def fire(self, which: list[Listener]) -> None:
        for listener in list(which):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one listener must not starve the others
                log.exception("a NATS connection listener failed")


_events: weakref.WeakKeyDictionary[NATS, ConnectionEvents] = weakref.WeakKeyDictionary()


def connection_events(nc: NATS) -> ConnectionEvents:
    """The listeners of ``nc``, installed once by chaining its callbacks
    (whatever the connection's owner passed to ``connect`` still runs)."""
    events = _events.get(nc)
    if events is not None:
        return events
    events = ConnectionEvents()
    _events[nc] = events
    before_dis = nc._disconnected_cb
    before_re = nc._reconnected_cb

    async def disconnected() -> None:
        if before_dis is not None:
            await before_dis()
        events.fire(events.on_disconnect)

    async def reconnected() -> None:
        if before_re is not None:
            await before_re()
        events.fire(events.on_reconnect)

    nc._disconnected_cb = disconnected
    nc._reconnected_cb = reconnected
    return events


async def connect_nats(servers: list[str], token: str, *, name: str = "nimbus") -> NATS:
    """Connect to the first server of ``servers`` that answers (``nats://``
    URLs) as user ``nimbus`` with ``token``. Raises ``UnavailableError``
    (with the driver error as ``__cause__``) when none does."""

    async def on_error(exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def on_disconnect() -> None:
        if not nc.is_closed:
            log.warning("NATS: disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("NATS: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    nc = NATS()
    errors: list[BaseException] = []

    async def on_first_error(exc: Exception) -> None:
        errors.append(exc)

    try:
        # Bounded while connecting (a wrong address or token fails the start),
        # unbounded once connected (a server restart never ends the process).
        async with asyncio.timeout(FIRST_CONNECT_TIMEOUT_S):
            await nc.connect(
                servers=servers, user=NATS_USER, password=token, name=name,
                connect_timeout=CONNECT_TIMEOUT_S,
                reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]  # float works
                max_reconnect_attempts=FIRST_CONNECT_ROUNDS, allow_reconnect=True,
                ping_interval=PING_INTERVAL_S, max_outstanding_pings=2,
                error_cb=on_first_error, disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        cause = next((e for e in errors if _is_auth_error(e)), errors[-1] if errors else exc)
        what = ("was refused: is the region token right?" if _is_auth_error(cause)
                else f"failed: {type(cause).__name__}: {cause}")
        raise UnavailableError(f"connecting to NATS at {', '.join(servers)} {what}") from cause
    nc.options["max_reconnect_attempts"] = -1
    nc._error_cb = on_error
    connection_events(nc)
    return nc


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization" in str(exc).lower()


async def close_nats(nc: NATS) -> None:
    """Close ``nc`` (flushing what is pending); never raises."""
    if nc.is_closed:
        return
    try:
        await nc.close()
    except (nats.errors.Error, OSError, TimeoutError):
        log.debug("closing the NATS connection", exc_info=True)


UNROUTED_TRIES = 20  # a request no stream answered (none elected, or interest not yet known)


async def retry_unrouted(make: Callable[[], Awaitable[T]]) -> T:
    """``await make()``, again (with backoff, about 5 s in all) while no
    stream answers it: nothing was stored or read, so trying again is safe
    (a stream just made, or electing its leader, or a server going away)."""
    delay = 0.02
    for _ in range(UNROUTED_TRIES - 1):
        try:
            return await make()
        except nats.js.errors.NoStreamResponseError:
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)
    return await make()


READ_RETRY_S = 20.0  # how long a read goes on trying while the stream elects a leader


async def retry_read(make: Callable[[], Awaitable[T]], *, within_s: float = READ_RETRY_S,
                     also: tuple[type[BaseException], ...] = ()) -> T:
    """``await make()`` for a read, again (with backoff) while no server
    answers in time or none is routed to: a stream whose leader died is
    electing another, and a read changes nothing, so asking again is safe.
    ``also``: more errors worth asking again for (e.g. a read served by a
    replica still catching up). Gives up with the last error after ``within_s``."""
    deadline = time.monotonic() + within_s
    delay = 0.05
    again: tuple[type[BaseException], ...] = (
        nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError,
        nats.errors.TimeoutError, *also)
    while True:
        try:
            return await make()
        except again:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

