"""The node's budget of instances and memory, shared fairly between functions.

A pure decision: given what every pool holds, may one more instance of
``requester`` start, must an idle instance of another function make room
first, or must the requester make do with what it has? Fairness is
max-min: a function below its fair share (the budget split evenly between
functions that have instances or demand) may take an idle instance from
the function furthest above its share; a function at or above its share
waits for its own instances.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal


def _default_memory_mb() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4096
    return int(pages * 0.75 / (1024 * 1024))


@dataclass(frozen=True, slots=True)
class NodeBudget:
    max_instances: int = 256
    memory_mb: int = 0  # 0: three quarters of the machine's memory

    def __post_init__(self) -> None:
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be at least 1, was: {self.max_instances}")
        if self.memory_mb < 0:
            raise ValueError(f"memory_mb cannot be negative, was: {self.memory_mb}")
        if self.memory_mb == 0:
            object.__setattr__(self, "memory_mb", _default_memory_mb())


@dataclass(frozen=True, slots=True)
class Usage:
    key: object
    instances: int  # ready + starting (the requester's new one included)
    idle: int  # ready instances with nothing in flight
    memory_mb: int  # per instance
    demand: int  # in-flight + held requests


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Literal["start", "evict", "deny"]
    victim: object = None  # the key whose idle instance makes room, for "evict"
    reason: str = ""


def admit(budget: NodeBudget, usages: list[Usage], requester: object) -> Admission:
    """May ``requester`` (whose ``Usage.instances`` already counts the new
    instance) start it?"""
    total = sum(u.instances for u in usages)
    memory = sum(u.instances * u.memory_mb for u in usages)
    if total <= budget.max_instances and memory <= budget.memory_mb:
        return Admission("start")
    active = [u for u in usages if u.instances or u.demand]
    share = budget.max_instances / max(len(active), 1)
    me = next(u for u in usages if u.key == requester)
    if me.instances - 1 >= share:
        return Admission("deny", reason=f"node budget full and this function holds "
                                        f"{me.instances - 1} instances, its fair share is "
                                        f"{share:.0f}")
    over = sorted((u for u in usages if u.key != requester and u.idle),
                  key=lambda u: u.instances - share, reverse=True)
    if over and over[0].instances >= me.instances:
        return Admission("evict", victim=over[0].key)
    return Admission("deny", reason="node budget full and no idle instance to reclaim")
