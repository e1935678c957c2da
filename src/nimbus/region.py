"""The name of the region this process serves (``--region``; ``local`` by
default). One process belongs to one region: it is set once at start and
read wherever a name carries it (ARNs, ``AWS_REGION``, event shapes)."""

from __future__ import annotations

_name = "local"


def set_region(name: str) -> None:
    global _name
    _name = name


def region() -> str:
    return _name
