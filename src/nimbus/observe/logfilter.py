"""Which log records a reader asked for: since a time, from a level, of one
request. Pure: parsing takes ``now``, matching looks at one record.

Levels are ordered DEBUG < INFO < WARNING < ERROR < CRITICAL. A record
without a level (a plain ``print``, output written to stdout or stderr
directly) counts as INFO: ``--level INFO`` shows it, ``--level WARNING``
hides it. Platform lines always have a level (ERROR for failures,
WARNING for throttles and retries).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RANK = {name: i for i, name in enumerate(LEVELS)}
ALIASES = {"TRACE": "DEBUG", "WARN": "WARNING", "FATAL": "CRITICAL"}
UNLEVELLED = "INFO"  # what a record without a level counts as
_SPAN = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)\s*(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MAX_SINCE_S = 366 * 86400.0


def parse_level(raw: str) -> str:
    """``raw`` as one of :data:`LEVELS` (any case; Lambda's TRACE, WARN and
    FATAL too). Raises ValueError saying what is accepted."""
    name = raw.strip().upper()
    name = ALIASES.get(name, name)
    if name not in RANK:
        raise ValueError(f"must be one of {', '.join(LEVELS)}")
    return name


def parse_since(raw: str, now: float) -> float:
    """The epoch time ``raw`` names: a span back from ``now`` (``90s``,
    ``10m``, ``2h``, ``1d``, ``1h30m``) or an ISO 8601 time
    (``2026-12-01T23:00:00Z``; without an offset it is UTC). Raises
    ValueError saying what is accepted."""
    text = raw.strip()
    if not text:
        raise ValueError("must be a span such as 10m, 2h, 1d or an ISO time")
    spans = list(_SPAN.finditer(text))
    if spans and "".join(m.group(0) for m in spans).replace(" ", "") == text.replace(" ", ""):
        seconds = sum(float(m.group(1)) * _UNIT_S[m.group(2)] for m in spans)
        if seconds > MAX_SINCE_S:
            raise ValueError("is more than a year back")
        return now - seconds
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError("must be a span such as 10m, 2h, 1d or an ISO time such as "
                         "2026-12-01T23:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def level_of(record: dict[str, Any]) -> str:
    """A record's level for filtering (unlevelled lines count as INFO)."""
    level = record.get("level")
    return level if isinstance(level, str) and level in RANK else UNLEVELLED


@dataclass(frozen=True, slots=True)
class LogFilter:
    since: float | None = None  # epoch seconds: records at or after it
    level: str | None = None  # the least level shown
    request_id: str | None = None

    @property
    def empty(self) -> bool:
        return self.since is None and self.level is None and self.request_id is None

    def matches(self, record: dict[str, Any]) -> bool:
        if self.request_id is not None and record.get("rid") != self.request_id:
            return False
        if self.since is not None:
            ts = record.get("ts")
            if not isinstance(ts, int | float) or ts < self.since:
                return False
        return self.level is None or RANK[level_of(record)] >= RANK[self.level]

    def apply(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.empty:
            return list(records)
        return [r for r in records if self.matches(r)]
