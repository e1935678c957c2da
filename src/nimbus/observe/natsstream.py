"""What the region's JetStream streams of logs and traces share.

- :func:`ensure_stream`: create a stream, or bring an existing one to its
  config, waiting out a cluster still electing leaders;
- :class:`StreamPublisher`: a background task that publishes what a sink
  gathered in memory, message by message with a ``Nats-Msg-Id`` (a batch
  whose acknowledgement was lost is sent again and JetStream's duplicate
  window drops the copy), with a bounded buffer and a backoff; nothing on
  the request path waits on NATS;
- :class:`DirectReader`: reads by subject through direct gets (any replica
  answers), every request standalone with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import Error as JsError
from nats.js.errors import NotFoundError

from nimbus.aio import wait_event
from nimbus.errors import UnavailableError
from nimbus.region import check_region_name

PUBLISH_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0
STREAM_READY_S = 30.0  # a new cluster electing leaders, or a racing creator
CREATE_TIMEOUT_S = 1.0  # a create's answer; then the loop looks whether it landed
READ_BATCH = 256  # messages per direct-get request


def region_stream(name: str, subjects: str, *, replicas: int, max_bytes: int,
                  max_age_s: float, max_msg_size: int, description: str,
                  max_msgs_per_subject: int = -1,
                  duplicate_window_s: float = 120.0) -> StreamConfig:
    """A region's stream of records: on disk, replicated, the oldest
    dropped past its bounds, read by direct gets, retries deduplicated
    (the server remembers every message id for ``duplicate_window_s``)."""
    return StreamConfig(
        name=name, subjects=[subjects], storage=StorageType.FILE, num_replicas=replicas,
        discard=DiscardPolicy.OLD, max_bytes=max_bytes, max_age=float(max_age_s),
        max_msgs_per_subject=max_msgs_per_subject, max_msg_size=max_msg_size,
        allow_direct=True, duplicate_window=duplicate_window_s, description=description)


def check_limit(what: str, key: str, value: object, least: int, most: int | None = None) -> None:
    """``value`` an integer from ``least`` (to ``most``), else a ValueError
    naming ``what`` limit ``key``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least \
            or (most is not None and value > most):
        span = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise ValueError(f"{what} limit {key} must be an integer {span}, was: {value!r}")


def check_age(what: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 1:
        raise ValueError(f"{what} limit max_age_s must be a number of seconds of at least 1, "
                         f"was: {value!r}")


async def ensure_stream(nc: NATS, config: StreamConfig, what: str,
                        ready_s: float = STREAM_READY_S) -> None:
    """Create the stream ``config`` names, or bring an existing one to it.
    A cluster still electing its leaders, or another process creating the
    stream at the same moment, is waited out for up to ``ready_s``."""
    # Two processes making one stream at the same moment: the server may
    # leave one of them without an answer while the stream is being made, so
    # each request first waits a short while, then longer on each try (a
    # loaded cluster's answers are slow but come), and the loop asks again.
    deadline = time.monotonic() + ready_s
    wait_s = CREATE_TIMEOUT_S
    while True:
        js = nc.jetstream(timeout=wait_s)
        try:
            try:
                await js.stream_info(config.name or "")
            except NotFoundError:
                await js.add_stream(config)
                return
            await js.update_stream(config)
            return
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                nats.errors.NoRespondersError, nats.js.errors.BadRequestError) as exc:
            # BadRequest: "stream name already in use" while another creates it
            if time.monotonic() > deadline:
                raise UnavailableError(f"the {what} stream {config.name} did not become "
                                       f"available within {ready_s:.0f}s: {exc!r}") from exc
            wait_s = min(READ_TIMEOUT_S, wait_s * 2)
            await asyncio.sleep(0.2)


# -- writing -----------------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """One message waiting for its acknowledgement."""

    subject: str
    payload: bytes
    count: int  # the records in it (lines, spans)
    msg_id: str

    def data(self) -> bytes:
        return self.payload


class StreamPublisher:
    """The background half of a sink: ``_make_batches`` turns what the sink
    gathered into :class:`Outgoing` messages on ``_outbox``; the task
    publishes them, ``window`` at a time (1: in order, each acknowledged,
    with a deadline, before the next). ``start()`` on the event loop first.
    The sink keeps ``_bytes`` (buffered, outbox included) within its bound."""

    what = "records"
    window = 1  # messages published at once (1: in order, each acknowledged first)

    def __init__(self, nc: NATS, *, region: str, name: str, flush_s: float,
                 buffer_bytes: int, least_buffer_bytes: int) -> None:
        if buffer_bytes < least_buffer_bytes:
            raise ValueError(f"buffer_bytes must be at least {least_buffer_bytes}, "
                             f"was: {buffer_bytes}")
        self.region = check_region_name(region)
        self.buffer_bytes = buffer_bytes
        self.nc = nc
        self.flush_s = flush_s
        self.js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self.log = logging.getLogger(f"nimbus.{self.what}")
        self._outbox: deque[Any] = deque()  # Outgoing: made, not yet acknowledged
        self._bytes = 0
        self._boot = f"{name}-{time.time_ns():x}"
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._close_by = 0.0
        self.published = 0  # records acknowledged by the stream
        self.dropped = 0  # records dropped, all told
        self.publish_errors = 0

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def next_msg_id(self) -> str:
        self._seq += 1
        return f"{self._boot}-{self._seq}"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"nats-{self.what}-sink")

    def flush(self) -> None:
        """Publish soon (the next round does not wait for ``flush_s``)."""
        self._wake.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records. What is buffered is still published, for at
        most ``timeout_s`` more (await :meth:`aclose` to wait for that)."""
        if not self._closing:
            self._closing = True
            self._close_by = time.monotonic() + timeout_s
        self._wake.set()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Publish what is buffered (within ``timeout_s``), then stop."""
        self.close(timeout_s)
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout_s + 1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- what a sink supplies --

    def _pending(self) -> bool:
        """Records gathered, not yet turned into messages."""
        raise NotImplementedError

    def _make_batches(self) -> None:
        raise NotImplementedError

    # -- the task --

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._closing:
                await wait_event(self._wake, self.flush_s + backoff)
            else:
                await asyncio.sleep(backoff)
            self._wake.clear()
            if self._closing and (not (self._outbox or self._pending())
                                  or time.monotonic() > self._close_by):
                return
            if not self._outbox:
                self._make_batches()
            try:
                while self._outbox:
                    n = min(self.window, len(self._outbox))
                    if n == 1:
                        await self._publish(self._outbox[0])
                    else:  # order does not matter: acknowledgements awaited together
                        await asyncio.gather(*(self._publish(self._outbox[i])
                                               for i in range(n)))
                    for _ in range(n):
                        batch = self._outbox.popleft()
                        self._bytes -= len(batch.payload)
                        self.published += batch.count
                    if not self._outbox and self._pending():
                        self._make_batches()
                backoff = 0.0
            except (NatsError, JsError, TimeoutError, OSError) as exc:
                self.publish_errors += 1
                if self.publish_errors == 1 or self.publish_errors % 100 == 0:
                    self.log.warning("publishing %s failed (%d times so far): %r", self.what,
                                     self.publish_errors, exc)
                backoff = min(max(2 * backoff, 0.1), 2.0)
            except Exception:  # a bug of ours: logged, the loop goes on
                self.log.exception("%s publisher failed", self.what)
                backoff = 1.0

    async def _publish(self, batch: Outgoing) -> None:
        await self.js.publish(batch.subject, batch.data(), timeout=PUBLISH_TIMEOUT_S,
                              headers={"Nats-Msg-Id": batch.msg_id})


# -- reading -----------------------------------------------------------------------


class DirectReader:
    """Direct gets on one stream (``allow_direct``): any replica answers."""

    def __init__(self, nc: NATS, stream: str, what: str,
                 timeout_s: float = READ_TIMEOUT_S) -> None:
        self.nc = nc
        self.stream = stream
        self.what = what
        self.timeout_s = timeout_s

    async def get(self, request: dict[str, Any], suffix: str = "") -> list[tuple[int, bytes]]:
        """One direct-get request: the (sequence, payload) pairs it answers,
        none for "no message"."""
        where = f"reading {self.what} from {self.stream}"
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        out: list[tuple[int, bytes]] = []
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self.stream}{suffix}",
                                  orjson.dumps(request) if request else b"", reply=inbox)
            deadline = time.monotonic() + self.timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(f"{where}: no answer within {self.timeout_s}s")
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeoutError:
                    raise UnavailableError(f"{where}: no answer within "
                                           f"{self.timeout_s}s") from None
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404" or status == "408":
                    return out
                if status == "204":  # end of batch
                    return out
                if status == "503":
                    raise UnavailableError(
                        f"{where}: no server answered for the stream (it does not exist "
                        "yet, or JetStream is unavailable)")
                if status:
                    raise UnavailableError(f"{where}: status {str(status).splitlines()[0]}")
                out.append((int(headers["Nats-Sequence"]), msg.data))
                if "batch" not in request:
                    return out
        except NatsError as exc:
            raise UnavailableError(f"{where}: {exc!r}") from exc
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def range(self, subject: str, start: int,
                    up_to: int | None) -> AsyncIterator[tuple[int, bytes]]:
        """The messages of ``subject`` (wildcards allowed) from sequence
        ``start`` (to ``up_to``)."""
        while up_to is None or start <= up_to:
            req: dict[str, Any] = {"seq": max(start, 1), "next_by_subj": subject,
                                   "batch": READ_BATCH}
            if up_to is not None:
                req["up_to_seq"] = up_to
            got = await self.get(req)
            if not got:
                return
            for seq, data in got:
                if up_to is not None and seq > up_to:
                    return
                yield seq, data
            start = got[-1][0] + 1
