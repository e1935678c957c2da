"""Which addresses a name gets: the app's regions ordered by its policy and
the regions' health (the edge's own HealthBook and region_order), and the
up gateways of the best region.

DNS answers a whole region at a time: a client caches the answer for the
TTL and may try every address in it, so all of them must be good choices.
When no region of the app is healthy the answer is the first region of the
order anyway (an empty answer helps nobody; resolvers keep the last one).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable

from nimbus.dns.apps import AppDirectory
from nimbus.edge.health import HealthBook
from nimbus.edge.policy import region_order
from nimbus.edge.prober import split_url
from nimbus.errors import ManifestError
from nimbus.multiregion.clusterfile import ClusterFile


def gateway_addresses(cluster: ClusterFile) -> dict[str, tuple[str, ...]]:
    """Each gateway URL's IP addresses: the literal, or the host name
    resolved once now. A name that does not resolve is an error naming the
    region and the gateway."""
    out: dict[str, tuple[str, ...]] = {}
    for name, region in cluster.regions.items():
        for url in region.gateways:
            try:
                host, _port = split_url(url)
            except ValueError as exc:
                raise ManifestError(str(exc), file=cluster.path,
                                    field=f"regions.{name}.gateways") from None
            try:
                out[url] = (str(ipaddress.ip_address(host)),)
                continue
            except ValueError:
                pass
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ManifestError(f"cannot resolve {host!r} of {url}: {exc}",
                                    file=cluster.path,
                                    field=f"regions.{name}.gateways") from None
            seen = dict.fromkeys(str(info[4][0]) for info in infos)
            out[url] = tuple(seen)
    return out


class RegionAnswers:
    """``lookup(app)``: the addresses to answer for ``<app>.<zone>`` now."""

    def __init__(self, cluster: ClusterFile, book: HealthBook, apps: AppDirectory,
                 addresses: dict[str, tuple[str, ...]], rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.book = book
        self.apps = apps
        self.addresses = addresses
        self.rng = rng or random.Random()
        self.clock = clock

    def region_for(self, app: str) -> str | None:
        """The region an answer for ``app`` names now; None for an unknown app."""
        info = self.apps.get(app)
        if info is None:
            return None
        now = self.clock()
        names = self.cluster.names
        up = {r for r in info.hosted_by if self.book.region_up(r, now)}
        order = region_order(info.regions, names, up, self.book.latencies(), self.rng)
        hosting = [r for r in order if r in info.hosted_by]
        chosen = hosting or order
        return chosen[0] if chosen else ""

    def lookup(self, app: str) -> list[str] | None:
        region = self.region_for(app)
        if region is None:
            return None
        if not region:
            return []
        now = self.clock()
        gateways = self.cluster.regions[region].gateways
        live = [g for g in gateways if self.book.gateway_up(g, now)] or list(gateways)
        out: list[str] = []
        for gateway in live:
            for address in self.addresses.get(gateway, ()):
                if address not in out:
                    out.append(address)
        return out
