"""The route table: (method, path) -> what to invoke, with path parameters.

Built once per change of the live apps and swapped whole; matching a static
path is one dict lookup. Templated paths (``/users/{id}``, ``/files/{key+}``)
are regular expressions tried most-specific first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nimbus.errors import MethodNotAllowedError, RouteNotFoundError

T = TypeVar("T")

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}")


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    target: T
    route_key: str
    path_params: dict[str, str] | None


class _Methods(Generic[T]):
    __slots__ = ("by_method", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.by_method: dict[str, T] = {}

    def get(self, method: str) -> tuple[T, str]:
        target = self.by_method.get(method)
        if target is not None:
            return target, f"{method} {self.path}"
        target = self.by_method.get("ANY")
        if target is not None:
            return target, f"ANY {self.path}"
        if method == "HEAD" and "GET" in self.by_method:
            return self.by_method["GET"], f"GET {self.path}"
        allowed = tuple(sorted(self.by_method))
        raise MethodNotAllowedError(
            f"method {method} is not allowed on {self.path}; allowed: {', '.join(allowed)}",
            allowed,
        )


def compile_path(path: str) -> re.Pattern[str] | None:
    """A regex for a templated path, or None for a static one."""
    if "{" not in path:
        return None
    out = ["^"]
    pos = 0
    for m in _PARAM.finditer(path):
        out.append(re.escape(path[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(path[pos:]))
    out.append("$")
    return re.compile("".join(out))


def _specificity(path: str) -> tuple[int, int, int]:
    # more literal characters first, then fewer params, greedy params last
    literal = len(_PARAM.sub("", path))
    return (-literal, path.count("{"), path.count("+}"))


class Router(Generic[T]):
    def __init__(self, routes: Iterable[tuple[str, str, T]] = ()) -> None:
        self._static: dict[str, _Methods[T]] = {}
        templated: dict[str, _Methods[T]] = {}
        for method, path, target in routes:
            table = self._static if "{" not in path else templated
            methods = table.get(path)
            if methods is None:
                methods = table[path] = _Methods(path)
            methods.by_method[method.upper()] = target
        self._templated = [
            (compile_path(p), m)
            for p, m in sorted(templated.items(), key=lambda kv: _specificity(kv[0]))
        ]

    def match(self, method: str, path: str) -> Match[T]:
        methods = self._static.get(path)
        if methods is not None:
            target, key = methods.get(method)
            return Match(target, key, None)
        for rx, methods in self._templated:
            m = rx.match(path)  # type: ignore[union-attr]
            if m is not None:
                target, key = methods.get(method)
                return Match(target, key, m.groupdict())
        raise RouteNotFoundError(f"no route for {method} {path}")
