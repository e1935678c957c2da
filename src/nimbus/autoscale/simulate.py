"""Run a :class:`~nimbus.autoscale.decider.Decider` over a traffic trace.

A trace is a function of time giving the observed concurrency (in-flight
plus held invocations; with held requests counted it is the offered load,
whatever the capacity). Each tick the simulation records a sample, asks for
a decision and carries it out on a model of the pool:

- instances asked for at tick ``i`` become ready at tick
  ``i + start_delay_ticks`` (0: ready for the next tick's decision too;
  the decision sees only ready instances, not starting ones);
- a lower desired count cancels pending starts first, then removes ready
  instances at once (a draining instance takes no new requests, so it is
  not ready).

Pure and deterministic: time is ``start_s + i * tick_s``, nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nimbus.autoscale.decider import Decider, ScalingConfig


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    concurrency: float  # the sample recorded at ``now``
    ready: int  # ready instances the decision was given
    desired: int
    panic: bool
    reason: str


def simulate(config: ScalingConfig, demand: Callable[[float], float], until_s: float, *,
             tick_s: float = 0.5, start_delay_ticks: int = 1, start_s: float = 0.0,
             arrivals: Callable[[float, float], int] | None = None) -> list[Tick]:
    """Ticks from ``start_s`` to ``until_s`` inclusive. ``arrivals(now,
    concurrency)`` gives the requests that arrived since the previous tick;
    by default one whenever the concurrency is above zero."""
    if not 0 < tick_s <= 1.0:
        raise ValueError(f"tick_s must be in (0, 1], was: {tick_s!r}")
    if start_delay_ticks < 0:
        raise ValueError(f"start_delay_ticks cannot be negative, was: {start_delay_ticks!r}")
    count = arrivals or (lambda _now, c: 1 if c > 0 else 0)
    decider = Decider(config)
    ready = 0
    pending: list[int] = []  # the tick at which each starting instance is ready
    curve: list[Tick] = []
    i = 0
    while (now := start_s + i * tick_s) <= until_s + 1e-9:
        ready += sum(1 for due in pending if due <= i)
        pending = [due for due in pending if due > i]
        c = demand(now)
        decider.record(now, c, count(now, c))
        decision = decider.decide(now, ready)
        curve.append(Tick(now, c, ready, decision.desired, decision.panic, decision.reason))
        ready, pending = _carry_out(decision.desired, ready, pending, i + start_delay_ticks)
        i += 1
    return curve


def _carry_out(desired: int, ready: int, pending: list[int], due: int) -> tuple[int, list[int]]:
    if desired > ready + len(pending):
        pending = pending + [due] * (desired - ready - len(pending))
    elif desired < ready + len(pending):
        keep = max(desired - ready, 0)  # cancel the latest starts first
        pending = sorted(pending)[:keep]
        ready = min(ready, desired)
    return ready, pending


def at(curve: Sequence[Tick], now: float) -> Tick:
    """The tick at ``now`` (the first one at or after it)."""
    for tick in curve:
        if tick.now >= now - 1e-9:
            return tick
    raise ValueError(f"the curve ends at {curve[-1].now!r}, before {now!r}")


def direction_changes(values: Sequence[int]) -> int:
    """How often a sequence turns from rising to falling or back (flapping)."""
    moves = [b - a for a, b in zip(values, values[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if (a > 0) != (b > 0))
