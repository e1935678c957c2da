"""The node budget's fair sharing: a pure decision, tested without processes."""

from __future__ import annotations

import pytest

from nimbus.worker.budget import NodeBudget, Usage, admit


def u(key, instances, idle=0, memory_mb=128, demand=0):
    return Usage(key, instances, idle, memory_mb, demand)


def test_room_left_starts():
    b = NodeBudget(max_instances=4, memory_mb=1024)
    assert admit(b, [u("a", 2), u("b", 2)], "a").verdict == "start"


def test_full_node_takes_an_idle_instance_from_the_biggest_function():
    b = NodeBudget(max_instances=4, memory_mb=10_000)
    # a hogs 4 (all idle); b wants its first instance (counted: 1)
    v = admit(b, [u("a", 4, idle=4), u("b", 1, demand=3)], "b")
    assert (v.verdict, v.victim) == ("evict", "a")


def test_function_at_its_fair_share_waits_for_its_own_instances():
    b = NodeBudget(max_instances=4, memory_mb=10_000)
    # fair share is 2 each; b already has 2 (+1 asked) and a has 2 idle
    v = admit(b, [u("a", 2, idle=2, demand=1), u("b", 3, demand=9)], "b")
    assert v.verdict == "deny" and "fair share" in v.reason


def test_busy_instances_are_never_reclaimed():
    b = NodeBudget(max_instances=2, memory_mb=10_000)
    v = admit(b, [u("a", 2, idle=0, demand=2), u("b", 1, demand=1)], "b")
    assert v.verdict == "deny"


def test_memory_budget_counts_too():
    b = NodeBudget(max_instances=100, memory_mb=512)
    assert admit(b, [u("a", 3, memory_mb=128), u("b", 1, memory_mb=128)], "b").verdict == "start"
    v = admit(b, [u("a", 3, idle=3, memory_mb=128), u("b", 2, memory_mb=128, demand=1)], "b")
    assert (v.verdict, v.victim) == ("evict", "a")


def test_budget_validation():
    with pytest.raises(ValueError, match="max_instances must be at least 1, was: 0"):
        NodeBudget(max_instances=0)
    with pytest.raises(ValueError, match="memory_mb cannot be negative"):
        NodeBudget(memory_mb=-1)
    assert NodeBudget().memory_mb > 0  # defaults to a share of the machine
