"""The ``nimbus`` command. Errors print as one line: exit 2 for usage and
manifest errors, 1 for failures; never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from nimbus.cli.params import parameter_overrides_option, parse_overrides
from nimbus.errors import ManifestError, NimbusError, UserInputError


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"nimbus: error: {message}", err=True)
    sys.exit(code)


def _client(state_dir: Path | None, url: str | None, token: str | None,
            app_dir: Path | None = None, timeout_s: float = 60.0) -> Any:
    from nimbus.cli.client import Client, find_connection

    dirs = [d for d in (state_dir, app_dir and app_dir / ".nimbus") if d]
    return Client(find_connection(url, token, dirs), timeout_s)


def connection_options(f: Any) -> Any:
    f = click.option("--token", help="Control API bearer token (or $NIMBUS_TOKEN).")(f)
    f = click.option("--url", help="Control API URL (or $NIMBUS_URL).")(f)
    f = click.option("--state-dir", type=click.Path(path_type=Path),
                     help="State folder of the nimbus to talk to (holds control.json, token).")(f)
    return f


def _region_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from nimbus.region import check_region_name

    try:
        return check_region_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def region_option(f: Any) -> Any:
    return click.option("--region", default="local", show_default=True,
                        callback=_region_name,
                        help="The region's name (in ARNs, AWS_REGION, events and records).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nimbus")
def cli() -> None:
    """nimbus: serve Python functions (Lambda-style handlers) over HTTP."""


@cli.command()
@click.argument("app_dir", default=".", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Gateway address.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Gateway port (0 picks a free one).")
@click.option("--control-host", default="127.0.0.1", show_default=True)
@click.option("--control-port", default=8081, show_default=True, type=click.IntRange(0, 65535),
              help="Control API port (0 picks a free one).")
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="Where nimbus keeps its store, bundles, venvs and logs [APP_DIR/.nimbus].")
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Seconds in-flight requests get to finish on shutdown.")
@click.option("--max-instances", "node_instances", default=256, show_default=True,
              type=click.IntRange(1), help="Instances this node may run, all functions together.")
@click.option("--memory-budget-mb", "node_memory_mb", default=0, type=click.IntRange(0),
              help="Memory (sum of memory_mb) this node's instances may hold "
                   "[default: three quarters of the machine].")
@click.option("--async-max-bytes", default=256 * 1024, show_default=True,
              type=click.IntRange(1), help="Largest async invocation or queue message.")
@click.option("--containment", default="auto", show_default=True,
              type=click.Choice(["auto", "full", "rlimits"]),
              help="full: a uid, cgroup, /tmp and filesystem view per function (needs root); "
                   "rlimits: resource limits only; auto: full when possible.")
@click.option("--uid-range", default="200000-265535", show_default=True,
              help="FIRST-LAST: the uids (and gids) functions run as under full containment.")
@click.option("--max-connections", default=10_000, show_default=True, type=click.IntRange(1),
              help="Connections the gateway holds at once; past it the longest-idle one "
                   "makes room, or 503 when all are busy.")
@click.option("--control-max-connections", default=256, show_default=True,
              type=click.IntRange(1),
              help="Connections the control API holds at once (its own budget).")
@click.option("--header-timeout", "header_timeout_s", default=10.0, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds a connection gets to send a complete request head.")
@click.option("--keep-alive", "keep_alive_s", default=5.0, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds an idle keep-alive connection is kept open.")
@click.option("--max-header-bytes", default=64 * 1024, show_default=True,
              type=click.IntRange(1024),
              help="Largest request line + headers; past it: 431.")
@click.option("--max-bundle-bytes", default=250 * 1024 * 1024, show_default=True,
              type=click.IntRange(1), help="Largest app bundle the control API accepts.")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path),
              help="A cluster file: the dashboard (/ui) shows the edge's view of its "
                   "regions, probing their gateways.")
@click.option("--trace", "trace_mode", type=click.Choice(["off", "file", "otlp"]),
              default=None, help="Traces: off (the default), JSON lines under STATE/traces/ "
              "(what `nimbus trace` reads), or OTLP/HTTP to --otlp-endpoint.")
@click.option("--otlp-endpoint", default=None, metavar="URL",
              help="Send traces over OTLP/HTTP to URL (e.g. http://127.0.0.1:4318); "
              "implies --trace otlp.")
@click.option("--metrics-auth", default="token", show_default=True,
              type=click.Choice(["token", "open"]),
              help="GET /metrics on the control port: the control token as Bearer, or open "
                   "(no token; only with a loopback --control-host).")
@parameter_overrides_option
@region_option
def up(app_dir: Path, host: str, port: int, control_host: str, control_port: int,
       state_dir: Path | None, grace_s: float, node_instances: int, node_memory_mb: int,
       async_max_bytes: int, containment: str, uid_range: str, region: str,
       cluster_path: Path | None, trace_mode: str | None, otlp_endpoint: str | None,
       parameter_overrides: tuple[str, ...], **http_limits: Any) -> None:
    """Start nimbus in the foreground and deploy APP_DIR (if it has an app.yaml or a SAM
    template.yaml)."""
    from nimbus.cli.up import run_up
    from nimbus.observe.tracing import trace_config
    from nimbus.region import set_region
    from nimbus.worker.budget import NodeBudget

    if http_limits.get("metrics_auth") == "open":
        from nimbus.observe.metrics import check_metrics_auth

        try:
            check_metrics_auth("open", control_host, "--control-host")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-auth") from None
    set_region(region)
    try:
        trace = trace_config(trace_mode, otlp_endpoint)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trace/--otlp-endpoint") from None
    run_up(app_dir, host=host, port=port, control_host=control_host,
           control_port=control_port, state_dir=state_dir, grace_s=grace_s,
           budget=NodeBudget(node_instances, node_memory_mb), async_max_bytes=async_max_bytes,
           containment=containment, uid_range=_uid_range(uid_range), http_limits=http_limits,
           cluster_path=cluster_path, trace=trace,
           parameters=parse_overrides(parameter_overrides))


def _uid_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        lo, hi = int(first), int(last)
    except ValueError:
        lo = hi = -1
    if not sep or not 1000 <= lo < hi <= 2**31 - 2:
        raise click.BadParameter(f"expected FIRST-LAST with 1000 <= FIRST < LAST, got {text!r}",
                                 param_hint="--uid-range")
    return lo, hi


def _cluster_options(f: Any) -> Any:
    f = click.option("--timeout", "timeout_s", default=120.0, show_default=True,
                     type=click.FloatRange(0, min_open=True),
                     help="With --cluster: seconds each region gets (and --wait-all waits).")(f)
    f = click.option("--wait-all", is_flag=True,
                     help="With --cluster: wait until every region runs what was deployed; "
                          "exit 1 if one does not within --timeout.")(f)
    f = click.option("--cluster", "cluster_path", type=click.Path(path_type=Path),
                     help="A cluster file (nimbus.cluster.yaml): work on every region in it.")(f)
    return f


@cli.command()
@click.argument("app_dir", default=".", type=click.Path(path_type=Path))
@_cluster_options
@click.option("--guided", is_flag=True,
              help="Ask for the app name, regions, policy and weights, deploy, and save the "
                   "answers to APP_DIR/nimbus.toml for the next plain deploy.")
@click.option("--strategy", default=None,
              help="How changed functions reach traffic: canary:10%:5m, linear:20%:1m or "
                   "all-at-once (default: the manifest's rollout: block; else a canary for a "
                   "function that takes real traffic).")
@click.option("--rollback-on", "rollback_on", default=None, metavar="EXPR",
              help="Roll back when this holds for the new version, e.g. "
                   "\"error_rate > 2% or p99 > 2x baseline\".")
@click.option("--min-requests", "min_requests", default=None, type=click.IntRange(1, 1_000_000),
              help="Requests the new version must answer before a step passes.")
@click.option("--waves", help="With --cluster: regions rolled out together, waves "
              "separated by ';' (eu;us,ap). Default: one region at a time, in the cluster "
              "file's order.")
@click.option("--bake", help="With --cluster: time to watch a wave's regions before the "
              "next wave (default 1m).")
@click.option("--on-region-failure", type=click.Choice(["rollback-all", "stop"]),
              help="With --cluster: when a region rolls back, roll back every region "
                   "already on the new version (rollback-all, the default) or leave them.")
@parameter_overrides_option
@connection_options
def deploy(app_dir: Path, cluster_path: Path | None, wait_all: bool, timeout_s: float,
           guided: bool, strategy: str | None, rollback_on: str | None,
           min_requests: int | None, waves: str | None, bake: str | None,
           on_region_failure: str | None, parameter_overrides: tuple[str, ...],
           state_dir: Path | None, url: str | None, token: str | None) -> None:
    """Deploy APP_DIR to a running nimbus, or with --cluster to every region of
    the app (regions that cannot be reached converge when they return).
    With no --cluster, --url or --state-dir, APP_DIR/nimbus.toml (written by
    --guided) is repeated when there is one."""
    from nimbus.cli.output import print_deploy_stream
    from nimbus.control.bundle import make_bundle
    from nimbus.manifest.loader import load_app

    parameters = parse_overrides(parameter_overrides)
    if guided:
        if cluster_path or url or state_dir:
            fail("--guided asks for the regions itself; leave out --cluster, --url and "
                 "--state-dir", 2)
        from nimbus.cli.guided import run_guided

        sys.exit(run_guided(app_dir, timeout_s, parameters=parameters))
    from nimbus.cli.regions import RolloutFlags, cluster_deploy, plain_deploy_settings

    flags = RolloutFlags(strategy=strategy, rollback_on=rollback_on,
                         min_requests=min_requests, waves=waves, bake=bake,
                         on_region_failure=on_region_failure)
    direct = url or state_dir or os.environ.get("NIMBUS_URL")
    settings = None if (cluster_path or direct) else plain_deploy_settings(app_dir)
    if cluster_path or settings:
        if settings:
            click.echo(f"repeating {app_dir / 'nimbus.toml'}")
        sys.exit(cluster_deploy(app_dir, cluster_path or settings.cluster,  # type: ignore[union-attr]
                                wait_all=wait_all, timeout_s=timeout_s, settings=settings,
                                flags=flags, parameters=parameters))
    if wait_all:
        fail("--wait-all needs --cluster", 2)
    for given, flag in ((waves, "--waves"), (bake, "--bake"),
                        (on_region_failure, "--on-region-failure")):
        if given is not None:
            fail(f"{flag} needs --cluster (it orders regions)", 2)
    params = {"name": app_dir.resolve().name, **_rollout_params(strategy, rollback_on,
                                                                 min_requests)}
    load_app(app_dir, parameters=parameters or None)  # fail fast, locally, with file and line
    if parameters:
        params["parameters"] = orjson.dumps(parameters).decode()
    bundle = make_bundle(app_dir)
    client = _client(state_dir, url, token, app_dir, timeout_s=900.0)
    lines = client.stream_lines("POST", "/v1/deploy", content=bundle, params=params,
                                headers={"content-type": "application/zip"})
    print_deploy_stream(lines, gateway_url=None)


def _rollout_params(strategy: str | None, rollback_on: str | None,
                    min_requests: int | None) -> dict[str, str]:
    """The deploy's rollout flags as query parameters, checked here first
    (exit 2 naming the flag)."""
    from nimbus.rollout.policy import parse_rule, parse_strategy

    try:
        if strategy is not None:
            parse_strategy(strategy)
        if rollback_on is not None:
            parse_rule(rollback_on)
    except UserInputError as exc:
        fail(str(exc), 2)
    out = {"strategy": strategy, "rollback_on": rollback_on,
           "min_requests": None if min_requests is None else str(min_requests)}
    return {k: v for k, v in out.items() if v is not None}


def _data(data: str | None, default: bytes) -> bytes:
    """``--data``: the text itself, or ``@FILE``."""
    if data is None:
        return default
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            fail(f"--data: cannot read {data[1:]}: {exc.strerror}", 2)
    return data.encode()


@cli.command()
@click.argument("function")
@click.option("--data", "-d", default=None,
              help="The event: JSON text, or @FILE to read it from a file.")
@click.option("--async", "is_async", is_flag=True,
              help="Queue the invocation and print its id instead of waiting for the result.")
@click.option("--idempotency-key", default=None,
              help="With --async: a repeat with the same key within 24 h returns the first "
                   "invocation's id and does not run again.")
@click.option("--qualifier", "-q", default=None, metavar="VERSION|ALIAS",
              help="Run this version (7) or alias (beta) instead of live.")
@connection_options
def invoke(function: str, data: str | None, is_async: bool, idempotency_key: str | None,
           qualifier: str | None, state_dir: Path | None, url: str | None,
           token: str | None) -> None:
    """Invoke FUNCTION once and print its result (or, with --async, its invocation id)."""
    raw = _data(data, b"{}")
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        fail(f"--data is not valid JSON: {exc}", 2)
    if idempotency_key is not None and not is_async:
        fail("--idempotency-key needs --async", 2)
    headers = {"x-nimbus-invocation-type": "Event"} if is_async else {}
    if idempotency_key:
        headers["idempotency-key"] = idempotency_key
    status, body = _client(state_dir, url, token).request(
        "POST", f"/v1/functions/{function}/invoke", content=raw, headers=headers,
        params={"qualifier": qualifier} if qualifier else None)
    if status == 202:
        dup = " (duplicate: already accepted with this idempotency key)" if body.get(
            "duplicate") else ""
        click.echo(f"{body['invocationId']}{dup}")
        return
    if "result" in body:
        click.echo(orjson.dumps(body["result"], option=orjson.OPT_INDENT_2).decode())
        return
    err = body.get("error") or body
    fail(f"{err.get('errorType', 'Error')}: {err.get('errorMessage', '')} "
         f"(request {body.get('requestId', '-')}, HTTP {status})")


@cli.command(name="ls")
@connection_options
def ls_(state_dir: Path | None, url: str | None, token: str | None) -> None:
    """List deployed functions."""
    from nimbus.cli.output import print_functions

    print_functions(_client(state_dir, url, token).request("GET", "/v1/functions"))


@cli.command()
@click.argument("function")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines as they come.")
@click.option("--request-id", help="Only this invocation's lines.")
@click.option("--tail", type=click.IntRange(1), help="Only the last N lines.")
@click.option("--since", help="Only lines since then: 90s, 10m, 2h, 1d, or an ISO time "
                              "(2026-12-01T23:00:00Z; UTC without an offset).")
@click.option("--level", help="Only lines of this level or above (DEBUG, INFO, WARNING, "
                              "ERROR, CRITICAL); print output without a level counts as INFO.")
@click.option("--json", "as_json", is_flag=True, help="Print each record as one JSON line.")
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path),
              help="A cluster file (nimbus.cluster.yaml): every region's lines, each "
                   "labelled with its region.")
@connection_options
def logs(function: str, follow: bool, request_id: str | None, tail: int | None,
         since: str | None, level: str | None, as_json: bool, cluster_path: Path | None,
         state_dir: Path | None, url: str | None, token: str | None) -> None:
    """Show FUNCTION's logs: its output and logger lines by request id, and
    the platform's lines about it (import errors, timeouts, throttles, ...)."""
    import time

    from nimbus.cli.logs import log_params, show, show_cluster

    params = log_params(follow=follow, request_id=request_id, tail=tail, since=since,
                        level=level, now=time.time())
    if cluster_path is not None:
        if url or state_dir:
            fail("--cluster reads every region of the file; leave out --url and --state-dir", 2)
        sys.exit(show_cluster(cluster_path, function, params, as_json))
    client = _client(state_dir, url, token, timeout_s=None if follow else 60.0)  # type: ignore[arg-type]
    try:
        show(client, function, params, as_json)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("function")
@click.option("--status", "status_", type=click.Choice(
    ["queued", "running", "retrying", "succeeded", "failed", "dead"]), help="Only these.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@connection_options
def invocations(function: str, status_: str | None, limit: int, as_json: bool,
                state_dir: Path | None, url: str | None, token: str | None) -> None:
    """List FUNCTION's async invocations, newest first."""
    from nimbus.cli.output import print_json, print_records

    params = {"limit": str(limit), **({"status": status_} if status_ else {})}
    recs = _client(state_dir, url, token).request(
        "GET", f"/v1/functions/{function}/invocations", params=params)
    print_json(recs) if as_json else print_records(recs)


@cli.command()
@click.argument("invocation_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@connection_options
def invocation(invocation_id: str, as_json: bool, state_dir: Path | None, url: str | None,
               token: str | None) -> None:
    """Show one async invocation: status, attempts, result or error."""
    from nimbus.cli.output import print_json, print_record

    rec = _client(state_dir, url, token).request("GET", f"/v1/invocations/{invocation_id}")
    print_json(rec) if as_json else print_record(rec)


@cli.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the spans as JSON.")
@connection_options
def trace(request_id: str, as_json: bool, state_dir: Path | None, url: str | None,
          token: str | None) -> None:
    """Show one request's spans as a tree with durations (REQUEST_ID: the
    x-nimbus-request-id of a response, or an async invocation id)."""
    from nimbus.cli.output import print_json
    from nimbus.observe.tracetree import format_tree

    body = _client(state_dir, url, token).request("GET", f"/v1/traces/{request_id}")
    if as_json:
        print_json(body)
    else:
        click.echo(format_tree(body["spans"]))


@cli.group()
def dlq() -> None:
    """Dead letters: async invocations that ran out of tries."""


@dlq.command(name="ls")
@click.argument("function")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@connection_options
def dlq_ls(function: str, limit: int, as_json: bool, state_dir: Path | None, url: str | None,
           token: str | None) -> None:
    """List FUNCTION's dead letters with their last error."""
    from nimbus.cli.output import print_json, print_records

    recs = _client(state_dir, url, token).request(
        "GET", f"/v1/functions/{function}/dlq", params={"limit": str(limit)})
    print_json(recs) if as_json else print_records(recs)


@dlq.command(name="redrive")
@click.argument("function")
@click.option("--id", "ids", multiple=True, help="Only this invocation (repeatable).")
@connection_options
def dlq_redrive(function: str, ids: tuple[str, ...], state_dir: Path | None, url: str | None,
                token: str | None) -> None:
    """Queue FUNCTION's dead letters (all, or --id ones) again, with fresh tries."""
    body = orjson.dumps({"ids": list(ids)}) if ids else b""
    out = _client(state_dir, url, token).request(
        "POST", f"/v1/functions/{function}/dlq/redrive", content=body)
    click.echo(f"redriven: {out['redriven']}")


@cli.command()
@click.argument("name")
@click.option("--data", "-d", required=True, help="The message body: text, or @FILE.")
@click.option("--queue", "kind", flag_value="queue", help="NAME is a queue.")
@click.option("--topic", "kind", flag_value="topic", help="NAME is a topic.")
@click.option("--attribute", "-a", "attributes", multiple=True,
              help="A message attribute KEY=VALUE (repeatable).")
@click.option("--subject", default=None, help="A topic message's subject (SNS Subject).")
@click.option("--idempotency-key", default=None,
              help="A repeat with the same key within 24 h is not delivered again.")
@connection_options
def publish(name: str, data: str, kind: str | None, attributes: tuple[str, ...],
            subject: str | None, idempotency_key: str | None, state_dir: Path | None,
            url: str | None, token: str | None) -> None:
    """Send a message to the queue or topic NAME."""
    for a in attributes:
        if "=" not in a or a.startswith("="):
            fail(f"--attribute must be KEY=VALUE, got {a!r}", 2)
    params: dict[str, Any] = {"attribute": list(attributes)}
    if kind:
        params["kind"] = kind
    if subject is not None:
        params["subject"] = subject
    headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
    out = _client(state_dir, url, token).request(
        "POST", f"/v1/publish/{name}", content=_data(data, b""), params=params,
        headers=headers)
    n = len(out["deliveries"])
    where = f"{n} subscriber{'s' if n != 1 else ''}" if out["kind"] == "topic" else "its consumer"
    click.echo(f"{out['messageId']} ({out['kind']} {name}, to {where})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_cluster_options
@connection_options
def status(as_json: bool, cluster_path: Path | None, wait_all: bool, timeout_s: float,
           state_dir: Path | None, url: str | None, token: str | None) -> None:
    """Show the platform: functions, instances, memory (in a region: every node,
    the leader, instances per worker, the NATS servers). With --cluster: each
    region's health, each app's version per region, drift and pending deploys."""
    from nimbus.cli.output import print_json, print_status

    if cluster_path is not None:
        from nimbus.cli.regions import cluster_status_cmd

        sys.exit(cluster_status_cmd(cluster_path, as_json=as_json, wait_all=wait_all,
                                    timeout_s=timeout_s))
    if wait_all:
        fail("--wait-all needs --cluster", 2)
    data = _client(state_dir, url, token).request("GET", "/v1/status")
    print_json(data) if as_json else print_status(data)


def main() -> None:
    import nimbus.chaos.cli  # noqa: F401 - registers nimbus chaos
    import nimbus.cli.aliases  # noqa: F401 - registers nimbus alias, nimbus versions
    import nimbus.cli.awscreds  # noqa: F401 - registers nimbus aws-credentials
    import nimbus.cli.dns  # noqa: F401 - registers nimbus dns
    import nimbus.cli.edge  # noqa: F401 - registers nimbus edge
    import nimbus.cli.export  # noqa: F401 - registers nimbus export
    import nimbus.cli.init  # noqa: F401 - registers nimbus init
    import nimbus.cli.metrics  # noqa: F401 - registers nimbus metrics
    import nimbus.cli.roles  # noqa: F401 - registers the region's process commands
    import nimbus.cli.rollout  # noqa: F401 - registers nimbus rollout and nimbus rollback
    import nimbus.demo  # noqa: F401 - registers nimbus demo

    try:
        code = cli.main(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        fail("aborted", 1)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail(exc.format_message().replace("\n", " ") + hint, exc.exit_code)
    except ManifestError as exc:
        fail(str(exc), 2)
    except UserInputError as exc:
        fail(str(exc), 1)
    except NimbusError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    # Run as a script this file is a second copy of the module: the commands
    # other modules register go on the importable copy, so run that one.
    from nimbus.cli.main import main as _main

    _main()
