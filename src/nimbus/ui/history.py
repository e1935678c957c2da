"""The dashboard's memory of the metrics: the last 15 minutes, pure.

A *frame* is what every scraped process said at one moment, per function,
summed over versions and processes (a region's workers each count their own
invocations; the dashboard shows the function). :class:`History` keeps one
frame per sample in a bounded ring. Rates and percentiles come from
differences between two frames, as Prometheus computes ``rate()`` and
``histogram_quantile()``: nothing here reads a clock, every question takes
``now``.

Counters and per-process gauges (instances, in flight) add up over
processes; the async queue's gauges (queued, running, dead) are the queue's
state, which any process may report: the largest reading is kept.

A counter that goes down between two frames (a process restarted or left
the scrape) counts as no increase for that step rather than a negative one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

SPAN_S = 900.0            # what the dashboard shows: 15 minutes
MAX_FRAMES = 1000         # a frame a second, with room to spare
MAX_FUNCTIONS = 500       # past this, further functions are left out of a frame
ERROR_OUTCOMES = ("error", "timeout", "instance_died")
OUTCOMES = ("success", *ERROR_OUTCOMES, "throttled")


class SampleLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def value(self) -> float: ...


class FamilyLike(Protocol):
    @property
    def samples(self) -> list[Any]: ...


@dataclass(slots=True)
class FnPoint:
    """One function at one moment: counters are cumulative, gauges current."""
    outcomes: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)   # le -> cumulative count
    duration_count: float = 0.0
    cold_starts: float = 0.0
    instances: dict[str, float] = field(default_factory=dict)   # state -> count
    in_flight: float = 0.0
    held: float = 0.0
    desired: float = 0.0
    ready: float = 0.0
    async_status: dict[str, float] = field(default_factory=dict)
    dead_letters: float = 0.0
    versions: set[str] = field(default_factory=set)

    @property
    def invocations(self) -> float:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> float:
        return sum(self.outcomes.get(o, 0.0) for o in ERROR_OUTCOMES)

    @property
    def instance_count(self) -> float:
        return sum(self.instances.values())


@dataclass(slots=True)
class Frame:
    t: float
    functions: dict[str, FnPoint]


_GAUGES = {"nimbus_in_flight_requests": "in_flight", "nimbus_held_requests": "held",
           "nimbus_instances_desired": "desired", "nimbus_instances_ready": "ready"}


def frame_from(families: Iterable[FamilyLike], t: float,
               into: Frame | None = None) -> Frame:
    """The nimbus samples of ``families`` (from a registry's ``collect()`` or
    parsed exposition text) added into ``into`` (a new frame at ``t`` when
    None): call it once per scraped process to sum them."""
    frame = into if into is not None else Frame(t, {})
    fns = frame.functions
    for family in families:
        for s in family.samples:
            name: str = s.name
            if not name.startswith("nimbus_"):
                continue
            labels: dict[str, str] = s.labels
            fn = labels.get("function")
            if not fn:
                continue
            point = fns.get(fn)
            if point is None:
                if len(fns) >= MAX_FUNCTIONS:
                    continue
                point = fns[fn] = FnPoint()
            value = float(s.value)
            if math.isnan(value):
                continue
            version = labels.get("version")
            if version:
                point.versions.add(version)
            if name == "nimbus_invocations_total":
                key = labels.get("outcome", "")
                point.outcomes[key] = point.outcomes.get(key, 0.0) + value
            elif name == "nimbus_invocation_duration_seconds_bucket":
                le = float(labels.get("le", "inf"))
                point.buckets[le] = point.buckets.get(le, 0.0) + value
            elif name == "nimbus_invocation_duration_seconds_count":
                point.duration_count += value
            elif name == "nimbus_cold_starts_total":
                point.cold_starts += value
            elif name == "nimbus_instances":
                key = labels.get("state", "")
                point.instances[key] = point.instances.get(key, 0.0) + value
            elif name in _GAUGES:
                attr = _GAUGES[name]
                setattr(point, attr, getattr(point, attr) + value)
            elif name == "nimbus_async_invocations":
                # the queue's state as one process sees it: several processes
                # reporting the same queue must not add up
                key = labels.get("status", "")
                point.async_status[key] = max(point.async_status.get(key, 0.0), value)
            elif name == "nimbus_async_dead_letters_total":
                point.dead_letters += value
    return frame


def frame_from_text(text: str, t: float, into: Frame | None = None) -> Frame:
    """``frame_from`` of Prometheus exposition text (a scraped ``/metrics``)."""
    return frame_from(text_string_to_metric_families(text), t, into)


class History:
    """The frames of the last ``span_s`` seconds, oldest first, at most
    ``max_frames`` of them (a burst of samples cannot grow it)."""

    def __init__(self, span_s: float = SPAN_S, max_frames: int = MAX_FRAMES) -> None:
        self.span_s = span_s
        self.frames: deque[Frame] = deque(maxlen=max_frames)

    def add(self, frame: Frame) -> None:
        if self.frames and frame.t < self.frames[-1].t:
            return  # a clock stepping back: keep the order
        self.frames.append(frame)
        while self.frames and self.frames[0].t < frame.t - self.span_s:
            self.frames.popleft()

    def latest(self) -> Frame | None:
        return self.frames[-1] if self.frames else None

    def at(self, t: float) -> Frame | None:
        """The newest frame taken at or before ``t``."""
        return self.at_each([t])[0]

    def at_each(self, times: list[float]) -> list[Frame | None]:
        """``at(t)`` for each of ``times`` (ascending), in one pass."""
        out: list[Frame | None] = []
        frames = self.frames
        i, n = 0, len(frames)
        for t in times:
            while i < n and frames[i].t <= t:
                i += 1
            out.append(frames[i - 1] if i else None)
        return out

    def functions(self) -> list[str]:
        names: set[str] = set()
        for f in self.frames:
            names.update(f.functions)
        return sorted(names)


# -- questions: pure, ``now`` given ------------------------------------------------


def increase(before: float, after: float) -> float:
    """A counter's increase between two readings; a reset counts as none."""
    return after - before if after >= before else 0.0


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The ``q`` quantile (0..1) of the observations made between two
    readings of a cumulative histogram (``le -> count``), interpolated
    linearly inside its bucket as Prometheus's ``histogram_quantile``. None
    when nothing was observed. An answer in the ``+Inf`` bucket is the
    largest finite bound."""
    bounds = sorted(after)
    if not bounds:
        return None
    counts = [increase(before.get(le, 0.0), after[le]) for le in bounds]
    # cumulative counts must not decrease (a reset mid-way can break that)
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, le in enumerate(bounds):
        if counts[i] >= rank:
            if math.isinf(le):
                finite = [b for b in bounds if not math.isinf(b)]
                return finite[-1] if finite else None
            low = bounds[i - 1] if i else 0.0
            below = counts[i - 1] if i else 0.0
            inside = counts[i] - below
            if inside <= 0:
                return le
            return low + (le - low) * (rank - below) / inside
    return None  # not reached: counts[-1] >= rank


def _point(frame: Frame | None, fn: str) -> FnPoint:
    if frame is None:
        return FnPoint()
    return frame.functions.get(fn) or FnPoint()


@dataclass(frozen=True, slots=True)
class Step:
    """What happened to one function between two moments."""
    seconds: float
    invocations: float
    errors: float
    throttled: float
    cold_starts: float
    p50: float | None
    p90: float | None
    p99: float | None

    @property
    def rate(self) -> float:
        return self.invocations / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.seconds if self.seconds > 0 else 0.0


def step(fn: str, a: Frame | None, b: Frame | None) -> Step:
    """Function ``fn`` between frames ``a`` (older) and ``b``."""
    pa, pb = _point(a, fn), _point(b, fn)
    seconds = (b.t - a.t) if a is not None and b is not None else 0.0
    outcomes = set(pa.outcomes) | set(pb.outcomes)
    inc = {o: increase(pa.outcomes.get(o, 0.0), pb.outcomes.get(o, 0.0)) for o in outcomes}
    return Step(
        seconds=seconds,
        invocations=sum(inc.values()),
        errors=sum(inc.get(o, 0.0) for o in ERROR_OUTCOMES),
        throttled=inc.get("throttled", 0.0),
        cold_starts=increase(pa.cold_starts, pb.cold_starts),
        p50=quantile(0.5, pa.buckets, pb.buckets),
        p90=quantile(0.9, pa.buckets, pb.buckets),
        p99=quantile(0.99, pa.buckets, pb.buckets))


def window(history: History, fn: str, seconds: float, now: float) -> Step:
    """Function ``fn`` over the last ``seconds`` before ``now`` (from the
    oldest frame inside the window when the history is shorter)."""
    newest = history.at(now)
    oldest = history.at(now - seconds)
    if oldest is None and history.frames:
        oldest = history.frames[0]
    if oldest is newest:
        return step(fn, None, None)
    return step(fn, oldest, newest)


def boundaries(now: float, span_s: float, step_s: float) -> list[float]:
    """Sample times ``now - span_s .. now`` every ``step_s``, aligned to whole
    multiples of ``step_s`` so that charts do not shimmer between polls."""
    end = math.floor(now / step_s) * step_s
    n = int(span_s // step_s)
    return [end - (n - i) * step_s for i in range(n + 1)]


def steps(history: History, fn: str, now: float, span_s: float = SPAN_S,
          step_s: float = 10.0) -> Iterator[tuple[float, Step | None]]:
    """``(t, Step)`` for each ``step_s`` interval ending at ``t`` over the
    last ``span_s`` seconds; the Step is None where the history has no frame
    at the interval's start (before the process started)."""
    times = boundaries(now, span_s, step_s)
    frames = history.at_each(times)
    for i in range(1, len(times)):
        a, b = frames[i - 1], frames[i]
        yield times[i], None if a is None or b is None else step(fn, a, b)


def gauge_series(history: History, fn: str, now: float, attr: str,
                 span_s: float = SPAN_S, step_s: float = 10.0) -> list[float | None]:
    """A gauge of ``fn`` (an FnPoint attribute or property) at each boundary."""
    frames = history.at_each(boundaries(now, span_s, step_s)[1:])
    return [None if f is None else float(getattr(_point(f, fn), attr)) for f in frames]


def rounded(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)
