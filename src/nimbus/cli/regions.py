"""``nimbus deploy --cluster`` and ``nimbus status --cluster``: the CLI side
of deploying to several regions (the work is in :mod:`nimbus.multiregion`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from nimbus.cli.output import print_json
from nimbus.errors import ManifestError
from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile, load_cluster
from nimbus.multiregion.deploy import DeployPlan, RegionReport, deploy_plan, plan_deploy
from nimbus.multiregion.settings import DeploySettings, read_settings
from nimbus.multiregion.state import state_dir_for
from nimbus.multiregion.status import cluster_status, render, unconverged_regions
from nimbus.multiregion.wait import wait_converged


def open_cluster(path: Path) -> ClusterFile:
    if not path.exists():
        raise ManifestError("no such cluster file; write one (see `nimbus deploy --guided`)",
                            file=path)
    return load_cluster(path)


def make_plan(app_dir: Path, cluster: ClusterFile,
              settings: DeploySettings | None) -> DeployPlan:
    if settings is None:
        return plan_deploy(app_dir, cluster)
    try:
        override = RegionsSpec.from_dict(settings.routing())
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"these regions and policy are not valid routing: {exc}",
                            file=app_dir / "nimbus.toml", field="deploy") from None
    return plan_deploy(app_dir, cluster, name=settings.name, override=override)


def cluster_deploy(app_dir: Path, cluster_path: Path, *, wait_all: bool, timeout_s: float,
                   settings: DeploySettings | None = None,
                   plan: DeployPlan | None = None) -> int:
    """Deploy to every region of the app; returns the exit status."""
    cluster = open_cluster(cluster_path)
    if plan is None:
        plan = make_plan(app_dir, cluster, settings)
        for line in plan.describe():
            click.echo(line)
    reports = asyncio.run(deploy_plan(plan, cluster, timeout_s=timeout_s,
                                      on_report=lambda r: click.echo(r.line())))
    return report_deploy(plan, cluster, reports, wait_all=wait_all, timeout_s=timeout_s)


def report_deploy(plan: DeployPlan, cluster: ClusterFile, reports: list[RegionReport], *,
                  wait_all: bool, timeout_s: float) -> int:
    refused = [r for r in reports if r.outcome == "refused"]
    pending = [r for r in reports if r.outcome in ("pending", "busy")]
    for r in refused:
        click.echo(f"nimbus: error: region {r.region} refused {plan.app}: {r.message}",
                   err=True)
    if refused:
        return 1
    if pending and wait_all:
        click.echo(f"waiting up to {timeout_s:g} s for {', '.join(r.region for r in pending)}")
        return _wait(cluster, timeout_s)
    return 0


def _wait(cluster: ClusterFile, timeout_s: float, as_json: bool = False) -> int:
    def progress(report: Any) -> None:
        if as_json:
            return
        for o in report.outcomes:
            if o.what in ("deployed", "refused"):
                click.echo(f"{o.region}: {o.app} {o.what} {o.message}".rstrip())

    doc = asyncio.run(wait_converged(cluster, state_dir_for(cluster.path), timeout_s,
                                     on_round=progress))
    if as_json:
        print_json(doc)
    else:
        for line in render(doc):
            click.echo(line)
    if not doc["converged"]:
        regions = unconverged_regions(doc)
        click.echo(f"nimbus: error: not converged within {timeout_s:g} s: "
                   f"{', '.join(regions)}", err=True)
        return 1
    return 0


def cluster_status_cmd(cluster_path: Path, *, as_json: bool, wait_all: bool,
                       timeout_s: float) -> int:
    cluster = open_cluster(cluster_path)
    if wait_all:
        return _wait(cluster, timeout_s, as_json)
    doc = asyncio.run(cluster_status(cluster, state_dir_for(cluster.path), min(timeout_s, 3.0)))
    if as_json:
        print_json(doc)
    else:
        for line in render(doc):
            click.echo(line)
    return 0


def plain_deploy_settings(app_dir: Path) -> DeploySettings | None:
    """The saved answers of a guided deploy, if the app has them."""
    return read_settings(app_dir)
