"""``nimbus deploy --cluster`` and ``nimbus status --cluster``: the CLI side
of deploying to several regions (the work is in :mod:`nimbus.multiregion`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from nimbus.cli.output import print_json
from nimbus.errors import ManifestError, UserInputError
from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile, load_cluster
from nimbus.multiregion.deploy import DeployPlan, RegionReport, deploy_plan, plan_deploy
from nimbus.multiregion.rollout import RolloutOptions, roll_out
from nimbus.multiregion.settings import DeploySettings, read_settings
from nimbus.multiregion.state import state_dir_for
from nimbus.multiregion.status import cluster_status, render, unconverged_regions
from nimbus.multiregion.wait import wait_converged
from nimbus.multiregion.waves import (
    DEFAULT_BAKE_S,
    ROLLBACK_ALL,
    check_on_region_failure,
    default_waves,
    parse_bake,
    parse_waves,
    wait_deadline_s,
)


@dataclass(frozen=True, slots=True)
class RolloutFlags:
    """What the command line said about a rollout (None: not given)."""

    strategy: str | None = None
    rollback_on: str | None = None
    min_requests: int | None = None
    waves: str | None = None
    bake: str | None = None
    on_region_failure: str | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.strategy, self.rollback_on,
                                           self.min_requests, self.waves, self.bake,
                                           self.on_region_failure))


def _step_waits(strategy: str) -> list[float]:
    """The waits of the strategy's steps (a UserInputError naming what is
    wrong with it)."""
    from nimbus.rollout.policy import parse_strategy

    return [float(step.wait_s) for step in parse_strategy(strategy).steps]


def rollout_options(plan: DeployPlan, cluster: ClusterFile,
                    flags: RolloutFlags) -> RolloutOptions | None:
    """The rollout by waves the flags and the manifest's ``rollout:`` block
    ask for (flags win), or None for a deploy to every region at once (no
    strategy, or one with no step before 100%)."""
    block = plan.rollout or {}
    where = f"{plan.manifest}: rollout" if plan.manifest else "rollout"
    strategy = flags.strategy if flags.strategy is not None else block.get("strategy")
    if strategy is None:
        if flags.waves is not None or flags.bake is not None:
            raise UserInputError("--waves and --bake need a rollout strategy (--strategy, "
                                 "or strategy: in the manifest's rollout: block)")
        return None
    waits = _step_waits(str(strategy))
    if len(waits) <= 1:
        return None
    if flags.rollback_on is not None:
        from nimbus.rollout.policy import parse_rule

        parse_rule(flags.rollback_on)
    if flags.waves is not None:
        waves = parse_waves(flags.waves, plan.regions, cluster.names)
    elif block.get("waves") is not None:
        waves = parse_waves(block["waves"], plan.regions, cluster.names,
                            where=f"{where}.waves")
    else:
        waves = default_waves(plan.regions, cluster.names)
    if flags.bake is not None:
        bake_s = parse_bake(flags.bake)
    elif block.get("bake") is not None:
        bake_s = parse_bake(block["bake"], where=f"{where}.bake")
    else:
        bake_s = DEFAULT_BAKE_S
    if flags.on_region_failure is not None:
        policy = check_on_region_failure(flags.on_region_failure,
                                         where="--on-region-failure")
    else:
        policy = check_on_region_failure(block.get("on_region_failure", ROLLBACK_ALL),
                                         where=f"{where}.on_region_failure")
    rollback_on = flags.rollback_on if flags.rollback_on is not None \
        else block.get("rollback_on")
    min_requests = flags.min_requests if flags.min_requests is not None \
        else block.get("min_requests")
    return RolloutOptions(strategy=str(strategy),
                          rollback_on=None if rollback_on is None else str(rollback_on),
                          min_requests=None if min_requests is None else int(min_requests),
                          waves=waves, bake_s=bake_s, on_region_failure=policy,
                          wait_s=wait_deadline_s(waits))


def _direct_params(flags: RolloutFlags) -> dict[str, str] | None:
    """Rollout parameters of a deploy to every region at once."""
    out = {}
    if flags.strategy is not None:
        out["strategy"] = flags.strategy
    if flags.rollback_on is not None:
        out["rollback_on"] = flags.rollback_on
    if flags.min_requests is not None:
        out["min_requests"] = str(flags.min_requests)
    return out or None


def open_cluster(path: Path) -> ClusterFile:
    if not path.exists():
        raise ManifestError("no such cluster file; write one (see `nimbus deploy --guided`)",
                            file=path)
    return load_cluster(path)


def make_plan(app_dir: Path, cluster: ClusterFile,
              settings: DeploySettings | None,
              parameters: dict[str, str] | None = None) -> DeployPlan:
    if settings is None:
        return plan_deploy(app_dir, cluster, parameters=parameters)
    try:
        override = RegionsSpec.from_dict(settings.routing())
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"these regions and policy are not valid routing: {exc}",
                            file=app_dir / "nimbus.toml", field="deploy") from None
    return plan_deploy(app_dir, cluster, name=settings.name, override=override,
                       parameters=parameters)


def cluster_deploy(app_dir: Path, cluster_path: Path, *, wait_all: bool, timeout_s: float,
                   settings: DeploySettings | None = None,
                   plan: DeployPlan | None = None,
                   flags: RolloutFlags | None = None,
                   parameters: dict[str, str] | None = None) -> int:
    """Deploy to every region of the app; returns the exit status."""
    cluster = open_cluster(cluster_path)
    flags = flags or RolloutFlags()
    if plan is None:
        plan = make_plan(app_dir, cluster, settings, parameters)
        for line in plan.describe():
            click.echo(line)
    try:
        opts = rollout_options(plan, cluster, flags)
    except UserInputError as exc:  # a usage or manifest mistake: exit 2
        raise click.UsageError(str(exc)) from None
    if opts is not None:
        if wait_all:
            raise click.UsageError("--wait-all does not go with a rollout by waves: the "
                                   "deploy itself waits for every region")
        return asyncio.run(roll_out(
            plan, cluster, opts, push_timeout_s=timeout_s, echo=click.echo,
            error=lambda text: click.echo(f"nimbus: error: {text}", err=True)))
    reports = asyncio.run(deploy_plan(plan, cluster, timeout_s=timeout_s,
                                      on_report=lambda r: click.echo(r.line()),
                                      extra=_direct_params(flags)))
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


def cluster_rollout_status(cluster_path: Path, fn: str, *, as_json: bool,
                           watch: bool) -> None:
    import time

    from nimbus.multiregion.rollstatus import cluster_rollout
    from nimbus.multiregion.rollstatus import render as render_rollout

    cluster = open_cluster(cluster_path)
    while True:
        doc = asyncio.run(cluster_rollout(cluster, fn))
        if as_json:
            print_json(doc)
        else:
            for line in render_rollout(doc, time.time()):
                click.echo(line)
        running = (doc["cluster"] or {}).get("state") in ("running", "baking") or any(
            (r["rollout"] or {}).get("state") == "running" for r in doc["regions"].values())
        if not watch or not running:
            return
        time.sleep(1.0)
        click.echo()


def cluster_rollback_cmd(cluster_path: Path, fn: str, to: int | None) -> int:
    from nimbus.multiregion.rollstatus import cluster_rollback

    cluster = open_cluster(cluster_path)
    lines, ok = asyncio.run(cluster_rollback(cluster, fn, to))
    for line in lines:
        click.echo(line)
    if not ok:
        click.echo(f"nimbus: error: {fn} was not rolled back in every region", err=True)
    return 0 if ok else 1
