"""``nimbus logs``: one nimbus (or region), or every region of a cluster file.

Filters (``--since``, ``--level``, ``--request-id``, ``--tail``) are applied
by each control API, so only matching records cross the network. With
``--cluster`` every region is read at once, one thread per region, and
each line is labelled with its region: without ``--follow`` the regions'
records are merged in time order; with it, lines print as they arrive
(each region's in its own order), and a region that cannot be reached or
drops the stream is tried again every few seconds from where it stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import click
import orjson

from nimbus.cli.client import Client, CLIError, Connection
from nimbus.observe.logfilter import parse_level, parse_since

RECONNECT_S = 2.0


def log_params(*, follow: bool, request_id: str | None, tail: int | None,
               since: str | None, level: str | None, now: float) -> dict[str, str]:
    """The query parameters for the control API; ``--since`` and ``--level``
    are checked here first (a usage error names the option)."""
    params = {"follow": "1" if follow else "0"}
    if request_id:
        params["request_id"] = request_id
    if tail:
        params["tail"] = str(tail)
    if since is not None:
        try:
            parse_since(since, now)
        except ValueError as exc:
            raise click.BadParameter(f"{exc}, got {since!r}", param_hint="--since") from None
        params["since"] = since
    if level is not None:
        try:
            params["level"] = parse_level(level)
        except ValueError as exc:
            raise click.BadParameter(f"{exc}, got {level!r}", param_hint="--level") from None
    return params


def render(rec: dict[str, Any], as_json: bool, region: str | None = None) -> str:
    from nimbus.cli.output import format_log

    if region is not None:
        rec = {"region": region, **rec}
    if as_json:
        return orjson.dumps(rec).decode()
    line = format_log(rec)
    return f"[{region}] {line}" if region is not None else line


def show(client: Client, function: str, params: dict[str, str], as_json: bool) -> None:
    for rec in client.stream_lines("GET", f"/v1/functions/{function}/logs", params=params):
        click.echo(render(rec, as_json))


def show_cluster(cluster_path: Path, function: str, params: dict[str, str],
                 as_json: bool) -> int:
    """Every region's records of ``function``; 1 if a region could not be read
    (without ``--follow``), else 0."""
    from nimbus.cli.regions import open_cluster

    cluster = open_cluster(cluster_path)
    follow = params.get("follow") == "1"
    out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=10_000)
    stop = threading.Event()
    threads = []
    for name, entry in cluster.regions.items():
        conn = Connection(entry.control, entry.token)
        t = threading.Thread(target=_read_region, name=f"logs-{name}", daemon=True,
                             args=(name, conn, function, dict(params), follow, out, stop))
        t.start()
        threads.append(t)
    failed = 0
    pending = len(threads)
    gathered: list[tuple[float, str, dict[str, Any]]] = []
    try:
        while pending:
            region, item = out.get()
            if item is None:
                pending -= 1
            elif isinstance(item, str):
                click.echo(f"nimbus: region {region}: {item}", err=True)
                failed += 1
            elif follow:
                click.echo(render(item, as_json, region))
            else:
                gathered.append((float(item.get("ts") or 0), region, item))
    except KeyboardInterrupt:
        stop.set()
        return 0
    gathered.sort(key=lambda g: g[0])  # stable: each region's order kept on ties
    for _ts, region, rec in gathered:
        click.echo(render(rec, as_json, region))
    return 1 if failed else 0


def _read_region(region: str, conn: Connection, function: str, params: dict[str, str],
                 follow: bool, out: queue.Queue[tuple[str, Any]],
                 stop: threading.Event) -> None:
    client = Client(conn, timeout_s=None if follow else 60.0)  # type: ignore[arg-type]
    last_ts: float | None = None
    last_error = ""
    seen_at_last: set[bytes] = set()  # records at last_ts: not repeated after a reconnect
    try:
        while not stop.is_set():
            try:
                for rec in client.stream_lines("GET", f"/v1/functions/{function}/logs",
                                               params=params):
                    key = orjson.dumps(rec)
                    ts = rec.get("ts")
                    if isinstance(ts, int | float):
                        if last_ts is not None and ts == last_ts and key in seen_at_last:
                            continue
                        if ts != last_ts:
                            last_ts, seen_at_last = ts, set()
                        seen_at_last.add(key)
                    out.put((region, rec))
                if not follow:
                    return
            except CLIError as exc:
                if str(exc) != last_error:  # said once, not at every attempt
                    last_error = str(exc)
                    out.put((region, last_error))
                if not follow:
                    return
            # the stream ended or failed: carry on from the last record seen
            if last_ts is not None:
                params = {**params, "since": _iso(last_ts)}
                params.pop("tail", None)
            stop.wait(RECONNECT_S)
    finally:
        out.put((region, None))


def _iso(ts: float) -> str:
    micros = int(ts * 1e6) % 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{micros:06d}Z"
