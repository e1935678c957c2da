"""``nimbus rollout status FN`` and ``nimbus rollback FN``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from nimbus.cli.main import _client, cli, connection_options
from nimbus.cli.output import console, print_json

WATCH_EVERY_S = 1.0


@cli.group()
def rollout() -> None:
    """Rollouts: a new version's traffic shifted in steps, rolled back on bad health."""


@rollout.command(name="status")
@click.argument("function")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
@click.option("--watch", is_flag=True,
              help="Print it again every second until the rollout ends.")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path),
              help="A cluster file: every region's rollout, and the waves' progress.")
@connection_options
def rollout_status(function: str, as_json: bool, watch: bool, cluster_path: Path | None,
                   state_dir: Path | None, url: str | None, token: str | None) -> None:
    """Show FUNCTION's latest rollout: the steps and shares, the current step and
    the time left in it, the health figures of each decision, and why it rolled
    back if it did."""
    if cluster_path is not None:
        from nimbus.cli.regions import cluster_rollout_status

        cluster_rollout_status(cluster_path, function, as_json=as_json, watch=watch)
        return
    client = _client(state_dir, url, token)
    while True:
        data = client.request("GET", f"/v1/functions/{function}/rollout")
        if as_json:
            print_json(data)
        else:
            print_rollout(data)
        if not watch or data["state"] != "running":
            return
        time.sleep(WATCH_EVERY_S)
        if not as_json:
            console.print()


@cli.command()
@click.argument("function")
@click.option("--to", "to", type=click.IntRange(1), default=None,
              help="Without a running rollout: the version live moves to (default: the one "
                   "before the stable version).")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path),
              help="A cluster file: roll back in every region (and stop the waves).")
@connection_options
def rollback(function: str, to: int | None, cluster_path: Path | None,
             state_dir: Path | None, url: str | None, token: str | None) -> None:
    """Move FUNCTION's live traffic back at once: a running rollout ends on the
    old version (its instances are warm); without one, live moves to --to or
    the previous version (which may have to cold-start)."""
    if cluster_path is not None:
        from nimbus.cli.regions import cluster_rollback_cmd

        raise SystemExit(cluster_rollback_cmd(cluster_path, function, to))
    body: dict[str, Any] = {} if to is None else {"to": to}
    data = _client(state_dir, url, token).request(
        "POST", f"/v1/functions/{function}/rollback", json=body)
    click.echo(data["message"])


def _pct(rate: Any) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def _health(fig: dict[str, Any] | None) -> str:
    if not fig:
        return "-"
    return (f"{fig.get('requests', 0)} req, {_pct(fig.get('error_rate'))} errors, "
            f"p99 {_ms(fig.get('p99'))}, {_pct(fig.get('throttle_rate'))} throttled")


def print_rollout(r: dict[str, Any]) -> None:
    state = r["state"].replace("_", " ")
    console.print(f"rollout of {r['function']} ({r['app']}): version {r['from']} -> {r['to']} "
                  f"with {r['strategy']}: {state}", markup=False)
    console.print(f"  rule: {r['rollback_on']}; at least {r['min_requests']} requests a step",
                  markup=False)
    steps = []
    for s in r["steps"]:
        mark = ""
        if r["state"] == "running" and s["index"] == r["step"]:
            mark = "*"
        wait = f"/{s['wait_s']:g}s" if s["wait_s"] else ""
        steps.append(f"{mark}{s['share']}%{wait}")
    console.print(f"  steps: {'  '.join(steps)}", markup=False)
    if r["state"] == "running":
        console.print(f"  now: step {r['step'] + 1} of {len(r['steps'])}, version {r['to']} "
                      f"takes {r['share']}%, {r.get('time_left_s', 0):g}s left in the step"
                      + (f"; waiting: {r['waiting']}" if r.get("waiting") else ""),
                      markup=False)
        cur = r.get("current")
        if cur:
            console.print(f"      canary   {_health(cur.get('canary'))}", markup=False)
            console.print(f"      baseline {_health(cur.get('baseline'))}", markup=False)
    elif r["state"] == "rolled_back":
        console.print(f"  rolled back: {r.get('reason')}", markup=False)
    else:
        console.print(f"  promoted: version {r['to']} serves 100%", markup=False)
    for h in r.get("history", []):
        at = time.strftime("%H:%M:%S", time.localtime(h["at"]))
        line = f"  {at} step {h['step'] + 1} ({h['share']}%): {h['action']}"
        if h.get("reason"):
            line += f": {h['reason']}"
        console.print(line, markup=False)
        if "canary" in h:
            console.print(f"      canary   {_health(h.get('canary'))}", markup=False)
            console.print(f"      baseline {_health(h.get('baseline'))}", markup=False)
