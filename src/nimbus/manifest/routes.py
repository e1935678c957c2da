"""Route rules: what a valid path looks like and which routes collide.

The rules follow API Gateway HTTP APIs, which is what the gateway's router
(:mod:`nimbus.gateway.router`) matches: a parameter is a whole segment,
``{name}`` with an identifier name, and a greedy ``{name+}`` may only be last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PAYLOADS = ("1.0", "2.0")  # API Gateway REST (Lambda proxy), HTTP API
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "ANY")

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}")
_BAD_CHARS = re.compile(r"[\s?#]")


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a valid route path, or None if it is."""
    if not path.startswith("/"):
        return "a route path must start with '/'"
    if path == "/":
        return None
    if path == "/_nimbus" or path.startswith("/_nimbus/"):
        return "paths under /_nimbus/ are reserved for nimbus (its health check)"
    segments = path[1:].split("/")
    names: set[str] = set()
    for i, seg in enumerate(segments):
        if seg == "":
            return "a route path must not have empty segments ('//') or end with '/'"
        if _BAD_CHARS.search(seg):
            return f"segment {seg!r} contains whitespace, '?' or '#'"
        if "{" not in seg and "}" not in seg:
            continue
        m = _PARAM.fullmatch(seg)
        if m is None:
            return (f"segment {seg!r} is not a path parameter: a parameter is a whole segment "
                    "like {id} (or greedy {proxy+}) whose name is an identifier")
        name, greedy = m.groups()
        if greedy and i != len(segments) - 1:
            return f"greedy parameter {seg!r} is only allowed as the last segment"
        if name in names:
            return f"parameter {{{name}}} appears twice"
        names.add(name)
    return None


def shape(path: str) -> str:
    """Paths that match the same requests have the same shape: /users/{id} == /users/{uid}."""
    return _PARAM.sub(lambda m: "{+}" if m.group(2) else "{}", path)


@dataclass(frozen=True, slots=True)
class Declared:
    """One route as written, with where it was written (for messages)."""

    method: str
    path: str
    function: str
    field: str
    line: int
    alias: str = "live"
    payload: str = "2.0"


def collide(method: str, path: str, other_method: str, other_path: str) -> bool:
    """Whether two routes would match the same request. One path may have ANY
    beside other methods (the named method wins, as on API Gateway); one shape
    under two spellings of its parameters may not, whatever the methods (API
    Gateway refuses such siblings too, and the router tries one spelling)."""
    return shape(path) == shape(other_path) and (method == other_method or path != other_path)


def find_conflict(routes: list[Declared]) -> tuple[Declared, Declared] | None:
    """The first (earlier, later) pair of routes that would match the same request."""
    seen: dict[str, list[Declared]] = {}
    for route in routes:
        bucket = seen.setdefault(shape(route.path), [])
        for other in bucket:
            if collide(route.method, route.path, other.method, other.path):
                return other, route
        bucket.append(route)
    return None


def conflict_message(first: Declared, second: Declared) -> str:
    if (first.method, first.path) == (second.method, second.path):
        what = f"duplicate route {second.method} {second.path}"
    elif first.path != second.path:
        what = (f"route {second.method} {second.path} overlaps {first.method} {first.path} "
                "(one path with other parameter names; name them the same)")
    else:
        what = f"route {second.method} {second.path} overlaps {first.method} {first.path}"
    mine = "this function" if first.function == second.function else f"function {first.function!r}"
    return f"{what}: already declared by {mine} at {first.field} (line {first.line})"
