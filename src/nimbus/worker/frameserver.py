"""A worker's frame server: gateways call this worker's functions over TCP.

Every connection starts with the challenge-response of
:mod:`nimbus.worker.frames`: nothing but the handshake is read until the
gateway has proven it holds the region token, a peer that does not within
``auth_timeout_s`` (or proves wrong, or sends anything else) is closed
without an answer and logged once, and the worker then proves itself back.
After that the connection is a multiplex of calls: each INVOKE goes to the
pool of its (function, version) through the pool's callback entry points
(:meth:`FunctionPool.start`, no task per call while an instance is free),
and its RESULT or ERROR is queued with the others of the same loop turn and
written in one go. A call whose pool is not here, or that comes while the
server closes or past ``max_calls`` on its connection, is answered at once
with an error kind the gateway knows was never run, so it can go elsewhere.

Every ``state_every_s`` the ready instances of each pool are compared with
what was last said and, if they changed, sent to every gateway (STATE): a
gateway holding requests for a function learns the moment an instance is
ready, without waiting for the cluster registry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson

from nimbus.errors import NimbusError
from nimbus.observe import tracing
from nimbus.worker import frames as f

if TYPE_CHECKING:
    from nimbus.manifest.model import AppSpec
    from nimbus.worker.pool import FunctionPool
    from nimbus.worker.worker import Worker

log = logging.getLogger("nimbus.frames")

AUTH_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 15.0  # no frame at all (gateways ping every second): the peer is gone
MAX_CALLS = 4096  # in flight per connection
STATE_EVERY_S = 0.02
REFUSAL_LOG_WINDOW_S = 60.0
REFUSAL_LOG_LINES = 20  # per window; the rest are counted
LOG_STREAMS = frozenset({"stdout", "stderr", "platform"})
LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
TOO_LARGE = {"errorType": "Function.ResponseSizeTooLarge",
             "errorMessage": f"the response is larger than {f.MAX_FRAME} bytes"}

_Fragment = orjson.Fragment
_dumps = orjson.dumps
_loads = orjson.loads
_pack = f.pack


class RefusalLog:
    """One line per refused connection, at most ``REFUSAL_LOG_LINES`` per
    window: a flood of bad peers cannot flood the log."""

    def __init__(self) -> None:
        self.refused = 0
        self._window_start = 0.0
        self._lines = 0
        self._quiet = 0

    def __call__(self, peer: object, reason: str, now: float) -> None:
        self.refused += 1
        if now - self._window_start >= REFUSAL_LOG_WINDOW_S:
            if self._quiet:
                log.warning("%d more frame connections refused in the last %.0f s",
                            self._quiet, REFUSAL_LOG_WINDOW_S)
            self._window_start, self._lines, self._quiet = now, 0, 0
        if self._lines < REFUSAL_LOG_LINES:
            self._lines += 1
            log.warning("frame connection from %s refused: %s", _peer_text(peer), reason)
        else:
            self._quiet += 1


class FrameServer:
    """Serves ``worker``'s pools to gateways on ``host:port`` (port 0: any)."""

    def __init__(self, worker: Worker, host: str, port: int, token: str, *,
                 auth_timeout_s: float = AUTH_TIMEOUT_S, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 max_calls: int = MAX_CALLS, state_every_s: float = STATE_EVERY_S) -> None:
        if len(token) < 32:
            raise ValueError("the region token must have at least 32 characters")
        if not f.WORKER_ID.fullmatch(worker.node_id):
            raise ValueError(f"worker id {worker.node_id!r} must be 1-64 letters, digits, "
                             "'.', '_' or '-'")
        self.worker = worker
        self.worker_id = worker.node_id
        self.host = host
        self.port = port
        self.token = token.encode()
        self.auth_timeout_s = auth_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_calls = max_calls
        self.state_every_s = state_every_s
        self.closing = False
        self.refusals = RefusalLog()
        self.connections: set[_Connection] = set()  # authenticated ones
        self.ready: dict[str, int] = {}
        self._state_frame = _dumps({})
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready = self._ready_now()
        self._state_frame = _dumps(self.ready)
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=1024,
            reuse_address=True)
        self._task = loop.create_task(self._watch())
        log.info("frame server of worker %s at %s", self.worker_id, self.address_text)

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (host, port)."""
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _ready_now(self) -> dict[str, int]:
        return {f.target_key(fn, v): len(p.instances)
                for (fn, v), p in self.worker.pools.items()}

    async def _watch(self) -> None:
        """Tell gateways what is ready when it changes; close dead peers."""
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        while True:
            await asyncio.sleep(self.state_every_s)
            try:
                ready = self._ready_now()
                if ready != self.ready:
                    self.ready = ready
                    self._state_frame = data = _dumps(ready)
                    for conn in self.connections:
                        conn.send(_pack(f.STATE, data))
                now = loop.time()
                if now >= next_sweep:
                    next_sweep = now + 1.0
                    for conn in list(self.connections):
                        if now - conn.last_rx > self.idle_timeout_s:
                            log.warning("gateway %s sent nothing for %.0f s: closing",
                                        _peer_text(conn.peer), self.idle_timeout_s)
                            conn.abort()
            except Exception:  # noqa: BLE001 - one bad round must not stop the reports
                log.exception("frame server state round failed")

    def in_flight(self) -> int:
        return sum(len(c.calls) for c in self.connections)

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Take no new calls (they are answered "closed": the gateway sends
        them elsewhere), let the ones in flight answer for up to ``grace_s``,
        then hang up."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class _Connection(asyncio.Protocol):
    """One gateway's connection: the handshake, then its calls."""

    def __init__(self, server: FrameServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: object = None
        self.buf = bytearray()
        self.authed = False
        self.closed = False
        self.nonce = secrets.token_bytes(f.NONCE_BYTES)
        self.calls: dict[int, asyncio.Future[Any]] = {}  # answering, or a held task
        self.last_rx = self.loop.time()
        self._out: list[bytes] = []
        self._flush_soon = False
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None

    # -- the handshake --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.peer = t.get_extra_info("peername")
        _tune(t)
        hello = _dumps([f.VERSION, self.server.worker_id, self.nonce.hex()])
        t.write(b"".join(_pack(f.HELLO, hello)))
        self._timer = self.loop.call_later(self.server.auth_timeout_s, self._refuse,
                                           "no valid handshake in time")

    def _refuse(self, reason: str) -> None:
        if self.closed:
            return
        self.server.refusals(self.peer, reason, time.monotonic())
        self.abort()

    def _handshake(self) -> bool:
        """Read the gateway's AUTH from the buffer; True once it is proven."""
        buf = self.buf
        if len(buf) < f.HEADER_SIZE:
            return False
        size, kind = f.HEADER.unpack_from(buf, 0)
        if kind != f.AUTH or size != f.NONCE_BYTES + f.PROOF_BYTES:
            self._refuse("it does not speak the frame protocol (no handshake)")
            return False
        if len(buf) < f.HEADER_SIZE + size:
            return False
        body = bytes(buf[f.HEADER_SIZE:f.HEADER_SIZE + size])
        del buf[:f.HEADER_SIZE + size]
        nonce_g, proof = body[:f.NONCE_BYTES], body[f.NONCE_BYTES:]
        server = self.server
        expected = f.gateway_proof(server.token, server.worker_id, self.nonce, nonce_g)
        if not f.check_proof(expected, proof):
            self._refuse("wrong proof (another region's token, or none)")
            return False
        self.authed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self.transport is not None
        mine = f.worker_proof(server.token, server.worker_id, self.nonce, nonce_g)
        self.transport.write(b"".join(_pack(f.WELCOME, mine)
                                      + _pack(f.STATE, server._state_frame)))
        server.connections.add(self)
        return True

    # -- frames -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = self.loop.time()
        self.buf += data
        if not self.authed:
            if len(self.buf) > f.HANDSHAKE_MAX:
                self._refuse("it sent more than a handshake before proving itself")
                return
            if not self._handshake():
                return
        try:
            frames = f.split(self.buf, f.MAX_FRAME)
        except f.FrameError as exc:
            log.warning("gateway %s: %s; closing", _peer_text(self.peer), exc)
            self.abort()
            return
        for kind, body in frames:
            if kind == f.INVOKE:
                self._invoke(body)
            elif kind == f.PING:
                self.send(_pack(f.PONG))
            elif kind == f.LOG:
                self._log(body)
            else:
                log.warning("gateway %s sent a frame of kind %d; closing",
                            _peer_text(self.peer), kind)
                self.abort()
                return

    def _invoke(self, body: bytes) -> None:
        meta, _, event = body.partition(b"\n")
        try:
            fields = _loads(meta)
            if len(fields) == 5:
                call_id, function, version, rid, timeout_s = fields
                parent = None
            else:  # a sixth: the gateway's span as a W3C traceparent (tracing on there)
                call_id, function, version, rid, timeout_s, parent = fields
                if type(parent) is not str:
                    raise TypeError("a field of the wrong type")
            if not (type(call_id) is int and type(function) is str and type(version) is int
                    and type(rid) is str and type(timeout_s) in (int, float)):
                raise TypeError("a field of the wrong type")
        except (ValueError, TypeError):
            log.warning("gateway %s sent a malformed INVOKE; closing", _peer_text(self.peer))
            self.abort()
            return
        server = self.server
        if server.closing:
            self._error(call_id, "closed", f"worker {server.worker_id} is stopping", None)
            return
        if len(self.calls) >= server.max_calls:
            self._error(call_id, "overloaded", f"worker {server.worker_id} has "
                        f"{server.max_calls} calls in flight on this connection", 1)
            return
        pool = server.worker.pools.get((function, version))
        if pool is None:
            self._error(call_id, "absent", f"worker {server.worker_id} does not run "
                        f"{function} version {version}", None)
            return
        traced = parent is not None and tracing.on and tracing.begin_remote(rid, parent)
        try:
            fut = pool.start(rid, _Fragment(event), timeout_s)
        except NimbusError as exc:
            if traced:
                tracing.active.pop(rid, None)
            self._error(call_id, *f.error_fields(exc))
            return
        if fut is None:  # no free instance: held, as the pool holds any request
            fut = self.loop.create_task(self._held(call_id, pool, rid, event, timeout_s,
                                                   traced))
        else:
            if traced:
                tracing.active.pop(rid, None)  # the pool has taken it
            fut.add_done_callback(functools.partial(self._answer, call_id))
        self.calls[call_id] = fut

    async def _held(self, call_id: int, pool: FunctionPool, rid: str, event: bytes,
                    timeout_s: float, traced: bool = False) -> None:
        try:
            fut = await pool.start_when_free(rid, _Fragment(event), timeout_s)
        except Exception as exc:  # noqa: BLE001 - answered to the gateway
            self.calls.pop(call_id, None)
            if not self.closed:
                self._error(call_id, *f.error_fields(exc))
            return
        finally:
            if traced:
                tracing.active.pop(rid, None)
        if self.closed:  # handed over as the gateway went: it still runs; nobody waits
            self.calls.pop(call_id, None)
            return
        self.calls[call_id] = fut
        fut.add_done_callback(functools.partial(self._answer, call_id))

    def _answer(self, call_id: int, fut: asyncio.Future[Any]) -> None:
        self.calls.pop(call_id, None)
        if fut.cancelled():
            if not self.closed:
                self._error(call_id, "closed", "the invocation was cancelled", None)
            return
        exc = fut.exception()
        if self.closed:
            return
        if exc is not None:
            if not isinstance(exc, NimbusError):
                log.error("call %s failed", call_id, exc_info=exc)
            self._error(call_id, *f.error_fields(exc))
            return
        data = _dumps(fut.result())
        if len(data) > f.MAX_FRAME - 32:
            self._error(call_id, "handler", TOO_LARGE["errorMessage"], TOO_LARGE)
            return
        self.send(_pack(f.RESULT, b"%d\n" % call_id, data))

    def _error(self, call_id: Any, kind: str, message: str, detail: Any) -> None:
        self.send(_pack(f.ERROR, b"%d\n" % call_id, _dumps([kind, message, detail])))

    def _log(self, body: bytes) -> None:
        try:
            function, _version, rid, stream, text, *more = _loads(body)
        except (ValueError, TypeError):
            return
        level = more[0] if more and more[0] in LOG_LEVELS else None
        if (isinstance(function, str) and isinstance(text, str) and stream in LOG_STREAMS
                and (rid is None or isinstance(rid, str))):
            self.server.worker.logs.write(function, rid, stream, text, level)

    # -- writing: every frame of one loop turn in one write ---------------------

    def send(self, parts: list[bytes]) -> None:
        self._out.extend(parts)
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._out = self._out, []
        if not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))

    def pause_writing(self) -> None:
        # The gateway does not read its answers: stop reading its calls.
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    # -- the end ------------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.server.connections.discard(self)
        # Held calls never reached an instance: they are dropped with the
        # connection. Calls already running finish; their answers go nowhere.
        for call in self.calls.values():
            if isinstance(call, asyncio.Task):
                call.cancel()
        self.calls.clear()


def _tune(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


# -- a worker process serving one app folder (tests and benchmarks) -------------

def _prepare_folder(args: argparse.Namespace) -> tuple[Path, str, AppSpec]:
    """The state folder, the token and the app, its code copied in place."""
    from nimbus.manifest.loader import load_app
    from nimbus.worker.target import code_dir_for

    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = Path(args.token_file).read_text().strip()
    app = load_app(args.app)
    code = code_dir_for(state, "app")
    if code.exists():
        shutil.rmtree(code)
    shutil.copytree(args.app, code)
    return state, token, app


async def _serve_folder(args: argparse.Namespace, state: Path, token: str,
                        app: AppSpec) -> None:
    from nimbus.observe.logs import LogSink
    from nimbus.worker.containment import Containment
    from nimbus.worker.target import Target
    from nimbus.worker.worker import Worker

    digest = "app"
    worker = Worker(state, LogSink(state / "logs"), node_id=args.node_id,
                    containment=Containment.create(state, "rlimits"))
    await worker.start()
    pools = [worker.pool(Target(app.name, 1, spec, digest, None))
             for spec in app.functions.values()]
    for pool in pools:
        pool.scale_to(max(args.warm, pool.target.spec.min_instances))
    async with asyncio.timeout(60):  # then the autoscaler keeps min_instances
        while any(len(p.instances) < max(args.warm, p.target.spec.min_instances)
                  for p in pools):
            await asyncio.sleep(0.01)
    server = FrameServer(worker, args.host, args.port, token,
                         auth_timeout_s=args.auth_timeout)
    await server.start()
    print(orjson.dumps({"frames": server.address_text, "id": worker.node_id}).decode(),
          flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    targets = {p.target.function: p.target for p in pools}

    def command(line: str) -> None:  # "scale FN N" (its pool made again if retired), "retire FN"
        words = line.split()
        if not words:  # end of input
            stop.set()
        elif words[0] == "scale" and len(words) == 3 and words[1] in targets:
            worker.pool(targets[words[1]]).scale_to(int(words[2]))
        elif words[0] == "retire" and len(words) == 2 and words[1] in targets:
            worker.retire({k for k in worker.pools if k != targets[words[1]].key})
        else:
            print(f"unknown command: {line.strip()}", file=sys.stderr, flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def read_commands() -> None:
        while not stop.is_set():
            command((await reader.readline()).decode())

    task = loop.create_task(read_commands())
    await stop.wait()
    task.cancel()
    await server.aclose(1.0)
    await worker.aclose(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve an app folder's functions to gateways "
                                             "over frames (tests and benchmarks).")
    ap.add_argument("--app", required=True, help="app folder (app.yaml)")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--warm", type=int, default=0,
                    help="instances of every function to start before serving")
    ap.add_argument("--auth-timeout", type=float, default=AUTH_TIMEOUT_S,
                    help="seconds a peer has to prove it holds the token")
    ap.add_argument("--otlp-endpoint", default=None,
                    help="send this worker's spans (hold, cold start, instance call) over "
                         "OTLP/HTTP to this URL")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.otlp_endpoint:
        from nimbus.observe import tracing

        tracing.setup(tracing.trace_config("otlp", args.otlp_endpoint), None, role="worker")
    try:
        prepared = _prepare_folder(args)
    except (OSError, NimbusError) as exc:
        raise SystemExit(f"cannot serve {args.app}: {exc}") from None
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(_serve_folder(args, *prepared))
    else:
        uvloop.run(_serve_folder(args, *prepared))
    finally:
        tracing.shutdown()  # what is left is exported


if __name__ == "__main__":
    main()
