"""``nimbus up``: the whole single-machine platform in one process.

Wiring happens here and only here (:meth:`Platform.create`): store, blobs,
worker (with its zygote), gateway, route sync, control API, and the two
HTTP servers. Shutdown is a sequence (uvicorn's, extended to instances):

1. stop accepting connections on both ports;
2. let in-flight requests finish, up to ``grace_s``;
3. drain every pool: SIGTERM-equivalent hang-up, grace, SIGKILL;
4. stop the zygote, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn

from nimbus.clock import SystemClock
from nimbus.control import statedir
from nimbus.control.api import MAX_BUNDLE_UPLOAD, create_control_app
from nimbus.control.bundle import STATE_MARKER
from nimbus.control.deploy import Deployer, RolloutOptions
from nimbus.control.routesync import RouteSync
from nimbus.control.statedir import Identity, StateDirError
from nimbus.control.statelock import StateLock
from nimbus.errors import UnavailableError
from nimbus.events.scheduler import Scheduler
from nimbus.events.service import DEFAULT_ASYNC_MAX_BYTES, Events
from nimbus.gateway.app import Gateway, GatewayConfig
from nimbus.gateway.connections import (
    DEFAULT_CONTROL_MAX_CONNECTIONS,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    ConnectionGuard,
    ConnectionLimits,
    fit_to_fds,
    gateway_protocol,
    guarded_protocol,
    raise_fd_limit,
)
from nimbus.manifest.model import RegionsSpec
from nimbus.observe import metrics, tracing
from nimbus.observe.logs import LogSink
from nimbus.observe.metrics import check_metrics_auth
from nimbus.observe.tracing import TraceConfig
from nimbus.region import region
from nimbus.store.base import Blobs, Store
from nimbus.store.private import private_file, write_private
from nimbus.store.queue import Queue
from nimbus.store.registry import open_blobs, open_store
from nimbus.store.sqlite_queue import SQLiteQueue, open_sqlite_queue
from nimbus.ui.collector import local_source
from nimbus.ui.dashboard import Dashboard, function_versions
from nimbus.ui.edgeview import EdgeView
from nimbus.worker.budget import NodeBudget
from nimbus.worker.containment import DEFAULT_UID_RANGE, Containment
from nimbus.worker.worker import Worker

if TYPE_CHECKING:
    from nimbus.rollout.runner import RolloutRunner

log = logging.getLogger("nimbus")

CONTROL_FILE = "control.json"
TOKEN_FILE = "token"
MIN_TOKEN_CHARS = 32


@dataclass(frozen=True, slots=True)
class ServerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    control_host: str = "127.0.0.1"
    control_port: int = 8081
    grace_s: float = 10.0
    max_body_bytes: int = 6 * 1024 * 1024
    async_max_bytes: int = DEFAULT_ASYNC_MAX_BYTES
    budget: NodeBudget = field(default_factory=NodeBudget)
    containment: str = "auto"  # auto, full or rlimits
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    # HTTP limits (both ports, each with its own connection budget)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    control_max_connections: int = DEFAULT_CONTROL_MAX_CONNECTIONS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_bundle_bytes: int = MAX_BUNDLE_UPLOAD
    # a cluster file (multiregion.clusterfile.ClusterFile): the dashboard shows
    # the edge's view of its regions
    cluster: Any = None
    trace: TraceConfig = field(default_factory=TraceConfig)
    metrics_auth: str = "token"  # GET /metrics: the control token, or "open" (loopback only)

    def __post_init__(self) -> None:
        check_metrics_auth(self.metrics_auth, self.control_host, "--control-host")
        for name in ("max_connections", "control_max_connections", "max_bundle_bytes"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, was: {value}")
        for name in ("header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be positive, was: {value}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, was: "
                             f"{self.max_header_bytes}")
        for name in ("port", "control_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be 0..65535, was: {value}")
        if self.async_max_bytes <= 0:
            raise ValueError(f"async_max_bytes must be positive, was: {self.async_max_bytes}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s cannot be negative, was: {self.grace_s}")


def ensure_token(state_dir: Path) -> str:
    """The control API's bearer token: read from ``token``, or made and
    written there (atomically, 0600). One that is empty, shorter than
    ``MIN_TOKEN_CHARS`` or not printable ASCII is an error naming the file."""
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)  # 43 characters
        write_private(path, (token + "\n").encode(), durable=True)
        return token
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not ASCII text"
        raise StateDirError(f"cannot read the token file {path}: {why}; delete it and "
                            "nimbus up writes a new one") from None
    if len(token) < MIN_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        what = "is empty" if not token else (
            f"holds a token of {len(token)} characters, at least {MIN_TOKEN_CHARS} are needed"
            if len(token) < MIN_TOKEN_CHARS else "holds spaces or control characters")
        raise StateDirError(f"the token file {path} {what}; delete it and nimbus up writes "
                            "a new one, or write a longer token into it")
    return token


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UnavailableError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us (we run two of them) and
    closes connections past their head or body deadline on every tick."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        self.guard.sweep(asyncio.get_running_loop().time())
        return await super().on_tick(counter)


class Platform:
    def __init__(self, config: ServerConfig, store: Store, blobs: Blobs, queue: Queue,
                 worker: Worker, gateway: Gateway) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.store = store
        self.blobs = blobs
        self.queue = queue
        self.worker = worker
        self.gateway = gateway
        clock = SystemClock()
        self.events = Events(queue, clock, max_bytes=config.async_max_bytes)
        self.scheduler = Scheduler(store, queue, clock)
        self.events.on_sync.append(self.scheduler.set_pools)
        gateway.events = self.events
        self.routes = RouteSync(store, gateway, worker, on_change=self.events.sync)
        self.events.resolve = self.routes.invoker_for
        self.deployer = Deployer(store, blobs, worker, config.state_dir)
        self.rollouts = _local_runner(store, worker, clock)
        self.deployer.traffic = self._traffic
        self.token = ensure_token(config.state_dir)
        self.started_at = time.time()
        self.gateway_url = ""
        self.control_url = ""
        self._servers: list[_Server] = []
        self.guards: dict[str, ConnectionGuard] = {}
        self._stop = asyncio.Event()
        self.lock: StateLock | None = None
        self.dashboard: Dashboard | None = None
        self.metrics_token: str | None = None if config.metrics_auth == "open" else self.token
        metrics.set_role("up")
        metrics.watch_worker(worker)
        metrics.watch_async(self._async_figures)
        metrics.watch_rollouts(self.rollouts.shares)

    async def _traffic(self, fn: str, version: int) -> int | None:
        return self.rollouts.traffic_of(fn, version, time.time())

    identity: Identity | None = None

    async def _async_figures(self) -> dict[str, metrics.AsyncFigures]:
        """Each routed function's async backlog, for the metrics scrape."""
        return {name: await self.events.backlog(name) for name in list(self.routes.functions)}

    @property
    def max_bundle_bytes(self) -> int:
        return self.config.max_bundle_bytes

    @classmethod
    async def create(cls, config: ServerConfig) -> Platform:
        statedir.prepare(config.state_dir)  # 0700, ours, not writable by others
        lock = StateLock.acquire(config.state_dir)  # before touching anything else in it
        try:
            identity = Identity.check(config.state_dir)  # never start empty over lost data
            ensure_token(config.state_dir)  # a bad token file stops us before anything runs
            platform = await cls._open(config)
        except BaseException:
            lock.release()
            raise
        platform.lock = lock
        platform.identity = identity
        if isinstance(platform.queue, SQLiteQueue) and not identity.queue_content:
            platform.queue.on_content = identity.note_queue_content
        return platform

    @classmethod
    async def _open(cls, config: ServerConfig) -> Platform:
        private_file(config.state_dir / STATE_MARKER)
        store = await open_store("sqlite", config.state_dir / "store.db")
        blobs = await open_blobs(config.state_dir / "blobs")
        queue = await open_sqlite_queue(config.state_dir / "queue.db")
        metrics.time_store(store, "sqlite")
        metrics.time_queue(queue, "sqlite")
        # This process owns the embedded queue: what a dead predecessor had
        # leased is deliverable again now, not after the lease.
        await queue.recover()
        containment = await asyncio.to_thread(
            Containment.create, config.state_dir, config.containment, config.uid_range)
        log.info("%s", containment.summary())
        worker = Worker(config.state_dir, LogSink(config.state_dir / "logs"), config.budget,
                        containment=containment)
        await worker.start()
        gateway = Gateway(GatewayConfig(max_body_bytes=config.max_body_bytes))
        tracing.setup(config.trace, config.state_dir, role="up", region=region())
        return cls(config, store, blobs, queue, worker, gateway)

    async def deploy(self, bundle: bytes, progress: Callable[[str], None],
                     name: str | None = None,
                     regions: RegionsSpec | None = None,
                     rollout: RolloutOptions | None = None,
                     parameters: dict[str, str] | None = None) -> dict[str, Any]:
        result = await self.deployer.deploy(bundle, progress, name, regions, rollout,
                                            parameters=parameters)
        if self.identity is not None and any(f.get("changed") for f in result["functions"]):
            self.identity.note_deploy()
        want = {f["name"]: f.get("serving", f["version"]) for f in result["functions"]}
        await self.routes.wait_for(lambda rs: all(
            name in rs.functions and rs.functions[name].target.version == v
            for name, v in want.items()))
        return result

    async def start(self) -> None:
        self.events.start()
        await self.routes.start()
        self.scheduler.start()
        self.rollouts.start()
        c = self.config
        gw_sock = _bind(c.host, c.port)
        try:
            ctl_sock = _bind(c.control_host, c.control_port)
        except UnavailableError:
            gw_sock.close()
            raise
        self.gateway_url = f"http://{_url_host(c.host)}:{gw_sock.getsockname()[1]}"
        self.control_url = f"http://{_url_host(c.control_host)}:{ctl_sock.getsockname()[1]}"
        gw_guard, ctl_guard = self._guards()
        self.dashboard = self._dashboard()
        common: dict[str, Any] = {
            "lifespan": "off", "access_log": False, "log_level": "warning",
            "timeout_graceful_shutdown": c.grace_s, "loop": "none",
            "timeout_keep_alive": c.keep_alive_s, "server_header": False, "date_header": False}
        gw = _Server(uvicorn.Config(self.gateway, http=gateway_protocol(gw_guard, self.gateway),
                                    **common), gw_guard)
        ctl = _Server(uvicorn.Config(create_control_app(self, dashboard=self.dashboard),
                                     http=guarded_protocol(ctl_guard), **common), ctl_guard)
        self._servers = [gw, ctl]
        self._serving = [asyncio.create_task(gw.serve(sockets=[gw_sock])),
                         asyncio.create_task(ctl.serve(sockets=[ctl_sock]))]
        while not (gw.started and ctl.started):
            if any(t.done() for t in self._serving):
                await asyncio.gather(*self._serving)
                raise RuntimeError("a server stopped during start")
            await asyncio.sleep(0.01)
        info = {"pid": os.getpid(), "gateway_url": self.gateway_url,
                "control_url": self.control_url}
        write_private(self.state_dir / CONTROL_FILE, orjson.dumps(info))

    def _dashboard(self) -> Dashboard:
        """``/ui``: its history sampled from this process's own metrics."""
        edge = EdgeView(self.config.cluster) if self.config.cluster is not None else None
        dashboard = Dashboard(self.token, local_source(), versions=self.versions,
                              store=self.store, region=region(), edge=edge)
        dashboard.start()
        return dashboard

    async def versions(self, fn: str) -> list[dict[str, Any]]:
        """``fn``'s version records, newest first, and which one is live."""
        return await function_versions(self.store, fn, self.routes.functions.get(fn))

    def _guards(self) -> tuple[ConnectionGuard, ConnectionGuard]:
        """One connection budget per port, both within the open-files limit
        (raised to its hard limit first), the control API's set aside."""
        c = self.config
        fd_limit = raise_fd_limit()
        gw_max, ctl_max = fit_to_fds(c.max_connections, c.control_max_connections, fd_limit)
        if (gw_max, ctl_max) != (c.max_connections, c.control_max_connections):
            log.warning("open-files limit %d: connection caps lowered to %d (gateway) and "
                        "%d (control API); raise `ulimit -n` for more", fd_limit, gw_max,
                        ctl_max)

        def limits(cap: int) -> ConnectionLimits:
            return ConnectionLimits(max_connections=cap, header_timeout_s=c.header_timeout_s,
                                    keep_alive_s=c.keep_alive_s,
                                    max_header_bytes=c.max_header_bytes)

        self.guards = {"gateway": ConnectionGuard("gateway", limits(gw_max)),
                       "control": ConnectionGuard("control API", limits(ctl_max))}
        return self.guards["gateway"], self.guards["control"]

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def aclose(self) -> None:
        self.gateway.draining = True
        for s in self._servers:  # 1 + 2: uvicorn stops accepting, then drains
            s.should_exit = True
        if self._servers:
            await asyncio.gather(*self._serving, return_exceptions=True)
        if self.dashboard is not None:
            await self.dashboard.aclose()
        await self.rollouts.aclose()
        await self.routes.aclose()
        await self.scheduler.aclose()
        await self.events.aclose(grace_s=min(self.config.grace_s, 5.0))
        await self.deployer.aclose()  # a garbage collection under way
        await self.worker.aclose(grace_s=min(self.config.grace_s, 5.0))  # 3
        await self.queue.aclose()  # 4
        await self.store.aclose()
        await self.blobs.aclose()
        tracing.shutdown()  # what is left is exported
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / CONTROL_FILE).unlink()
        if self.lock is not None:
            self.lock.release()


def _local_runner(store: Store, worker: Worker, clock: SystemClock) -> RolloutRunner:
    """The rollout runner of ``nimbus up``: this process's own counters, and
    its decisions as platform lines in the function's logs."""
    from nimbus.rollout.runner import RolloutRunner
    from nimbus.rollout.sampler import LocalSampler

    def note(fn: str, text: str, level: str) -> None:
        worker.logs.write(fn, None, "platform", text, level)

    # reading its own counters costs nothing: the traffic meter samples every second
    return RolloutRunner(store, LocalSampler(), clock, note=note, meter_every_s=1.0)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def install_stop_signals(platform: Platform) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, platform.request_stop)
