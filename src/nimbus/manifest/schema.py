"""Pydantic models for the two manifest forms, exactly as written in app.yaml.

Strict on purpose: YAML happily turns ``timeout_s: ten`` into a string and
``memory_mb: 1.5`` into a float, and a serverless config that silently
coerces is a config that surprises in production. Field descriptions are
the "expected ..." half of error messages (see :mod:`.errmap`); our own
validators raise errors of type ``nimbus`` whose message is used verbatim.
"""

from __future__ import annotations

import keyword
import re
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from nimbus.events.retry import MAX_DELAY_S
from nimbus.manifest.errmap import show
from nimbus.manifest.model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPHEMERAL_STORAGE_MB,
    DEFAULT_MAX_EVENT_AGE_S,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MEMORY_MB,
    DEFAULT_MIN_INSTANCES,
    DEFAULT_PANIC_WINDOW_S,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY_S,
    DEFAULT_SCALE_TO_ZERO_AFTER_S,
    DEFAULT_STABLE_WINDOW_S,
    DEFAULT_TIMEOUT_S,
    MISSED_POLICIES,
    RegionsSpec,
    RolloutSpec,
    is_provided,
)
from nimbus.manifest.routes import METHODS, PAYLOADS, path_problem

EVENTS = ("http", "schedule", "queue", "topic")
RUNTIME_RE = re.compile(r"python3(?:\.(\d+))?")
_APP_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FUNCTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}")
_ALIAS = re.compile(r"[a-z][a-z0-9-]{0,62}")


def fail(message: str) -> PydanticCustomError:
    # The message goes through a context value: paths like /users/{id}
    # must not be read as format placeholders.
    return PydanticCustomError("nimbus", "{msg}", {"msg": message})


def sanitise_app_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].strip("-")
    return name or "app"


def _app_name(v: Any) -> Any:
    if isinstance(v, str) and not _APP_NAME.fullmatch(v):
        raise fail(f"expected an app name of lower-case letters, digits and '-' (at most 63), "
                   f"got {show(v)}; did you mean {sanitise_app_name(v)!r}?")
    return v


def _function_name(v: Any) -> Any:
    if not isinstance(v, str) or not _FUNCTION_NAME.fullmatch(v):
        raise fail("expected a function name (a letter, then up to 63 letters, digits, "
                   f"'_' or '-'), got {show(v)}")
    return v


def _runtime(v: Any) -> Any:
    if not isinstance(v, str):
        raise fail(f"expected a runtime like 'python3.11', got {show(v)}")
    if not RUNTIME_RE.fullmatch(v) and not is_provided(v):
        raise fail(f"runtime {v!r} is not supported: only python3.x runtimes "
                   "(e.g. python3.11) and custom runtimes (provided.al2023, provided: an "
                   "executable bootstrap) are supported")
    return v


def _any_handler(v: Any) -> Any:
    if not isinstance(v, str) or not v or not v.isprintable():
        raise fail(f"expected a handler: 'module.callable' (e.g. api.get_user), or any "
                   f"string for a custom runtime, got {show(v)}")
    return v


def check_handler_ref(v: str) -> str | None:
    """What is wrong with ``v`` as a Python handler reference, or None."""
    parts = v.split(".")
    if len(parts) < 2 or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return f"expected 'module.callable' (e.g. api.get_user), got {show(v)}"
    return None


def _handler_ref(v: Any) -> Any:
    parts = v.split(".") if isinstance(v, str) else []
    if len(parts) < 2 or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise fail(f"expected 'module.callable' (e.g. api.get_user), got {show(v)}")
    return v


def _module_name(v: Any) -> Any:
    parts = v.split(".") if isinstance(v, str) else []
    if not parts or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise fail(f"expected a module name like 'jinja2' or 'os.path', got {show(v)}")
    return v


def _method(v: Any) -> Any:
    if not isinstance(v, str) or v.upper() not in METHODS:
        raise fail(f"expected one of {' '.join(METHODS)}, got {show(v)}")
    return v.upper()


def _path(v: Any) -> Any:
    if not isinstance(v, str):
        raise fail(f"expected a route path starting with '/', got {show(v)}")
    problem = path_problem(v)
    if problem:
        raise fail(f"invalid path {v!r}: {problem}")
    return v


def _alias(v: Any) -> Any:
    if not isinstance(v, str) or not _ALIAS.fullmatch(v) or v.isdigit():
        raise fail(f"expected an alias name (1 to 63 characters: lower-case letters, digits "
                   f"and '-', starting with a letter) like 'live' or 'beta', got {show(v)}")
    return v


def _payload(v: Any) -> Any:
    # YAML reads an unquoted 1.0 as a number: take it as the version it spells.
    if type(v) is float and f"{v:.1f}" in PAYLOADS:
        return f"{v:.1f}"
    if not isinstance(v, str) or v not in PAYLOADS:
        raise fail(f"expected a payload format version, \"1.0\" (API Gateway REST API, "
                   f"Lambda proxy) or \"2.0\" (HTTP API, the default), got {show(v)}")
    return v


def _event(v: Any) -> Any:
    if not isinstance(v, str) or v.lower() not in EVENTS:
        raise fail(f"unsupported event {show(v)}; valid events: {', '.join(EVENTS)}")
    return v.lower()


def _log_format(v: Any) -> Any:
    if not isinstance(v, str) or v.strip().upper() not in ("TEXT", "JSON"):
        raise fail(f"expected Text or JSON, got {show(v)}")
    return "JSON" if v.strip().upper() == "JSON" else "Text"


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = {"TRACE": "DEBUG", "WARN": "WARNING", "FATAL": "CRITICAL"}


def _log_level(v: Any) -> Any:
    name = v.strip().upper() if isinstance(v, str) else ""
    name = _LOG_LEVEL_ALIASES.get(name, name)
    if name not in _LOG_LEVELS:
        raise fail(f"expected one of {', '.join(_LOG_LEVELS)} (or Lambda's TRACE, WARN, "
                   f"FATAL), got {show(v)}")
    return name


def _queue_name(v: Any) -> Any:
    if not isinstance(v, str) or not _QUEUE_NAME.fullmatch(v):
        raise fail("expected a queue or topic name (1 to 80 letters, digits, '_' or '-'), "
                   f"got {show(v)}")
    return v


def _schedule_expression(v: Any) -> Any:
    from nimbus.events.schedule_expr import ScheduleError, parse_schedule

    if not isinstance(v, str):
        raise fail("expected a schedule like 'rate(5 minutes)', 'cron(0 12 * * ? *)' or "
                   f"'0 12 * * *', got {show(v)}")
    try:
        parse_schedule(v)
    except ScheduleError as exc:
        raise fail(str(exc)) from None
    return v.strip()


def _json_mapping(v: Any) -> Any:
    import orjson

    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise fail(f"expected a mapping with string keys, got {show(v)}")
    try:
        orjson.dumps(v)
    except TypeError as exc:
        raise fail(f"expected JSON values (mappings, lists, strings, numbers, booleans, "
                   f"null): {exc}") from None
    return v


def _timezone(v: Any) -> Any:
    import zoneinfo

    if not isinstance(v, str):
        raise fail(f"expected an IANA time zone like 'Europe/Paris', got {show(v)}")
    try:
        zoneinfo.ZoneInfo(v)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise fail(f"unknown time zone {v!r}; expected an IANA name like 'Europe/Paris'") from None
    return v


def _missed(v: Any) -> Any:
    if v not in MISSED_POLICIES:
        raise fail(f"expected one of {', '.join(MISSED_POLICIES)}, got {show(v)}")
    return v


def _one_or_many(v: Any) -> Any:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def _schedule_entry(v: Any) -> Any:
    return {"expression": v} if isinstance(v, str) else v


def _queue_trigger(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


def _env_key(v: Any) -> Any:
    if not isinstance(v, str) or not _ENV_KEY.fullmatch(v):
        raise fail("expected an environment variable name (letters, digits and '_', "
                   f"not starting with a digit), got {show(v)}")
    return v


def _env_value(v: Any) -> Any:
    # Environment values are strings; numbers and booleans are stringified
    # as YAML spells them (true, not True) since that is what the user typed.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if not isinstance(v, str):
        raise fail(f"expected a string, number or boolean, got {show(v)}")
    return v


def _requirements(v: Any) -> Any:
    if not isinstance(v, str) or not v.strip():
        raise fail(f"expected a path to a requirements file, got {show(v)}")
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts:
        # The file is shipped inside the app bundle; outside it, it would not exist.
        raise fail(f"requirements file {v!r} must be a path inside the app folder")
    return p.as_posix()


def _folder(v: Any) -> Any:
    if not isinstance(v, str) or not v.strip():
        raise fail(f"expected a folder inside the app folder, got {show(v)}")
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts:
        raise fail(f"folder {v!r} must be inside the app folder")
    return p.as_posix()


def _routes(v: Any) -> Any:
    # `http: {method: GET, path: /x}` is one route; `http:` with nothing is none.
    if v is None:
        return []
    return [v] if isinstance(v, dict) else v


def _checked_text(v: Any, parse: Any, what: str, example: str) -> Any:
    """``v`` stripped, once ``parse(v, what)`` accepts it (its UserInputError
    becomes this field's error)."""
    from nimbus.errors import UserInputError

    if not isinstance(v, str):
        raise fail(f"expected {example}, got {show(v)}")
    try:
        parse(v, what)
    except UserInputError as exc:
        raise fail(str(exc)) from None
    return v.strip()


def _strategy(v: Any) -> Any:
    from nimbus.rollout.policy import parse_strategy

    return _checked_text(v, parse_strategy, "strategy", "a strategy like 'canary:10%:5m', "
                         "'linear:20%:1m' or 'all-at-once'")


def _rule(v: Any) -> Any:
    from nimbus.rollout.policy import parse_rule

    return _checked_text(v, parse_rule, "rollback_on",
                         "a rule like 'error_rate > 2% or p99 > 2x baseline'")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h)?")
_UNIT_S = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def _bake(v: Any) -> Any:
    if isinstance(v, int | float) and not isinstance(v, bool):
        seconds = float(v)
    else:
        m = _DURATION.fullmatch(v.strip()) if isinstance(v, str) else None
        if m is None:
            raise fail(f"expected a duration like 30s, 5m or 1h (or seconds), got {show(v)}")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not 0 <= seconds <= 86400:
        raise fail(f"expected a duration from 0 to 24h, got {show(v)}")
    return seconds


def _waves(v: Any) -> Any:
    from nimbus.region import REGION_NAME

    if not isinstance(v, list) or not v:
        raise fail(f"expected a list of waves (a region name, or a list of them), got {show(v)}")
    waves = []
    seen: set[str] = set()
    for wave in v:
        names = wave if isinstance(wave, list) else [wave]
        if not names or not all(isinstance(n, str) and REGION_NAME.fullmatch(n)
                                for n in names):
            raise fail(f"expected a region name or a non-empty list of them, got {show(wave)}")
        for n in names:
            if n in seen:
                raise fail(f"region {n!r} is in two waves")
            seen.add(n)
        waves.append(tuple(names))
    return tuple(waves)


def _on_region_failure(v: Any) -> Any:
    from nimbus.manifest.model import ON_REGION_FAILURE

    if v not in ON_REGION_FAILURE:
        raise fail(f"expected one of {', '.join(ON_REGION_FAILURE)}, got {show(v)}")
    return v


AppName = Annotated[str, BeforeValidator(_app_name)]
FunctionName = Annotated[str, BeforeValidator(_function_name)]
Runtime = Annotated[str, BeforeValidator(_runtime)]
HandlerRef = Annotated[str, BeforeValidator(_handler_ref)]
AnyHandler = Annotated[str, BeforeValidator(_any_handler)]
Method = Annotated[str, BeforeValidator(_method)]
RoutePath = Annotated[str, BeforeValidator(_path)]
AliasName = Annotated[str, BeforeValidator(_alias)]
PayloadVersion = Annotated[str, BeforeValidator(_payload)]
EnvKey = Annotated[str, BeforeValidator(_env_key)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]
ModuleName = Annotated[str, BeforeValidator(_module_name)]
QueueName = Annotated[str, BeforeValidator(_queue_name)]
LogFormat = Annotated[str, BeforeValidator(_log_format)]
LogLevel = Annotated[str, BeforeValidator(_log_level)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class RolloutModel(_Model):
    """The ``rollout:`` block (app level, and per function to override it)."""

    strategy: Annotated[str, BeforeValidator(_strategy)] | None = None
    rollback_on: Annotated[str, BeforeValidator(_rule)] | None = None
    min_requests: int | None = Field(None, ge=1, le=1_000_000,
                                     description="an integer from 1 to 1000000")
    bake: Annotated[float, BeforeValidator(_bake)] | None = None
    waves: Annotated[tuple[tuple[str, ...], ...], BeforeValidator(_waves)] | None = None
    on_region_failure: Annotated[str, BeforeValidator(_on_region_failure)] | None = None

    def spec(self) -> RolloutSpec:
        return RolloutSpec(strategy=self.strategy, rollback_on=self.rollback_on,
                           min_requests=self.min_requests, bake_s=self.bake,
                           waves=self.waves, on_region_failure=self.on_region_failure)


class HttpRoute(_Model):
    method: Method = "GET"
    path: RoutePath = Field(description="a route path starting with '/'")
    alias: AliasName = Field(default="live",
                             description="the function's alias this route serves")
    payload: PayloadVersion = Field(default="2.0",
                                    description='the event format, "1.0" or "2.0"')


class ScheduleModel(_Model):
    expression: Annotated[str, BeforeValidator(_schedule_expression)] = Field(
        description="'rate(N unit)', 'cron(6 fields)' or a 5-field cron")
    timezone: Annotated[str, BeforeValidator(_timezone)] = "UTC"
    missed: Annotated[str, BeforeValidator(_missed)] = "once"
    input: Annotated[dict[str, Any], BeforeValidator(_json_mapping)] = Field(
        default_factory=dict, description="a mapping, passed as the event's detail")
    input_as_event: bool = False  # true: input is the whole event (EventBridge's Input)

    @model_validator(mode="after")
    def _expression_in_zone(self) -> ScheduleModel:
        from datetime import UTC, datetime

        from nimbus.events.schedule_expr import ScheduleError, parse_schedule

        try:
            sched = parse_schedule(self.expression, self.timezone)
        except ScheduleError as exc:
            raise fail(str(exc)) from None
        if sched.next_after(datetime.now(UTC)) is None:
            raise fail(f"{self.expression!r} has no tick from now on")
        return self


class QueueTrigger(_Model):
    name: QueueName = Field(description="a queue name")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=1000,
                            description="an integer from 1 to 1000")
    max_batching_window_s: float = Field(0.0, ge=0, le=300,
                                         description="a number of seconds from 0 to 300")
    report_batch_failures: bool = True


class Destination(_Model):
    function: Annotated[str, BeforeValidator(_function_name)] | None = None
    queue: QueueName | None = None
    topic: QueueName | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Destination:
        if [self.function, self.queue, self.topic].count(None) != 2:
            raise fail("expected exactly one of 'function: NAME', 'queue: NAME' or "
                       "'topic: NAME'")
        return self

    @property
    def ref(self) -> str:
        return (f"function:{self.function}" if self.function else
                f"queue:{self.queue}" if self.queue else f"topic:{self.topic}")


class Destinations(_Model):
    on_success: Destination | None = None
    on_failure: Destination | None = None
    # Lambda's dead-letter queue: the event itself, not a destination record
    dead_letter_queue: Destination | None = None


Schedules = Annotated[list[Annotated[ScheduleModel, BeforeValidator(_schedule_entry)]],
                      BeforeValidator(_one_or_many)]
Topics = Annotated[list[QueueName], BeforeValidator(_one_or_many)]

EVENT_KEYS = ("retries", "retry_delay_s", "max_event_age_s", "dead_letter", "destinations",
              "schedule", "queue", "topic", "trigger_alias")


class EventSettings(_Model):
    """Async and trigger keys, shared by both forms."""

    retries: int = Field(DEFAULT_RETRIES, ge=0, le=20, description="an integer from 0 to 20")
    retry_delay_s: float = Field(DEFAULT_RETRY_DELAY_S, gt=0, le=MAX_DELAY_S,
                                 description="a number of seconds greater than 0, at most "
                                 f"{MAX_DELAY_S:g} (the longest wait between tries)")
    max_event_age_s: float = Field(DEFAULT_MAX_EVENT_AGE_S, ge=1, le=DEFAULT_MAX_EVENT_AGE_S,
                                   description="a number of seconds from 1 to 21600")
    dead_letter: bool = True
    destinations: Destinations | None = None
    schedule: Schedules = Field(default_factory=list, description=(
        "a schedule expression, a mapping {expression, timezone, missed, input}, or a list"))
    queue: Annotated[QueueTrigger, BeforeValidator(_queue_trigger)] | None = Field(
        None, description="a queue name or {name, batch_size, max_batching_window_s}")
    topic: Topics = Field(default_factory=list, description="a topic name or a list of them")
    trigger_alias: AliasName | None = Field(
        None, description="the alias its schedule, queue and topic triggers invoke")


# Autoscaling keys, accepted by a rich-form function and by a short-form
# handler entry. Defaults that depend on other keys (target_concurrency, and
# panic_window_s when stable_window_s is shorter) and the checks between
# keys are the loader's: in the short form one function's keys may be spread
# over several handler entries.
MaxInstances = Annotated[int, Field(ge=1, le=1000, description="an integer from 1 to 1000")]
MinInstances = Annotated[int, Field(ge=0, description="an integer from 0 to max_instances")]
MaxConcurrency = Annotated[int | None, Field(
    ge=1, description="an integer of at least 1, or null for no cap")]
TargetConcurrency = Annotated[float | None, Field(
    gt=0, description="a number greater than 0 and at most concurrency, "
                      "or null for concurrency x 0.7")]
StableWindow = Annotated[float, Field(
    gt=0, le=3600, description="a number of seconds greater than 0 and at most 3600")]
PanicWindow = Annotated[float, Field(
    gt=0, description="a number of seconds greater than 0 and at most stable_window_s")]
ScaleToZeroAfter = Annotated[float, Field(
    ge=0, le=86400, description="a number of seconds from 0 to 86400")]
MaxQueue = Annotated[int, Field(ge=0, description="an integer of at least 0")]
Preload = Annotated[list[ModuleName], Field(
    description="a list of module names (e.g. [jinja2, os.path])")]

SCALING_KEYS = ("min_instances", "max_instances", "max_concurrency", "target_concurrency",
                "stable_window_s", "panic_window_s", "scale_to_zero_after_s", "max_queue",
                "preload", "log_format", "log_level")


class FunctionModel(EventSettings):
    # 'module.callable' is checked by the loader, which knows the runtime
    # (a custom runtime's handler is any string, given to its bootstrap).
    handler: AnyHandler = Field(description="'module.callable' (e.g. api.get_user); any "
                                            "string for a custom runtime")
    http: Annotated[list[HttpRoute], BeforeValidator(_routes)] = Field(
        default_factory=list, description="a route {method, path} or a list of routes")
    memory_mb: int = Field(DEFAULT_MEMORY_MB, ge=16, le=10240,
                           description="an integer from 16 to 10240 (megabytes)")
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=900,
                             description="a number of seconds greater than 0 and at most 900")
    concurrency: int = Field(1, ge=1, le=1000, description="an integer from 1 to 1000")
    max_processes: int = Field(DEFAULT_MAX_PROCESSES, ge=4, le=4096,
                               description="an integer from 4 to 4096 (processes and threads)")
    cpu: float | None = Field(None, gt=0, le=64,
                              description="a fraction of one core greater than 0 and at most 64,"
                                          " or null for no cap")
    ephemeral_storage_mb: int = Field(DEFAULT_EPHEMERAL_STORAGE_MB, ge=16, le=10240,
                                      description="an integer from 16 to 10240 (megabytes)")
    min_instances: MinInstances = DEFAULT_MIN_INSTANCES
    max_instances: MaxInstances = DEFAULT_MAX_INSTANCES
    max_concurrency: MaxConcurrency = None
    target_concurrency: TargetConcurrency = None
    stable_window_s: StableWindow = DEFAULT_STABLE_WINDOW_S
    panic_window_s: PanicWindow = DEFAULT_PANIC_WINDOW_S
    scale_to_zero_after_s: ScaleToZeroAfter = DEFAULT_SCALE_TO_ZERO_AFTER_S
    max_queue: MaxQueue = DEFAULT_MAX_QUEUE
    preload: Preload = []
    log_format: LogFormat | None = None
    log_level: LogLevel | None = None
    runtime: Runtime | None = None
    env: dict[EnvKey, EnvValue] = Field(
        default_factory=dict, description="a mapping of variable names to values")
    requirements: Annotated[str, BeforeValidator(_requirements)] | None = None
    code_dir: Annotated[str, BeforeValidator(_folder)] | None = None
    layers: list[Annotated[str, BeforeValidator(_folder)]] = Field(
        default_factory=list, description="a list of folders inside the app folder")
    rollout: RolloutModel | None = None


def _regions(v: Any) -> Any:
    """``regions: [eu, us]`` or ``{names, policy, weights}``: a RegionsSpec."""
    if isinstance(v, list):
        v = {"names": v}
    if not isinstance(v, dict):
        raise fail("expected a list of region names, or a mapping with names, policy "
                   "and weights")
    try:
        return RegionsSpec.from_dict(v)
    except ValueError as exc:
        raise fail(str(exc)) from None


Regions = Annotated[Any, BeforeValidator(_regions)]


class RichApp(_Model):
    name: AppName | None = None
    runtime: Runtime = "python3"
    regions: Regions = None
    rollout: RolloutModel | None = None
    functions: dict[FunctionName, FunctionModel] = Field(
        min_length=1, description="a mapping of function names to their settings")


class SeedHandler(EventSettings):
    function: FunctionName = Field(description="a function name")
    event: Annotated[str, BeforeValidator(_event)] = Field(
        description="'http', 'schedule', 'queue' or 'topic'")
    method: Method = "GET"
    path: RoutePath | None = None
    payload: PayloadVersion = "2.0"
    handler: HandlerRef | None = None
    min_instances: MinInstances = DEFAULT_MIN_INSTANCES
    max_instances: MaxInstances = DEFAULT_MAX_INSTANCES
    max_concurrency: MaxConcurrency = None
    target_concurrency: TargetConcurrency = None
    stable_window_s: StableWindow = DEFAULT_STABLE_WINDOW_S
    panic_window_s: PanicWindow = DEFAULT_PANIC_WINDOW_S
    scale_to_zero_after_s: ScaleToZeroAfter = DEFAULT_SCALE_TO_ZERO_AFTER_S
    max_queue: MaxQueue = DEFAULT_MAX_QUEUE
    preload: Preload = []
    log_format: LogFormat | None = None
    log_level: LogLevel | None = None


class SeedApp(_Model):
    name: AppName | None = None
    runtime: Runtime = "python3"
    regions: Regions = None
    rollout: RolloutModel | None = None
    handlers: list[SeedHandler] = Field(min_length=1, description="a non-empty list of handlers")
