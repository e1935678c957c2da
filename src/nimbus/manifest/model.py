"""The app model every manifest form loads into.

Plain frozen dataclasses: cheap to build, hashable, and serialisable to the
JSON that the store keeps (``to_dict`` / ``from_dict``). Validation happens
once, in :mod:`nimbus.manifest.loader`; nothing here checks input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nimbus.region import REGION_NAME

DEFAULT_MEMORY_MB = 128
DEFAULT_MAX_PROCESSES = 32  # tasks (processes and threads) per instance
DEFAULT_EPHEMERAL_STORAGE_MB = 512  # Lambda's default /tmp size
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024
DEFAULT_MIN_INSTANCES = 0
DEFAULT_MAX_INSTANCES = 4
DEFAULT_TARGET_UTILISATION = 0.7  # target_concurrency defaults to concurrency x this
DEFAULT_STABLE_WINDOW_S = 60.0
DEFAULT_PANIC_WINDOW_S = 6.0  # or stable_window_s when that is shorter
DEFAULT_SCALE_TO_ZERO_AFTER_S = 30.0
DEFAULT_MAX_QUEUE = 100
# Async invocations, Lambda's defaults.
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_S = 1.0
DEFAULT_MAX_EVENT_AGE_S = 6 * 3600.0
DEFAULT_BATCH_SIZE = 10
MISSED_POLICIES = ("once", "none", "all")


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP trigger: ``method`` upper-case (or ``ANY``), ``path`` like ``/users/{id}``."""

    method: str
    path: str
    alias: str = "live"  # the alias of the function this route serves
    # The event and response shape: "2.0" (HTTP API) or "1.0" (API Gateway
    # REST, Lambda proxy integration).
    payload: str = "2.0"

    @property
    def key(self) -> str:
        """The API Gateway ``routeKey``: ``"GET /users/{id}"``."""
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """One schedule trigger. ``missed``: what to do with ticks that passed
    while nothing was running: fire the latest ``once``, ``none`` or ``all``
    (bounded). ``input``: the event's ``detail`` (JSON object), or with
    ``input_as_event`` the whole event (as an EventBridge target's Input)."""

    expression: str
    timezone: str = "UTC"
    missed: str = "once"
    input: tuple[tuple[str, Any], ...] = ()
    input_as_event: bool = False

    def to_dict(self) -> dict[str, Any]:
        # input_as_event only when set: config hashes of older schedules stay
        return {"expression": self.expression, "timezone": self.timezone,
                "missed": self.missed, "input": dict(self.input)} | (
                    {"input_as_event": True} if self.input_as_event else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleSpec:
        return cls(d["expression"], d.get("timezone", "UTC"), d.get("missed", "once"),
                   tuple(sorted(d.get("input", {}).items())),
                   bool(d.get("input_as_event", False)))


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
    # Autoscaling. Fields added later keep defaults so that records
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
    # Async invocations and event triggers.
    retries: int = DEFAULT_RETRIES
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S  # the first; doubling each time
    max_event_age_s: float = DEFAULT_MAX_EVENT_AGE_S
    dead_letter: bool = True  # keep events that ran out of tries for redrive
    on_success: str | None = None  # "function:NAME", "queue:NAME" or "topic:NAME"
    on_failure: str | None = None
    schedules: tuple[ScheduleSpec, ...] = ()
    queue: str | None = None  # the queue whose messages this function consumes
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batching_window_s: float = 0.0
    topics: tuple[str, ...] = ()
    # The alias its schedule, queue and topic triggers invoke (None: live).
    trigger_alias: str | None = None
    # Containment: per-instance limits beside memory_mb.
    max_processes: int = DEFAULT_MAX_PROCESSES  # processes + threads, the instance's own counted
    cpu: float | None = None  # a fraction of one core; None: no CPU cap
    ephemeral_storage_mb: int = DEFAULT_EPHEMERAL_STORAGE_MB  # the private /tmp
    # The root logger's format ("Text" or "JSON") and level, as Lambda's
    # LoggingConfig; None: Text, and the level Python's logging starts with.
    log_format: str | None = None
    log_level: str | None = None
    # The handler module's import root relative to the app folder (SAM's
    # CodeUri; None: the app folder), and layer folders whose ``python``
    # folders follow it on sys.path, as Lambda's /var/task and /opt.
    code_dir: str | None = None
    layers: tuple[str, ...] = ()
    # False: a queue handler's batchItemFailures are ignored (the whole
    # batch succeeded if it returned), as Lambda without ReportBatchItemFailures.
    report_batch_failures: bool = True
    # Lambda's dead-letter queue: "queue:NAME" or "topic:NAME" gets an
    # async event that ran out of tries as it was (not a destination record).
    dead_letter_to: str | None = None

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
        """'module.callable'; a custom runtime's handler string as written."""
        return f"{self.module}.{self.callable}" if self.module else self.callable

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # A route on ``live`` is stored as before: its version's config hash
        # (and so whether a deploy makes a new version) does not change.
        d["routes"] = [{"method": r.method, "path": r.path}
                       | ({"alias": r.alias} if r.alias != "live" else {})
                       | ({"payload": r.payload} if r.payload != "2.0" else {})
                       for r in self.routes]
        d["env"] = dict(self.env)
        d["preload"] = list(self.preload)
        d["schedules"] = [s.to_dict() for s in self.schedules]
        d["topics"] = list(self.topics)
        if self.trigger_alias is None:  # as before it existed: config hashes unchanged
            del d["trigger_alias"]
        d["layers"] = list(self.layers)
        for key, default in _LATER_DEFAULTS:  # likewise
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionSpec:
        # Keys a newer nimbus added are ignored (records outlive versions of
        # nimbus: a rollback must still read them); keys missing from older
        # records take their defaults.
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["routes"] = tuple(Route(r["method"], r["path"], r.get("alias", "live"),
                                  r.get("payload", "2.0"))
                            for r in d.get("routes", ()))
        d["env"] = tuple(sorted(d.get("env", {}).items()))
        d["preload"] = tuple(d.get("preload", ()))
        d["schedules"] = tuple(ScheduleSpec.from_dict(s) for s in d.get("schedules", ()))
        d["topics"] = tuple(d.get("topics", ()))
        d["layers"] = tuple(d.get("layers", ()))
        return cls(**d)


PROVIDED_RUNTIMES = ("provided", "provided.al2", "provided.al2023")


def is_provided(runtime: str) -> bool:
    """A custom runtime: the function's code folder holds an executable
    ``bootstrap``, served the Lambda Runtime API."""
    return runtime in PROVIDED_RUNTIMES


def handler_text(spec: dict[str, Any]) -> str:
    """A stored function spec's handler as written: 'module.callable', or a
    custom runtime's string (its module is empty)."""
    module, func = spec.get("module", "?"), spec.get("callable", "?")
    return f"{module}.{func}" if module else str(func)


# Fields added after records existed, left out of to_dict while at their default.
_LATER_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("code_dir", None), ("layers", []), ("report_batch_failures", True),
    ("dead_letter_to", None))


ROUTING_POLICIES = ("failover", "weighted", "latency")


@dataclass(frozen=True, slots=True)
class RegionsSpec:
    """Where an app runs and how an edge routes it: ``names`` in order
    (``None``: every region of the cluster file, in the file's order), the
    policy, and the weights of ``weighted`` (region -> share)."""

    names: tuple[str, ...] | None = None
    policy: str = "failover"
    weights: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"names": None if self.names is None else list(self.names),
                "policy": self.policy, "weights": dict(self.weights)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegionsSpec:
        """The inverse of :meth:`to_dict`; ``ValueError`` naming the field
        that is wrong (it also reads what a client sends)."""
        if not isinstance(d, dict):
            raise ValueError("regions must be an object")
        unknown = set(d) - {"names", "policy", "weights"}
        if unknown:
            raise ValueError(f"regions has unknown field(s): {', '.join(sorted(unknown))}")
        names = d.get("names")
        policy = d.get("policy", "failover")
        weights = d.get("weights") or {}
        if names is not None and not (isinstance(names, list) and names and all(
                isinstance(n, str) and REGION_NAME.fullmatch(n) for n in names)):
            raise ValueError("regions.names must be a non-empty list of region names")
        if names is not None and len(set(names)) != len(names):
            raise ValueError("regions.names lists a region twice")
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"regions.policy must be one of {', '.join(ROUTING_POLICIES)}, "
                             f"was {policy!r}")
        if not isinstance(weights, dict) or not all(
                isinstance(k, str) and REGION_NAME.fullmatch(k) and type(v) is int
                and 0 <= v <= 1000 for k, v in weights.items()):
            raise ValueError("regions.weights must map region names to integers from 0 to 1000")
        if policy == "weighted":
            if not weights or not any(weights.values()):
                raise ValueError("regions.weights: policy weighted needs a weight above 0")
            if names is None:
                names = list(weights)
            missing = [n for n in weights if n not in names]
            if missing:
                raise ValueError(f"regions.weights names {', '.join(missing)}, "
                                 "not in regions.names")
        elif weights:
            raise ValueError(f"regions.weights only applies to policy weighted, not {policy}")
        return cls(names=None if names is None else tuple(names), policy=policy,
                   weights={n: weights.get(n, 0) for n in names or ()}
                   if policy == "weighted" else {})


ON_REGION_FAILURE = ("rollback-all", "stop")


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """How new versions of a function reach traffic (the manifest's
    ``rollout:`` block, the app's keys overridden by the function's). A key
    left out is ``None``: the deploy's flags or nimbus's defaults decide.
    Kept apart from :class:`FunctionSpec`: changing how a version rolls out
    does not make a new version."""

    strategy: str | None = None  # e.g. "canary:10%:5m", "linear:20%:1m", "all-at-once"
    rollback_on: str | None = None  # the rollback rule
    min_requests: int | None = None  # before a step may pass
    bake_s: float | None = None  # between regions
    waves: tuple[tuple[str, ...], ...] | None = None  # regions, wave by wave
    on_region_failure: str | None = None  # "rollback-all" (the default) or "stop"

    def merged(self, over: RolloutSpec) -> RolloutSpec:
        """This spec with every key ``over`` sets taking its place."""
        return RolloutSpec(**{k: getattr(over, k) if getattr(over, k) is not None
                              else getattr(self, k) for k in (f.name for f in fields(self))})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["waves"] = None if self.waves is None else [list(w) for w in self.waves]
        return d


@dataclass(frozen=True, slots=True)
class AppSpec:
    name: str
    source: str  # the manifest file it was read from
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    # Lines that the loader wants shown but that are not errors
    # (e.g. "runtime python3.8 is served by Python 3.11").
    notices: tuple[str, ...] = ()
    regions: RegionsSpec | None = None  # None: every region, failover in the file's order
    # function -> its rollout settings (app block merged with its own);
    # a function without any has none here
    rollouts: dict[str, RolloutSpec] = field(default_factory=dict)
