"""The region's process commands: ``nimbus controller``, ``nimbus worker``,
``nimbus gateway`` and ``nimbus cluster up``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from nimbus.cli.main import _uid_range, cli, region_option
from nimbus.cli.params import parameter_overrides_option


def region_options(f: Any) -> Any:
    f = click.option("--state-dir", type=click.Path(path_type=Path), required=True,
                     help="This process's own folder (code cache, venvs, logs, node.json).")(f)
    f = click.option("--token-file", type=click.Path(path_type=Path),
                     help="The region token (NATS password, worker frames, control API); "
                          "default: STATE_DIR/token, or $NIMBUS_TOKEN_FILE.")(f)
    f = region_option(f)
    f = click.option("--store", "store_url", required=True,
                     help="The region's store: nats://HOST:PORT[,HOST:PORT...]")(f)
    f = click.option("--trace", "trace_mode",
                     type=click.Choice(["off", "region", "file", "otlp"]),
                     default=None, help="Traces of this process: off (the default), region "
                     "(to the region's trace stream, where any controller finds them for "
                     "`nimbus trace`), file (that, and JSON lines under STATE_DIR/traces/) "
                     "or otlp (that, and OTLP/HTTP to --otlp-endpoint).")(f)
    f = click.option("--otlp-endpoint", default=None, metavar="URL",
                     help="Send traces over OTLP/HTTP to URL (a collector every process "
                          "of the region sends to); implies --trace otlp.")(f)
    return f


def _run_traced(role: str, region: str, state_dir: Path, trace_mode: str | None,
                otlp_endpoint: str | None, main: Any) -> None:
    """Run a role's main with tracing set up as its options say."""
    from nimbus.observe import tracing
    from nimbus.roles.common import run_role

    try:
        config = tracing.trace_config(trace_mode or ("otlp" if otlp_endpoint else "off"),
                                      otlp_endpoint)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trace/--otlp-endpoint") from None
    tracing.setup(config, state_dir, role=role, region=region)
    try:
        code = run_role(main)
    finally:
        tracing.shutdown()
    sys.exit(code)


def metrics_options(f: Any) -> Any:
    """A worker's or gateway's metrics port."""
    f = click.option("--metrics-auth", default="token", show_default=True,
                     type=click.Choice(["token", "open"]),
                     help="GET /metrics: the region token as Bearer, or open (no token; only "
                          "on a loopback --metrics-host).")(f)
    f = click.option("--metrics-port", default=0, show_default=True,
                     type=click.IntRange(0, 65535),
                     help="Port of GET /metrics (0 picks a free one; the node record "
                          "names it).")(f)
    f = click.option("--metrics-host", default=None,
                     help="Address of the metrics port [default: the role's host].")(f)
    return f


def _auth_ok(auth: str, host: str, where: str) -> None:
    from nimbus.observe.metrics import check_metrics_auth

    try:
        check_metrics_auth(auth, host, where)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics-auth") from None


def _config(role: str, store_url: str, region: str, token_file: Path | None,
            state_dir: Path) -> Any:
    from nimbus.roles.common import role_config

    return role_config(role, store_url, region, token_file, state_dir)


@cli.command()
@region_options
@click.option("--control-host", default="127.0.0.1", show_default=True)
@click.option("--control-port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0))
@click.option("--metrics-auth", default="token", show_default=True,
              type=click.Choice(["token", "open"]),
              help="GET /metrics on the control API: the region token as Bearer, or open "
                   "(no token; only on a loopback --control-host).")
def controller(store_url: str, region: str, token_file: Path | None, state_dir: Path,
               control_host: str, control_port: int, grace_s: float,
               metrics_auth: str, trace_mode: str | None,
               otlp_endpoint: str | None) -> None:
    """Run a controller of the region: control API, leader election,
    autoscaling and placement, schedules."""
    from nimbus.roles.controller import ControllerOptions, serve_controller

    _auth_ok(metrics_auth, control_host, "--control-host")
    config = _config("controller", store_url, region, token_file, state_dir)
    options = ControllerOptions(control_host, control_port, grace_s,
                                metrics_auth=metrics_auth)
    _run_traced("controller", region, state_dir, trace_mode, otlp_endpoint,
                lambda stop: serve_controller(config, options, stop))


@cli.command()
@region_options
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT for invocation frames from gateways.")
@click.option("--advertise", default=None,
              help="The host gateways dial, when it is not the --listen host.")
@click.option("--max-instances", "node_instances", default=256, show_default=True,
              type=click.IntRange(1))
@click.option("--memory-budget-mb", "node_memory_mb", default=0, type=click.IntRange(0))
@click.option("--containment", default="auto", show_default=True,
              type=click.Choice(["auto", "full", "rlimits"]))
@click.option("--uid-range", default="200000-265535", show_default=True)
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0))
@metrics_options
def worker(store_url: str, region: str, token_file: Path | None, state_dir: Path, listen: str,
           advertise: str | None, node_instances: int, node_memory_mb: int, containment: str,
           uid_range: str, grace_s: float, metrics_host: str | None, metrics_port: int,
           metrics_auth: str, trace_mode: str | None,
               otlp_endpoint: str | None) -> None:
    """Run a worker of the region: zygotes and instances, serving gateways."""
    from nimbus.roles.worker import WorkerOptions, serve_worker
    from nimbus.worker.budget import NodeBudget

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}", param_hint="--listen")
    _auth_ok(metrics_auth, metrics_host or host.strip("[]"), "--metrics-host")
    config = _config("worker", store_url, region, token_file, state_dir)
    options = WorkerOptions(host.strip("[]"), int(port), advertise,
                            NodeBudget(node_instances, node_memory_mb), containment,
                            _uid_range(uid_range), grace_s, metrics_host=metrics_host,
                            metrics_port=metrics_port, metrics_auth=metrics_auth)
    _run_traced("worker", region, state_dir, trace_mode, otlp_endpoint,
                lambda stop: serve_worker(config, options, stop))


@cli.command()
@region_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0))
@metrics_options
def gateway(store_url: str, region: str, token_file: Path | None, state_dir: Path, host: str,
            port: int, grace_s: float, metrics_host: str | None, metrics_port: int,
            metrics_auth: str, trace_mode: str | None,
               otlp_endpoint: str | None) -> None:
    """Run a gateway of the region: HTTP routes to instances on the workers."""
    from nimbus.roles.gateway import GatewayOptions, serve_gateway

    _auth_ok(metrics_auth, metrics_host or host, "--metrics-host")
    config = _config("gateway", store_url, region, token_file, state_dir)
    options = GatewayOptions(host, port, grace_s, metrics_host=metrics_host,
                             metrics_port=metrics_port, metrics_auth=metrics_auth)
    _run_traced("gateway", region, state_dir, trace_mode, otlp_endpoint,
                lambda stop: serve_gateway(config, options, stop))


@cli.group()
def cluster() -> None:
    """A whole region on this machine (NATS cluster and every process)."""


@cluster.command(name="up")
@click.argument("app_dir", required=False, type=click.Path(path_type=Path))
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--gateways", default=2, show_default=True, type=int)
@click.option("--controllers", default=2, show_default=True, type=int)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="The first gateway's port (the next ones count up); 0 for free ports.")
@click.option("--control-port", default=8090, show_default=True,
              type=click.IntRange(0, 65535),
              help="The first controller's port (the next ones count up); 0 for free ports.")
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="Default: APP_DIR/.nimbus (or ./.nimbus).")
@click.option("--region", default="local", show_default=True)
@click.option("--containment", default="auto", show_default=True,
              type=click.Choice(["auto", "full", "rlimits"]))
@click.option("--trace", "trace_mode", default="off", show_default=True,
              type=click.Choice(["off", "region"]),
              help="region: every process publishes its spans to the region's trace stream "
                   "(`nimbus trace REQUEST_ID`).")
@parameter_overrides_option
def cluster_up(app_dir: Path | None, workers: int, gateways: int, controllers: int, port: int,
               control_port: int, state_dir: Path | None, region: str,
               containment: str, trace_mode: str, parameter_overrides: tuple[str, ...]) -> None:
    """Start a region on this machine in the foreground and deploy APP_DIR."""
    from nimbus.cli.cluster import run_cluster_up
    from nimbus.cli.params import parse_overrides
    from nimbus.errors import UserInputError
    from nimbus.roles.common import check_region

    if app_dir is not None and not app_dir.is_dir():
        raise click.BadParameter(f"{app_dir} is not a folder", param_hint="APP_DIR")
    if port and control_port and (
            control_port <= port < control_port + controllers
            or port <= control_port < port + gateways):
        raise click.BadParameter(f"--port {port} and --control-port {control_port} ranges "
                                 "overlap", param_hint="--port")
    try:
        check_region(region)
    except UserInputError as exc:
        raise click.BadParameter(str(exc).partition(": ")[2], param_hint="--region") from None
    state = state_dir or (app_dir or Path(".")) / ".nimbus"
    sys.exit(run_cluster_up(app_dir, state_dir=state, region=region,
                            workers=workers, gateways=gateways, controllers=controllers,
                            port=port, control_port=control_port,
                            worker_args=["--containment", containment],
                            role_args=["--trace", trace_mode],
                            parameters=parse_overrides(parameter_overrides)))
