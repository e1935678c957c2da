"""Calling functions on worker processes from a gateway.

:class:`WorkerDirectory` knows the region's workers (fed by the cluster
registry through :meth:`WorkerDirectory.update` / :meth:`~WorkerDirectory.remove`)
and keeps one authenticated frame connection to each
(:mod:`nimbus.worker.frames`), reconnecting with backoff. Each worker also
reports its ready instances per target over that connection the moment
they change, which is what dispatch reads while the connection is up.

:class:`RemoteInvoker` is what a route (or an event consumer) points at for
one function version, in place of an in-process ``FunctionPool``:

- **Pick**: the worker with the fewest of this gateway's calls outstanding
  per ready instance of the target.
- **Hold**: while no worker has a ready instance (or the gateway's share of
  ``max_concurrency``, :attr:`RemoteInvoker.cap`, is used), requests wait, at
  most ``max_queue`` of them, each up to the function's timeout + 10 s, then
  429 as the pool answers; they are handed on oldest first the moment a
  worker reports a ready instance or a call ends.
- **Retry rule**: a call goes to another worker only when it cannot have
  run twice because of it: the worker answered that it did not run it (no
  such pool here, stopping, throttled), or it was never written to a live
  connection; or, once, when the connection died with it in flight and the
  request is idempotent (an HTTP GET, HEAD, PUT, DELETE or OPTIONS; async
  and queue events are not). Otherwise a lost worker is a 502
  (``InstanceDiedError``), as a lost instance is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import socket
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import orjson

from nimbus.errors import (
    ClosedError,
    InstanceDiedError,
    InvocationTimeoutError,
    NimbusError,
    ThrottledError,
    UnavailableError,
)
from nimbus.observe import metrics, tracing
from nimbus.observe.platformlog import ThrottleNotes
from nimbus.worker import frames as f
from nimbus.worker.pool import ACQUIRE_GRACE_S

if TYPE_CHECKING:
    from nimbus.worker.target import Target

log = logging.getLogger("nimbus.remote")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
CONNECT_TIMEOUT_S = 3.0  # TCP connect and handshake
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
PING_EVERY_S = 1.0  # when nothing came from the worker for this long
DEAD_AFTER_S = 6.0  # nothing at all from a worker with calls in flight: it is gone
ANSWER_MARGIN_S = 5.0  # beyond the longest a worker may hold and run a call
MAX_CALLS = 4096  # in flight per connection (the worker refuses more)

_dumps = orjson.dumps
_loads = orjson.loads
_HEADER = f.HEADER
_INVOKE = f.INVOKE
_RESULT = f.RESULT


class WorkerLost(UnavailableError):
    """The connection to a worker is gone. ``sent``: the call was written to
    it (so it may be running there)."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class NotRun(Exception):
    """The worker answered that it never handed the call to an instance."""

    def __init__(self, kind: str, error: NimbusError) -> None:
        super().__init__(str(error))
        self.kind = kind
        self.error = error


class HandshakeError(Exception):
    """The peer is not a worker of this region (or not the one expected)."""


def idempotent(event: Any) -> bool:
    """Whether ``event`` may run twice: an HTTP request whose method says so."""
    try:
        method = event["requestContext"]["http"]["method"]  # payload 2.0
    except (KeyError, TypeError, IndexError):
        method = event.get("httpMethod") if type(event) is dict else None  # payload 1.0
    return isinstance(method, str) and method.upper() in IDEMPOTENT_METHODS


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a (host, port) pair."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"worker frame address {address!r} must be host:port")
        host = host.removeprefix("[").removesuffix("]")
        port = int(port_text)
    if not host or not 0 < int(port) < 65536:
        raise ValueError(f"worker frame address {address!r} must be host:port")
    return host, int(port)


class WorkerLink:
    """One worker as this gateway sees it."""

    def __init__(self, worker_id: str, host: str, port: int, ready: Mapping[str, int]) -> None:
        self.id = worker_id
        self.host = host
        self.port = port
        self.registry: dict[str, int] = dict(ready)  # as the registry last said
        self.reported: dict[str, int] | None = None  # as the worker says, while connected
        self.conn: _Client | None = None
        self.outstanding: dict[str, int] = {}  # this gateway's calls in flight, per target
        self.calls = 0
        self.removed = False
        self.task: asyncio.Task[None] | None = None

    def ready(self, key: str) -> int:
        if self.conn is None:
            return 0
        ready = self.reported if self.reported is not None else self.registry
        return ready.get(key, 0)

    def keys(self) -> list[str]:
        ready = self.reported if self.reported is not None else self.registry
        return [k for k, n in ready.items() if n > 0]

    def forget(self, key: str) -> None:
        """The worker said it does not run ``key`` (its instances stopped
        since it last said): none ready here until it says otherwise."""
        ready = self.reported if self.reported is not None else self.registry
        ready[key] = 0

    def reserve(self, key: str) -> None:
        self.outstanding[key] = self.outstanding.get(key, 0) + 1
        self.calls += 1

    def release(self, key: str) -> None:
        self.outstanding[key] -= 1
        self.calls -= 1


class WorkerDirectory:
    """The region's workers, one persistent connection each."""

    def __init__(self, token: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 max_calls: int = MAX_CALLS, ping_every_s: float = PING_EVERY_S,
                 dead_after_s: float = DEAD_AFTER_S) -> None:
        if len(token) < 32:
            raise ValueError("the region token must have at least 32 characters")
        self.token = token.encode()
        self.connect_timeout_s = connect_timeout_s
        self.max_calls = max_calls
        self.ping_every_s = ping_every_s
        self.dead_after_s = dead_after_s
        self.workers: dict[str, WorkerLink] = {}
        self._invokers: dict[str, weakref.WeakSet[RemoteInvoker]] = {}
        self._draining: set[WorkerLink] = set()
        self._closed = False

    # -- fed by the registry --------------------------------------------------

    def update(self, worker_id: str, address: str | tuple[str, int],
               ready: Mapping[str, int]) -> None:
        """A worker is (still) there, at ``address`` (its frame server), with
        ``ready`` instances per target key (``fn@version``)."""
        if self._closed:
            raise ClosedError("worker directory is closed")
        if not f.WORKER_ID.fullmatch(worker_id):
            raise ValueError(f"worker id {worker_id!r} must be 1-64 letters, digits, "
                             "'.', '_' or '-'")
        host, port = parse_address(address)
        link = self.workers.get(worker_id)
        if link is not None and (link.host, link.port) != (host, port):
            self.remove(worker_id)  # moved: the old connection drains
            link = None
        if link is None:
            link = self.workers[worker_id] = WorkerLink(worker_id, host, port, ready)
            link.task = asyncio.get_running_loop().create_task(self._keep_connected(link))
            return
        grown = [k for k, n in ready.items() if n > link.registry.get(k, 0)]
        link.registry = dict(ready)
        if grown and link.reported is None:
            self._changed(grown)

    def remove(self, worker_id: str) -> None:
        """The worker is gone from the registry: no new calls go to it; the
        connection closes once the calls in flight on it have answered."""
        link = self.workers.pop(worker_id, None)
        if link is None:
            return
        link.removed = True
        conn = link.conn
        if conn is not None and conn.pending:
            conn.close_when_idle = True
            self._draining.add(link)
        else:
            if conn is not None:
                conn.close()
            if link.task is not None:
                link.task.cancel()

    # -- read by invokers ---------------------------------------------------------

    def take(self, key: str, exclude: Iterable[str] = ()) -> WorkerLink | None:
        """The worker with the fewest outstanding calls per ready instance of
        ``key``, its slot reserved (``release`` it), or None."""
        best: WorkerLink | None = None
        low = 0.0
        ties = 0
        limit = self.max_calls
        for link in self.workers.values():
            ready = link.ready(key)
            if ready <= 0 or link.calls >= limit or (exclude and link.id in exclude):
                continue
            score = link.outstanding.get(key, 0) / ready
            if best is None or score < low:
                best, low, ties = link, score, 1
            elif score == low:
                # equally loaded as this gateway sees them: any of them, at
                # random (another gateway's calls are invisible here, so a
                # fixed order would send every gateway to the same worker)
                ties += 1
                if random.random() * ties < 1.0:
                    best = link
        if best is not None:
            best.reserve(key)
        return best

    def ready(self, key: str) -> int:
        """Ready instances of ``key`` on every connected worker."""
        return sum(link.ready(key) for link in self.workers.values())

    def link_for_logs(self, key: str) -> WorkerLink | None:
        links = [w for w in self.workers.values() if w.conn is not None]
        for link in links:
            if link.ready(key):
                return link
        return links[0] if links else None

    def _listen(self, key: str, invoker: RemoteInvoker) -> None:
        self._invokers.setdefault(key, weakref.WeakSet()).add(invoker)

    def _changed(self, keys: Iterable[str]) -> None:
        """More may be ready for ``keys``: held requests may go."""
        for key in keys:
            invokers = self._invokers.get(key)
            if invokers:
                for inv in list(invokers):
                    inv._wake()

    # -- connections --------------------------------------------------------------

    async def _keep_connected(self, link: WorkerLink) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN_S
        problem: str | None = None
        while not link.removed:
            holder: list[_Client] = []
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await loop.create_connection(
                        functools.partial(_new_client, holder, self, link), link.host, link.port)
                    await holder[0].authed
            except Exception as exc:  # noqa: BLE001 - any failure: try again later
                if holder:
                    holder[0].abort()
                why = _why(exc)
                if why != problem:  # once per kind of trouble, not per attempt
                    log.warning("worker %s at %s:%d: %s; retrying", link.id, link.host,
                                link.port, why)
                    problem = why
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if problem is not None:
                log.info("worker %s at %s:%d reached", link.id, link.host, link.port)
                problem = None
            delay = BACKOFF_MIN_S
            conn = holder[0]
            link.conn = conn
            self._changed(link.keys())
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(conn.closed)
            if link.conn is conn:
                link.conn = None
                link.reported = None
            self._draining.discard(link)
            if not link.removed:
                problem = "connection lost"
                log.warning("worker %s at %s:%d: connection lost; reconnecting",
                            link.id, link.host, link.port)

    async def aclose(self) -> None:
        """Close every connection (calls in flight fail) and stop reconnecting."""
        self._closed = True
        links = list(self.workers.values()) + list(self._draining)
        self.workers.clear()
        self._draining.clear()
        for link in links:
            link.removed = True
            if link.conn is not None:
                link.conn.abort()
            if link.task is not None:
                link.task.cancel()
        for link in links:
            if link.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task


def _new_client(holder: list[_Client], directory: WorkerDirectory, link: WorkerLink) -> _Client:
    conn = _Client(directory, link)
    holder.append(conn)
    return conn


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no connection and handshake within the time allowed"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, HandshakeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _Client(asyncio.Protocol):
    """The gateway's end of one worker connection."""

    def __init__(self, directory: WorkerDirectory, link: WorkerLink) -> None:
        self.directory = directory
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.authed: asyncio.Future[None] = self.loop.create_future()
        self.authed.add_done_callback(_retrieved)  # a failed handshake may have no reader
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self.close_when_idle = False
        self.last_rx = self.loop.time()
        self._ids = 0
        self._nonce = b""
        self._out: list[bytes] = []
        self._unsent: list[int] = []  # calls in _out, not yet written
        self._flush_soon = False
        self._gone = False
        self._ticker: asyncio.TimerHandle | None = None

    # -- the handshake --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def _fail_handshake(self, why: str) -> None:
        if not self.authed.done():
            self.authed.set_exception(HandshakeError(why))
        self.abort()

    def _handshake(self, kind: int, body: bytes) -> bool:
        """One handshake frame; False when the handshake failed (closed)."""
        d = self.directory
        if kind == f.HELLO and not self._nonce:
            try:
                version, worker_id, nonce_hex = _loads(body)
                nonce_w = bytes.fromhex(nonce_hex)
            except (ValueError, TypeError):
                self._fail_handshake("it does not speak the frame protocol")
                return False
            if version != f.VERSION or len(nonce_w) != f.NONCE_BYTES:
                self._fail_handshake(f"it speaks {version!r}, not {f.VERSION}")
                return False
            if worker_id != self.link.id:
                self._fail_handshake(f"it is worker {worker_id!r}, not {self.link.id!r}")
                return False
            self._nonce_w = nonce_w
            self._nonce = secrets.token_bytes(f.NONCE_BYTES)
            proof = f.gateway_proof(d.token, self.link.id, nonce_w, self._nonce)
            assert self.transport is not None
            self.transport.write(b"".join(f.pack(f.AUTH, self._nonce, proof)))
            return True
        elif kind == f.WELCOME and self._nonce:
            expected = f.worker_proof(d.token, self.link.id, self._nonce_w, self._nonce)
            if not f.check_proof(expected, body):
                self._fail_handshake("its proof is wrong: it does not hold this region's token")
                return False
            self._ticker = self.loop.call_later(d.ping_every_s, self._tick)
            self.authed.set_result(None)
            return True
        self._fail_handshake(f"it sent a frame of kind {kind} during the handshake")
        return False

    # -- frames -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._gone:
            return
        self.last_rx = self.loop.time()
        buf = self.buf
        buf += data
        while not self.authed.done():  # nothing but the handshake until it is done
            if len(buf) < f.HEADER_SIZE:
                return
            size, kind = _HEADER.unpack_from(buf, 0)
            if size > f.HANDSHAKE_MAX:
                self._fail_handshake(f"it sent a frame of {size} bytes during the handshake")
                return
            if len(buf) < f.HEADER_SIZE + size:
                return
            body = bytes(buf[f.HEADER_SIZE:f.HEADER_SIZE + size])
            del buf[:f.HEADER_SIZE + size]
            if not self._handshake(kind, body):
                return
        try:
            frames = f.split(buf, f.MAX_FRAME)
        except f.FrameError as exc:
            log.warning("worker %s: %s; closing", self.link.id, exc)
            self.abort()
            return
        try:
            self._frames(frames)
        except (ValueError, TypeError) as exc:
            log.warning("worker %s sent a malformed frame (%s); closing", self.link.id, exc)
            self.abort()

    def _frames(self, frames: list[tuple[int, bytes]]) -> None:
        pending = self.pending
        for kind, body in frames:
            if kind == _RESULT:
                cid, _, data = body.partition(b"\n")
                entry = pending.pop(int(cid), None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(_loads(data))
            elif kind == f.ERROR:
                cid, _, data = body.partition(b"\n")
                entry = pending.pop(int(cid), None)
                if entry is not None and not entry[0].done():
                    kind_, message, detail = _loads(data)
                    error = f.error_from(kind_, message, detail)
                    entry[0].set_exception(NotRun(kind_, error) if kind_ in f.NOT_RUN
                                           else error)
            elif kind == f.STATE:
                self._state(body)
            elif kind != f.PONG:
                log.warning("worker %s sent a frame of kind %d; closing", self.link.id, kind)
                self.abort()
                return
        if self.close_when_idle and not pending:
            self.close()

    def _state(self, body: bytes) -> None:
        try:
            ready = _loads(body)
        except ValueError:
            return
        if not isinstance(ready, dict):
            return
        link = self.link
        before = link.reported if link.reported is not None else link.registry
        link.reported = {k: n for k, n in ready.items() if isinstance(n, int)}
        grown = [k for k, n in link.reported.items() if n > before.get(k, 0)]
        if grown and link.conn is self:
            self.directory._changed(grown)

    def _tick(self) -> None:
        """Every ping_every_s: ping if the worker was quiet; give up on one
        that stays silent with calls in flight; expire forgotten calls."""
        if self._gone:
            return
        d = self.directory
        now = self.loop.time()
        quiet = now - self.last_rx
        if self.pending and quiet > d.dead_after_s:
            log.warning("worker %s answered nothing for %.1f s: dropping the connection",
                        self.link.id, quiet)
            self.abort()
            return
        if quiet >= d.ping_every_s:
            self.send([_HEADER.pack(0, f.PING)])
        late = [cid for cid, (_fut, deadline) in self.pending.items() if deadline < now]
        for cid in late:
            fut, _deadline = self.pending.pop(cid)
            if not fut.done():
                fut.set_exception(InvocationTimeoutError(
                    f"worker {self.link.id} did not answer in time"))
        if self.close_when_idle and not self.pending:
            self.close()
            return
        self._ticker = self.loop.call_later(d.ping_every_s, self._tick)

    # -- calls ---------------------------------------------------------------------

    def call(self, function: str, version: int, rid: str, timeout_s: float, payload: bytes,
             answer_by: float) -> asyncio.Future[Any]:
        self._ids += 1
        cid = self._ids
        fut = self.loop.create_future()
        self.pending[cid] = (fut, answer_by)
        span = tracing.active.get(rid) if tracing.on else None
        meta = _dumps([cid, function, version, rid, timeout_s] if span is None
                      else [cid, function, version, rid, timeout_s, span.traceparent])
        self._unsent.append(cid)
        self.send([_HEADER.pack(len(meta) + 1 + len(payload), _INVOKE), meta, b"\n", payload])
        return fut

    def send(self, parts: list[bytes]) -> None:
        self._out.extend(parts)
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._out = self._out, []
        if not self._gone and self.transport is not None:
            self.transport.write(b"".join(out))
            self._unsent.clear()

    # -- the end ------------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None and not self._gone:
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        if self._ticker is not None:
            self._ticker.cancel()
        if not self.authed.done():
            self.authed.set_exception(HandshakeError(
                "it closed the connection during the handshake (it refused our proof, "
                "or is not a worker)"))
        pending, self.pending = self.pending, {}
        unsent = set(self._unsent)
        for cid, (fut, _deadline) in pending.items():
            if not fut.done():
                fut.set_exception(WorkerLost(
                    f"the connection to worker {self.link.id} was lost", sent=cid not in unsent))
        self._out.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        link = self.link
        if link.conn is self:
            link.conn = None
            link.reported = None


class RemoteInvoker:
    """Runs invocations of one function version on the region's workers;
    duck-compatible with ``FunctionPool`` where the gateway and the event
    dispatcher use one."""

    def __init__(self, target: Target, directory: WorkerDirectory, *,
                 cap: int | None = None,
                 logs: Callable[..., None] | None = None) -> None:
        spec = target.spec
        self.target = target
        self.directory = directory
        self.key = f.target_key(target.function, target.version)
        self.timeout_s = spec.timeout_s
        whole = spec.max_instances * spec.concurrency
        self._cap = cap if cap is not None else min(spec.max_concurrency or whole, whole)
        self.max_queue = spec.max_queue
        self.in_flight = 0
        self.arrivals = 0  # since the last take_arrivals
        self.throttles = 0
        self.cold_starts = 0  # instances start on workers, not here
        self.retries = 0  # idempotent calls sent again after their worker was lost
        self.rerouted = 0  # calls a worker did not run, sent to another
        self.closed = False
        self._logs = logs
        self._throttle_notes = ThrottleNotes(self.log)
        self._waiters: deque[asyncio.Future[WorkerLink]] = deque()
        self._rerouting: list[tuple[asyncio.Future[WorkerLink], frozenset[str]]] = []
        # Outcomes decided here, not by a worker's pool: throttled before a
        # worker took the call, or its worker lost (its counters went with it).
        self.metrics = metrics.invocation_stats(target.function, target.version)
        directory._listen(self.key, self)

    @property
    def cap(self) -> int:
        """Calls this gateway runs at once (its share of ``max_concurrency``)."""
        return self._cap

    @cap.setter
    def cap(self, value: int) -> None:
        self._cap = max(0, int(value))  # 0: none of the region's cap is ours now
        self._wake()

    @property
    def held(self) -> int:
        """Requests waiting for a ready instance or a slot."""
        return len(self._waiters)

    def take_arrivals(self) -> int:
        n, self.arrivals = self.arrivals, 0
        return n

    def stats(self) -> dict[str, Any]:
        return {"concurrency": self.in_flight, "held": len(self._waiters),
                "ready": self.directory.ready(self.key), "cap": self._cap,
                "throttles": self.throttles, "retries": self.retries,
                "rerouted": self.rerouted}

    # -- the request path ---------------------------------------------------------

    async def invoke(self, rid: str, event: Any) -> Any:
        self.arrivals += 1
        link = self.directory.take(self.key) if self.in_flight < self._cap else None
        if link is None:
            try:
                link = await self._acquire_slow()  # its slot comes reserved
            except BaseException as exc:
                self.metrics.failed(exc)
                raise
        else:
            self.in_flight += 1
        try:
            return await self._call(link, rid, event)
        finally:
            self.in_flight -= 1
            self._wake()

    async def _call(self, link: WorkerLink, rid: str, event: Any) -> Any:
        payload = _dumps(event)
        key = self.key
        target = self.target
        loop = asyncio.get_running_loop()
        now = loop.time()
        look_until = now + self.timeout_s + ACQUIRE_GRACE_S  # for another worker
        answer_by = now + 2 * self.timeout_s + ACQUIRE_GRACE_S + ANSWER_MARGIN_S
        tried: set[str] = set()
        lost_once = False
        while True:
            wait = True
            lost_here = False
            absent = False
            try:
                conn = link.conn
                if conn is None:
                    raise WorkerLost(f"worker {link.id} is not connected", sent=False)
                return await conn.call(target.function, target.version, rid, self.timeout_s,
                                       payload, answer_by)
            except WorkerLost as exc:
                if exc.sent:
                    if lost_once or not idempotent(event):
                        self.metrics.instance_died += 1
                        raise InstanceDiedError(
                            f"worker {link.id} was lost during the invocation") from None
                    lost_once = True
                    self.retries += 1
                    failure: NimbusError = InstanceDiedError(
                        f"worker {link.id} was lost during the invocation and no other "
                        f"worker could take it")
                    lost_here = True
                else:  # it ran nowhere: as a hold that found no instance in time
                    failure = ThrottledError(f"no worker could take {target.function} in time")
                    lost_here = True
            except NotRun as exc:
                self.rerouted += 1
                failure = exc.error
                wait = exc.kind not in ("throttled", "overloaded")  # elsewhere now, or 429
                if exc.kind == "absent":
                    # Its instances stopped (scaled to zero) after it last
                    # said: it may be the one to start the next, so the call
                    # may wait for it too, once it says it has one ready.
                    link.forget(key)
                    absent = True
            finally:
                link.release(key)
            if not absent:
                tried.add(link.id)
            nxt = self.directory.take(key, tried)
            if nxt is None and wait and loop.time() < look_until:
                nxt = await self._reroute(frozenset(tried), look_until)
            if nxt is None:
                if lost_here:  # a worker's answer (NotRun) was counted by its pool
                    self.metrics.failed(failure)
                raise failure
            link = nxt

    async def _acquire_slow(self) -> WorkerLink:
        if self.closed:
            raise ClosedError(f"{self.target.function} version {self.target.version} "
                              "is no longer served here")
        if self.in_flight + len(self._waiters) >= self._cap + self.max_queue:
            self._throttled("at the concurrency limit with the queue full")
            raise ThrottledError(
                f"{self.target.function} is at its concurrency limit ({self._cap}) and "
                f"{len(self._waiters)} requests are waiting", retry_after_s=1)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WorkerLink] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(self.timeout_s + ACQUIRE_GRACE_S, _expire, waiter)
        try:
            return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # handed a worker in the same instant we gave up: give it back
                waiter.result().release(self.key)
                self.in_flight -= 1
                self._wake()
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                self._throttled("held until their deadline")
                if self.directory.ready(self.key):
                    raise ThrottledError(f"no slot of {self.target.function} became free "
                                         "in time") from None
                raise ThrottledError(f"no instance of {self.target.function} became ready "
                                     "in time") from None
            raise
        finally:
            timer.cancel()

    async def _reroute(self, exclude: frozenset[str], until: float) -> WorkerLink | None:
        """A worker other than ``exclude`` for a call that already holds its
        slot, waiting until ``until`` for one to be ready."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WorkerLink] = loop.create_future()
        entry = (waiter, exclude)
        self._rerouting.append(entry)
        timer = loop.call_at(until, _expire, waiter)
        try:
            return await waiter
        except TimeoutError:
            return None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                waiter.result().release(self.key)
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._rerouting.remove(entry)

    def _wake(self) -> None:
        """Hand ready workers to waiting calls: rerouted ones first (they
        hold a slot already), then held requests, oldest first, within the cap."""
        take = self.directory.take
        key = self.key
        if self._rerouting:
            for waiter, exclude in list(self._rerouting):
                if waiter.done():
                    continue
                link = take(key, exclude)
                if link is None:
                    break
                waiter.set_result(link)
        waiters = self._waiters
        while waiters and self.in_flight < self._cap:
            if waiters[0].done():
                waiters.popleft()
                continue
            link = take(key)
            if link is None:
                return
            self.in_flight += 1  # reserved now, so no one else takes it
            waiters.popleft().set_result(link)

    def _throttled(self, reason: str) -> None:
        self.throttles += 1
        self._throttle_notes.hit(reason)

    def log(self, rid: str | None, stream: str, text: str, level: str | None = None) -> None:
        """A line in this function's logs (kept by a worker)."""
        if self._logs is not None:
            self._logs(rid, stream, text, level)
            return
        link = self.directory.link_for_logs(self.key)
        if link is None or link.conn is None:
            log.warning("%s: no worker connected to keep this log line: %s",
                        self.target.function, text)
            return
        body = _dumps([self.target.function, self.target.version, rid, stream, text, level])
        link.conn.send(f.pack(f.LOG, body))

    def close(self) -> None:
        """Stop taking requests; the held ones fail (ClosedError)."""
        self.closed = True
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(ClosedError(f"{self.target.function} version "
                                            f"{self.target.version} is no longer served here"))


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _expire(waiter: asyncio.Future[WorkerLink]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
