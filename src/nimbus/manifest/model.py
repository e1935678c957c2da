"""The app model every manifest form loads into.

Plain frozen dataclasses: cheap to build, hashable, and serialisable to the
JSON that the store keeps (``to_dict`` / ``from_dict``). Validation happens
once, in :mod:`nimbus.manifest.loader`; nothing here checks input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_MEMORY_MB = 128
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024
DEFAULT_MIN_INSTANCES = 0
DEFAULT_MAX_INSTANCES = 4
DEFAULT_TARGET_UTILISATION = 0.7  # target_concurrency defaults to concurrency x this
DEFAULT_STABLE_WINDOW_S = 60.0
DEFAULT_PANIC_WINDOW_S = 6.0  # or stable_window_s when that is shorter
DEFAULT_SCALE_TO_ZERO_AFTER_S = 30.0
DEFAULT_MAX_QUEUE = 100


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
    max_instances: int = DEFAULT_MAX_INSTANCES
    env: tuple[tuple[str, str], ...] = ()
    requirements: str | None = None  # path relative to the app folder
    # Autoscaling (issue 3). Fields added later keep defaults so that records
    # written before them still load (see from_dict).
    min_instances: int = DEFAULT_MIN_INSTANCES
    max_concurrency: int | None = None  # across all instances; None: no cap of its own
    # Defaults that depend on other fields are given as None and resolved on
    # construction, so after it both fields are always floats:
    # target_concurrency (in-flight requests per instance the autoscaler aims
    # for) to concurrency x DEFAULT_TARGET_UTILISATION, panic_window_s to
    # DEFAULT_PANIC_WINDOW_S or stable_window_s if that is shorter.
    target_concurrency: float | None = None
    stable_window_s: float = DEFAULT_STABLE_WINDOW_S
    panic_window_s: float | None = None
    scale_to_zero_after_s: float = DEFAULT_SCALE_TO_ZERO_AFTER_S
    max_queue: int = DEFAULT_MAX_QUEUE  # requests held waiting for an instance before 429
    preload: tuple[str, ...] = ()  # modules the function's zygote imports ahead of time

    def __post_init__(self) -> None:
        if self.target_concurrency is None:
            # Rounded so that 3 x 0.7 is 2.1, not 2.0999999999999996.
            object.__setattr__(self, "target_concurrency",
                               round(self.concurrency * DEFAULT_TARGET_UTILISATION, 6))
        if self.panic_window_s is None:
            object.__setattr__(self, "panic_window_s",
                               min(DEFAULT_PANIC_WINDOW_S, self.stable_window_s))

    @property
    def handler(self) -> str:
        return f"{self.module}.{self.callable}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["routes"] = [{"method": r.method, "path": r.path} for r in self.routes]
        d["env"] = dict(self.env)
        d["preload"] = list(self.preload)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionSpec:
        # Keys a newer nimbus added are ignored (records outlive versions of
        # nimbus: a rollback must still read them); keys missing from older
        # records take their defaults.
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["routes"] = tuple(Route(r["method"], r["path"]) for r in d.get("routes", ()))
        d["env"] = tuple(sorted(d.get("env", {}).items()))
        d["preload"] = tuple(d.get("preload", ()))
        return cls(**d)


@dataclass(frozen=True, slots=True)
class AppSpec:
    name: str
    source: str  # the manifest file it was read from
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    # Lines that the loader wants shown but that are not errors
    # (e.g. "runtime python3.8 is served by Python 3.11").
    notices: tuple[str, ...] = ()
