"""``nimbus alias set|ls|rm`` and ``nimbus versions``: a function's
versions and the aliases that split traffic between them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from nimbus.cli.main import _client, cli, connection_options, fail
from nimbus.errors import UserInputError
from nimbus.rollout import traffic


def _weights_text(weights: dict[str, int]) -> str:
    return ", ".join(f"{v} ({w}%)" for v, w in sorted(weights.items(), key=lambda kv: -int(kv[0])))


def print_aliases(view: dict[str, Any]) -> None:
    from nimbus.cli.output import console

    table = Table("ALIAS", "VERSIONS", "ROUTES", box=None)
    for alias, weights in view["aliases"].items():
        routes = [f"{r['method']} {r['path']}" for r in view.get("routes", ())
                  if r["alias"] == alias]
        table.add_row(alias, _weights_text(weights), ", ".join(routes) or "-")
    console.print(table)


@cli.group()
def alias() -> None:
    """A function's aliases: names (like live, the one routes use) for a
    version, or for several versions with weights."""


@alias.command("set")
@click.argument("function")
@click.argument("name")
@click.argument("weights", metavar="VERSION|V=W,V=W")
@click.option("--json", "as_json", is_flag=True, help="Print the aliases as JSON.")
@connection_options
def alias_set(function: str, name: str, weights: str, as_json: bool, state_dir: Path | None,
              url: str | None, token: str | None) -> None:
    """Point FUNCTION's alias NAME at a version (8), or split it by weight
    (7=90,8=10: whole percents summing to 100). Setting live to one version
    moves all traffic to it at once."""
    try:
        traffic.check_alias_name(name)
        parsed = traffic.parse_weights(weights)
    except UserInputError as exc:
        fail(str(exc), 2)
    view = _client(state_dir, url, token).request(
        "PUT", f"/v1/functions/{function}/aliases/{name}",
        json={"weights": {str(v): w for v, w in parsed.items()}})
    _show(view, as_json)


@alias.command("ls")
@click.argument("function")
@click.option("--json", "as_json", is_flag=True, help="Print the aliases as JSON.")
@connection_options
def alias_ls(function: str, as_json: bool, state_dir: Path | None, url: str | None,
             token: str | None) -> None:
    """List FUNCTION's aliases, their versions and weights, and the routes on each."""
    _show(_client(state_dir, url, token).request("GET", f"/v1/functions/{function}/aliases"),
          as_json)


@alias.command("rm")
@click.argument("function")
@click.argument("name")
@connection_options
def alias_rm(function: str, name: str, state_dir: Path | None, url: str | None,
             token: str | None) -> None:
    """Remove FUNCTION's alias NAME (not live, nor an alias a route serves)."""
    try:
        traffic.check_alias_name(name)
    except UserInputError as exc:
        fail(str(exc), 2)
    if name == traffic.DEFAULT_ALIAS:
        fail(f"alias {traffic.DEFAULT_ALIAS!r} cannot be removed: every function has it "
             f"(nimbus alias set {function} live VERSION)", 2)
    view = _client(state_dir, url, token).request(
        "DELETE", f"/v1/functions/{function}/aliases/{name}")
    click.echo(f"removed alias {name} of {function}")
    print_aliases(view)


def _show(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        from nimbus.cli.output import print_json

        print_json(view)
    else:
        print_aliases(view)


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@cli.command()
@click.argument("function")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@connection_options
def versions(function: str, as_json: bool, state_dir: Path | None, url: str | None,
             token: str | None) -> None:
    """List FUNCTION's versions, newest first: code hash, when deployed,
    memory and timeout, and the share of traffic each alias sends it."""
    from nimbus.cli.output import console, print_json

    data = _client(state_dir, url, token).request("GET", f"/v1/functions/{function}/versions")
    if as_json:
        print_json(data)
        return
    table = Table("VERSION", "CODE", "CREATED (UTC)", "CONFIG", "TRAFFIC", box=None)
    for row in data["versions"]:
        shares = ", ".join(f"{a} {w}%" for a, w in row["shares"].items()) or "-"
        config = f"{row.get('memory_mb', '?')} MB, {row.get('timeout_s', '?'):g} s" \
            if isinstance(row.get("timeout_s"), (int, float)) else "-"
        table.add_row(str(row["version"]) + (" (stable)" if row["stable"] else ""),
                      row["digest"] or "-", _when(row.get("created")), config, shares)
    console.print(table)
