"""The name of the region this process serves (``--region``; ``local`` by
default). One process belongs to one region: it is set once at start and
read wherever a name carries it (ARNs, ``AWS_REGION``, event shapes)."""

from __future__ import annotations

import re

REGION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_name = "local"


def check_region_name(name: str) -> str:
    """``name`` if it can name a region, else ``ValueError`` saying why."""
    if not REGION_NAME.fullmatch(name):
        raise ValueError(f"a region name is 1 to 64 letters, digits, '_' or '-', "
                         f"was {name!r}")
    return name


def set_region(name: str) -> None:
    global _name
    _name = name


def region() -> str:
    return _name
