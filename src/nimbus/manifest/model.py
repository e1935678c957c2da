"""The app model every manifest form loads into.

Plain frozen dataclasses: cheap to build, hashable, and serialisable to the
JSON that the store keeps (``to_dict`` / ``from_dict``). Validation happens
once, in :mod:`nimbus.manifest.loader`; nothing here checks input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_MEMORY_MB = 128
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP trigger: ``method`` upper-case (or ``ANY``), ``path`` like ``/users/{id}``."""

    method: str
    path: str

    @property
    def key(self) -> str:
        """The API Gateway ``routeKey``: ``"GET /users/{id}"``."""
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    name: str
    module: str  # dotted module, relative to the app folder
    callable: str
    runtime: str = "python3"
    routes: tuple[Route, ...] = ()
    memory_mb: int = DEFAULT_MEMORY_MB
    timeout_s: float = DEFAULT_TIMEOUT_S
    concurrency: int = 1
    max_instances: int = 4
    env: tuple[tuple[str, str], ...] = ()
    requirements: str | None = None  # path relative to the app folder

    @property
    def handler(self) -> str:
        return f"{self.module}.{self.callable}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["routes"] = [{"method": r.method, "path": r.path} for r in self.routes]
        d["env"] = dict(self.env)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionSpec:
        d = dict(d)
        d["routes"] = tuple(Route(r["method"], r["path"]) for r in d.get("routes", ()))
        d["env"] = tuple(sorted(d.get("env", {}).items()))
        return cls(**d)


@dataclass(frozen=True, slots=True)
class AppSpec:
    name: str
    source: str  # the manifest file it was read from
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    # Lines that the loader wants shown but that are not errors
    # (e.g. "runtime python3.8 is served by Python 3.11").
    notices: tuple[str, ...] = ()
