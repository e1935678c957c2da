"""How async work maps onto ``Queue`` names, and who consumes each queue.

Every consumer has a queue of its own, so a slow or failing function never
holds up another's work:

* ``fn/<function>``: async invocations of the function (invoke ``--async``,
  HTTP with ``X-Nimbus-Invocation-Type: Event``, schedule ticks,
  destinations);
* ``q/<queue>``: a manifest ``queue:`` (one consumer per queue);
* ``topic/<topic>/<function>``: one subscription of a topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["invoke", "queue", "topic"]


def invoke_queue(function: str) -> str:
    return f"fn/{function}"


def user_queue(name: str) -> str:
    return f"q/{name}"


def topic_queue(topic: str, function: str) -> str:
    return f"topic/{topic}/{function}"


@dataclass(frozen=True, slots=True)
class Subscription:
    """One consumer: ``function`` runs the messages of ``queue``."""

    queue: str  # the storage queue name
    function: str
    kind: Kind
    source: str  # the function, queue or topic name as the user wrote it
