"""``nimbus chaos``: the command line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import orjson

from nimbus.chaos import plan
from nimbus.cli.main import cli, fail
from nimbus.errors import UserInputError


@cli.command()
@click.option("--cluster", "cluster_file", required=True,
              type=click.Path(path_type=Path, dir_okay=False),
              help="The cluster file naming the regions (nimbus.cluster.yaml).")
@click.option("--app", required=True, help="The app to load (deployed in the regions).")
@click.option("--edge", required=True, help="The edge's URL (loopback only), e.g. "
              "http://127.0.0.1:8000.")
@click.option("--duration", default="120s", show_default=True,
              help="How long the load runs (120s, 2m, 500ms).")
@click.option("--rate", default=200.0, show_default=True, type=click.FloatRange(0.1, 20_000),
              help="Requests per second, sent on schedule whatever the answers take.")
@click.option("--path", default=None,
              help="The route to GET [the app's first GET route without parameters].")
@click.option("--min-success", default=0.9999, show_default=True,
              type=click.FloatRange(0, 1), help="Exit 1 when fewer requests succeed.")
@click.option("--events", default=",".join(plan.EVENT_KINDS), show_default=True,
              help="What to kill, in this order, spaced over the run.")
@click.option("--concurrency", default=None, type=click.IntRange(1, 4096),
              help="Requests in flight at most; past it a request is counted as not sent "
                   "[rate x timeout, 16 to 1000].")
@click.option("--timeout", "timeout", default="5s", show_default=True,
              help="Deadline of every request.")
@click.option("--async-rate", default=2.0, show_default=True, type=click.FloatRange(0, 1000),
              help="Async (Event) invocations per second, each with an Idempotency-Key, "
                   "checked at the end in the region that accepted it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def chaos(cluster_file: Path, app: str, edge: str, duration: str, rate: float,
          path: str | None, min_success: float, events: str, concurrency: int | None,
          timeout: str, async_rate: float, as_json: bool) -> None:
    """Kill an instance, a worker, a gateway, the controller leader and a whole
    region in turn under steady load through the edge, bring each back, and
    report availability. Loopback only. Exit 1 when a goal is missed."""
    from nimbus.chaos.runner import ChaosOptions, run

    try:
        opts = ChaosOptions(
            cluster=cluster_file, app=app,
            edge=plan.require_loopback(edge, "--edge"),
            duration_s=plan.parse_duration(duration), rate=rate, path=path,
            min_success=min_success, events=plan.parse_events(events),
            concurrency=concurrency, timeout_s=plan.parse_duration(timeout, "--timeout"),
            async_rate=async_rate)
        if not cluster_file.is_file():
            raise UserInputError(f"--cluster: {cluster_file} does not exist")

        def say(msg: str) -> None:
            click.echo(f"nimbus chaos: {msg}", err=True)

        report = asyncio.run(run(opts, say))
    except UserInputError as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        # what was killed has been started again on the way out
        click.echo("nimbus chaos: interrupted; no report", err=True)
        sys.exit(130)
    if as_json:
        click.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(report.render())
    sys.exit(report.exit_code)
