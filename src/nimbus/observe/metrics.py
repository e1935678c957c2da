"""Prometheus metrics of one nimbus process: the registry, every family, and
the ``/metrics`` answer every endpoint serves.

The request path pays only for integer adds:

- Invocation outcomes and durations are plain ints on an
  :class:`InvocationStats` per function version (created once, when the pool
  is made, and kept for the life of the process so counters never go back),
  bumped where the pool already settles an invocation. Gateway requests by
  status code and bytes are ints on :data:`HTTP`. Both run on the event
  loop's thread only: no lock is needed, and none is taken.
- Everything that is a level rather than a count (instances by state, in
  flight, held, desired and ready instances, panic mode, async backlog,
  memory, zygotes) is read at scrape time, by :class:`NimbusCollector`, from
  the figures the pool, the autoscaler, the worker and the queue already
  keep. Async counts need a query of the queue's records: that one is cached
  for :data:`ASYNC_REFRESH_S`, so scraping often costs the queue little.
- Rarer events (cold starts, retries, dead letters, schedule fires, store and
  queue operations) use prometheus-client's own counters and histograms,
  their label children bound once per function or backend.

Every family carries a ``region`` label (this process's region, read when
the series is made or scraped).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nimbus.errors import (
    ClosedError,
    DeployError,
    HandlerError,
    InvocationTimeoutError,
    ThrottledError,
    UnavailableError,
)
from nimbus.region import region

log = logging.getLogger("nimbus.metrics")

# No ``_created`` series: half the output, and of no use to dashboards.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Invocation duration buckets, seconds: 1 ms up to the longest timeout a
# function may have.
DURATION_BUCKETS: tuple[float, ...] = (
    .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 900.0)
# Cold starts (fork asked -> instance ready) and platform latencies.
COLD_START_BUCKETS: tuple[float, ...] = (
    .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0)
OPERATION_BUCKETS: tuple[float, ...] = (
    .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0)

OUTCOMES = ("success", "error", "timeout", "throttled", "instance_died")
ROLES = ("up", "controller", "worker", "gateway", "edge")
ASYNC_REFRESH_S = 1.0
_clock = time.perf_counter


def outcome_of(exc: BaseException) -> str | None:
    """The ``outcome`` label of an invocation that failed with ``exc``, or
    None when it does not count (cancelled: the caller left before it ran)."""
    if isinstance(exc, ClosedError):
        return None  # the version was retired before it ran
    if isinstance(exc, HandlerError | DeployError):
        return "error"  # the handler raised, answered badly, or failed to import
    if isinstance(exc, InvocationTimeoutError):
        return "timeout"
    if isinstance(exc, ThrottledError):
        return "throttled"
    if isinstance(exc, UnavailableError):
        return "instance_died"
    if isinstance(exc, Exception):
        return "error"
    return None  # CancelledError, KeyboardInterrupt...


class InvocationStats:
    """One function version's invocations in this process: counts by
    outcome and the duration histogram (non-cumulative bucket counts, the
    last one +Inf), as plain ints. Bumped on the event loop thread only."""

    __slots__ = ("function", "version", "success", "error", "timeout", "throttled",
                 "instance_died", "buckets", "total_s")

    def __init__(self, function: str, version: int) -> None:
        self.function = function
        self.version = version
        self.success = 0
        self.error = 0
        self.timeout = 0
        self.throttled = 0
        self.instance_died = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.total_s = 0.0

    def succeeded(self, seconds: float) -> None:
        self.success += 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total_s += seconds

    def failed(self, exc: BaseException, seconds: float | None = None) -> None:
        """An invocation that ended with ``exc``; ``seconds`` when it reached
        an instance (its duration is observed only if the instance answered:
        an error from the handler, not a timeout or a death)."""
        outcome = outcome_of(exc)
        if outcome is None:
            return
        setattr(self, outcome, getattr(self, outcome) + 1)
        if seconds is not None and outcome == "error":
            self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
            self.total_s += seconds

    def counts(self) -> dict[str, int]:
        return {o: getattr(self, o) for o in OUTCOMES}


class HttpStats:
    """Gateway requests of this process: by function and status code, and
    bytes received (request bodies) and sent (response bodies)."""

    __slots__ = ("by_function", "received", "sent")

    def __init__(self) -> None:
        self.by_function: dict[str, dict[int, int]] = {}
        self.received = 0
        self.sent = 0

    def count(self, function: str, status: int, received: int, sent: int) -> None:
        codes = self.by_function.get(function)
        if codes is None:
            codes = self.by_function[function] = {}
        codes[status] = codes.get(status, 0) + 1
        self.received += received
        self.sent += sent


class _InvocationsOff(InvocationStats):
    """``NIMBUS_METRICS=off``: the same calls, nothing counted."""

    __slots__ = ()

    def succeeded(self, seconds: float) -> None:
        pass

    def failed(self, exc: BaseException, seconds: float | None = None) -> None:
        pass


class _HttpOff(HttpStats):
    __slots__ = ()

    def count(self, function: str, status: int, received: int, sent: int) -> None:
        pass


# NIMBUS_METRICS=off turns the request path's counting off (what
# `bench/warm.py --observe` compares against); /metrics still answers.
COUNTING = os.environ.get("NIMBUS_METRICS", "on").lower() != "off"
_INVOCATIONS: dict[tuple[str, int], InvocationStats] = {}
HTTP = HttpStats() if COUNTING else _HttpOff()


def invocation_stats(function: str, version: int) -> InvocationStats:
    """The stats of ``function`` version ``version`` (made once per process)."""
    key = (function, version)
    s = _INVOCATIONS.get(key)
    if s is None:
        s = _INVOCATIONS[key] = (InvocationStats if COUNTING else _InvocationsOff)(
            function, version)
    return s


def all_invocation_stats() -> list[InvocationStats]:
    """Every function version's stats this process has counted."""
    return list(_INVOCATIONS.values())


# -- families kept by prometheus-client (off the hot path) -------------------------

COLD_STARTS = Counter("nimbus_cold_starts", "Instances started (fork asked -> ready)",
                      ["function", "version", "region"])
COLD_START_SECONDS = Histogram(
    "nimbus_cold_start_duration_seconds", "Time from asking for a fork to the instance ready",
    ["function", "version", "region"], buckets=COLD_START_BUCKETS)
ASYNC_RETRIES = Counter("nimbus_async_retries", "Async invocations scheduled for another try",
                        ["function", "region"])
ASYNC_DEAD_LETTERS = Counter("nimbus_async_dead_letters",
                             "Async invocations that gave up (dead-lettered)",
                             ["function", "region"])
SCHEDULE_FIRES = Counter("nimbus_schedule_fires", "Schedule ticks that fired an invocation",
                         ["function", "schedule", "region"])
SCHEDULE_MISSES = Counter("nimbus_schedule_misses",
                          "Schedule ticks missed (the platform was down or behind)",
                          ["function", "schedule", "region"])
ROLLOUT_DECISIONS = Counter("nimbus_rollout_decisions",
                            "Rollout decisions (promote, rollback, hold) by the runner",
                            ["function", "region", "action"])
STORE_SECONDS = Histogram("nimbus_store_operation_seconds", "Store operation latency",
                          ["region", "backend", "op"], buckets=OPERATION_BUCKETS)
QUEUE_SECONDS = Histogram("nimbus_queue_operation_seconds", "Queue operation latency",
                          ["region", "backend", "op"], buckets=OPERATION_BUCKETS)

# The edge's own endpoint serves the nimbus_edge_* families from a registry
# of its own (one per edge): see nimbus.edge.metrics.


@dataclass(slots=True)
class ColdStart:
    """A pool's bound children of the cold start families."""

    count: Any
    seconds: Any

    def observe(self, seconds: float) -> None:
        self.count.inc()
        self.seconds.observe(seconds)


def cold_start(function: str, version: int) -> ColdStart:
    labels = (function, str(version), region())
    return ColdStart(COLD_STARTS.labels(*labels), COLD_START_SECONDS.labels(*labels))


_BOUND: dict[tuple[Any, ...], Any] = {}


def _child(family: Any, *labels: str) -> Any:
    key = (family, *labels)
    c = _BOUND.get(key)
    if c is None:
        c = _BOUND[key] = family.labels(*labels)
    return c


def async_known(function: str) -> None:
    """Export ``function``'s async counters at 0 before their first event:
    ``increase()`` (the dead-letter alert) misses the first increment of a
    series that is born at 1."""
    _child(ASYNC_RETRIES, function, region())
    _child(ASYNC_DEAD_LETTERS, function, region())


def async_retried(function: str) -> None:
    _child(ASYNC_RETRIES, function, region()).inc()


def async_dead_lettered(function: str) -> None:
    _child(ASYNC_DEAD_LETTERS, function, region()).inc()


def schedule_fired(function: str, schedule: str) -> None:
    _child(SCHEDULE_FIRES, function, schedule, region()).inc()


def schedule_missed(function: str, schedule: str, n: int = 1) -> None:
    # bound at 0 on a schedule's first tick, so that increase() sees its first miss
    child = _child(SCHEDULE_MISSES, function, schedule, region())
    if n > 0:
        child.inc(n)


def rollout_decided(function: str, action: str) -> None:
    _child(ROLLOUT_DECISIONS, function, region(), action).inc()


def operation_timer(family: Histogram, backend: str, op: str) -> Any:
    """The bound histogram child for one store/queue operation kind."""
    return _child(family, region(), backend, op)


STORE_OPS = ("get", "list", "put", "create", "update", "delete", "campaign", "renew", "resign")
QUEUE_OPS = ("send", "receive", "begin", "ack", "retry", "release", "dead_letter", "fail",
             "get", "records", "redrive", "stats")


def time_store(store: Any, backend: str) -> None:
    """Observe ``store``'s operations in ``nimbus_store_operation_seconds``."""
    _time_operations(store, STORE_SECONDS, backend, STORE_OPS)


def time_queue(queue: Any, backend: str) -> None:
    """Observe ``queue``'s operations in ``nimbus_queue_operation_seconds``."""
    _time_operations(queue, QUEUE_SECONDS, backend, QUEUE_OPS)


def _time_operations(obj: Any, family: Histogram, backend: str, ops: Iterable[str]) -> None:
    # The timed method is set on the instance: the object keeps its class
    # (isinstance checks hold) and its histogram child is bound here, once.
    if getattr(obj, "_nimbus_timed", False):
        return
    for op in ops:
        fn = getattr(obj, op, None)
        if fn is not None:
            setattr(obj, op, _timed(fn, operation_timer(family, backend, op)))
    obj._nimbus_timed = True


def _timed(fn: Callable[..., Awaitable[Any]], child: Any) -> Callable[..., Awaitable[Any]]:
    observe = child.observe

    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = _clock()
        try:
            return await fn(*args, **kwargs)
        finally:
            observe(_clock() - t0)

    timed.__name__ = getattr(fn, "__name__", "operation")
    timed.__doc__ = fn.__doc__
    return timed


# -- what is read at scrape time ---------------------------------------------------------


@dataclass(slots=True)
class AsyncFigures:
    """One function's async backlog, as last read from the queue."""

    queued: int = 0
    running: int = 0
    retrying: int = 0
    dead: int = 0
    oldest_queued_age_s: float | None = None


AsyncReader = Callable[[], Awaitable[dict[str, AsyncFigures]]]


class NimbusCollector(Collector):
    """The families read at scrape time from what this process keeps."""

    def __init__(self) -> None:
        self.role = "up"
        self.worker: Any = None  # a nimbus.worker.worker.Worker, when this process has one
        # a region gateway's remote invokers (requests it holds for a slot)
        self.invokers: Callable[[], Iterable[Any]] | None = None
        self.async_reader: AsyncReader | None = None
        self.async_figures: dict[str, AsyncFigures] = {}
        self.async_read_at = -1e9
        # the rollout runner's running rollouts: (function, new version, share)
        self.rollouts: Callable[[], Iterable[tuple[str, int, int]]] | None = None

    async def refresh(self, now: float | None = None) -> None:
        """Read the async backlog unless it was read in the last
        :data:`ASYNC_REFRESH_S` (scrapes stay cheap for the queue)."""
        reader = self.async_reader
        if reader is None:
            return
        now = time.monotonic() if now is None else now
        if now - self.async_read_at < ASYNC_REFRESH_S:
            return
        self.async_read_at = now
        try:
            self.async_figures = await reader()
        except Exception as exc:  # noqa: BLE001 - a scrape must still answer
            log.warning("reading the async backlog for metrics failed: %s", exc)

    def describe(self) -> Iterator[Metric]:
        """Every family this collector may yield (the registry refuses
        another metric by one of these names)."""
        for name, kind in _COLLECTED:
            yield Metric(name, "", kind)

    def collect(self) -> Iterator[Metric]:
        reg = region()
        if self.role in ("up", "worker", "gateway") or _INVOCATIONS:
            yield from invocation_families(list(_INVOCATIONS.values()), reg)
        if self.role in ("up", "gateway"):
            yield from http_families(HTTP, reg)
        if self.worker is not None:
            yield from pool_families(list(self.worker.pools.values()), reg)
            yield from worker_families(self.worker, reg, self.role)
        else:
            if self.invokers is not None:
                yield from held_families(list(self.invokers()), reg)
            yield from platform_memory(reg, self.role, os.getpid(), [], [])
        if self.async_reader is not None:
            yield from async_families(self.async_figures, reg)
        if self.rollouts is not None:
            yield from rollout_families(list(self.rollouts()), reg)


def rollout_families(rollouts: list[tuple[str, int, int]], reg: str) -> Iterator[Metric]:
    share = GaugeMetricFamily("nimbus_rollout_share",
                              "The new version's share of live traffic (percent) in a "
                              "running rollout", labels=["function", "version", "region"])
    for fn, version, pct in rollouts:
        share.add_metric([fn, str(version), reg], pct)
    yield share
    running = GaugeMetricFamily("nimbus_rollouts_running", "Rollouts running",
                                labels=["region"])
    running.add_metric([reg], len(rollouts))
    yield running


def invocation_families(stats: Iterable[InvocationStats], reg: str) -> Iterator[Metric]:
    inv = CounterMetricFamily("nimbus_invocations", "Invocations by outcome",
                              labels=["function", "version", "region", "outcome"])
    dur = HistogramMetricFamily(
        "nimbus_invocation_duration_seconds",
        "Duration of invocations an instance answered (success or error)",
        labels=["function", "version", "region"])
    bounds = [*(_fmt(b) for b in DURATION_BUCKETS), "+Inf"]
    for s in stats:
        v = str(s.version)
        for outcome in OUTCOMES:
            inv.add_metric([s.function, v, reg, outcome], getattr(s, outcome))
        acc = 0
        cumulative = []
        for le, n in zip(bounds, s.buckets, strict=True):
            acc += n
            cumulative.append((le, acc))
        dur.add_metric([s.function, v, reg], cumulative, s.total_s)
    yield inv
    yield dur


def http_families(http: HttpStats, reg: str) -> Iterator[Metric]:
    req = CounterMetricFamily("nimbus_http_requests", "Gateway requests by function and code",
                              labels=["function", "region", "code"])
    for fn, codes in list(http.by_function.items()):
        for code, n in sorted(codes.items()):
            req.add_metric([fn, reg, str(code)], n)
    yield req
    rx = CounterMetricFamily("nimbus_http_received_bytes", "Request body bytes received",
                             labels=["region"])
    rx.add_metric([reg], http.received)
    yield rx
    tx = CounterMetricFamily("nimbus_http_sent_bytes", "Response body bytes sent",
                             labels=["region"])
    tx.add_metric([reg], http.sent)
    yield tx


def pool_families(pools: Iterable[Any], reg: str) -> Iterator[Metric]:
    """Per function version levels from each pool's own figures."""
    names = ["function", "version", "region"]
    instances = GaugeMetricFamily("nimbus_instances", "Instances by state",
                                  labels=[*names, "state"])
    in_flight = GaugeMetricFamily("nimbus_in_flight_requests",
                                  "Invocations running on an instance", labels=names)
    held = GaugeMetricFamily("nimbus_held_requests", "Requests waiting for an instance",
                             labels=names)
    desired = GaugeMetricFamily("nimbus_instances_desired",
                                "Instances the autoscaler (or the leader) wants", labels=names)
    ready = GaugeMetricFamily("nimbus_instances_ready", "Instances ready to serve",
                              labels=names)
    panic = GaugeMetricFamily("nimbus_autoscaler_panic", "1 while the autoscaler is in panic "
                              "mode", labels=names)
    for p in pools:
        t = p.target
        labels = [t.function, str(t.version), reg]
        busy = sum(1 for i in p.instances if i.outstanding)
        ready_n = len(p.instances)
        instances.add_metric([*labels, "starting"], p.starting)
        instances.add_metric([*labels, "idle"], ready_n - busy)
        instances.add_metric([*labels, "busy"], busy)
        in_flight.add_metric(labels, p.in_flight)
        held.add_metric(labels, p.held)
        d = p.decision
        desired.add_metric(labels, d.desired if d is not None else ready_n + p.starting)
        ready.add_metric(labels, ready_n)
        panic.add_metric(labels, 1 if d is not None and d.panic else 0)
    yield from (instances, in_flight, held, desired, ready, panic)


def held_families(invokers: Iterable[Any], reg: str) -> Iterator[Metric]:
    """A region gateway's held requests (waiting for a slot on a worker)."""
    held = GaugeMetricFamily("nimbus_held_requests", "Requests waiting for an instance",
                             labels=["function", "version", "region"])
    for inv in invokers:
        t = inv.target
        held.add_metric([t.function, str(t.version), reg], inv.held)
    yield held


def worker_families(worker: Any, reg: str, role: str) -> Iterator[Metric]:
    zygote_pids = [z.pid for z in worker.zygotes.values() if z.pid]
    instance_pids = [i.pid for p in list(worker.pools.values()) for i in p.instances]
    zygotes = GaugeMetricFamily("nimbus_zygotes", "Zygotes running", labels=["region"])
    zygotes.add_metric([reg], len(zygote_pids))
    yield zygotes
    yield from platform_memory(reg, role, os.getpid(), zygote_pids, instance_pids)


def platform_memory(reg: str, role: str, platform_pid: int, zygote_pids: list[int],
                    instance_pids: list[int]) -> Iterator[Metric]:
    mem = GaugeMetricFamily("nimbus_memory_pss_bytes",
                            "Proportional set size of the platform, zygotes and instances",
                            labels=["region", "role", "kind"])
    for kind, pids in (("platform", [platform_pid]), ("zygote", zygote_pids),
                       ("instances", instance_pids)):
        mem.add_metric([reg, role, kind], sum(pss_bytes(pid) for pid in pids))
    yield mem


def pss_bytes(pid: int) -> int:
    """PSS of ``pid`` in bytes from /proc/PID/smaps_rollup (0 if gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def async_families(figures: Mapping[str, AsyncFigures], reg: str) -> Iterator[Metric]:
    counts = GaugeMetricFamily("nimbus_async_invocations", "Async invocations by status",
                               labels=["function", "region", "status"])
    oldest = GaugeMetricFamily("nimbus_async_oldest_queued_age_seconds",
                               "Age of the oldest async invocation waiting for its first "
                               "try (0 when none)",
                               labels=["function", "region"])
    for fn, f in sorted(figures.items()):
        for status in ("queued", "running", "retrying", "dead"):
            counts.add_metric([fn, reg, status], getattr(f, status))
        if f.oldest_queued_age_s is not None:  # None: the queue cannot tell cheaply
            oldest.add_metric([fn, reg], f.oldest_queued_age_s)
    yield counts
    yield oldest


def _fmt(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


_COLLECTED = (
    ("nimbus_invocations", "counter"), ("nimbus_invocation_duration_seconds", "histogram"),
    ("nimbus_http_requests", "counter"), ("nimbus_http_received_bytes", "counter"),
    ("nimbus_http_sent_bytes", "counter"), ("nimbus_instances", "gauge"),
    ("nimbus_in_flight_requests", "gauge"), ("nimbus_held_requests", "gauge"),
    ("nimbus_instances_desired", "gauge"), ("nimbus_instances_ready", "gauge"),
    ("nimbus_autoscaler_panic", "gauge"), ("nimbus_zygotes", "gauge"),
    ("nimbus_memory_pss_bytes", "gauge"), ("nimbus_async_invocations", "gauge"),
    ("nimbus_async_oldest_queued_age_seconds", "gauge"), ("nimbus_rollout_share", "gauge"),
    ("nimbus_rollouts_running", "gauge"))
COLLECTOR = NimbusCollector()
REGISTRY.register(COLLECTOR)


def set_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, was {role!r}")
    COLLECTOR.role = role


def watch_worker(worker: Any) -> None:
    """Read this worker's pools and zygotes at scrape time."""
    COLLECTOR.worker = worker


def watch_invokers(invokers: Callable[[], Iterable[Any]] | None) -> None:
    """Read a region gateway's held requests from ``invokers()`` at scrape time."""
    COLLECTOR.invokers = invokers


def watch_rollouts(shares: Callable[[], Iterable[tuple[str, int, int]]] | None) -> None:
    """Read the running rollouts' shares with ``shares()`` at scrape time."""
    COLLECTOR.rollouts = shares


def watch_async(reader: AsyncReader | None) -> None:
    """Read the async backlog with ``reader`` (cached, see :meth:`NimbusCollector.refresh`)."""
    COLLECTOR.async_reader = reader
    COLLECTOR.async_figures = {}
    COLLECTOR.async_read_at = -1e9


# -- the endpoint ---------------------------------------------------------------------------

METRICS_AUTH = ("token", "open")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind, or ``localhost``) is loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_metrics_auth(auth: str, host: str, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``auth`` may serve on ``host``:
    ``open`` (no token) only on a loopback address."""
    if auth not in METRICS_AUTH:
        raise ValueError(f"--metrics-auth {auth!r}: expected token or open")
    if auth == "open" and not is_loopback(host):
        raise ValueError(
            f"--metrics-auth open serves metrics without a token, so only on a loopback "
            f"address; {where} is {host!r} (bind it to 127.0.0.1, or scrape with the token)")


Answer = tuple[int, list[tuple[str, str]], bytes]


def authorized(request_headers: Mapping[str, str], token: str | None) -> bool:
    """``token`` None: open. Else ``Authorization: Bearer <token>`` (scheme in
    any case); an empty token never authenticates."""
    if token is None:
        return True
    got = request_headers.get("authorization")
    if got is None or not token:
        return False
    scheme, _, credentials = got.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return False
    return hmac.compare_digest(credentials.strip().encode("latin-1"),
                               token.strip().encode("latin-1"))


UNAUTHORIZED: Answer = (
    401, [("content-type", "application/json"), ("www-authenticate", "Bearer")],
    b'{"errorType":"Unauthorized","errorMessage":"missing or wrong bearer token '
    b'(Authorization: Bearer <token>)"}')


def metrics_response(request_headers: Mapping[str, str], token: str | None) -> Answer:
    """The answer to ``GET /metrics``: the exposition text, or 401.
    ``token`` None serves it to anyone (``--metrics-auth open``)."""
    if not authorized(request_headers, token):
        return UNAUTHORIZED
    return 200, [("content-type", CONTENT_TYPE_LATEST)], _generate_latest(REGISTRY)


async def serve_metrics(request_headers: Mapping[str, str], token: str | None) -> Answer:
    """:func:`metrics_response`, with the async backlog read first (cached)."""
    if not authorized(request_headers, token):
        return UNAUTHORIZED
    await COLLECTOR.refresh()
    return metrics_response(request_headers, token)
