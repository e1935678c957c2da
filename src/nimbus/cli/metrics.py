"""``nimbus metrics targets``: a Prometheus ``file_sd`` file listing every
nimbus process to scrape (a ``nimbus up``, a region's nodes, every region
of a cluster file, edges)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx

from nimbus.cli.main import _client, cli, connection_options, fail

STATUS_TIMEOUT_S = 5.0


@cli.group()
def metrics() -> None:
    """Prometheus metrics: what to scrape."""


@metrics.command("targets")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path),
              help="List every region of this cluster file (instead of one nimbus).")
@click.option("--edge", "edges", multiple=True, metavar="URL",
              help="An edge to list too (its /_nimbus/metrics); may be repeated.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Write the file here (atomically) instead of to stdout.")
@click.option("--watch", "watch_s", type=click.FloatRange(0.5), metavar="SECONDS",
              help="Keep running: look again every SECONDS and rewrite --out when "
                   "processes come or go.")
@connection_options
def targets(cluster_path: Path | None, edges: tuple[str, ...], out: Path | None,
            watch_s: float | None, state_dir: Path | None, url: str | None,
            token: str | None) -> None:
    """Print a Prometheus file_sd target file: every process of a nimbus up or
    a region (its controllers, workers and gateways), of every region of a
    cluster file with --cluster, and the edges given with --edge. Targets
    carry the labels region and role (see docs/monitoring.md)."""
    from nimbus.observe.targets import TargetError, edge_target

    if watch_s is not None and out is None:
        fail("--watch needs --out FILE (the file Prometheus reads)", 2)
    try:
        edge_targets = [edge_target(u) for u in edges]
    except TargetError as exc:
        fail(f"--edge {exc}", 2)
    lister = TargetLister(cluster_path, state_dir, url, token, local_optional=bool(edges))
    last: bytes | None = None
    try:
        while True:
            data = lister.render(edge_targets)
            if out is None:
                click.echo(data.decode(), nl=False)
            elif data != last:
                write_atomic(out, data)
                last = data
            if watch_s is None:
                return
            time.sleep(watch_s)
    finally:
        lister.close()


class TargetLister:
    """Reads each region's status; remembers each region's last good list,
    so a region that does not answer for a moment keeps its targets (and
    Prometheus reports them down) rather than vanishing."""

    def __init__(self, cluster_path: Path | None, state_dir: Path | None, url: str | None,
                 token: str | None, local_optional: bool) -> None:
        self.cluster: Any = None
        self.local: Any = None
        self.known: dict[str, list[Any]] = {}        # a cluster's regions' last lists
        self.local_known: list[Any] | None = None
        if cluster_path is not None:
            from nimbus.multiregion.clusterfile import load_cluster

            self.cluster = load_cluster(cluster_path)
        else:
            from nimbus.cli.client import CLIError

            try:
                self.local = _client(state_dir, url, token, timeout_s=STATUS_TIMEOUT_S)
            except CLIError:
                # edges alone are a complete answer; a nimbus asked for by name is not
                if not local_optional or state_dir is not None or url is not None:
                    raise

    def close(self) -> None:
        if self.local is not None:
            self.local.http.close()

    def render(self, edges: list[Any]) -> bytes:
        from nimbus.observe.targets import from_status, render, target

        found: list[Any] = list(edges)
        if self.local is not None:
            from nimbus.cli.client import CLIError

            try:
                status = self.local.request("GET", "/v1/status")
            except CLIError as exc:
                if self.local_known is None:
                    raise  # nothing known yet: the one-line error, exit 1
                _warn([f"{exc}; listing what was known"])
                found += self.local_known
            else:
                listed, warnings = from_status(status, self.local.conn.url)
                _warn(warnings)
                self.local_known = listed
                found += listed
        if self.cluster is not None:
            for name, region in self.cluster.regions.items():
                try:
                    status = _status(region.control, region.token)
                    listed, warnings = from_status(status, region.control, name)
                    _warn(warnings)
                    self.known[name] = listed
                except _Unreachable as exc:
                    listed = self.known.get(name) or [target(region.control, name,
                                                             "controller")]
                    _warn([f"region {name}: {exc}; listing what was known"])
                found += listed
        return render(found)


class _Unreachable(Exception):
    pass


def _status(control: str, token: str) -> dict[str, Any]:
    try:
        r = httpx.get(control + "/v1/status", headers={"authorization": f"Bearer {token}"},
                      timeout=STATUS_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise _Unreachable(f"cannot reach {control}: {exc}") from None
    if r.status_code != 200:
        raise _Unreachable(f"{control}/v1/status answered {r.status_code}")
    try:
        data = r.json()
    except ValueError:
        raise _Unreachable(f"{control}/v1/status answered no JSON") from None
    if not isinstance(data, dict):
        raise _Unreachable(f"{control}/v1/status answered no JSON object")
    return data


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        click.echo(f"nimbus: warning: {w}", err=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0644: Prometheus runs as its own
    user) so a reader sees the old file or the new one, never a part."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        fail(f"--out {path}: cannot write in {folder}: {exc.strerror or exc}", 2)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        fail(f"--out {path}: {exc.strerror or exc}", 1)
