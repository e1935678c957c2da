"""Where a region's instances run: a pure decision over counts.

``place`` takes how many instances each target should have (``"fn@version"``
-> n, from the leader's deciders), the live workers with their budgets and
what they run now, and returns the new placement per worker. It is a
function of its inputs only, so a new leader that starts from the
placements in the store computes the same answer the old one would have.

Rules, in the order they are applied:

1. Dead workers are ignored: their instances are simply missing from the
   current placement and get placed again like any other shortfall.
2. Keep: every current placement of a wanted target stays, except what is
   beyond a worker's budget (instances, memory: the targets with the most
   instances there give first) and beyond the target's desired count (taken
   from the workers holding the most of it).
3. Add: each missing instance goes to the worker with room that holds the
   fewest of that target, then the least loaded (fraction of its instance
   and memory budgets), then by id: new instances spread on their own.
4. Spread: a target with two or more instances all on one worker moves one
   of them to another worker if any has room, so one machine's loss never
   takes every instance of a function. Only then does anything move.

A target that does not fit anywhere gets fewer instances than desired
(:func:`shortfall` says how many): the budgets always hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Placement = dict[str, dict[str, int]]  # worker id -> target -> instances


@dataclass(frozen=True, slots=True)
class WorkerState:
    id: str
    max_instances: int  # instance budget of the node
    memory_mb: int  # memory budget of the node
    placed: Mapping[str, int] = field(default_factory=dict)  # current placement
    alive: bool = True


def target_key(function: str, version: int) -> str:
    return f"{function}@{version}"


def parse_target_key(key: str) -> tuple[str, int]:
    """``"fn@3"`` -> ``("fn", 3)``; ``ValueError`` naming the key otherwise."""
    fn, sep, version = key.rpartition("@")
    if not sep or not fn or not version.isdigit():
        raise ValueError(f"target key must look like 'function@version', was: {key!r}")
    return fn, int(version)


class _Node:
    def __init__(self, w: WorkerState, memory: Mapping[str, int]) -> None:
        self.id = w.id
        self.max_instances = w.max_instances
        self.memory_mb = w.memory_mb
        self.memory = memory
        self.counts: dict[str, int] = {}

    @property
    def instances(self) -> int:
        return sum(self.counts.values())

    @property
    def used_mb(self) -> int:
        return sum(n * self.memory[t] for t, n in self.counts.items())

    def fits(self, target: str) -> bool:
        return (self.instances + 1 <= self.max_instances
                and self.used_mb + self.memory[target] <= self.memory_mb)

    def load(self) -> float:
        a = self.instances / self.max_instances if self.max_instances > 0 else 1.0
        b = self.used_mb / self.memory_mb if self.memory_mb > 0 else 1.0
        return max(a, b)

    def add(self, target: str, n: int = 1) -> None:
        self.counts[target] = self.counts.get(target, 0) + n

    def remove(self, target: str, n: int = 1) -> None:
        left = self.counts[target] - n
        if left > 0:
            self.counts[target] = left
        else:
            del self.counts[target]


def _check(desired: Mapping[str, int], workers: list[WorkerState],
           memory_mb: Mapping[str, int]) -> None:
    for t, n in desired.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"desired[{t!r}] must be a non-negative integer, was: {n!r}")
        m = memory_mb.get(t)
        if n and (not isinstance(m, int) or isinstance(m, bool) or m <= 0):
            raise ValueError(f"memory_mb[{t!r}] must be a positive integer, was: {m!r}")
    seen: set[str] = set()
    for w in workers:
        if w.id in seen:
            raise ValueError(f"worker {w.id!r} appears twice")
        seen.add(w.id)
        if w.max_instances < 0 or w.memory_mb < 0:
            raise ValueError(f"worker {w.id!r} has a negative budget")


def place(desired: Mapping[str, int], workers: list[WorkerState],
          memory_mb: Mapping[str, int]) -> Placement:
    """The new placement of every live worker (each live worker has an
    entry, possibly empty). Raises ``ValueError`` for bad input."""
    _check(desired, workers, memory_mb)
    wanted = {t: n for t, n in desired.items() if n > 0}
    alive = sorted((w for w in workers if w.alive), key=lambda w: w.id)
    nodes = [_Node(w, memory_mb) for w in alive]

    # 2. keep what is wanted and fits the budgets
    for node, w in zip(nodes, alive, strict=True):
        for t, n in w.placed.items():
            if t in wanted and n > 0:
                node.add(t, n)
        while node.counts and (node.instances > node.max_instances
                               or node.used_mb > node.memory_mb):
            biggest = max(node.counts, key=lambda t: (node.counts[t], t))
            node.remove(biggest)
    for t, n in wanted.items():
        excess = sum(node.counts.get(t, 0) for node in nodes) - n
        while excess > 0:
            holder = max((node for node in nodes if node.counts.get(t)),
                         key=lambda node: (node.counts[t], node.id))
            holder.remove(t)
            excess -= 1

    # 3 and 4, until nothing moves: a spread move frees room on its source,
    # which may let a short target grow or an earlier target move too. It
    # ends: a target moves at most once (the move leaves it spread, and
    # adding never gathers it on one worker again).
    while True:
        _add_missing(nodes, wanted)
        if not _spread_one(nodes, wanted):
            break
    return {node.id: dict(sorted(node.counts.items())) for node in nodes}


def _add_missing(nodes: list[_Node], wanted: Mapping[str, int]) -> None:
    """Each missing instance to the worker with room holding the fewest of
    its target, then the least loaded, then by id."""
    for t in sorted(wanted):
        missing = wanted[t] - sum(node.counts.get(t, 0) for node in nodes)
        for _ in range(missing):
            room = [node for node in nodes if node.fits(t)]
            if not room:
                break
            best = min(room, key=lambda node: (node.counts.get(t, 0), node.load(), node.id))
            best.add(t)


def _spread_one(nodes: list[_Node], wanted: Mapping[str, int]) -> bool:
    """Move one instance of a target gathered on one worker (two or more
    there, none elsewhere) to another with room; True if one moved."""
    for t in sorted(wanted):
        holders = [node for node in nodes if node.counts.get(t)]
        if len(holders) != 1 or holders[0].counts[t] < 2:
            continue
        only = holders[0]
        room = [node for node in nodes if node is not only and node.fits(t)]
        if room:
            only.remove(t)
            min(room, key=lambda node: (node.load(), node.id)).add(t)
            return True
    return False


def shortfall(desired: Mapping[str, int], placement: Placement) -> dict[str, int]:
    """Instances wanted but not placed anywhere (no room), per target."""
    out: dict[str, int] = {}
    for t, n in desired.items():
        placed = sum(p.get(t, 0) for p in placement.values())
        if placed < n:
            out[t] = n - placed
    return out


def totals(placement: Placement) -> dict[str, int]:
    """Instances placed per target, over every worker."""
    out: dict[str, int] = {}
    for p in placement.values():
        for t, n in p.items():
            out[t] = out.get(t, 0) + n
    return out
