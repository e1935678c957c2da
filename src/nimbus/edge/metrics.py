"""The edge's metrics, served at ``/_nimbus/metrics``.

The request path only adds integers to dicts made once per region (no
lock: the edge runs on one event loop, and the scrape runs on it too); the
Prometheus families are built from them when scraped. Region health is read
from the HealthBook at scrape time; detection times are observed by the
book's ``on_region_down`` callback (rare) into a histogram.

- ``nimbus_edge_region_up{region}``: 1 while any gateway of the region is up;
- ``nimbus_edge_requests_total{region,code}``: answers sent to clients, by
  the region that answered (``x-nimbus-region``) and status; a 502
  ``RegionFailed`` the edge made counts under the region it names (``""``
  when the app names none of the edge's regions);
- ``nimbus_edge_retries_total{region}``: attempts after a failed one, by the
  region of the failed attempt (another gateway of it, or another region);
- ``nimbus_edge_failovers_total{region}``: requests moved away from the
  region after failing there (a retry in another region);
- ``nimbus_edge_detection_seconds{region}``: from the first failure (probe
  or request) of the region's last up gateway to the region marked down;
- ``nimbus_memory_pss_bytes{region="",role="edge",kind="platform"}``, and
  prometheus-client's process, platform and GC collectors.

The families live here rather than in ``nimbus.observe.metrics`` (the
process-wide registry): a registry per edge keeps edges run side by side in
one process (tests) apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nimbus.edge.health import HealthBook
from nimbus.observe.metrics import authorized, is_loopback, platform_memory

METRICS_PATH = b"/_nimbus/metrics"
REGIONS_PATH = b"/_nimbus/regions"  # the edge's view of regions: as guarded as metrics
DETECTION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0)
NO_REGION = ""


class EdgeMetrics:
    """Counters for one edge. ``requests[region][status]``,
    ``retries[region]`` and ``failovers[region]`` are plain ints the request
    path adds to; the keys exist from the start for every region."""

    def __init__(self, regions: Iterable[str], book: HealthBook) -> None:
        names = list(regions)
        self.book = book
        self.requests: dict[str, dict[int, int]] = {r: {} for r in (*names, NO_REGION)}
        self.retries: dict[str, int] = dict.fromkeys(names, 0)
        self.failovers: dict[str, int] = dict.fromkeys(names, 0)
        self.registry = CollectorRegistry()
        self.detection = Histogram(
            "nimbus_edge_detection_seconds",
            "Seconds from a region's first failed probe or request to the region marked down",
            ["region"], buckets=DETECTION_BUCKETS, registry=self.registry)
        self._detection = {r: self.detection.labels(region=r) for r in names}
        self.registry.register(_Families(self))
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(default)
        book.on_region_down.append(self.region_down)

    def region_down(self, region: str, detection_s: float) -> None:
        child = self._detection.get(region)
        if child is not None:
            child.observe(max(0.0, detection_s))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Families(Collector):
    def __init__(self, metrics: EdgeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        up = GaugeMetricFamily("nimbus_edge_region_up",
                               "1 while any gateway of the region is up (the edge's view)",
                               labels=["region"])
        for region in m.book.by_region:
            up.add_metric([region], 1.0 if m.book.region_up(region, 0.0) else 0.0)
        yield up
        requests = CounterMetricFamily("nimbus_edge_requests",
                                       "Answers sent to clients, by region and status code",
                                       labels=["region", "code"])
        for region, codes in m.requests.items():
            for code, n in sorted(codes.items()):
                requests.add_metric([region, str(code)], n)
        yield requests
        retries = CounterMetricFamily("nimbus_edge_retries",
                                      "Attempts after a failed one, by the failed region",
                                      labels=["region"])
        for region, n in m.retries.items():
            retries.add_metric([region], n)
        yield retries
        failovers = CounterMetricFamily("nimbus_edge_failovers",
                                        "Requests moved away from a region after failing there",
                                        labels=["region"])
        for region, n in m.failovers.items():
            failovers.add_metric([region], n)
        yield failovers
        yield from platform_memory("", "edge", os.getpid(), [], [])


class MetricsAuth:
    """Who may read the edge's operator pages (``/_nimbus/metrics`` and
    ``/_nimbus/regions``, which name every gateway and its last error): a
    Bearer token, or anyone when the edge listens on loopback only and no
    token is set. ``/_nimbus/health`` stays open for load balancers."""

    def __init__(self, token: str | None, host: str) -> None:
        self.token = token or None
        self.open = self.token is None and is_loopback(host)
        self.host = host

    def check(self, headers: list[tuple[bytes, bytes]], what: str = "metrics",
              ) -> tuple[int, str] | None:
        """None when allowed, else (status, message)."""
        if self.token is None:
            if self.open:
                return None
            return 403, (f"{what} are served without a token only on loopback; this edge "
                         f"listens on {self.host}: start it with --metrics-token-file FILE")
        given = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers
                 if n == b"authorization"}
        if authorized(given, self.token):
            return None
        return 401, f"{what} need 'Authorization: Bearer TOKEN' (the --metrics-token-file)"


CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
