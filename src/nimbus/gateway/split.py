"""A weighted alias as a route target: picks a version per invocation.

Route sync makes a :class:`Split` only for an alias with two or more
versions taking traffic; a one-version alias is that version's plain
invoker, so a function that is not being rolled out pays nothing.

Per invocation: a client that sends ``x-nimbus-sticky`` (or the cookie
``nimbus-sticky``) is hashed to a bucket (crc32, the same in every gateway
process) and always lands on the same version while the weights stand; the
newest version owns the lowest buckets, so as its share grows a client
moves at most once, old to new. Without a key the pick is random by
weight. The tables are built once, here; a pick is a random number and a
short scan.
"""

from __future__ import annotations

import random
from typing import Any

from nimbus.rollout.traffic import bucket, bucket_table

STICKY_HEADER = "x-nimbus-sticky"
STICKY_COOKIE = "nimbus-sticky="


class Split:
    """Invoker over several versions of one function, by weight."""

    __slots__ = ("_buckets", "_by_version", "_cumulative", "_last", "alias", "choices",
                 "stable", "target")

    def __init__(self, alias: str, choices: list[tuple[int, int, Any]], stable: Any) -> None:
        """``choices``: (version, weight, invoker), weights summing to 100;
        ``stable``: the stable version's invoker (its ``target``, ``cap`` and
        logs stand for the function's)."""
        self.alias = alias
        self.choices = sorted(choices, key=lambda c: c[0], reverse=True)  # newest first
        self.stable = stable
        self.target = stable.target
        self._by_version = {v: inv for v, _w, inv in self.choices}
        serving = [(v, w, inv) for v, w, inv in self.choices if w > 0]
        if not serving:
            raise ValueError(f"alias {alias!r} sends no traffic anywhere")
        total = 0
        self._cumulative: list[tuple[int, Any]] = []
        for _v, w, inv in serving:
            total += w
            self._cumulative.append((total, inv))
        self._last = serving[-1][2]
        self._buckets = [(end, self._by_version[v])
                         for end, v in bucket_table({v: w for v, w, _ in serving})]

    @property
    def cap(self) -> int:
        return int(self.stable.cap)

    def log(self, rid: str | None, stream: str, text: str, level: str | None = None) -> None:
        self.stable.log(rid, stream, text, level)

    def for_version(self, version: int) -> Any | None:
        """The invoker of ``version`` if this alias still names it."""
        return self._by_version.get(version)

    def pick(self, sticky: str | None = None) -> Any:
        """The invoker for one invocation: by ``sticky``'s bucket, or at random by weight."""
        if sticky is None:
            r = random.random() * 100
            for end, inv in self._cumulative:
                if r < end:
                    return inv
            return self._last
        b = bucket(sticky)
        for end, inv in self._buckets:
            if b < end:
                return inv
        return self._last

    async def invoke(self, rid: str, event: Any) -> Any:
        return await self.pick(sticky_key(event)).invoke(rid, event)


def sticky_key(event: Any) -> str | None:
    """The client's sticky key in an HTTP event (payload 2.0 or 1.0): the
    ``x-nimbus-sticky`` header, else the ``nimbus-sticky`` cookie; None for
    anything else."""
    if type(event) is not dict:
        return None
    headers = event.get("headers")
    rest = "httpMethod" in event  # payload 1.0: header names as the client wrote them
    if headers:
        key = headers.get(STICKY_HEADER)
        if key is None and rest:
            key = _any_case(headers, STICKY_HEADER)
        if key is not None:
            return str(key)
    cookies = event.get("cookies")
    if cookies:
        for c in cookies:
            if c.startswith(STICKY_COOKIE):
                return str(c[len(STICKY_COOKIE):])
    elif headers:
        # a payload 1.0 event keeps them in their header
        raw = headers.get("cookie") or (_any_case(headers, "cookie") if rest else None)
        if raw:
            for c in raw.split(";"):
                c = c.strip()
                if c.startswith(STICKY_COOKIE):
                    return str(c[len(STICKY_COOKIE):])
    return None


def _any_case(headers: dict[str, Any], lower: str) -> Any:
    for name, value in headers.items():
        if name.lower() == lower:
            return value
    return None
