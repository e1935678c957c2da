"""``nimbus edge``: the HTTP front over the regions of a cluster file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from nimbus.cli.main import cli, fail


@cli.command()
@click.option("--cluster", "cluster_path", required=True, type=click.Path(path_type=Path),
              help="The cluster file naming the regions (nimbus.cluster.yaml).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 picks a free one).")
@click.option("--probe-interval", "interval_s", default=0.25, show_default=True,
              type=click.FloatRange(0.01), help="Seconds between health probes of a gateway.")
@click.option("--probe-timeout", "timeout_s", default=0.3, show_default=True,
              type=click.FloatRange(0.01), help="A probe not answered within this fails.")
@click.option("--fall", default=2, show_default=True, type=click.IntRange(1),
              help="Consecutive failed probes that take a gateway down.")
@click.option("--rise", "rise_s", default=3.0, show_default=True, type=click.FloatRange(0),
              help="Seconds of continuous health before a down gateway takes traffic again.")
@click.option("--connect-timeout", "connect_timeout_s", default=0.5, show_default=True,
              type=click.FloatRange(0.01), help="Seconds to open a connection to a gateway.")
@click.option("--retry-ratio", default=0.2, show_default=True, type=click.FloatRange(0),
              help="Retries may add at most this share of the requests (plus 10/s).")
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Seconds requests in flight get to finish on shutdown.")
@click.option("--max-connections", default=10_000, show_default=True, type=click.IntRange(1),
              help="Client connections held at once; past it the longest-idle one makes "
                   "room, or 503 when all are busy.")
@click.option("--converge/--no-converge", default=True, show_default=True,
              help="Bring regions that missed a 'nimbus deploy --cluster' (down at the "
                   "time, or back at another version) up to date in the background.")
@click.option("--metrics-token-file", type=click.Path(path_type=Path),
              help="A file holding the Bearer token that GET /_nimbus/metrics and "
                   "/_nimbus/regions ask for [default: no token, served only when --host "
                   "is a loopback address].")
@click.option("--emit", type=click.Choice(["haproxy"]),
              help="Write an equivalent configuration for this proxy to stdout, "
                   "listening on --host/--port, and exit.")
@click.option("--trace", "trace_mode", type=click.Choice(["off", "file", "otlp"]),
              default=None, help="Traces of the edge's requests and tries: off (the "
              "default), JSON lines in the cluster's state folder, or OTLP/HTTP.")
@click.option("--otlp-endpoint", default=None, metavar="URL",
              help="Send traces over OTLP/HTTP to URL; implies --trace otlp.")
def edge(cluster_path: Path, host: str, port: int, interval_s: float, timeout_s: float,
         fall: int, rise_s: float, connect_timeout_s: float, retry_ratio: float,
         grace_s: float, max_connections: int, converge: bool, metrics_token_file: Path | None,
         emit: str | None, trace_mode: str | None, otlp_endpoint: str | None) -> None:
    """Serve HTTP in front of every region of a cluster file: route each request
    by its app's policy and the regions' health, fail over within a second."""
    from nimbus.edge.health import HealthConfig
    from nimbus.edge.server import EdgeConfig, run
    from nimbus.multiregion.clusterfile import load_cluster

    cluster = load_cluster(cluster_path)
    for region in cluster.regions.values():
        for url in (*region.gateways, region.control):
            if not url.startswith("http://"):
                fail(f"{cluster_path}: region {region.name}: {url}: the edge speaks plain "
                     "http:// to gateways and control APIs", 2)
    if emit == "haproxy":
        from nimbus.edge.haproxy import EmitOptions, emit_haproxy

        health = HealthConfig(interval_s, timeout_s, fall, rise_s)
        options = EmitOptions(host, port, health, timeout_connect_s=connect_timeout_s)
        click.echo(emit_haproxy(cluster, options), nl=False)
        return
    metrics_token = read_metrics_token(metrics_token_file) if metrics_token_file else None
    config = EdgeConfig(health=HealthConfig(interval_s, timeout_s, fall, rise_s),
                        connect_timeout_s=connect_timeout_s, retry_ratio=retry_ratio,
                        grace_s=grace_s, max_connections=max_connections,
                        metrics_token=metrics_token)

    def ready(edge: Any, bound: tuple[str, int]) -> None:
        names = ", ".join(cluster.names)
        click.echo(f"nimbus edge: serving http://{bound[0]}:{bound[1]} "
                   f"(regions {names}; health at /_nimbus/regions)")
        if metrics_token is None and not edge.metrics_auth.open:
            click.echo(f"nimbus edge: /_nimbus/metrics and /_nimbus/regions answer 403: "
                       f"--host {host} is not a loopback address and no "
                       "--metrics-token-file was given")
        sys.stdout.flush()

    background = None
    if converge:
        from nimbus.multiregion.converge import Converger
        from nimbus.multiregion.state import state_dir_for

        background = Converger(cluster, state_dir_for(cluster.path)).run
    from nimbus.multiregion.state import state_dir_for
    from nimbus.observe import tracing

    try:
        trace = tracing.trace_config(trace_mode or ("otlp" if otlp_endpoint else "off"),
                                     otlp_endpoint)
    except ValueError as exc:
        fail(f"--trace/--otlp-endpoint: {exc}", 2)
    logging.basicConfig(level=logging.INFO, format="nimbus edge: %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tracing.setup(trace, state_dir_for(cluster.path), role="edge", region="edge")
    try:
        run(cluster, host, port, config, ready, background)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    finally:
        tracing.shutdown()


MIN_METRICS_TOKEN_CHARS = 16


def read_metrics_token(path: Path) -> str:
    """The token in ``path``: printable ASCII without spaces, 16 characters or more."""
    where = f"--metrics-token-file {path}"
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        fail(f"{where}: no such file", 2)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{where}: cannot read it: "
             f"{exc.strerror if isinstance(exc, OSError) else 'not ASCII text'}", 2)
    if len(token) < MIN_METRICS_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        fail(f"{where}: the token must be at least {MIN_METRICS_TOKEN_CHARS} printable "
             "characters without spaces", 2)
    return token
