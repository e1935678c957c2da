"""How the CLI prints things: deploy progress, tables, log lines."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable
from typing import Any

import click
import orjson
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
                # one line each, however long (a notice ends with its file:line)
                err_console.print(msg["progress"], style="dim", markup=False, soft_wrap=True)
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
        ro = fn.get("rollout")
        if ro is not None:
            why = (f" (the default: version {ro['from']} takes real traffic; --strategy "
                   "all-at-once to skip)" if ro.get("defaulted") else "")
            state += (f": rolling out over version {ro['from']} with {ro['strategy']}{why}; "
                      f"nimbus rollout status {fn['name']}")
        elif fn.get("serving", fn["version"]) != fn["version"]:
            state += f" (rolling out; version {fn['serving']} is stable)"
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


def print_region_status(s: dict[str, Any]) -> None:
    leader = s.get("leader") or "none"
    console.print(f"region {s['region']}: leader {leader}; answered by controller "
                  f"{s['node']} (pid {s['pid']}) at {s['control_url']}")
    nodes = Table("ROLE", "ID", "PID", "URL", "LEASE", "UP", "INSTANCES", box=None)
    for n in sorted(s["nodes"], key=lambda n: (n["role"], n["id"])):
        role = n["role"] + (" (leader)" if n["id"] == s.get("leader") else "")
        ready = sum(n.get("ready", {}).values()) if n["role"] == "worker" else None
        nodes.add_row(role, n["id"], str(n["pid"]), n.get("url") or "-", n["lease"],
                      f"{n['uptime_s']} s", "-" if ready is None else str(ready))
    console.print(nodes)
    servers = Table("NATS SERVER", "URL", "HEALTH", box=None)
    for srv in s.get("nats", []):
        servers.add_row(srv.get("name", "-"), srv.get("url", "-"), srv.get("health", "-"))
    console.print(servers)
    if s.get("nats_urls"):
        console.print("NATS URLs: " + ", ".join(s["nats_urls"]))
    fns = Table("FUNCTION", "VERSION", "DESIRED", "READY", "PER WORKER", "QUEUED", "DEAD",
                box=None)
    for f in s["functions"]:
        per = ", ".join(f"{w}: {n}" for w, n in sorted(f["instances_per_worker"].items()))
        a = f.get("async") or {}
        fns.add_row(f["name"], str(f["version"]),
                    "-" if f["desired"] is None else str(f["desired"]), str(f["ready"]),
                    per or "-", str(a.get("ready", 0) + a.get("delayed", 0)),
                    str(a.get("dead", 0)))
    console.print(fns)


def print_status(s: dict[str, Any]) -> None:
    if s.get("mode") == "region":
        print_region_status(s)
        return
    console.print(f"nimbus pid {s['pid']}, up {s['uptime_s']} s, {s['requests']} requests")
    console.print(f"gateway {s['gateway_url']}   control {s['control_url']}")
    console.print(f"state   {s['state_dir']}")
    console.print(f"memory  platform {_mb(s['memory']['platform'], 'pss_kb')} PSS")
    c = s.get("containment") or {}
    if c.get("mode") == "full":
        console.print(f"contain full: uid per function ({c['uid_range']}), "
                      f"{c['cgroups'] or 'no cgroups'}; limits: {c['limits']}")
    elif c:
        console.print(f"contain rlimits only ({c['reason']}); limits: {c['limits']}")
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
    ts = dt.datetime.fromtimestamp(rec["ts"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rid = rec.get("rid") or "-"
    level = rec.get("level")
    # a logger's stdout line shows its level in its text already
    stream = rec["stream"] if level is None or rec["stream"] == "stdout" else \
        f"{rec['stream']}:{level}"
    return f"{ts[:-4]}Z {rid} {stream:8} {rec['text']}"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def print_records(recs: list[dict[str, Any]]) -> None:
    if not recs:
        console.print("no invocations")
        return
    table = Table("ID", "STATUS", "TRIES", "TRIGGER", "ENQUEUED (UTC)", "UPDATED", "ERROR",
                  box=None)
    for r in recs:
        err = r.get("error") or {}
        table.add_row(r["id"], r["status"], str(r["attempts"]), r["source"],
                      _when(r["enqueued_at"]), _when(r["updated_at"]),
                      f"{err.get('errorType', '')}: {err.get('errorMessage', '')}"[:60]
                      if err else "-")
    console.print(table)


def print_record(r: dict[str, Any]) -> None:
    click.echo(f"invocation  {r['id']}")
    click.echo(f"function    {r['function'] or '-'} ({r['source']}, queue {r['queue']})")
    click.echo(f"status      {r['status']} after {r['attempts']} "
               f"{'try' if r['attempts'] == 1 else 'tries'}")
    click.echo(f"enqueued    {_when(r['enqueued_at'])} UTC")
    click.echo(f"updated     {_when(r['updated_at'])} UTC")
    if r.get("next_attempt_at"):
        click.echo(f"next try    {_when(r['next_attempt_at'])} UTC")
    if r.get("error"):
        click.echo(f"error       {r['error'].get('errorType')}: {r['error'].get('errorMessage')}")
        if r["error"].get("nimbusReason"):
            click.echo(f"gave up     {r['error']['nimbusReason']}")
    if r["status"] == "succeeded":
        click.echo(f"result      {orjson.dumps(r['result']).decode()}")
    if r.get("request_id") and r.get("function"):
        click.echo(f"logs        nimbus logs {r['function']} --request-id {r['request_id']}")
