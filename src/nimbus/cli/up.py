"""``nimbus up``: run the platform in the foreground and deploy an app folder."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from nimbus.errors import NimbusError
from nimbus.worker.budget import NodeBudget


def run_up(app_dir: Path, *, host: str, port: int, control_host: str, control_port: int,
           state_dir: Path | None, grace_s: float, budget: NodeBudget,
           async_max_bytes: int, containment: str = "auto",
           uid_range: tuple[int, int] = (200_000, 265_535),
           http_limits: dict[str, Any] | None = None,
           cluster_path: Path | None = None, trace: Any = None,
           parameters: dict[str, str] | None = None) -> None:
    """``http_limits``: the HTTP ``ServerConfig`` fields (``max_connections``,
    ``control_max_connections``, ``header_timeout_s``, ``keep_alive_s``,
    ``max_header_bytes``, ``max_bundle_bytes``) given on the command line;
    ``parameters``: a SAM template's parameter overrides."""
    from nimbus.control.bundle import make_bundle
    from nimbus.manifest.loader import MANIFEST_NAMES, load_app

    # Everything the platform writes (store, queue, logs, token) is its
    # owner's alone; the state folder's setup also sets modes explicitly.
    os.umask(0o077)

    has_app = any((app_dir / n).exists() for n in MANIFEST_NAMES)
    if not app_dir.is_dir():
        raise click.BadParameter(f"{app_dir} is not a folder", param_hint="APP_DIR")
    bundle = None
    if has_app:
        # manifest errors: one line, exit 2, before anything starts
        load_app(app_dir, parameters=parameters or None)
        bundle = make_bundle(app_dir)
    cluster = None
    if cluster_path is not None:
        from nimbus.multiregion.clusterfile import load_cluster

        cluster = load_cluster(cluster_path)  # errors: file, line, field; exit 2
    logging.basicConfig(level=logging.WARNING, format="nimbus: %(levelname)s %(message)s")
    from nimbus.control.server import ServerConfig

    config = ServerConfig(
        state_dir=(state_dir or app_dir / ".nimbus").resolve(), host=host, port=port,
        control_host=control_host, control_port=control_port, grace_s=grace_s, budget=budget,
        async_max_bytes=async_max_bytes, containment=containment, uid_range=uid_range,
        cluster=cluster, **({"trace": trace} if trace is not None else {}),
        **(http_limits or {}))
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    code = runner(_main(config, bundle, app_dir.resolve().name, parameters or None))
    sys.exit(code)


async def _main(config: object, bundle: bytes | None, name: str,
                parameters: dict[str, str] | None = None) -> int:
    from nimbus.cli.output import print_deployed
    from nimbus.control.server import Platform, install_stop_signals

    try:
        platform = await Platform.create(config)  # type: ignore[arg-type]
    except NimbusError as exc:
        click.echo(f"nimbus: error: {exc}", err=True)
        return 1
    code = 0
    try:
        click.echo(f"nimbus: {platform.worker.containment.summary()}", err=True)
        install_stop_signals(platform)
        await platform.start()
        click.echo(f"nimbus: gateway {platform.gateway_url}  control {platform.control_url}  "
                   f"state {platform.state_dir}", err=True)
        click.echo(f"nimbus: dashboard {platform.control_url}/ui (sign in with the token "
                   f"in {platform.state_dir / 'token'})", err=True)
        if bundle is not None:
            deploy = asyncio.create_task(platform.deploy(
                bundle, lambda m: click.echo(f"nimbus: {m}", err=True), name,
                parameters=parameters))
            stop = asyncio.create_task(platform.wait_stopped())
            await asyncio.wait({deploy, stop}, return_when=asyncio.FIRST_COMPLETED)
            if deploy.done():
                try:
                    print_deployed(deploy.result(), platform.gateway_url)
                except NimbusError as exc:
                    click.echo(f"nimbus: error: {exc}", err=True)
                    code = 1
                    platform.request_stop()
            else:
                deploy.cancel()
            stop.cancel()
        if code == 0:
            # What start-up made lives as long as the process: out of the
            # collector's sight, a full collection (which requests' short
            # lived objects trigger now and then) walks only what came after.
            gc.freeze()
            click.echo(f"nimbus: serving at {platform.gateway_url} (Ctrl-C to stop)", err=True)
            sys.stdout.flush()
        await platform.wait_stopped()
        click.echo("nimbus: stopping: draining requests and instances", err=True)
    finally:
        await platform.aclose()
    click.echo("nimbus: stopped", err=True)
    return code
