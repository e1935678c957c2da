"""How the CLI prints things: deploy progress, tables, log lines."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from nimbus.errors import DeployError, ManifestError

# Piped output (scripts, tests) is not wrapped at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
err_console = Console(stderr=True, highlight=False)


def print_deploy_stream(lines: Iterable[dict[str, Any]], gateway_url: str | None) -> dict[str, Any]:
    """Show progress lines as they arrive; returns the result or raises the error."""
    result: dict[str, Any] | None = None
    with err_console.status("deploying…", spinner="dots") as spinner:
        for msg in lines:
            if "progress" in msg:
                err_console.print(f"[dim]{msg['progress']}[/dim]", markup=True)
                spinner.update(msg["progress"][:70])
            elif "error" in msg:
                err = msg["error"]
                if err.get("errorType") == "ManifestError":
                    raise _ManifestFailure(err["errorMessage"])
                raise DeployError(err["errorMessage"])
            elif "result" in msg:
                result = msg["result"]
    if result is None:
        raise DeployError("the control API closed the deploy stream without a result")
    print_deployed(result, gateway_url)
    return result


class _ManifestFailure(ManifestError):
    """A manifest error reported by the server: its message is already rendered."""

    def __init__(self, rendered: str) -> None:
        Exception.__init__(self, rendered)

    def __str__(self) -> str:
        return str(self.args[0])


def print_deployed(result: dict[str, Any], gateway_url: str | None) -> None:
    for fn in result["functions"]:
        state = f"version {fn['version']}" + ("" if fn["changed"] else " (unchanged)")
        click.echo(f"deployed {result['app']}/{fn['name']}: {state}")
        for route in fn["routes"]:
            method, path = route.split(" ", 1)
            where = f"{gateway_url}{path}" if gateway_url else path
            click.echo(f"  {method:6} {where}")


def print_functions(fns: list[dict[str, Any]]) -> None:
    table = Table("FUNCTION", "APP", "VERSION", "HANDLER", "ROUTES", "INSTANCES", box=None)
    for f in fns:
        table.add_row(f["name"], f["app"], str(f["version"]), f["handler"],
                      ", ".join(f["routes"]) or "-", str(f["instances"]))
    console.print(table)


def _mb(mem: dict[str, int] | None, key: str) -> str:
    return f"{mem[key] / 1024:.1f} MB" if mem else "-"


def print_status(s: dict[str, Any]) -> None:
    console.print(f"nimbus pid {s['pid']}, up {s['uptime_s']} s, {s['requests']} requests")
    console.print(f"gateway {s['gateway_url']}   control {s['control_url']}")
    console.print(f"state   {s['state_dir']}")
    console.print(f"memory  platform {_mb(s['memory']['platform'], 'pss_kb')} PSS")
    for z in s["zygotes"]:
        what = ", ".join(z["preload"]) or "base runtime"
        console.print(f"zygote  pid {z['pid'] or '-'}: {what}, {_mb(z['memory'], 'pss_kb')} PSS")
    scaling = Table("FUNCTION", "VERSION", "CONCURRENCY", "HELD", "READY", "STARTING",
                    "DESIRED", "PANIC", "COLD STARTS", "THROTTLES", box=None)
    for f in s["functions"]:
        scaling.add_row(f["name"], str(f["version"]), str(f["concurrency"]), str(f["held"]),
                        str(f["ready"]), str(f["starting"]), str(f["desired"] if f["desired"]
                                                                  is not None else "-"),
                        "yes" if f["panic"] else "no", str(f["cold_starts"]),
                        str(f["throttles"]))
    console.print(scaling)
    table = Table("FUNCTION", "INSTANCE", "PID", "BUSY", "PSS", "PRIVATE", box=None)
    for f in s["functions"]:
        for i in f["instances"]:
            table.add_row(f["name"], i["id"], str(i["pid"]), str(i["outstanding"]),
                          _mb(i["memory"], "pss_kb"), _mb(i["memory"], "private_kb"))
    console.print(table)


def format_log(rec: dict[str, Any]) -> str:
    ts = dt.datetime.fromtimestamp(rec["ts"], dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rid = rec.get("rid") or "-"
    return f"{ts[:-4]}Z {rid} {rec['stream']:8} {rec['text']}"
