"""Health of every gateway of every region, from active probes and passive
signals. Pure: every call takes ``now``; no clock, no I/O.

The model, per gateway:

- down after ``fall`` consecutive failed probes, or at once on a passive
  failure (connection refused or reset, a burst of errors the gateway itself
  made);
- up again only after ``rise_s`` of *continuous* successful probes
  (hysteresis): one failed probe restarts the count, so a gateway that flaps
  every few seconds never takes traffic back;
- while the book is younger than ``rise_s``, a gateway never seen up is up
  on its first successful probe (a fresh edge is ready at once); after
  that, a gateway that was down from the start rises like any other;
- probe latency is smoothed (EWMA) for the ``latency`` policy.

A region is up when any of its gateways is up. When its last up gateway
goes down, ``on_region_down`` callbacks get the region and the detection
time: from that gateway's first failure (probe or request) since its last
good probe to the moment it was marked down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from nimbus.edge.types import ClusterLike

EWMA_ALPHA = 0.3
ERROR_BURST = 5          # gateway-made 5xx within ERROR_WINDOW_S -> down
ERROR_WINDOW_S = 1.0


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 0.25      # active probe interval
    timeout_s: float = 0.3        # a probe past this fails
    fall: int = 2                 # consecutive failed probes -> down
    rise_s: float = 3.0           # continuous healthy time before a down gateway is up again

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, was: {getattr(self, name)}")
        if self.fall < 1:
            raise ValueError(f"fall must be at least 1, was: {self.fall}")
        if self.rise_s < 0:
            raise ValueError(f"rise_s must not be negative, was: {self.rise_s}")


@dataclass(slots=True)
class GatewayHealth:
    url: str
    region: str
    up: bool = False
    seen_up: bool = False             # ever up: the first success needs no rise_s
    fails: int = 0                    # consecutive failed probes
    ok_since: float | None = None     # start of the current run of successes
    since: float = 0.0                # when `up` last changed
    latency_s: float | None = None    # smoothed probe latency
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    last_error: str = ""
    failing_since: float | None = None  # first failure since the last good probe
    recent_5xx: deque[float] = field(default_factory=deque)


class HealthBook:
    """Every gateway of every region. ``on_down`` callbacks run (with the
    gateway URL) each time a gateway turns down: the proxy aborts what it
    still waits for from it. ``on_region_down`` callbacks run (with the
    region and the detection time in seconds) each time a region's last up
    gateway turns down."""

    def __init__(self, cluster: ClusterLike, config: HealthConfig, now: float) -> None:
        self.config = config
        self.started = now
        self.gateways: dict[str, GatewayHealth] = {}
        self.by_region: dict[str, list[GatewayHealth]] = {}
        for name, region in cluster.regions.items():
            states = []
            for url in region.gateways:
                if url in self.gateways:
                    raise ValueError(f"gateway {url} is listed in two regions")
                g = GatewayHealth(url, name, since=now)
                self.gateways[url] = g
                states.append(g)
            self.by_region[name] = states
        self.on_down: list[Callable[[str], None]] = []
        self.on_region_down: list[Callable[[str, float], None]] = []
        self._up: set[str] | None = None                      # caches, dropped on change
        self.version = 0          # moves on every change of health or latency
        self._latencies: dict[str, float | None] | None = None

    # -- signals ---------------------------------------------------------
    def probe_ok(self, gateway: str, latency_s: float, now: float) -> None:
        g = self.gateways[gateway]
        g.latency_s = latency_s if g.latency_s is None else (
            EWMA_ALPHA * latency_s + (1 - EWMA_ALPHA) * g.latency_s)
        g.fails = 0
        g.failing_since = None
        self._latencies = None
        self.version += 1
        if g.ok_since is None:
            g.ok_since = now
        if not g.up and (now - g.ok_since >= self.config.rise_s or (
                not g.seen_up and now - self.started < self.config.rise_s)):
            g.up = g.seen_up = True
            g.since = now
            self._up = None
            self._latencies = None

    def probe_failed(self, gateway: str, reason: str, now: float) -> None:
        g = self.gateways[gateway]
        g.ok_since = None
        g.fails += 1
        g.last_error = reason
        if g.failing_since is None:
            g.failing_since = now
        if g.up and g.fails >= self.config.fall:
            self._down(g, now)

    def passive_failure(self, gateway: str, reason: str, now: float) -> None:
        """Connection refused or reset: down at once."""
        g = self.gateways[gateway]
        g.ok_since = None
        g.fails = max(g.fails, self.config.fall)
        g.errors += 1
        g.last_error = reason
        if g.failing_since is None:
            g.failing_since = now
        if g.up:
            self._down(g, now)

    def gateway_error(self, gateway: str, reason: str, now: float) -> None:
        """A 5xx the gateway itself made (not a function's answer): a burst
        of them within a second is a passive failure."""
        g = self.gateways[gateway]
        g.errors += 1
        if g.failing_since is None:
            g.failing_since = now
        recent = g.recent_5xx
        recent.append(now)
        while recent and recent[0] < now - ERROR_WINDOW_S:
            recent.popleft()
        if len(recent) >= ERROR_BURST:
            recent.clear()
            g.errors -= 1  # counted once, here, not again as the passive failure
            self.passive_failure(gateway, f"{ERROR_BURST} gateway errors within "
                                 f"{ERROR_WINDOW_S:g} s, last: {reason}", now)

    def _down(self, g: GatewayHealth, now: float) -> None:
        g.up = False
        g.since = now
        self.version += 1
        self._up = None
        self._latencies = None
        for callback in self.on_down:
            callback(g.url)
        if not any(other.up for other in self.by_region[g.region]):
            detection = now - (g.failing_since if g.failing_since is not None else now)
            for region_callback in self.on_region_down:
                region_callback(g.region, detection)

    # -- requests (for least-loaded choice and the snapshot) ---------------
    def begin(self, gateway: str) -> None:
        g = self.gateways[gateway]
        g.in_flight += 1
        g.requests += 1

    def end(self, gateway: str) -> None:
        self.gateways[gateway].in_flight -= 1

    # -- questions ---------------------------------------------------------
    def gateway_up(self, gateway: str, now: float) -> bool:
        return self.gateways[gateway].up

    def region_up(self, region: str, now: float) -> bool:
        return any(g.up for g in self.by_region.get(region, ()))

    def up_regions(self, now: float) -> set[str]:
        """The regions with a gateway up (the same set until health changes:
        do not modify it)."""
        if self._up is None:
            self._up = {r for r, gs in self.by_region.items() if any(g.up for g in gs)}
        return self._up

    def latency(self, region: str) -> float | None:
        """The region's smoothed probe latency: its best up gateway's (or its
        best gateway's when none is up); None before any probe answered."""
        gs = self.by_region.get(region, ())
        pool = [g for g in gs if g.up and g.latency_s is not None] or [
            g for g in gs if g.latency_s is not None]
        return min(g.latency_s for g in pool) if pool else None  # type: ignore[type-var]

    def latencies(self) -> dict[str, float | None]:
        """Every region's latency (cached until the next probe answer)."""
        if self._latencies is None:
            self._latencies = {r: self.latency(r) for r in self.by_region}
        return self._latencies

    def pick_gateway(self, region: str, now: float,
                     exclude: Collection[str] = ()) -> str | None:
        """The least-in-flight up gateway of the region (first listed on a
        tie) not in ``exclude``, or None when there is none."""
        best: GatewayHealth | None = None
        for g in self.by_region.get(region, ()):
            if g.up and (best is None or g.in_flight < best.in_flight) \
                    and g.url not in exclude:
                best = g
        return best.url if best is not None else None

    def any_gateway(self, region: str, now: float) -> str | None:
        """Last resort for a region with no gateway up: its least-busy one."""
        gs = self.by_region.get(region, ())
        return min(gs, key=lambda g: g.in_flight).url if gs else None

    def snapshot(self, now: float) -> dict[str, Any]:
        regions: dict[str, Any] = {}
        for name, gs in self.by_region.items():
            lat = self.latency(name)
            regions[name] = {
                "up": any(g.up for g in gs),
                "latency_ms": None if lat is None else round(lat * 1000, 3),
                "in_flight": sum(g.in_flight for g in gs),
                "errors": sum(g.errors for g in gs),
                "gateways": [{
                    "url": g.url,
                    "up": g.up,
                    "latency_ms": None if g.latency_s is None else round(g.latency_s * 1000, 3),
                    "in_flight": g.in_flight,
                    "requests": g.requests,
                    "errors": g.errors,
                    "last_error": g.last_error or None,
                    "since_s": round(now - g.since, 3),
                } for g in gs],
            }
        return {"regions": regions}
