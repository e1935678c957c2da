"""The availability report: counting outcomes, measuring detection and
recovery from what was observed, and judging the goals. Pure: every
function takes the observations (and times) as arguments."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

# A poll of the edge's view: (seconds since the start, {region: routable}).
Poll = tuple[float, dict[str, bool]]


def failure_cause(status: int | None, error: str | None = None) -> str | None:
    """None for a success (a 2xx or 3xx answer), else the cause as the report
    counts it: ``http_502``, ``timeout``, ``connect``, ``reset``, ..."""
    if error is not None:
        return error
    if status is None:
        return "no_response"
    if 200 <= status < 400:
        return None
    return f"http_{status}"


def error_type(body: bytes) -> str | None:
    """The ``errorType`` of a nimbus error answer (``RegionFailed``,
    ``Runtime.ExitError``, ...), or None when the body is not one."""
    if len(body) > 4096 or not body.startswith(b"{"):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    kind = data.get("errorType") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) and kind.replace(".", "").isalnum() else None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100, nearest rank) or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class LoadStats:
    """Outcomes of the steady load, counted as they come."""

    scheduled: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    by_region: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_s: list[float] = field(default_factory=list)
    # (sent at, answered at, region) of every success, for detection times
    served: list[tuple[float, float, str]] = field(default_factory=list)
    # failures per whole second of the run (when the request was due)
    failed_at: collections.Counter[int] = field(default_factory=collections.Counter)

    def not_sent(self, cause: str, at: float = 0.0) -> None:
        """A request the run meant to send but could not (e.g. the
        concurrency cap was full): a failure, so a hang cannot hide."""
        self.scheduled += 1
        self.failed[cause] += 1
        self.failed_at[int(at)] += 1

    def record(self, sent_at: float, done_at: float, status: int | None,
               region: str | None, error: str | None = None) -> None:
        self.scheduled += 1
        self.sent += 1
        cause = failure_cause(status, error)
        if cause is not None:
            self.failed[cause] += 1
            self.failed_at[int(sent_at)] += 1
            return
        self.succeeded += 1
        self.latencies_s.append(done_at - sent_at)
        name = region or "?"
        self.by_region[name] += 1
        self.served.append((sent_at, done_at, name))

    @property
    def success_ratio(self) -> float:
        return self.succeeded / self.scheduled if self.scheduled else 1.0


def detection_s(polls: Iterable[Poll], region: str, killed_at: float) -> float | None:
    """Seconds from the kill until the edge first reported ``region`` as not
    routable (None if it never did)."""
    for t, view in polls:
        if t >= killed_at and view.get(region) is False:
            return t - killed_at
    return None


def back_up_s(polls: Sequence[Poll], region: str, killed_at: float) -> float | None:
    """Seconds from the kill until the edge routed to ``region`` again after
    it had been down: the first poll (after a down one) from which the
    region stays up to the end of the polls. None if it never came back."""
    seen_down = False
    candidate: float | None = None
    for t, view in polls:
        if t < killed_at or region not in view:
            continue
        if view[region] is False:
            seen_down = True
            candidate = None
        elif seen_down and candidate is None:
            candidate = t
    return None if candidate is None else candidate - killed_at


def last_served_s(served: Iterable[tuple[float, float, str]], region: str,
                  killed_at: float) -> float | None:
    """Seconds from the kill to the last answer ``region`` gave to a request
    sent after the kill and before it was back (responses of the region
    after it died mean it was not dead yet): None if none."""
    last: float | None = None
    for sent, done, name in served:
        if name == region and sent >= killed_at:
            if last is not None and sent - last > 0.5:
                break  # a gap: what follows is the region back, not before death
            last = done
    return None if last is None else last - killed_at


def served_again_s(served: Iterable[tuple[float, float, str]], region: str,
                   since: float, killed_at: float) -> float | None:
    """Seconds from the kill to the first answer from ``region`` to a request
    sent at or after ``since`` (its restart)."""
    for sent, done, name in served:
        if name == region and sent >= since:
            return done - killed_at
    return None


@dataclass
class EventResult:
    kind: str
    planned_at_s: float
    region: str | None = None
    at_s: float | None = None            # when the kill happened
    target: str = ""                     # what was killed, in words
    pids: list[int] = field(default_factory=list)
    detection_s: float | None = None     # edge stopped routing to it
    recovery_s: float | None = None      # back in service
    restarted_pids: list[int] = field(default_factory=list)
    skipped: str | None = None           # why it did not happen
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "planned_at_s": self.planned_at_s, "region": self.region,
                "at_s": _r(self.at_s), "target": self.target, "pids": self.pids,
                "detection_s": _r(self.detection_s), "recovery_s": _r(self.recovery_s),
                "restarted_pids": self.restarted_pids, "skipped": self.skipped,
                "notes": self.notes}


@dataclass
class AsyncStats:
    accepted: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    found: int = 0
    lost: list[str] = field(default_factory=list)        # accepted, then not found
    unverified: list[str] = field(default_factory=list)  # its region never answered
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class Report:
    edge: str
    app: str
    path: str
    rate: float
    duration_s: float
    min_success: float
    load: LoadStats
    events: list[EventResult]
    async_: AsyncStats

    def goals(self) -> list[str]:
        """The goals missed, in words (empty: all met)."""
        missed = []
        if self.load.success_ratio < self.min_success:
            missed.append(f"success {_pct(self.load.success_ratio)} is below the goal "
                          f"{_pct(self.min_success)}")
        if self.async_.lost:
            missed.append(f"{len(self.async_.lost)} accepted async invocation(s) lost")
        if self.async_.unverified:
            missed.append(f"{len(self.async_.unverified)} accepted async invocation(s) "
                          "could not be checked (their region did not answer)")
        return missed

    @property
    def exit_code(self) -> int:
        return 1 if self.goals() else 0

    def to_dict(self) -> dict[str, Any]:
        ld = self.load
        return {
            "edge": self.edge, "app": self.app, "path": self.path, "rate": self.rate,
            "duration_s": self.duration_s, "min_success": self.min_success,
            "requests": {"scheduled": ld.scheduled, "sent": ld.sent,
                         "succeeded": ld.succeeded,
                         "failed": sum(ld.failed.values()),
                         "failed_by_cause": dict(sorted(ld.failed.items())),
                         "failed_per_second": {str(k): v for k, v in
                                               sorted(ld.failed_at.items())},
                         "success_ratio": ld.success_ratio,
                         "by_region": dict(sorted(ld.by_region.items())),
                         "latency_p50_ms": _ms(percentile(ld.latencies_s, 50)),
                         "latency_p99_ms": _ms(percentile(ld.latencies_s, 99))},
            "events": [e.to_dict() for e in self.events],
            "async": {"accepted": self.async_.accepted,
                      "refused": dict(sorted(self.async_.refused.items())),
                      "found": self.async_.found, "lost": self.async_.lost,
                      "unverified": self.async_.unverified,
                      "statuses": dict(sorted(self.async_.statuses.items()))},
            "goals_missed": self.goals(), "exit_code": self.exit_code,
        }

    def render(self) -> str:
        ld = self.load
        lines = [f"nimbus chaos: {self.app} {self.path} through {self.edge}, "
                 f"{self.rate:g}/s for {self.duration_s:g} s"]
        lines.append(f"requests   {ld.scheduled} scheduled, {ld.sent} sent, "
                     f"{ld.succeeded} succeeded ({_pct(ld.success_ratio)}), "
                     f"{sum(ld.failed.values())} failed")
        if ld.failed:
            lines.append("failed by cause  " + ", ".join(
                f"{c} {n}" for c, n in sorted(ld.failed.items())))
            lines.append("failed when      " + ", ".join(
                f"{t}s-{t + 1}s {n}" for t, n in sorted(ld.failed_at.items())[:20]))
        if ld.by_region:
            lines.append("served by  " + ", ".join(
                f"{r} {n}" for r, n in sorted(ld.by_region.items())))
        p50, p99 = percentile(ld.latencies_s, 50), percentile(ld.latencies_s, 99)
        if p50 is not None and p99 is not None:
            lines.append(f"latency    p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        lines.append("events")
        lines.append(f"  {'at':>7}  {'event':<9}{'region':<8}{'detection':>10}"
                     f"{'recovery':>10}  what")
        for e in self.events:
            at = f"{e.at_s:.1f}s" if e.at_s is not None else f"({e.planned_at_s:.1f}s)"
            if e.skipped:
                lines.append(f"  {at:>7}  {e.kind:<9}{e.region or '-':<8}{'-':>10}{'-':>10}"
                             f"  skipped: {e.skipped}")
                continue
            what = e.target + (f"; back as pid {', '.join(map(str, e.restarted_pids))}"
                               if e.restarted_pids else "")
            if e.notes:
                what += "; " + "; ".join(e.notes)
            lines.append(f"  {at:>7}  {e.kind:<9}{e.region or '-':<8}"
                         f"{_secs(e.detection_s):>10}{_secs(e.recovery_s):>10}  {what}")
        a = self.async_
        line = (f"async      {a.accepted} accepted, {a.found} found, {len(a.lost)} lost")
        if a.unverified:
            line += f", {len(a.unverified)} unverified"
        if a.refused:
            line += " (not accepted: " + ", ".join(
                f"{c} {n}" for c, n in sorted(a.refused.items())) + ")"
        lines.append(line)
        if a.lost:
            lines.append("lost ids   " + ", ".join(a.lost[:20]))
        missed = self.goals()
        lines.append("result     " + ("goals met" if not missed else
                                      "GOALS MISSED: " + "; ".join(missed)))
        return "\n".join(lines)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def _pct(x: float) -> str:
    return f"{x * 100:.4f}%"


def edge_view(doc: Any) -> dict[str, bool]:
    """``{region: routable}`` from the edge's ``/_nimbus/regions`` document:
    ``{"regions": {name: {...}}}`` or ``{"regions": [{"name": ...}]}``, each
    region saying ``up`` / ``healthy`` / ``routable`` (booleans) or
    ``status`` / ``state`` (``up``/``ok``/``healthy`` vs anything else)."""
    regions = doc.get("regions") if isinstance(doc, dict) else None
    items: list[tuple[Any, Any]]
    if isinstance(regions, list):
        items = [(r.get("name"), r) for r in regions if isinstance(r, dict)]
    elif isinstance(regions, dict):
        items = list(regions.items())
    else:
        return {}
    out: dict[str, bool] = {}
    for name, r in items:
        if not isinstance(name, str):
            continue
        if isinstance(r, bool):
            out[name] = r
            continue
        if not isinstance(r, dict):
            continue
        for key in ("up", "routable", "healthy"):
            if isinstance(r.get(key), bool):
                out[name] = bool(r[key])
                break
        else:
            for key in ("status", "state", "health"):
                if isinstance(r.get(key), str):
                    out[name] = r[key].lower() in ("up", "ok", "healthy")
                    break
    return out
