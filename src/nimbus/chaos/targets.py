"""What can be killed in a region, and how it comes back.

A region answers ``GET /v1/status`` on its control API. A ``nimbus up``
region is one process tree (its ``pid``, with zygotes and instances under
it): instances can be killed alone, and the whole region is brought back by
running its command line again with the ports it had. A ``nimbus cluster
up`` region (``"mode": "region"``) lists its nodes (role, id, pid) and its
leader: workers, gateways and controllers can be killed one at a time and
are started again from their command lines (gateways and controllers on
the ports they had).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from nimbus.chaos import procs


@dataclass
class Kill:
    """One kill: what, which roots, and how to bring it back."""

    region: str
    target: str
    roots: list[int]
    restart: list[tuple[procs.CommandLine, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    # when set, "back" is judged on this machine (e.g. a worker's instance
    # processes) rather than from the region's status
    replaced: Callable[[], bool] | None = None

    def execute(self) -> list[int]:
        self.pids = procs.kill_tree(self.roots)
        procs.wait_gone(self.pids, time.monotonic() + 5.0)
        return self.pids

    def bring_back(self) -> list[int]:
        return [cmd.spawn(log) for cmd, log in self.restart]


class Skip(Exception):
    """The event does not apply to this region (the message says why)."""


@dataclass
class Region:
    name: str
    control: str
    token: str
    gateways: tuple[str, ...]

    async def status(self, client: httpx.AsyncClient, url: str | None = None,
                     timeout_s: float = 3.0) -> dict[str, Any]:
        r = await client.get((url or self.control) + "/v1/status", timeout=timeout_s,
                             headers={"authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    async def any_status(self, client: httpx.AsyncClient,
                         urls: list[str]) -> dict[str, Any] | None:
        """The status from the first control URL of ``urls`` that answers."""
        for url in [self.control, *urls]:
            try:
                return await self.status(client, url)
            except (httpx.HTTPError, ValueError):
                continue
        return None


def is_cluster(status: dict[str, Any]) -> bool:
    return status.get("mode") == "region"


def _port(url: str) -> str:
    return str(urlsplit(url).port)


def _checked(pid: Any, what: str) -> int:
    if not isinstance(pid, int) or pid <= 1 or not procs.looks_like_nimbus(pid):
        raise Skip(f"{what}: pid {pid!r} is not a nimbus process on this machine")
    return pid


def plan_instance(region: str, status: dict[str, Any], functions: set[str]) -> Kill:
    """An instance of one of the app's functions (a busy one if any)."""
    if is_cluster(status):
        # instances live under the workers: zygote children of each worker
        for node in status.get("nodes", []):
            if node.get("role") != "worker":
                continue
            wpid = _checked(node.get("pid"), "worker")
            kids = procs.children_map()
            grandkids = [g for z in kids.get(wpid, []) for g in kids.get(z, [])]
            if grandkids:
                victim = grandkids[0]
                kill = Kill(region, f"instance pid {victim} on worker {node.get('id')}",
                            [victim], notes=["the worker replaces it"])
                kill.replaced = functools.partial(_replaced, wpid, victim, len(grandkids))
                return kill
        raise Skip("no instance is running in the region")
    candidates = [(i.get("outstanding", 0), f["name"], i["pid"])
                  for f in status.get("functions", []) if f.get("name") in functions
                  for i in f.get("instances", []) if isinstance(i.get("pid"), int)]
    if not candidates:
        raise Skip("no instance of the app is running in the region")
    _, fn, pid = max(candidates)
    return Kill(region, f"instance pid {pid} of {fn}", [_checked(pid, "instance")],
                notes=["the platform replaces it"])


def _replaced(worker: int, victim: int, want: int) -> bool:
    """Whether ``worker`` has ``want`` live instance processes (zygote
    children) again, ``victim`` not among them."""
    kids = procs.children_map()
    return len([g for z in kids.get(worker, []) for g in kids.get(z, [])
                if g != victim and procs.alive(g)]) >= want


def plan_node(region: str, status: dict[str, Any], role: str) -> Kill:
    """A worker, a gateway or (``role="leader"``) the controller leader of a
    ``nimbus cluster up`` region, to be started again from its command line."""
    if not is_cluster(status):
        raise Skip(f"a nimbus up region has no separate {role} process")
    nodes = status.get("nodes", [])
    if role == "leader":
        leader = status.get("leader")
        picked = [n for n in nodes if n.get("role") == "controller" and n.get("id") == leader]
        if not picked:
            raise Skip("the region has no leader now")
    else:
        picked = [n for n in nodes if n.get("role") == role]
        if role == "worker":  # the one with the most ready instances
            picked.sort(key=lambda n: -sum(int(v) for v in (n.get("ready") or {}).values()))
        if not picked:
            raise Skip(f"the region has no {role}")
    node = picked[0]
    pid = _checked(node.get("pid"), f"{role} {node.get('id')}")
    kill = Kill(region, f"{role} {node.get('id')} (pid {pid})", [pid])
    kill.restart = [_restartable(pid, node)]
    return kill


def plan_region(region: str, status: dict[str, Any]) -> Kill:
    """Every process of the region: the ``nimbus up`` tree, or every node
    of a ``nimbus cluster up`` region (its NATS servers, the store, stay)."""
    if is_cluster(status):
        nodes = [n for n in status.get("nodes", []) if isinstance(n.get("pid"), int)]
        if not nodes:
            raise Skip("the region lists no processes")
        roots = [_checked(n["pid"], f"{n.get('role')} {n.get('id')}") for n in nodes]
        kill = Kill(region, f"{len(roots)} processes (every node)", roots,
                    notes=["its NATS servers keep running"])
        kill.restart = [_restartable(n["pid"], n) for n in nodes]
        return kill
    pid = _checked(status.get("pid"), "the region")
    cmd = procs.CommandLine.of(pid)
    for url, opt in ((status.get("gateway_url"), "--port"),
                     (status.get("control_url"), "--control-port")):
        if isinstance(url, str):
            cmd = cmd.with_option(opt, _port(url))
    state = status.get("state_dir")
    log = (Path(state) if isinstance(state, str) else Path(cmd.cwd)) / "restarted.log"
    return Kill(region, f"nimbus up pid {pid} and its processes", [pid],
                restart=[(cmd, log)])


def _restartable(pid: int, node: dict[str, Any]) -> tuple[procs.CommandLine, Path]:
    cmd = procs.CommandLine.of(pid)
    url = node.get("url")
    if isinstance(url, str):
        if node.get("role") == "gateway":
            cmd = cmd.with_option("--port", _port(url))
        elif node.get("role") == "controller":
            cmd = cmd.with_option("--control-port", _port(url))
    state = cmd.option("--state-dir")
    return cmd, (Path(state) if state else Path(cmd.cwd)) / "process.log"


async def wait_until(check: Any, deadline: float, every_s: float = 0.05) -> float | None:
    """Poll the async ``check()`` until true: the monotonic time it was, or
    None at the deadline."""
    while time.monotonic() < deadline:
        try:
            if await check():
                return time.monotonic()
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        await asyncio.sleep(every_s)
    return None
