"""An app as a SAM template: the way back out to AWS.

:func:`template_for` turns an :class:`AppSpec` into the SAM template (a
plain dict, with :class:`Ref`, :class:`GetAtt` and :class:`Sub` for the
intrinsics) that ``sam deploy`` would deploy, plus warning lines for what
Lambda has no place for or takes only in another form. :func:`dump` writes
it as YAML with CloudFormation's short tags; :func:`export_sam` does both
and copies the app's code beside the template.

What SAM cannot say is kept in a ``Metadata: {nimbus: {...}}`` block on the
function (keys as in ``app.yaml``), so the template loses nothing nimbus
needs to serve the app again; AWS ignores it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nimbus.errors import UserInputError
from nimbus.manifest.model import (
    DEFAULT_EPHEMERAL_STORAGE_MB,
    DEFAULT_MAX_EVENT_AGE_S,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PANIC_WINDOW_S,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY_S,
    DEFAULT_SCALE_TO_ZERO_AFTER_S,
    DEFAULT_STABLE_WINDOW_S,
    DEFAULT_TARGET_UTILISATION,
    AppSpec,
    FunctionSpec,
    RolloutSpec,
    Route,
)

TEMPLATE_NAME = "template.yaml"
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10240
LAMBDA_MAX_RETRIES = 2
LAMBDA_MIN_EVENT_AGE_S = 60
LAMBDA_MAX_BATCHING_WINDOW_S = 300
LAMBDA_MIN_EPHEMERAL_MB = 512
SQS_MAX_VISIBILITY_S = 43200
NIMBUS_ACCOUNT = "000000000000"  # the account id in the ARNs nimbus makes
DEFAULT_PYTHON = "python3.11"  # the Lambda runtime for a bare ``python3``
# Python runtimes Lambda no longer creates functions with; nimbus serves
# them with its own Python 3.11, so that is what they become.
RETIRED_PYTHON = {"python2.7", "python3.6", "python3.7"}
DEPRECATED_PYTHON = {"python3.8", "python3.9"}  # still created, for now
ALIAS = "live"  # AutoPublishAlias: the alias nimbus's routes and triggers serve
# Folders never copied: state, virtual environments, caches, VCS.
SKIP_NAMES = {".nimbus", ".venv", "venv", "__pycache__", ".git", ".aws-sam", ".pytest_cache",
              ".mypy_cache", ".ruff_cache", "node_modules"}
MANIFEST_FILES = {"app.yaml", "app.yml", "template.yaml", "template.yml"}

# Environment variables Lambda sets itself and refuses in a function's configuration.
LAMBDA_RESERVED_ENV = frozenset({
    "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR"})
# Python's level names as Lambda's ApplicationLogLevel spells them.
LAMBDA_LOG_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR",
                     "CRITICAL": "FATAL"}

# CodeDeploy's predefined Lambda deployment configurations: (kind, share %, minutes).
CODEDEPLOY_TYPES: dict[tuple[str, int, float], str] = {
    ("canary", 10, 5): "Canary10Percent5Minutes",
    ("canary", 10, 10): "Canary10Percent10Minutes",
    ("canary", 10, 15): "Canary10Percent15Minutes",
    ("canary", 10, 30): "Canary10Percent30Minutes",
    ("linear", 10, 1): "Linear10PercentEvery1Minute",
    ("linear", 10, 2): "Linear10PercentEvery2Minutes",
    ("linear", 10, 3): "Linear10PercentEvery3Minutes",
    ("linear", 10, 10): "Linear10PercentEvery10Minutes",
}


# -- intrinsics and the YAML dumper -------------------------------------------------

class Ref(str):
    """``!Ref LogicalId``."""


class GetAtt(str):
    """``!GetAtt LogicalId.Attribute``."""


class Sub(str):
    """``!Sub 'text with ${Refs}'``."""


_TAGS = ("!Ref", "!GetAtt", "!Sub")


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order given, short intrinsic tags."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)  # lists indented under their key

    def choose_scalar_style(self) -> Any:
        # A tagged scalar is never implicit, so PyYAML would quote it:
        # ``!Ref 'Queue'``. Plain where plain is safe: ``!Ref Queue``.
        event = self.event
        if (isinstance(event, yaml.ScalarEvent) and event.tag in _TAGS and not event.style
                and self.analysis is None):
            self.analysis = self.analyze_scalar(event.value)
        if (isinstance(event, yaml.ScalarEvent) and event.tag in _TAGS and not event.style
                and self.analysis is not None and self.analysis.allow_block_plain
                and not self.analysis.empty and not self.analysis.multiline):
            return ""
        return super().choose_scalar_style()


def _tagged(tag: str) -> Any:
    def represent(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar(tag, str(value))
    return represent


for _cls, _tag in ((Ref, "!Ref"), (GetAtt, "!GetAtt"), (Sub, "!Sub")):
    _Dumper.add_representer(_cls, _tagged(_tag))


def dump(template: dict[str, Any]) -> str:
    return yaml.dump(template, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


# -- the mapping ----------------------------------------------------------------------

@dataclass
class Export:
    """A template and the lines that say what changed or had no place in it."""

    template: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


_ID_PART = re.compile(r"[A-Za-z0-9]+")


def camel(text: str) -> str:
    """``send-mail`` -> ``SendMail``: a CloudFormation logical id part."""
    out = "".join(p[:1].upper() + p[1:] for p in _ID_PART.findall(text))
    return out or "X"


class _Ids:
    """Logical ids, each used once."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, wanted: str) -> str:
        wanted = wanted if wanted[:1].isalpha() else "R" + wanted
        got, n = wanted, 2
        while got.lower() in self.used:  # CloudFormation ids are case-sensitive; be safe
            got, n = f"{wanted}{n}", n + 1
        self.used.add(got.lower())
        return got


def template_for(app: AppSpec) -> Export:
    """The SAM template of ``app`` and the warnings, one line each."""
    out = Export({})
    ids = _Ids()
    fn_ids = {name: ids.take(name if name.isalnum() and name[:1].isalpha() else camel(name))
              for name in app.functions}
    queues = _queue_names(app)
    queue_ids = {q: ids.take(camel(q) + "Queue") for q in queues}
    topics = list(dict.fromkeys(
        [t for fn in app.functions.values() for t in fn.topics]
        + [d.split(":", 1)[1] for fn in app.functions.values()
           for d in (fn.on_success, fn.on_failure, fn.dead_letter_to)
           if d and d.startswith("topic:")]))
    topic_ids = {t: ids.take(camel(t) + "Topic") for t in topics}
    layers = list(dict.fromkeys(lay for fn in app.functions.values() for lay in fn.layers))
    layer_ids = {lay: ids.take(camel(lay) + "Layer") for lay in layers}

    resources: dict[str, Any] = {}
    for name, fn in app.functions.items():
        ctx = _FnContext(fn, fn_ids, queue_ids, topic_ids, layer_ids, out.warnings)
        resources[fn_ids[name]] = ctx.resource(app.rollouts.get(name))
    for q in queues:
        resources[queue_ids[q]] = {"Type": "AWS::SQS::Queue", "Properties": {
            "QueueName": q, "VisibilityTimeout": _visibility_timeout(app, q)}}
    for t in topics:
        resources[topic_ids[t]] = {"Type": "AWS::SNS::Topic", "Properties": {"TopicName": t}}
    for lay in layers:
        runtimes = sorted({_runtime(fn.runtime) for fn in app.functions.values()
                           if lay in fn.layers and fn.runtime.startswith("python")})
        props: dict[str, Any] = {"LayerName": f"{app.name}-{camel(lay)}", "ContentUri": lay}
        if runtimes:
            props["CompatibleRuntimes"] = runtimes
        resources[layer_ids[lay]] = {"Type": "AWS::Serverless::LayerVersion",
                                     "Properties": props}

    template: dict[str, Any] = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": f"{app.name} (exported from nimbus)",
    }
    app_meta: dict[str, Any] = {"app": app.name}
    if app.regions is not None:
        app_meta["regions"] = app.regions.to_dict()
        out.warnings.append("app: regions have no place in a SAM template (one stack is one "
                            "region); kept in Metadata.nimbus.regions")
    for notice in app.notices:
        if notice.startswith("not provided by nimbus: "):
            what = notice.removeprefix("not provided by nimbus: ")
            if what.startswith("Outputs "):
                continue  # the export has Outputs of its own: the API URLs
            out.warnings.append(f"app: {what} was not provided by nimbus, so it is not in "
                                "the export; copy it from the original template")
    template["Metadata"] = {"nimbus": app_meta}
    template["Resources"] = resources
    outputs = _outputs(app)
    if outputs:
        template["Outputs"] = outputs
    out.template = template
    return out


def _queue_names(app: AppSpec) -> list[str]:
    names: list[str] = []
    for fn in app.functions.values():
        if fn.queue:
            names.append(fn.queue)
        for dest in (fn.on_success, fn.on_failure, fn.dead_letter_to):
            if dest and dest.startswith("queue:"):
                names.append(dest.split(":", 1)[1])
    return list(dict.fromkeys(names))


def _visibility_timeout(app: AppSpec, queue: str) -> int:
    """At least six times the consumer's timeout, as AWS advises (and at
    least SQS's default of 30 s)."""
    timeouts = [math.ceil(fn.timeout_s) for fn in app.functions.values() if fn.queue == queue]
    return min(SQS_MAX_VISIBILITY_S, max([30] + [6 * t for t in timeouts]))


def _outputs(app: AppSpec) -> dict[str, Any]:
    payloads = {r.payload for fn in app.functions.values() for r in fn.routes}
    outputs: dict[str, Any] = {}
    if "2.0" in payloads:
        outputs["HttpApiUrl"] = {
            "Description": "The HTTP API's URL (payload 2.0 routes)",
            "Value": Sub("https://${ServerlessHttpApi}.execute-api.${AWS::Region}."
                         "${AWS::URLSuffix}/")}
    if "1.0" in payloads:
        outputs["ApiUrl"] = {
            "Description": "The REST API's URL (payload 1.0 routes), stage Prod",
            "Value": Sub("https://${ServerlessRestApi}.execute-api.${AWS::Region}."
                         "${AWS::URLSuffix}/Prod/")}
    return outputs


def _runtime(runtime: str) -> str:
    if runtime == "python3" or runtime in RETIRED_PYTHON:
        return DEFAULT_PYTHON
    return runtime


@dataclass
class _FnContext:
    fn: FunctionSpec
    fn_ids: dict[str, str]
    queue_ids: dict[str, str]
    topic_ids: dict[str, str]
    layer_ids: dict[str, str]
    warnings: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def warn(self, text: str) -> None:
        self.warnings.append(f"function {self.fn.name}: {text}")

    def keep(self, key: str, value: Any, why: str) -> None:
        """``key`` goes to Metadata.nimbus, with a warning saying why."""
        self.meta[key] = value
        self.warn(f"{why}; kept in Metadata.nimbus.{key}")

    def resource(self, rollout: RolloutSpec | None) -> dict[str, Any]:
        fn = self.fn
        props: dict[str, Any] = {}
        if not (fn.name.isalnum() and fn.name[:1].isalpha()):
            props["FunctionName"] = fn.name
        props.update(self._code())
        props.update(self._limits())
        env = {k: v for k, v in fn.env if k not in LAMBDA_RESERVED_ENV}
        if env:
            props["Environment"] = {"Variables": env}
        for key, value in env.items():
            if f":{NIMBUS_ACCOUNT}:" in value:
                self.warn(f"env {key} holds an ARN in nimbus's account {NIMBUS_ACCOUNT} "
                          f"({value}); on AWS, point it at the real resource (!GetAtt or "
                          "!Ref in the template)")
        reserved = {k: v for k, v in fn.env if k in LAMBDA_RESERVED_ENV}
        if reserved:
            self.keep("env", reserved, f"env {', '.join(sorted(reserved))}: Lambda sets "
                      f"{'these' if len(reserved) > 1 else 'this'} itself and refuses it in "
                      "Environment.Variables")
        if fn.layers:
            props["Layers"] = [Ref(self.layer_ids[lay]) for lay in fn.layers]
        logging = self._logging()
        if logging:
            props["LoggingConfig"] = logging
        invoke = self._event_invoke_config()
        if invoke:
            props["EventInvokeConfig"] = invoke
        if fn.dead_letter_to:
            d = self._destination(fn.dead_letter_to)
            props["DeadLetterQueue"] = {"Type": d["Type"], "TargetArn": d["Destination"]}
        deployment = self._deployment(rollout)
        if deployment or fn.min_instances > 0:
            props["AutoPublishAlias"] = ALIAS
        if fn.min_instances > 0:
            props["ProvisionedConcurrencyConfig"] = {
                "ProvisionedConcurrentExecutions": fn.min_instances}
        if deployment:
            props["DeploymentPreference"] = deployment
        events = self._events()
        if events:
            props["Events"] = events
        self._scaling_meta()
        res: dict[str, Any] = {"Type": "AWS::Serverless::Function", "Properties": props}
        if self.meta:
            res["Metadata"] = {"nimbus": self.meta}
        return res

    # -- code, runtime, limits

    def _code(self) -> dict[str, Any]:
        fn = self.fn
        runtime = _runtime(fn.runtime)
        if runtime != fn.runtime and fn.runtime != "python3":  # python3 is 3.11 in nimbus too
            self.keep("runtime", fn.runtime,
                      f"runtime {fn.runtime} is no longer offered by Lambda and nimbus serves "
                      f"it with Python 3.11: exported as {runtime}")
        elif runtime in DEPRECATED_PYTHON:
            self.warn(f"runtime {runtime} is deprecated on Lambda (nimbus serves it with "
                      "Python 3.11); consider python3.11 or later")
        handler = fn.callable if fn.runtime.startswith("provided") else fn.handler
        props = {"CodeUri": fn.code_dir or ".", "Handler": handler, "Runtime": runtime}
        expected = Path(fn.code_dir or ".") / "requirements.txt"
        if fn.requirements is not None and Path(fn.requirements) != expected:
            self.keep("requirements", fn.requirements,
                      f"requirements {fn.requirements}: 'sam build' installs "
                      f"{expected.as_posix()} (the CodeUri folder's requirements.txt) instead")
        return props

    def _limits(self) -> dict[str, Any]:
        fn = self.fn
        props: dict[str, Any] = {}
        memory = min(LAMBDA_MAX_MEMORY_MB, max(LAMBDA_MIN_MEMORY_MB, fn.memory_mb))
        props["MemorySize"] = memory
        if memory != fn.memory_mb:
            self.keep("memory_mb", fn.memory_mb,
                      f"memory_mb {fn.memory_mb} is below Lambda's minimum: exported as "
                      f"MemorySize {memory}")
        timeout = max(1, math.ceil(fn.timeout_s))
        props["Timeout"] = timeout
        if timeout != fn.timeout_s:
            self.keep("timeout_s", fn.timeout_s,
                      f"timeout_s {fn.timeout_s:g} is not whole seconds: exported as "
                      f"Timeout {timeout}")
        if fn.ephemeral_storage_mb != DEFAULT_EPHEMERAL_STORAGE_MB:
            if fn.ephemeral_storage_mb >= LAMBDA_MIN_EPHEMERAL_MB:
                props["EphemeralStorage"] = {"Size": fn.ephemeral_storage_mb}
            else:
                self.keep("ephemeral_storage_mb", fn.ephemeral_storage_mb,
                          f"ephemeral_storage_mb {fn.ephemeral_storage_mb} is below Lambda's "
                          f"minimum of {LAMBDA_MIN_EPHEMERAL_MB}: left at Lambda's default")
        if fn.max_concurrency is not None:
            props["ReservedConcurrentExecutions"] = fn.max_concurrency
        return props

    def _scaling_meta(self) -> None:
        """Keys Lambda has no place for: kept, each with a warning."""
        fn = self.fn
        checks: list[tuple[str, Any, Any]] = [
            ("concurrency", fn.concurrency, 1),
            ("max_instances", fn.max_instances, DEFAULT_MAX_INSTANCES),
            ("target_concurrency", fn.target_concurrency,
             round(fn.concurrency * DEFAULT_TARGET_UTILISATION, 6)),
            ("stable_window_s", fn.stable_window_s, DEFAULT_STABLE_WINDOW_S),
            ("panic_window_s", fn.panic_window_s,
             min(DEFAULT_PANIC_WINDOW_S, fn.stable_window_s)),
            ("scale_to_zero_after_s", fn.scale_to_zero_after_s, DEFAULT_SCALE_TO_ZERO_AFTER_S),
            ("max_queue", fn.max_queue, DEFAULT_MAX_QUEUE),
            ("preload", list(fn.preload), []),
            ("max_processes", fn.max_processes, DEFAULT_MAX_PROCESSES),
            ("cpu", fn.cpu, None),
            ("retry_delay_s", fn.retry_delay_s, DEFAULT_RETRY_DELAY_S),
            ("dead_letter", fn.dead_letter, True),
            ("trigger_alias", fn.trigger_alias, None),
        ]
        for key, value, default in checks:
            if value != default:
                self.keep(key, value, f"{key} has no place in a Lambda function")

    def _logging(self) -> dict[str, Any]:
        fn = self.fn
        out: dict[str, Any] = {}
        if fn.log_format is not None:
            out["LogFormat"] = fn.log_format
        if fn.log_level is not None:
            if fn.log_format == "JSON":
                out["ApplicationLogLevel"] = LAMBDA_LOG_LEVELS.get(fn.log_level, fn.log_level)
            else:
                self.keep("log_level", fn.log_level,
                          "log_level needs LogFormat JSON on Lambda (this function logs Text)")
        return out

    # -- async invocations

    def _destination(self, ref: str) -> dict[str, Any]:
        kind, _, name = ref.partition(":")
        if kind == "queue":
            return {"Type": "SQS", "Destination": GetAtt(f"{self.queue_ids[name]}.Arn")}
        if kind == "topic":
            return {"Type": "SNS", "Destination": Ref(self.topic_ids[name])}
        if name in self.fn_ids:
            return {"Type": "Lambda", "Destination": GetAtt(f"{self.fn_ids[name]}.Arn")}
        self.warn(f"destination {ref} names no function of this app: exported as the ARN "
                  "of a function of that name in the same account and region")
        return {"Type": "Lambda", "Destination": Sub(
            f"arn:${{AWS::Partition}}:lambda:${{AWS::Region}}:${{AWS::AccountId}}:function:{name}")}

    def _event_invoke_config(self) -> dict[str, Any]:
        fn = self.fn
        cfg: dict[str, Any] = {}
        if fn.retries != DEFAULT_RETRIES:
            cfg["MaximumRetryAttempts"] = min(fn.retries, LAMBDA_MAX_RETRIES)
            if fn.retries > LAMBDA_MAX_RETRIES:
                self.keep("retries", fn.retries,
                          f"retries {fn.retries} is above Lambda's maximum of "
                          f"{LAMBDA_MAX_RETRIES}: exported as {LAMBDA_MAX_RETRIES}")
        if fn.max_event_age_s != DEFAULT_MAX_EVENT_AGE_S:
            age = max(LAMBDA_MIN_EVENT_AGE_S, math.ceil(fn.max_event_age_s))
            cfg["MaximumEventAgeInSeconds"] = age
            if age != fn.max_event_age_s:
                why = (f"is below Lambda's minimum of {LAMBDA_MIN_EVENT_AGE_S}"
                       if fn.max_event_age_s < LAMBDA_MIN_EVENT_AGE_S else
                       "is not whole seconds")
                self.keep("max_event_age_s", fn.max_event_age_s,
                          f"max_event_age_s {fn.max_event_age_s:g} {why}: exported as {age}")
        dest: dict[str, Any] = {}
        if fn.on_success:
            dest["OnSuccess"] = self._destination(fn.on_success)
        if fn.on_failure:
            dest["OnFailure"] = self._destination(fn.on_failure)
        if dest:
            cfg["DestinationConfig"] = dest
        return cfg

    # -- rollouts

    def _deployment(self, rollout: RolloutSpec | None) -> dict[str, Any]:
        if rollout is None:
            return {}
        extra = {k: v for k, v in rollout.to_dict().items() if v is not None}
        out: dict[str, Any] = {}
        if rollout.strategy is not None:
            kind = codedeploy_type(rollout.strategy)
            if kind is not None:
                out = {"Type": kind}
                del extra["strategy"]
            else:
                self.warn(f"rollout strategy {rollout.strategy} is none of CodeDeploy's "
                          "predefined configurations: no DeploymentPreference (kept in "
                          "Metadata.nimbus.rollout)")
        if extra:
            self.meta["rollout"] = extra
            rest = sorted(k for k in extra if k != "strategy")
            if rest:
                self.warn(f"rollout {', '.join(rest)} have no place in a DeploymentPreference; "
                          "kept in Metadata.nimbus.rollout")
        return out

    # -- events

    def _events(self) -> dict[str, Any]:
        fn = self.fn
        events: dict[str, Any] = {}
        names = _Ids()

        def put(wanted: str, event: dict[str, Any]) -> None:
            events[names.take(wanted)] = event

        aliases = {}
        for r in fn.routes:
            put(_route_event_name(r), _route_event(r))
            if r.alias != ALIAS:
                aliases[r.key] = r.alias
        if aliases:
            self.keep("route_aliases", aliases,
                      "routes serving another alias than live have no SAM event form "
                      "(on AWS they serve the function's live alias)")
        self._schedule_events(put)
        if fn.queue:
            props: dict[str, Any] = {"Queue": GetAtt(f"{self.queue_ids[fn.queue]}.Arn"),
                                     "BatchSize": fn.batch_size}
            window = math.ceil(fn.max_batching_window_s)
            if fn.batch_size > 10 and window < 1:
                window = 1
                self.warn(f"batch_size {fn.batch_size} above 10 needs a batching window on "
                          "AWS: MaximumBatchingWindowInSeconds set to 1")
            window = min(window, LAMBDA_MAX_BATCHING_WINDOW_S)
            if window:
                props["MaximumBatchingWindowInSeconds"] = window
            if window != fn.max_batching_window_s:
                self.keep("max_batching_window_s", fn.max_batching_window_s,
                          f"max_batching_window_s {fn.max_batching_window_s:g} exported as "
                          f"{window}")
            if fn.report_batch_failures:
                props["FunctionResponseTypes"] = ["ReportBatchItemFailures"]
            put(camel(fn.queue) + "Messages", {"Type": "SQS", "Properties": props})
        for t in fn.topics:
            put(camel(t) + "Messages",
                {"Type": "SNS", "Properties": {"Topic": Ref(self.topic_ids[t])}})
        return events

    def _schedule_events(self, put: Any) -> None:
        inexact = False
        for i, s in enumerate(self.fn.schedules, 1):
            expr, why = aws_schedule(s.expression)
            if why:
                self.warn(f"schedule {s.expression!r}: {why}")
                inexact = True
            if s.missed != "once":
                self.warn(f"schedule {s.expression!r}: missed: {s.missed} has no AWS form "
                          "(EventBridge never fires missed ticks)")
                inexact = True
            if expr is None:
                continue
            props: dict[str, Any]
            if s.timezone != "UTC":
                props = {"ScheduleExpression": expr, "ScheduleExpressionTimezone": s.timezone}
                kind = "ScheduleV2"
            else:
                props, kind = {"Schedule": expr}, "Schedule"
            if s.input:
                props["Input"] = json.dumps(dict(s.input), separators=(",", ":"))
                if not s.input_as_event:
                    self.warn(f"schedule {s.expression!r}: on AWS the function receives Input "
                              "as its whole event, where this schedule gives it as the "
                              "Scheduled Event's detail; read both in the handler "
                              "(event.get('detail', event)), or set input_as_event: true")
                    inexact = True
            put(f"Schedule{i}", {"Type": kind, "Properties": props})
        if inexact:
            self.meta["schedules"] = [s.to_dict() for s in self.fn.schedules]
            self.warn("the schedules as nimbus runs them are kept in Metadata.nimbus.schedules")


def _route_event_name(r: Route) -> str:
    prefix = "Http" if r.payload == "2.0" else "Rest"
    return prefix + r.method.title() + (camel(r.path) if r.path.strip("/") else "Root")


def _route_event(r: Route) -> dict[str, Any]:
    if r.payload == "1.0":
        return {"Type": "Api", "Properties": {"Path": r.path, "Method": r.method.lower()}}
    return {"Type": "HttpApi", "Properties": {"Path": r.path, "Method": r.method.upper()}}


def codedeploy_type(strategy: str) -> str | None:
    """The CodeDeploy predefined configuration that is exactly ``strategy``, or None."""
    from nimbus.rollout.policy import parse_strategy

    try:
        parsed = parse_strategy(strategy)
    except UserInputError:
        return None
    if parsed.text == "all-at-once":
        return "AllAtOnce"
    kind = parsed.text.split(":", 1)[0]
    first = parsed.steps[0]
    return CODEDEPLOY_TYPES.get((kind, first.share, first.wait_s / 60))


# -- schedule expressions ---------------------------------------------------------------

_RATE = re.compile(r"rate\(\s*(\d+)\s+([A-Za-z]+?)s?\s*\)", re.IGNORECASE)
_RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_DOW_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


def aws_schedule(expression: str) -> tuple[str | None, str | None]:
    """``expression`` (any form nimbus takes) as an EventBridge expression:
    ``(aws_expression, None)`` when exact, ``(None, why)`` when there is none."""
    from nimbus.events.schedule_expr import _MACROS

    s = expression.strip()
    low = s.lower()
    if low.startswith("rate("):
        m = _RATE.fullmatch(s)
        if m is None:
            return None, "not a rate AWS takes"
        seconds = int(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
        for unit in ("day", "hour", "minute"):
            n, rem = divmod(seconds, _RATE_UNITS[unit])
            if rem == 0 and n >= 1:
                return f"rate({n} {unit}{'' if n == 1 else 's'})", None
        return None, "EventBridge rates are whole minutes; no Schedule event exported"
    if low.startswith("cron("):
        return s, None
    fields = (_MACROS.get(low) or s).split()
    if len(fields) != 5:
        return None, "not a cron form AWS takes; no Schedule event exported"
    converted = _cron5(fields)
    if converted is None:
        return None, ("restricts both day-of-month and day-of-week (either matches), which "
                      "AWS cron cannot say; no Schedule event exported")
    return converted, None


def _cron5(fields: list[str]) -> str | None:
    from nimbus.events.schedule_expr import _parse_dow

    minute, hour, dom, month, dow = (_step_start(f, lo) for f, lo in
                                     zip(fields, (0, 0, 1, 1, 0), strict=True))
    dom_any, dow_any = fields[2] == "*", fields[4] == "*"
    if not dom_any and not dow_any:
        return None
    if dow_any:
        return f"cron({minute} {hour} {dom} {month} ? *)"
    days = sorted(_parse_dow(fields[4], False, 0, 7).days)
    return f"cron({minute} {hour} ? {month} {','.join(_DOW_NAMES[d] for d in days)} *)"


def _step_start(part: str, lo: int) -> str:
    """``*/5`` -> ``0/5`` (``1/5`` for days and months): the form AWS documents."""
    return ",".join(f"{lo}/{p[2:]}" if p.startswith("*/") else p for p in part.split(","))


# -- writing the folder -------------------------------------------------------------------

@dataclass
class Written:
    template: Path
    files: int
    warnings: list[str]


def export_sam(app: AppSpec, app_dir: Path, out_dir: Path, *, force: bool = False) -> Written:
    """Write ``template.yaml`` and a copy of the app's code into ``out_dir``.

    ``UserInputError`` if ``out_dir`` is a file, or a folder with something
    in it and not ``force``.
    """
    app_dir, out_dir = app_dir.resolve(), out_dir.resolve()
    if out_dir == app_dir:
        raise UserInputError(f"{out_dir}: the output folder is the app folder; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserInputError(f"{out_dir}: the folder is not empty (use --force to write "
                             "into it anyway)")
    result = template_for(app)
    _check_paths(app, app_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    left_out: list[str] = []
    files = _copy_tree(app_dir, out_dir, {out_dir}, root=app_dir, left_out=left_out)
    path = out_dir / TEMPLATE_NAME
    path.write_text(dump(result.template), encoding="utf-8")
    warnings = list(result.warnings) + [
        f"{rel}: a link to outside the app folder (or to a folder) is not exported, as a "
        "deploy leaves it out too" for rel in left_out]
    return Written(path, files, warnings)


def _check_paths(app: AppSpec, app_dir: Path) -> None:
    for fn in app.functions.values():
        for rel in ([fn.code_dir] if fn.code_dir else []) + list(fn.layers):
            if not (app_dir / rel).is_dir():
                raise UserInputError(f"function {fn.name}: folder {rel} is not in {app_dir}")


def _copy_tree(src: Path, dst: Path, skip: set[Path], *, root: Path, left_out: list[str],
               top: bool = True) -> int:
    """Copy ``src`` into ``dst`` without state, caches, virtual
    environments or the app's own manifest; the number of files copied. As
    in a deploy's bundle, a link to a file inside the app folder is copied
    as that file; other links are left out (named in ``left_out``)."""
    count = 0
    for entry in sorted(src.iterdir()):
        if entry.name in SKIP_NAMES or entry.resolve() in skip:
            continue
        if entry.is_symlink():
            target = entry.resolve()
            if target.is_file() and target.is_relative_to(root) \
                    and not (top and entry.name in MANIFEST_FILES):
                shutil.copyfile(target, dst / entry.name)
                shutil.copymode(target, dst / entry.name)
                count += 1
            else:
                left_out.append(entry.relative_to(root).as_posix())
            continue
        if entry.is_dir():
            if (entry / "control.json").exists() or (entry / "nimbus.db").exists():
                continue  # a nimbus state folder under another name
            target = dst / entry.name
            target.mkdir(exist_ok=True)
            count += _copy_tree(entry, target, skip, root=root, left_out=left_out, top=False)
        elif entry.is_file() and not (top and entry.name in MANIFEST_FILES):
            shutil.copy2(entry, dst / entry.name)
            count += 1
    return count


__all__ = ["Export", "GetAtt", "Ref", "Sub", "Written", "aws_schedule",
           "codedeploy_type", "dump", "export_sam", "template_for"]
