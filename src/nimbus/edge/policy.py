"""Which regions to try for a request, best first. Pure."""

from __future__ import annotations

import random

from nimbus.edge.types import RegionsSpecLike

POLICIES = ("failover", "weighted", "latency")
LATENCY_TIE_S = 0.002       # latencies this close (or within 20%) are a tie
LATENCY_TIE_RATIO = 0.2


def region_order(spec: RegionsSpecLike | None, cluster_order: tuple[str, ...], up: set[str],
                 latency: dict[str, float | None], rng: random.Random) -> list[str]:
    """The regions to try, best first: the healthy ones ordered by the
    policy, then (last resort) the rest in the spec's order.

    - failover: the spec's order (the cluster file's when it names none);
    - weighted: the first region drawn by weight among the healthy ones,
      then the other healthy ones by weight (heaviest first);
    - latency: lowest smoothed latency first (unmeasured last); regions
      within 2 ms or 20% of the fastest are a tie, kept in the app's order.

    Regions the cluster file does not know are skipped."""
    known = set(cluster_order)
    if spec is None:
        names: tuple[str, ...] = cluster_order
        policy = "failover"
    else:
        policy = spec.policy
        names = spec.names if spec.names is not None else (
            tuple(spec.weights) if policy == "weighted" and spec.weights else cluster_order)
    names = tuple(n for n in names if n in known)
    healthy = [n for n in names if n in up]
    rest = [n for n in names if n not in up]
    if policy == "weighted" and len(healthy) > 1:
        weights = spec.weights if spec is not None else {}
        healthy = _weighted(healthy, weights, rng)
    elif policy == "latency" and len(healthy) > 1:
        healthy = _by_latency(healthy, latency)
    return healthy + rest


def _by_latency(healthy: list[str], latency: dict[str, float | None]) -> list[str]:
    """Fastest first; regions within LATENCY_TIE of the fastest count as
    equally fast and keep the app's order, so noise of a fraction of a
    millisecond does not move traffic back and forth."""
    ranked = sorted(healthy, key=lambda n: _or_inf(latency.get(n)))
    best = _or_inf(latency.get(ranked[0]))
    if best == float("inf"):
        return healthy
    band = best + max(LATENCY_TIE_S, LATENCY_TIE_RATIO * best)
    near = [n for n in healthy if _or_inf(latency.get(n)) <= band]
    return near + [n for n in ranked if n not in near]


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


def _weighted(healthy: list[str], weights: dict[str, int], rng: random.Random) -> list[str]:
    total = sum(max(0, weights.get(n, 0)) for n in healthy)
    by_weight = sorted(healthy, key=lambda n: -max(0, weights.get(n, 0)))
    if total <= 0:
        return by_weight
    x = rng.random() * total
    first = by_weight[-1]
    for n in healthy:
        x -= max(0, weights.get(n, 0))
        if x < 0:
            first = n
            break
    return [first] + [n for n in by_weight if n != first]
