"""``nimbus dns``: the zone's authoritative server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from nimbus.cli.main import cli, fail
from nimbus.errors import NimbusError


@cli.command()
@click.option("--cluster", "cluster_path", required=True, type=click.Path(path_type=Path),
              help="The cluster file (nimbus.cluster.yaml) naming the regions.")
@click.option("--zone", required=True, help="The zone to answer, e.g. example.internal: "
              "APP.ZONE gets the addresses of APP's gateways.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=53, show_default=True, type=click.IntRange(0, 65535),
              help="UDP and TCP port (0 picks a free one).")
@click.option("--ttl", default=5, show_default=True, type=click.IntRange(0, 86400),
              help="Seconds resolvers may cache an answer (and a negative answer).")
@click.option("--ns", "ns_name", default="",
              help="The zone's name server name [ns.ZONE, answered with --host].")
@click.option("--probe-interval", "interval_s", default=0.25, show_default=True,
              type=click.FloatRange(0.01, 60), help="Seconds between health probes.")
@click.option("--probe-timeout", "timeout_s", default=0.3, show_default=True,
              type=click.FloatRange(0.01, 60), help="A probe slower than this fails.")
@click.option("--fall", default=2, show_default=True, type=click.IntRange(1, 100),
              help="Failed probes in a row that take a gateway down.")
@click.option("--rise", "rise_s", default=3.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds of continuous health before a gateway that was down is answered again.")
def dns(cluster_path: Path, zone: str, host: str, port: int, ttl: int, ns_name: str,
        interval_s: float, timeout_s: float, fall: int, rise_s: float) -> None:
    """Answer APP.ZONE with the gateways of APP's best healthy region."""
    from nimbus.dns.answers import gateway_addresses
    from nimbus.dns.server import serve
    from nimbus.dns.zone import normalize_zone
    from nimbus.edge.health import HealthConfig
    from nimbus.multiregion.clusterfile import load_cluster
    from nimbus.roles.common import run_role

    for option, value in (("--zone", zone), ("--ns", ns_name)):
        try:
            if value or option == "--zone":
                normalize_zone(value)
        except ValueError as exc:
            fail(f"{option}: {exc}", 2)
    cluster = load_cluster(cluster_path)        # errors name the file, line and field
    addresses = gateway_addresses(cluster)
    config = HealthConfig(interval_s=interval_s, timeout_s=timeout_s, fall=fall, rise_s=rise_s)
    failed: list[str] = []

    async def main(stop: asyncio.Event) -> None:
        try:
            await serve(cluster, addresses, zone, host, port, ttl, ns_name, config, stop)
        except NimbusError as exc:
            failed.append(str(exc))

    code = run_role(main)
    if failed:
        fail(failed[0], 1)
    sys.exit(code)
