"""Region-wide demand: gateways report it, the leader collects it.

Knative's split between the metric source and the collector. Every
gateway owns ``demand/<gateway id>`` (a campaign key, ttl 3 s) and rewrites
it every ``interval_s`` with, per target, the invocations in flight, the
requests held waiting for an instance and the requests that arrived since
its previous report. A gateway that dies stops counting when its key
expires. The leader's :class:`Collector` follows those keys with one watch
and hands the :class:`~nimbus.autoscale.decider.Decider` of each target
what the worker's autoscaler hands it in a single process: concurrency
(in flight + held, summed over gateways) and arrivals since the last
sample (summed over every report seen, none counted twice).

Scale from zero must not wait for a period: a target whose held count goes
from 0 to more than 0 is reported at once, and the collector tells the
leader (``on_urgent``), which decides at once rather than at its next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait, wait_event
from nimbus.cluster.keys import (
    DEMAND,
    SHARES,
    ClusterStore,
    KeyWatch,
    resign_quietly,
    target_of_path,
)
from nimbus.errors import ConflictError, NimbusError

log = logging.getLogger("nimbus.cluster")

DEMAND_TTL_S = 3.0
POLL_S = 0.05  # how often the reporter looks for newly held requests


@dataclass(frozen=True, slots=True)
class Demand:
    """One target's demand over the whole region."""

    in_flight: int = 0
    held: int = 0
    arrivals: int = 0  # since the previous sample
    cap: int = 0  # one gateway's: the part of the cap it enforces now

    @property
    def concurrency(self) -> int:
        return self.in_flight + self.held


def aggregate(latest: Iterable[Mapping[str, Any]],
              arrivals: Mapping[str, int]) -> dict[str, Demand]:
    """Sum each gateway's latest report per target; ``arrivals`` are the
    arrivals of every report since the previous sample (pure)."""
    in_flight: dict[str, int] = {}
    held: dict[str, int] = {}
    for report in latest:
        for target, d in report.get("targets", {}).items():
            in_flight[target] = in_flight.get(target, 0) + int(d.get("in_flight", 0))
            held[target] = held.get(target, 0) + int(d.get("held", 0))
    return {t: Demand(in_flight.get(t, 0), held.get(t, 0), arrivals.get(t, 0))
            for t in sorted(set(in_flight) | set(held) | set(arrivals))}


def decode_report(value: bytes) -> dict[str, Any] | None:
    """A demand report, or None if it is not one (logged by the caller)."""
    try:
        report = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(report, dict) or not isinstance(report.get("targets"), dict):
        return None
    for d in report["targets"].values():
        if not isinstance(d, dict) or not all(
                isinstance(d.get(k, 0), int) and d.get(k, 0) >= 0
                for k in ("in_flight", "held", "arrivals", "cap")):
            return None
    return report


def by_target(invokers: Iterable[Any]) -> dict[str, Any]:
    """Invokers keyed by ``"fn@version"`` (each has a ``.target``)."""
    return {f"{inv.target.function}@{inv.target.version}": inv for inv in invokers}


class DemandReporter:
    """The gateway's side: reports its invokers' demand.

    ``invokers()`` returns the gateway's invokers by target key
    (``"fn@version"``); each has ``in_flight``, ``held`` and
    ``take_arrivals()`` (a ``RemoteInvoker`` or a ``FunctionPool``).
    """

    def __init__(self, store: ClusterStore, gateway_id: str,
                 invokers: Callable[[], Mapping[str, Any]], interval_s: float = 0.5,
                 ttl_s: float = DEMAND_TTL_S) -> None:
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"interval_s must be positive and below ttl_s ({ttl_s}), "
                             f"was: {interval_s!r}")
        self.store = store
        self.gateway_id = gateway_id
        self.key = f"{DEMAND}{gateway_id}"
        self.invokers = invokers
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.revision: int | None = None
        self.reports = 0
        self._last_held: dict[str, int] = {}
        self._carry: dict[str, int] = {}  # arrivals of a report that failed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def nudge(self) -> None:
        """Report now (e.g. a request is held and no instance is ready)."""
        self._wake.set()

    def snapshot(self) -> dict[str, Any]:
        targets: dict[str, dict[str, int]] = {}
        for key, inv in self.invokers().items():
            arrivals = int(inv.take_arrivals()) + self._carry.pop(key, 0)
            targets[key] = {"in_flight": int(inv.in_flight), "held": int(inv.held),
                            "arrivals": arrivals, "cap": int(getattr(inv, "cap", 0))}
        for key, n in self._carry.items():  # invokers that went meanwhile
            targets.setdefault(key, {"in_flight": 0, "held": 0, "arrivals": n})
        self._carry.clear()
        return {"gateway": self.gateway_id, "at": time.time(), "targets": targets}

    def _urgent(self) -> bool:
        for key, inv in self.invokers().items():
            if inv.held > 0 and self._last_held.get(key, 0) == 0:
                return True
        return False

    async def report(self) -> None:
        """One report now."""
        snap = self.snapshot()
        value = orjson.dumps(snap)
        try:
            if self.revision is not None:
                try:
                    self.revision = await self.store.renew(self.key, self.revision,
                                                           self.ttl_s, value)
                except ConflictError:
                    self.revision = None
            if self.revision is None:
                self.revision = await self.store.campaign(self.key, value, self.ttl_s)
        except BaseException:
            for key, d in snap["targets"].items():  # counted next time instead
                if d["arrivals"]:
                    self._carry[key] = self._carry.get(key, 0) + d["arrivals"]
            raise
        self.reports += 1
        self._last_held = {k: d["held"] for k, d in snap["targets"].items()}

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.report()
            except NimbusError as exc:
                log.warning("demand report failed: %s", exc)
            except Exception:  # noqa: BLE001 - keep reporting
                log.exception("demand report failed")
            next_at = max(next_at + self.interval_s, loop.time())
            while loop.time() < next_at and not self._wake.is_set():
                await wait_event(self._wake, min(POLL_S, max(0.0, next_at - loop.time())))
                try:
                    if self._urgent():
                        break
                except Exception:  # noqa: BLE001
                    log.exception("reading invokers failed")
            self._wake.clear()

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await resign_quietly(self.store, self.key, self.revision)
        self.revision = None


class Collector:
    """The leader's side: the region's demand per target from the gateways'
    reports. ``take()`` is one sample (arrivals reset); ``on_urgent(target)``
    runs when a report shows requests held for a target that had none."""

    def __init__(self, store: ClusterStore,
                 on_urgent: Callable[[str], None] | None = None) -> None:
        self.latest: dict[str, dict[str, Any]] = {}  # gateway key -> report
        self.on_urgent = on_urgent
        self._arrivals: dict[str, int] = {}
        self._watch = KeyWatch(store, DEMAND, on_change=self._resync, on_event=self._event)

    async def start(self) -> None:
        await self._watch.start()

    def _event(self, kind: str, key: str, value: bytes) -> None:
        if kind != "put":
            self.latest.pop(key, None)
            return
        report = decode_report(value)
        if report is None:
            log.warning("ignoring a malformed demand report at %s", key)
            return
        before = self.latest.get(key, {}).get("targets", {})
        self.latest[key] = report
        for target, d in report["targets"].items():
            if d.get("arrivals"):
                self._arrivals[target] = self._arrivals.get(target, 0) + d["arrivals"]
            if (d.get("held") and not before.get(target, {}).get("held")
                    and self.on_urgent is not None):
                self.on_urgent(target)

    def _resync(self, watch: KeyWatch) -> None:
        """After a listing: the reports there are, arrivals not counted again."""
        latest: dict[str, dict[str, Any]] = {}
        for key, e in watch.entries.items():
            report = decode_report(e.value)
            if report is not None:
                latest[key] = report
        self.latest = latest

    def take(self) -> dict[str, Demand]:
        arrivals, self._arrivals = self._arrivals, {}
        return aggregate(self.latest.values(), arrivals)

    def gateways(self) -> int:
        return len(self.latest)

    def by_gateway(self, live: Iterable[str]) -> dict[str, dict[str, Demand]]:
        """Each live gateway's own demand per target (empty for a gateway
        that has not reported yet)."""
        out: dict[str, dict[str, Demand]] = {}
        for gw in live:
            report = self.latest.get(f"{DEMAND}{gw}", {})
            out[gw] = {t: Demand(int(d.get("in_flight", 0)), int(d.get("held", 0)),
                                 cap=int(d.get("cap", 0)))
                       for t, d in report.get("targets", {}).items()}
        return out

    async def aclose(self) -> None:
        await self._watch.aclose()


class Shares:
    """The gateway's side of region-wide caps: ``shares/<fn>/<version>`` as the
    leader wrote them (each gateway's part; the parts add up to the cap).
    ``share(target, cap)`` is this gateway's part, 0 until the leader has
    given it one: its requests are held meanwhile, never run over the cap."""

    def __init__(self, store: ClusterStore, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.shares: dict[str, dict[str, int]] = {}
        self._watch = KeyWatch(store, SHARES, on_change=self._sync)

    async def start(self) -> None:
        await self._watch.start()

    def _sync(self, watch: KeyWatch) -> None:
        shares: dict[str, dict[str, int]] = {}
        for key, e in watch.entries.items():
            try:
                parts = orjson.loads(e.value)["shares"]
                target = target_of_path(key[len(SHARES):])
                shares[target] = {str(g): int(n) for g, n in parts.items() if int(n) >= 0}
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue
        self.shares = shares

    def share(self, target: str, cap: int) -> int:
        return min(cap, self.shares.get(target, {}).get(self.gateway_id, 0))

    async def aclose(self) -> None:
        await self._watch.aclose()
