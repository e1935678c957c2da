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
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

SPAN_S = 900.0            # what the dashboard shows: 15 minutes
MAX_FRAMES = 1000         # a bound whatever the sampling rate
FINE_S = 120.0            # every frame of the last two minutes is kept ...
COARSE_S = 5.0            # ... and one every 5 s before that
MAX_FUNCTIONS = 200       # past this, further functions are left out of a frame
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
    # the histogram once packed: the bounds (shared by every frame) and the counts
    bounds: tuple[float, ...] = ()
    counts: array[float] | None = None

    def pack(self) -> None:
        """Keep the histogram as an array of counts beside shared bounds
        (about a tenth of the memory of a dict of floats)."""
        if self.buckets:
            key = tuple(sorted(self.buckets))
            self.bounds = _BOUNDS.setdefault(key, key)
            self.counts = array("d", (self.buckets[b] for b in self.bounds))
            self.buckets = {}

    def histogram(self) -> dict[float, float]:
        """``le -> cumulative count``, packed or not."""
        if self.counts is not None:
            return dict(zip(self.bounds, self.counts, strict=True))
        return self.buckets

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


_BOUNDS: dict[tuple[float, ...], tuple[float, ...]] = {}  # one tuple per distinct bucket list

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
    """The frames of the last ``span_s`` seconds, oldest first: every frame
    of the last ``fine_s`` seconds, one every ``coarse_s`` seconds before
    that (the charts draw 5 and 10 s steps; the table's last minute wants
    every sample), at most ``max_frames`` in all. Each frame's histograms
    are packed into arrays when it is added."""

    def __init__(self, span_s: float = SPAN_S, max_frames: int = MAX_FRAMES,
                 fine_s: float = FINE_S, coarse_s: float = COARSE_S) -> None:
        self.span_s = span_s
        self.max_frames = max_frames
        self.fine_s = fine_s
        self.coarse_s = coarse_s
        self._older: deque[Frame] = deque()
        self._recent: deque[Frame] = deque()

    @property
    def frames(self) -> list[Frame]:
        return [*self._older, *self._recent]

    def add(self, frame: Frame) -> None:
        newest = self._recent[-1] if self._recent else (self._older[-1] if self._older else None)
        if newest is not None and frame.t < newest.t:
            return  # a clock stepping back: keep the order
        for point in frame.functions.values():
            point.pack()
        self._recent.append(frame)
        while self._recent and self._recent[0].t < frame.t - self.fine_s:
            f = self._recent.popleft()
            if not self._older or f.t - self._older[-1].t >= self.coarse_s - 0.5:
                self._older.append(f)
        for q in (self._older, self._recent):
            while q and q[0].t < frame.t - self.span_s:
                q.popleft()
        while len(self._older) + len(self._recent) > self.max_frames:
            (self._older or self._recent).popleft()

    def latest(self) -> Frame | None:
        return self._recent[-1] if self._recent else (self._older[-1] if self._older else None)

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
    return quantiles((q,), before, after)[0]


def quantiles(qs: tuple[float, ...], before: dict[float, float],
              after: dict[float, float]) -> list[float | None]:
    """:func:`quantile` for each of ``qs``, the bucket differences taken once."""
    bounds = sorted(after)
    if not bounds:
        return [None] * len(qs)
    counts = []
    low = 0.0
    for le in bounds:
        # cumulative counts must not decrease (a reset mid-way can break that)
        low = max(low, increase(before.get(le, 0.0), after[le]))
        counts.append(low)
    total = counts[-1]
    if total <= 0:
        return [None] * len(qs)
    return [_rank(q * total, bounds, counts) for q in qs]


def _rank(rank: float, bounds: list[float], counts: list[float]) -> float | None:
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
    p50, p90, p99 = quantiles((0.5, 0.9, 0.99), pa.histogram(), pb.histogram())
    seconds = (b.t - a.t) if a is not None and b is not None else 0.0
    outcomes = set(pa.outcomes) | set(pb.outcomes)
    inc = {o: increase(pa.outcomes.get(o, 0.0), pb.outcomes.get(o, 0.0)) for o in outcomes}
    return Step(
        seconds=seconds,
        invocations=sum(inc.values()),
        errors=sum(inc.get(o, 0.0) for o in ERROR_OUTCOMES),
        throttled=inc.get("throttled", 0.0),
        cold_starts=increase(pa.cold_starts, pb.cold_starts),
        p50=p50, p90=p90, p99=p99)


def window(history: History, fn: str, seconds: float, now: float) -> Step:
    """Function ``fn`` over the last ``seconds`` before ``now`` (from the
    oldest frame inside the window when the history is shorter)."""
    newest = history.at(now)
    oldest = history.at(now - seconds)
    if oldest is None:
        frames = history.frames
        oldest = frames[0] if frames else None
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
