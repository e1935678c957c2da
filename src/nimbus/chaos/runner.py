"""One chaos run: open-loop load and async invocations through the edge,
the edge's view polled, the planned kills executed and brought back, then
the async invocations checked in the regions that accepted them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from nimbus.chaos import plan, procs
from nimbus.chaos.httpclient import Client, ResponseError
from nimbus.chaos.report import (
    AsyncStats,
    EventResult,
    LoadStats,
    Poll,
    Report,
    back_up_s,
    detection_s,
    edge_view,
    error_type,
    last_served_s,
    served_again_s,
)
from nimbus.chaos.targets import Kill, Region, Skip, plan_instance, plan_node, plan_region
from nimbus.errors import UserInputError

POLL_EVERY_S = 0.05
REGION_HEADER = "x-nimbus-region"


@dataclass(frozen=True)
class ChaosOptions:
    cluster: Path
    app: str
    edge: str
    duration_s: float = 120.0
    rate: float = 200.0
    path: str | None = None
    min_success: float = 0.9999
    events: tuple[str, ...] = plan.EVENT_KINDS
    concurrency: int | None = None  # default: rate x timeout (at most 1000)
    timeout_s: float = 5.0
    async_rate: float = 2.0
    recover_timeout_s: float = 60.0


def load_regions(path: Path) -> list[Region]:
    from nimbus.multiregion.clusterfile import load_cluster

    cluster = load_cluster(path)
    regions = []
    for entry in cluster.regions.values():
        plan.require_loopback(entry.control, f"{path}: regions.{entry.name}.control")
        for gw in entry.gateways:
            plan.require_loopback(gw, f"{path}: regions.{entry.name}.gateways")
        regions.append(Region(entry.name, entry.control, entry.token, tuple(entry.gateways)))
    return regions


async def app_info(client: httpx.AsyncClient, regions: list[Region],
                   app: str) -> tuple[set[str], list[str]]:
    """The app's functions and GET routes, from the first region that has it."""
    for r in regions:
        try:
            resp = await client.get(r.control + "/v1/apps", timeout=5.0,
                                    headers={"authorization": f"Bearer {r.token}"})
            resp.raise_for_status()
            apps = resp.json()
        except (httpx.HTTPError, ValueError):
            continue
        for a in apps if isinstance(apps, list) else []:
            if isinstance(a, dict) and a.get("name") == app:
                gets = [rt["path"] for rt in a.get("routes", [])
                        if rt.get("method") in ("GET", "ANY") and "{" not in rt["path"]]
                return set(a.get("functions", [])), gets
    raise UserInputError(f"app {app!r} is not deployed in any region that answers")


class Chaos:
    def __init__(self, opts: ChaosOptions, regions: list[Region], path: str,
                 functions: set[str], say: Callable[[str], None]) -> None:
        self.opts = opts
        self.regions = {r.name: r for r in regions}
        self.order = [r.name for r in regions]
        self.path = path
        self.functions = functions
        self.say = say
        self.load = LoadStats()
        self.async_ = AsyncStats()
        self.accepted: list[tuple[str, str]] = []  # (invocation id, region)
        self.polls: list[Poll] = []
        self.events = [EventResult(e.kind, e.at_s)
                       for e in plan.schedule(opts.events, opts.duration_s)]
        self.t0 = 0.0
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.run_id = secrets.token_hex(4)

    @property
    def cap(self) -> int:
        """Requests in flight at most: by default as many as the rate can put
        in flight within one deadline (so only a request that would time out
        anyway is not sent), at most 1000."""
        if self.opts.concurrency is not None:
            return self.opts.concurrency
        return plan.default_concurrency(self.opts.rate, self.opts.timeout_s)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> Report:
        client = Client(self.opts.edge)
        async with httpx.AsyncClient(timeout=5.0) as admin:
            self.t0 = time.monotonic()
            poller = asyncio.create_task(self._poll(admin))
            events = asyncio.create_task(self._events(admin))
            await asyncio.gather(self._load(client), self._async(client))
            while self.tasks:
                await asyncio.wait(list(self.tasks), timeout=self.opts.timeout_s + 1)
            self.say(f"load done after {self.now():.1f} s; waiting for the events to finish")
            await events
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await self._check_async(admin)
        client.close()
        return Report(self.opts.edge, self.opts.app, self.path, self.opts.rate,
                      self.opts.duration_s, self.opts.min_success, self.load, self.events,
                      self.async_)

    # -- load --------------------------------------------------------------

    async def _load(self, client: Client) -> None:
        total = plan.request_times(self.opts.rate, self.opts.duration_s)
        for i in range(total):
            # behind schedule (a busy machine) the due requests go at once,
            # but never without letting the ones in flight progress
            await asyncio.sleep(max(0.0, i / self.opts.rate - self.now()))
            if self.inflight >= self.cap:
                self.load.not_sent("not_sent_concurrency_cap", self.now())
                continue
            self._spawn(self._get(client))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _get(self, client: Client) -> None:
        self.inflight += 1
        sent = self.now()
        status: int | None = None
        region: str | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.opts.timeout_s):
                r = await client.request("GET", self.path)
            status, region = r.status, r.headers.get(REGION_HEADER)
            if status >= 400:
                kind = error_type(r.body)
                error = f"http_{status}" + (f" {kind}" if kind else "")
        except TimeoutError:
            error = "timeout"
        except ResponseError as exc:
            error = exc.cause
        finally:
            self.inflight -= 1
        self.load.record(sent, self.now(), status, region, error)

    async def _async(self, client: Client) -> None:
        if self.opts.async_rate <= 0:
            return
        n = int(self.opts.async_rate * self.opts.duration_s)
        for i in range(n):
            await asyncio.sleep(max(0.0, i / self.opts.async_rate - self.now()))
            self._spawn(self._submit(client, f"chaos-{self.run_id}-{i}"))

    async def _submit(self, client: Client, key: str) -> None:
        headers = {"x-nimbus-invocation-type": "Event", "idempotency-key": key}
        try:
            async with asyncio.timeout(self.opts.timeout_s):
                r = await client.request("GET", self.path, headers)
        except TimeoutError:
            self.async_.refused["timeout"] += 1
            return
        except ResponseError as exc:
            self.async_.refused[exc.cause] += 1
            return
        region = r.headers.get(REGION_HEADER)
        inv = None
        if r.status == 202:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                inv = orjson.loads(r.body).get("invocationId")
        if not isinstance(inv, str) or region not in self.regions:
            self.async_.refused[f"http_{r.status}" if r.status != 202
                                else "no_region_or_id"] += 1
            return
        self.async_.accepted += 1
        self.accepted.append((inv, region))

    async def _check_async(self, admin: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 30.0
        for inv, region in self.accepted:
            r = self.regions[region]
            while True:
                try:
                    resp = await admin.get(f"{r.control}/v1/invocations/{inv}",
                                           headers={"authorization": f"Bearer {r.token}"})
                except httpx.HTTPError:
                    resp = None
                if resp is not None and resp.status_code == 200:
                    self.async_.found += 1
                    with contextlib.suppress(ValueError, AttributeError):
                        self.async_.statuses[str(resp.json().get("status"))] += 1
                    break
                if resp is not None and resp.status_code == 404:
                    self.async_.lost.append(inv)
                    break
                if time.monotonic() > deadline:
                    self.async_.unverified.append(inv)
                    break
                await asyncio.sleep(0.2)

    # -- the edge's view ---------------------------------------------------

    async def _poll(self, admin: httpx.AsyncClient) -> None:
        url = self.opts.edge + "/_nimbus/regions"
        while True:
            t = self.now()
            try:
                r = await admin.get(url, timeout=1.0)
                view = edge_view(r.json()) if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                view = {}
            if view:
                self.polls.append((t, view))
            await asyncio.sleep(max(0.0, POLL_EVERY_S - (self.now() - t)))

    def edge_says(self, region: str) -> bool | None:
        return self.polls[-1][1].get(region) if self.polls else None

    # -- events ------------------------------------------------------------

    def _busiest(self) -> str:
        """The region that served most of the last 2 s of requests (the one
        a kill hurts most), else the cluster file's first."""
        since = self.now() - 2.0
        counts: dict[str, int] = {}
        for sent, _done, name in reversed(self.load.served):
            if sent < since:
                break
            counts[name] = counts.get(name, 0) + 1
        named = [(n, r) for r, n in counts.items() if r in self.regions]
        return max(named)[1] if named else self.order[0]

    async def _events(self, admin: httpx.AsyncClient) -> None:
        for ev in self.events:
            delay = ev.planned_at_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            ev.region = self._busiest()
            region = self.regions[ev.region]
            try:
                await self._event(admin, ev, region)
            except Skip as exc:
                ev.skipped = str(exc)
            except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
                # a region whose status does not say what can be killed
                ev.skipped = f"could not inspect or kill: {type(exc).__name__}: {exc}"
            self.say(f"event {ev.kind} in {ev.region}: " + (
                f"skipped ({ev.skipped})" if ev.skipped else
                f"{ev.target}; detection {ev.detection_s}, recovery {ev.recovery_s}"))

    async def _event(self, admin: httpx.AsyncClient, ev: EventResult, region: Region) -> None:
        status = await region.status(admin)
        controls = [str(n["url"]) for n in status.get("nodes", [])
                    if n.get("role") == "controller" and n.get("url")]
        kill: Kill
        if ev.kind == "instance":
            kill = plan_instance(region.name, status, self.functions)
        elif ev.kind == "region":
            kill = plan_region(region.name, status)
        else:
            kill = plan_node(region.name, status, ev.kind)
        ev.target = kill.target
        ev.notes.extend(kill.notes)
        # what "back" means, counted before the kill (a count taken after it
        # would no longer see the killed process alive)
        want = (max(1, _instances(status, self.functions, [])) if ev.kind == "instance"
                else _role_count(status, ev.kind, []))
        at = self.now()
        ev.at_s = at
        ev.pids = await asyncio.to_thread(kill.execute)
        self.say(f"killed {kill.target} in {region.name} at {at:.2f} s "
                 f"({len(ev.pids)} processes)")
        try:
            await self._follow(admin, ev, region, kill, controls, want, at)
        finally:
            if kill.restart and not ev.restarted_pids:
                # interrupted (Ctrl-C) before it was brought back: do it now
                ev.restarted_pids = kill.bring_back()
                self.say(f"{kill.target} started again as pid "
                         f"{', '.join(map(str, ev.restarted_pids))}")

    async def _follow(self, admin: httpx.AsyncClient, ev: EventResult, region: Region,
                      kill: Kill, controls: list[str], want: int, at: float) -> None:
        """Bring back what was killed and measure detection and recovery."""
        deadline = time.monotonic() + self.opts.recover_timeout_s
        if ev.kind == "region":
            # the edge should route away within a second: give it 3 before
            # starting the region again, so detection is of a dead region
            await self._wait(lambda: self.edge_says(region.name) is False, 3.0)
            restarted_at = self.now()
            ev.restarted_pids = await asyncio.to_thread(kill.bring_back)
            await self._wait(lambda: self.edge_says(region.name) is True,
                             self.opts.recover_timeout_s)
            # and serving again when it was the region taking the traffic
            await self._wait(lambda: served_again_s(
                self.load.served, region.name, restarted_at, at) is not None
                or self.now() > self.opts.duration_s, self.opts.recover_timeout_s)
            ev.detection_s = detection_s(self.polls, region.name, at)
            ev.recovery_s = (back_up_s(self.polls, region.name, at)
                             or served_again_s(self.load.served, region.name, restarted_at, at))
            last = last_served_s(self.load.served, region.name, at)
            if last is not None:
                ev.notes.append(f"its last answer {last:.2f}s after the kill")
            if not self.polls:
                ev.notes.append("the edge's /_nimbus/regions gave no view")
            return
        if kill.restart:
            ev.restarted_pids = await asyncio.to_thread(kill.bring_back)
        back = await self._recovered(admin, region, controls, ev.kind, want, ev.pids,
                                     deadline, kill.replaced)
        ev.recovery_s = None if back is None else back - (self.t0 + at)
        ev.detection_s = detection_s(self.polls, region.name, at)
        if ev.detection_s is not None and ev.recovery_s is not None \
                and ev.detection_s > ev.recovery_s:
            ev.detection_s = None  # marked down after it was back: not this event's
        if ev.detection_s is None:
            ev.notes.append("the region stayed routable")

    async def _wait(self, cond: Callable[[], bool], timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(POLL_EVERY_S / 2)
        return True

    async def _recovered(self, admin: httpx.AsyncClient, region: Region, controls: list[str],
                         kind: str, want: int, dead: list[int], deadline: float,
                         local: Callable[[], bool] | None = None) -> float | None:
        """When the region's status shows what was killed replaced: ``want``
        instances of the app, or processes of the role, none of them dead."""
        async def check() -> bool:
            if local is not None:
                return await asyncio.to_thread(local)
            now = await region.any_status(admin, controls)
            if now is None:
                return False
            if kind == "instance":
                return _instances(now, self.functions, dead) >= want
            if kind == "leader":
                leader = now.get("leader")
                return bool(leader) and any(
                    n.get("id") == leader and n.get("pid") not in dead
                    for n in now.get("nodes", []))
            return _role_count(now, kind, dead) >= want

        from nimbus.chaos.targets import wait_until

        return await wait_until(check, deadline, every_s=0.1)


def _instances(status: dict[str, Any], functions: set[str], dead: list[int]) -> int:
    n = 0
    for f in status.get("functions", []):
        if f.get("name") not in functions:
            continue
        if "instances" in f:
            n += sum(1 for i in f["instances"] if i.get("pid") not in dead)
        else:
            n += int(f.get("ready", 0))
    return n


def _role_count(status: dict[str, Any], role: str, dead: list[int]) -> int:
    return sum(1 for n in status.get("nodes", [])
               if n.get("role") == role and n.get("pid") not in dead
               and procs.alive(int(n.get("pid") or 0)))


async def run(opts: ChaosOptions, say: Callable[[str], None]) -> Report:
    regions = load_regions(opts.cluster)
    async with httpx.AsyncClient() as client:
        functions, gets = await app_info(client, regions, opts.app)
    path = opts.path
    if path is None:
        if not gets:
            raise UserInputError(f"app {opts.app!r} has no GET route without parameters: "
                                 "give one with --path")
        path = gets[0]
    if not path.startswith("/"):
        raise UserInputError(f"--path must start with /, got {path!r}")
    chaos = Chaos(opts, regions, path, functions, say)
    return await chaos.run()
