"""A SAM template (``template.yaml``) read as a nimbus app.

The template is read and its intrinsics resolved by :mod:`.cfn`; this module
maps what it declares onto the rich form of app.yaml (plain data, as if the
user had written it) and records, for every key it writes, the template
location it came from. The loader then runs that data through the same
validation and cross-checks as an app.yaml (ranges, route conflicts,
handler modules, requirements, queue consumers, destinations), with each
error pointed back at the template's own line and property.

Resources nimbus does not provide are listed as notices; properties that
would change what the app does if ignored (authorizers, event sources
nimbus cannot trigger, code that is not in the folder) are refused.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from nimbus.errors import ManifestError
from nimbus.manifest.cfn import Resolver, read_template
from nimbus.manifest.errmap import format_loc, show
from nimbus.manifest.model import is_provided
from nimbus.manifest.source import Loc, Source

TEMPLATE_NAMES = ("template.yaml", "template.yml")
SAM_TRANSFORM = "AWS::Serverless-2016-10-31"
FUNCTION = "AWS::Serverless::Function"
LAYER = "AWS::Serverless::LayerVersion"
QUEUE = "AWS::SQS::Queue"
TOPIC = "AWS::SNS::Topic"
APIS = ("AWS::Serverless::Api", "AWS::Serverless::HttpApi")
# The template's Metadata.nimbus keys -> the app.yaml keys they hold.
TOP_KEYS = {"app": "name", "regions": "regions"}

# Function properties read with no effect on how nimbus runs the function.
_NO_EFFECT = {"Tracing", "Tags", "Description", "Policies", "Role", "VpcConfig",
              "Architectures", "PermissionsBoundary", "KmsKeyArn", "RolePath", "FunctionName",
              "AutoPublishCodeSha256", "AutoPublishAliasAllProperties", "VersionDescription",
              "CodeSigningConfigArn", "PropagateTags", "SnapStart", "RuntimeManagementConfig",
              "AssumeRolePolicyDocument", "RecursiveLoop", "SourceKMSKeyArn"}
_HANDLED = {"Handler", "Runtime", "CodeUri", "MemorySize", "Timeout", "Environment",
            "ReservedConcurrentExecutions", "ProvisionedConcurrencyConfig", "DeadLetterQueue",
            "EventInvokeConfig", "AutoPublishAlias", "DeploymentPreference", "Layers",
            "LoggingConfig", "Events", "PackageType", "EphemeralStorage", "InlineCode",
            "ImageUri", "ImageConfig", "FileSystemConfigs", "FunctionUrlConfig"}
_EVENT_TYPES = ("Api", "HttpApi", "Schedule", "ScheduleV2", "SQS", "SNS")


@dataclass
class SamApp:
    """A template mapped onto the rich form: ``source`` holds the data (with
    lines of the template), ``fields`` maps a rich-form field back to the
    template's property, ``payloads`` each function's route payloads in order."""

    source: Source
    fields: dict[str, str]
    notices: list[str]
    payloads: dict[str, list[str]] = field(default_factory=dict)

    def error(self, exc: ManifestError) -> ManifestError:
        """``exc`` (about the rich-form data) named by the template's property."""
        name = exc.field
        if name:
            best = max((f for f in self.fields if name == f or name.startswith(f + ".")
                        or name.startswith(f + "[")), key=len, default=None)
            if best is not None:
                name = self.fields[best] + name[len(best):]
        message = exc.message
        for rich in sorted(self.fields, key=len, reverse=True):
            if rich.startswith("functions.") and rich in message:  # e.g. a route clash
                message = message.replace(rich, self.fields[rich])
        return ManifestError(message, file=exc.file, line=exc.line, field=name)


def is_sam(data: Any) -> bool:
    transform = data.get("Transform") if isinstance(data, dict) else None
    names = transform if isinstance(transform, list) else [transform]
    return SAM_TRANSFORM in names


def read_sam(file: Path, app_dir: Path, *, app_name: str, region: str, account: str,
             parameters: dict[str, str] | None = None) -> SamApp:
    """Read ``file`` (a SAM template in ``app_dir``) into rich-form data."""
    tsrc = read_template(file)
    if not is_sam(tsrc.data):
        raise ManifestError(f"not a SAM template: expected 'Transform: {SAM_TRANSFORM}' "
                            "(nimbus reads SAM templates, not plain CloudFormation)",
                            file=file, line=tsrc.line(("Transform",), key=True),
                            field="Transform")
    meta = tsrc.data.get("Metadata")
    nimbus = meta.get("nimbus") if isinstance(meta, dict) else None
    if nimbus is not None and not isinstance(nimbus, dict):
        raise ManifestError(f"expected a mapping (app, regions), got {show(nimbus)}",
                            file=file, line=tsrc.line(("Metadata", "nimbus"), key=True),
                            field="Metadata.nimbus")
    nimbus = nimbus or {}
    if isinstance(nimbus.get("app"), str):  # the app's name (nimbus export sam writes it)
        app_name = nimbus["app"]
    mapper = _Mapper(tsrc, app_dir, app_name, region, account, parameters or {})
    for key in ("app", "regions"):
        if key in nimbus:
            mapper.put((TOP_KEYS[key],), ("Metadata", "nimbus", key), nimbus[key])
    unknown = set(nimbus) - set(TOP_KEYS)
    if unknown:
        key = sorted(map(str, unknown))[0]
        raise ManifestError(f"unknown key {key!r}; expected app or regions",
                            file=file, line=tsrc.line(("Metadata", "nimbus", key), key=True),
                            field=f"Metadata.nimbus.{key}")
    return mapper.run()


class _Mapper:
    def __init__(self, tsrc: Source, app_dir: Path, app_name: str, region: str, account: str,
                 overrides: dict[str, str]) -> None:
        self.t = tsrc
        self.app_dir = app_dir
        self.r = Resolver(tsrc, app_name, region, account, overrides, names=self._name)
        self.rich: dict[str, Any] = {"name": app_name, "functions": {}}
        self.locs: dict[Loc, Loc] = {}
        self.notices: list[str] = []
        self.payloads: dict[str, list[str]] = {}
        self.kept: dict[str, dict[str, Any]] = {}  # logical -> resource, conditions applied
        self.queues: dict[str, str] = {}  # logical -> nimbus queue name
        self.topics: dict[str, str] = {}
        self.layers: dict[str, str] = {}  # logical -> folder
        self.functions: dict[str, str] = {}  # logical -> nimbus function name
        self.apis: dict[str, dict[str, Any]] = {}
        self.global_fn: dict[str, Any] = {}  # Globals.Function, resolved
        self.iam_noted = False

    # -- helpers ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.t.file.name

    def where(self, loc: Loc) -> str:
        return f"{self.name}:{self.t.line(loc, key=True)}"

    def error(self, loc: Loc, message: str) -> ManifestError:
        return ManifestError(message, file=self.t.file, line=self.t.line(loc, key=True),
                             field=format_loc(loc))

    def _name(self, logical: str) -> str | None:
        """The physical name a resource declares, if it is a usable nimbus name."""
        res = self.t.data.get("Resources", {}).get(logical)
        if not isinstance(res, dict) or not isinstance(res.get("Properties"), dict):
            return None
        key = {FUNCTION: "FunctionName", QUEUE: "QueueName", TOPIC: "TopicName",
               LAYER: "LayerName"}.get(res.get("Type", ""))
        if key is None or key not in res["Properties"]:
            return None
        value = self.r.resolve(res["Properties"][key],
                               ("Resources", logical, "Properties", key))
        pattern = r"[A-Za-z][A-Za-z0-9_-]{0,63}" if key == "FunctionName" else \
            r"[A-Za-z0-9_-]{1,80}"
        if isinstance(value, str) and key == "QueueName" and value.endswith(".fifo"):
            value = value[:-5]
        return value if isinstance(value, str) and re.fullmatch(pattern, value) else None

    def put(self, rich_loc: Loc, sam_loc: Loc, value: Any) -> None:
        """Set the rich-form ``rich_loc`` to ``value``, written at ``sam_loc``."""
        node = self.rich
        for part in rich_loc[:-1]:
            node = node.setdefault(part, {})
        node[rich_loc[-1]] = value
        self.locs[rich_loc] = sam_loc

    def not_provided(self, what: str, loc: Loc) -> None:
        self.notices.append(f"not provided by nimbus: {what} ({self.where(loc)})")

    # -- the run ---------------------------------------------------------------

    def run(self) -> SamApp:
        self.r.parameters  # noqa: B018 - overrides and defaults checked, used or not
        resources = self.r.resources
        if not resources:
            raise self.error(("Resources",), "the template declares no Resources")
        for logical, res in resources.items():
            loc: Loc = ("Resources", logical)
            if not isinstance(res, dict) or not isinstance(res.get("Type"), str):
                raise self.error(loc, "expected a resource with a Type")
            cond = res.get("Condition")
            if cond is not None and not self.r.condition(cond, loc + ("Condition",)):
                continue
            self.kept[logical] = res
        self._globals()
        for logical, res in self.kept.items():
            self._index(logical, res)
        for logical, res in self.kept.items():
            if res["Type"] == FUNCTION:
                self._function(logical)
        self._unconsumed_queues()
        if "Outputs" in self.t.data:
            self.not_provided("Outputs", ("Outputs",))
        if not self.rich["functions"]:
            raise self.error(("Resources",), f"the template declares no {FUNCTION}")
        lines_key: dict[Loc, int] = {}
        lines_value: dict[Loc, int] = {}
        for rich_loc, sam_loc in self.locs.items():
            lines_key[rich_loc] = self.t.line(sam_loc, key=True)
            lines_value[rich_loc] = self.t.line(sam_loc)
        src = Source(self.t.file, self.rich, self.t.root_line, lines_key, lines_value)
        fields = {format_loc(r): format_loc(s) for r, s in self.locs.items()}
        return SamApp(src, fields, self.notices, self.payloads)

    def _globals(self) -> None:
        g = self.t.data.get("Globals") or {}
        if not isinstance(g, dict):
            raise self.error(("Globals",), f"expected a mapping, got {show(g)}")
        fn = g.get("Function") or {}
        self.global_fn = self.r.resolve(fn, ("Globals", "Function"))
        if not isinstance(self.global_fn, dict):
            raise self.error(("Globals", "Function"), "expected a mapping")
        for section in ("Api", "HttpApi"):
            api = self.r.resolve(g.get(section) or {}, ("Globals", section))
            if isinstance(api, dict):
                self._check_api_auth(api, ("Globals", section))

    def _index(self, logical: str, res: dict[str, Any]) -> None:
        rtype = res["Type"]
        loc: Loc = ("Resources", logical)
        if rtype not in (FUNCTION, QUEUE, TOPIC, LAYER, *APIS):
            # listed, and its properties not evaluated: nimbus needs nothing of them
            self.not_provided(f"{rtype} {logical}", loc)
            return
        props = self.r.resolve(res.get("Properties") or {}, loc + ("Properties",))
        if not isinstance(props, dict):
            raise self.error(loc + ("Properties",), f"expected a mapping, got {show(props)}")
        if rtype == FUNCTION:
            name = self._name(logical) or logical
            other = next((k for k, v in self.functions.items() if v == name), None)
            if other is not None:
                raise self.error(loc + ("Properties", "FunctionName"), f"function name "
                                 f"{name!r} is already the name of {other}")
            self.functions[logical] = name
        elif rtype == QUEUE:
            self.queues[logical] = self._name(logical) or logical
        elif rtype == TOPIC:
            self.topics[logical] = self._name(logical) or logical
            if props.get("Subscription"):
                self.not_provided(f"{rtype} {logical} Subscription (subscribe functions with "
                                  "an SNS event instead)", loc + ("Properties", "Subscription"))
        elif rtype == LAYER:
            self.layers[logical] = self._folder(props.get("ContentUri"),
                                                loc + ("Properties", "ContentUri"),
                                                "ContentUri", required=True) or "."
            meta = res.get("Metadata")
            if isinstance(meta, dict) and meta.get("BuildMethod"):
                self.notices.append(f"layer {logical} is not built by nimbus (Metadata "
                                    "BuildMethod): its folder's python/ is used as it is "
                                    f"({self.where(loc + ('Metadata', 'BuildMethod'))})")
        elif rtype in APIS:
            self._check_api_auth(props, loc + ("Properties",))
            self.apis[logical] = props
            for key in ("DefinitionBody", "DefinitionUri"):
                if key in props:
                    self.not_provided(f"{rtype} {logical} {key} (routes come from the "
                                      "functions' events)", loc + ("Properties", key))

    def _check_api_auth(self, props: dict[str, Any], loc: Loc) -> None:
        for key in ("Cors", "CorsConfiguration"):
            if props.get(key) not in (None, False):
                self.not_provided(f"{key} (answer OPTIONS and add the CORS headers in the "
                                  "handler)", loc + (key,))
        auth = props.get("Auth")
        if not isinstance(auth, dict):
            return
        for key in ("DefaultAuthorizer", "ApiKeyRequired", "ResourcePolicy", "UsagePlan"):
            value = auth.get(key)
            if value not in (None, False, "NONE"):
                raise self.error(loc + ("Auth", key), f"Auth.{key}: nimbus does not "
                                 "provide API Gateway authorizers, API keys or resource "
                                 "policies; serving these routes without them would let "
                                 "every request in (remove it, and check requests in the "
                                 "handler)")

    def _folder(self, value: Any, loc: Loc, what: str, *, required: bool = False) -> str | None:
        """A local folder (``CodeUri``/``ContentUri``) relative to the app folder,
        None for the app folder itself."""
        if value is None and not required:
            return None
        if not isinstance(value, str) or value.startswith("s3://"):
            raise self.error(loc, f"{what} must be a folder of this app (code in S3 "
                             f"would be missing), got {show(value)}")
        p = PurePosixPath(value)
        if p.is_absolute() or ".." in p.parts:
            raise self.error(loc, f"{what} {value!r} must be a folder inside the app folder")
        if p.as_posix() in (".", ""):
            return None
        if not (self.app_dir / p).is_dir():
            raise self.error(loc, f"{what} {value!r} is not a folder in {self.app_dir}")
        return p.as_posix()

    # -- functions ---------------------------------------------------------------

    def _function(self, logical: str) -> None:
        res = self.kept[logical]
        own_loc: Loc = ("Resources", logical, "Properties")
        own = self.r.resolve(res.get("Properties") or {}, own_loc)
        if not isinstance(own, dict):
            raise self.error(own_loc, "expected a mapping of properties")
        props = _merge(self.global_fn, own)
        name = self.functions[logical]
        base: Loc = ("functions", name)
        self.locs[("functions",)] = ("Resources",)
        self.locs[base] = ("Resources", logical)
        self.rich["functions"][name] = {}

        def at(prop: str, *rest: Any) -> Loc:
            return (own_loc if prop in own else ("Globals", "Function")) + (prop, *rest)

        def put(key: str, prop: str, value: Any, *rest: Any) -> None:
            self.put(base + (key,), at(prop, *rest), value)

        for prop in props:
            if prop not in _HANDLED and prop not in _NO_EFFECT:
                close = difflib.get_close_matches(str(prop), sorted(_HANDLED | _NO_EFFECT),
                                                  n=1, cutoff=0.8)
                if close:  # a misspelling: ignoring it would change what runs
                    raise self.error(at(prop), f"unknown property {prop!r} of "
                                     f"AWS::Serverless::Function; did you mean {close[0]!r}?")
                self.notices.append(f"property {prop} of {logical} is not read by nimbus "
                                    f"({self.where(at(prop))})")
        if props.get("PackageType", "Zip") != "Zip" or "ImageUri" in props:
            raise self.error(at("PackageType" if "PackageType" in props else "ImageUri"),
                             "container image functions are not supported by nimbus: "
                             "use PackageType Zip with a CodeUri folder")
        if "InlineCode" in props:
            raise self.error(at("InlineCode"), "InlineCode is not supported by nimbus: put "
                             "the code in a file of a CodeUri folder")
        if props.get("FileSystemConfigs"):
            raise self.error(at("FileSystemConfigs"), "EFS file systems are not provided by "
                             "nimbus; the function would not find its files")
        if props.get("FunctionUrlConfig"):
            auth = props["FunctionUrlConfig"].get("AuthType") if isinstance(
                props["FunctionUrlConfig"], dict) else None
            if auth == "AWS_IAM":
                raise self.error(at("FunctionUrlConfig", "AuthType"), "a function URL with "
                                 "AWS_IAM auth is not provided by nimbus")
            self.not_provided(f"FunctionUrlConfig of {logical} (add an HttpApi event for "
                              "an HTTP route)", at("FunctionUrlConfig"))
        if ("Policies" in props or "Role" in props) and not self.iam_noted:
            self.iam_noted = True
            iam = at("Policies" if "Policies" in props else "Role")
            self.notices.append("IAM is not enforced by nimbus: Policies and Role are "
                                f"accepted and ignored ({self.where(iam)})")
        code_dir = self._folder(props.get("CodeUri"), at("CodeUri"), "CodeUri")
        if code_dir is not None:
            put("code_dir", "CodeUri", code_dir)
        runtime = props.get("Runtime")
        handler = props.get("Handler")
        if not isinstance(handler, str) or not handler:
            raise self.error(at("Handler") if "Handler" in props else own_loc,
                             f"Handler: expected the function's handler (e.g. app.handler), "
                             f"got {show(handler)}")
        provided = isinstance(runtime, str) and is_provided(runtime)
        if runtime is not None:
            put("runtime", "Runtime", runtime)
        # a custom runtime's Handler is any string, given to its bootstrap
        put("handler", "Handler", handler if provided else handler.replace("/", "."))
        root = self.app_dir / code_dir if code_dir else self.app_dir
        if not provided and (root / "requirements.txt").is_file():
            req = f"{code_dir}/requirements.txt" if code_dir else "requirements.txt"
            put("requirements", "CodeUri" if "CodeUri" in props else "Handler", req)
        for key, prop in (("memory_mb", "MemorySize"), ("timeout_s", "Timeout")):
            if prop in props:
                put(key, prop, _num(props[prop]))
        storage = props.get("EphemeralStorage")
        if isinstance(storage, dict) and "Size" in storage:
            put("ephemeral_storage_mb", "EphemeralStorage", _num(storage["Size"]), "Size")
        env = props.get("Environment")
        if env is not None:
            variables = env.get("Variables") if isinstance(env, dict) else None
            if not isinstance(variables, dict):
                raise self.error(at("Environment"), "expected Variables: a mapping")
            put("env", "Environment", variables, "Variables")
        self._limits(props, at, put, logical)
        self._async(props, at, put, name)
        self._alias(props, at, put, base)
        self._layers(props, at, put)
        logging = props.get("LoggingConfig")
        if isinstance(logging, dict):
            if "LogFormat" in logging:
                put("log_format", "LoggingConfig", logging["LogFormat"], "LogFormat")
            if "ApplicationLogLevel" in logging:
                put("log_level", "LoggingConfig", logging["ApplicationLogLevel"],
                    "ApplicationLogLevel")
        events = props.get("Events") or {}
        if not isinstance(events, dict):
            raise self.error(at("Events"), f"expected a mapping of events, got {show(events)}")
        self.payloads[name] = []
        for ev_name, ev in events.items():
            self._event(name, base, at("Events", ev_name), ev_name, ev)
        meta = res.get("Metadata")
        if isinstance(meta, dict) and meta.get("nimbus") is not None:
            self._nimbus_metadata(name, base, ("Resources", logical, "Metadata", "nimbus"),
                                  meta["nimbus"])

    def _nimbus_metadata(self, name: str, base: Loc, loc: Loc, meta: Any) -> None:
        """A function's ``Metadata: {nimbus: {...}}``: what Lambda has no place for
        (``nimbus export sam`` writes it), keyed as in app.yaml, over what the
        properties said; AWS ignores it."""
        if not isinstance(meta, dict):
            raise self.error(loc, f"expected a mapping of app.yaml keys, got {show(meta)}")
        meta = self.r.resolve(meta, loc)
        fn = self.rich["functions"][name]
        for key, value in meta.items():
            kloc = loc + (key,)
            if key == "route_aliases":
                if not isinstance(value, dict):
                    raise self.error(kloc, 'expected {"METHOD /path": alias}')
                for route_key, alias in value.items():
                    found = [i for i, r in enumerate(fn.get("http", []))
                             if f"{r['method']} {r['path']}" == route_key]
                    if not found:
                        raise self.error(kloc + (route_key,), f"{route_key!r} is no route of "
                                         f"{name} (its events give them)")
                    for i in found:
                        fn["http"][i]["alias"] = alias
                        self.locs[base + ("http", i, "alias")] = kloc + (route_key,)
            elif key == "schedules":  # the schedules as nimbus runs them: all of them
                if not isinstance(value, list):
                    raise self.error(kloc, f"expected a list of schedules, got {show(value)}")
                fn["schedule"] = value
                self.locs[base + ("schedule",)] = kloc
                for i in range(len(value)):
                    self.locs[base + ("schedule", i)] = kloc + (i,)
            elif key == "max_batching_window_s":
                if "queue" not in fn:
                    raise self.error(kloc, f"{key} needs an SQS event on {name}")
                fn["queue"][key] = value
                self.locs[base + ("queue", key)] = kloc
            elif key == "rollout" and isinstance(value, dict):
                block = dict(fn.get("rollout") or {})
                for rkey, rvalue in value.items():
                    rkey = "bake" if rkey == "bake_s" else rkey
                    block[rkey] = rvalue
                    self.locs[base + ("rollout", rkey)] = kloc + (rkey,)
                self.put(base + ("rollout",), kloc, block)
            elif key == "env" and isinstance(value, dict):
                self.put(base + ("env",), kloc, {**(fn.get("env") or {}), **value})
            else:  # an unknown key is the validation's to name, at this line
                self.put(base + (key,), kloc, value)

    def _limits(self, props: dict[str, Any], at: Any, put: Any, logical: str) -> None:
        if "ReservedConcurrentExecutions" in props:
            value = _num(props["ReservedConcurrentExecutions"])
            if value == 0:
                raise self.error(at("ReservedConcurrentExecutions"),
                                 "ReservedConcurrentExecutions: 0 stops the function from ever "
                                 "running; remove the function instead")
            put("max_concurrency", "ReservedConcurrentExecutions", value)
        pc = props.get("ProvisionedConcurrencyConfig")
        if pc is not None:
            count = pc.get("ProvisionedConcurrentExecutions") if isinstance(pc, dict) else None
            if count is None:
                raise self.error(at("ProvisionedConcurrencyConfig"),
                                 "expected ProvisionedConcurrentExecutions")
            if "AutoPublishAlias" not in props:
                raise self.error(at("ProvisionedConcurrencyConfig"),
                                 "ProvisionedConcurrencyConfig needs AutoPublishAlias (as in SAM)")
            count = _num(count)
            put("min_instances", "ProvisionedConcurrencyConfig", count,
                "ProvisionedConcurrentExecutions")
            if isinstance(count, int) and count > 4:
                put("max_instances", "ProvisionedConcurrencyConfig", min(count, 1000),
                    "ProvisionedConcurrentExecutions")

    def _target(self, arn: Any, loc: Loc, kinds: dict[str, str]) -> tuple[str, str] | None:
        """(kind, nimbus name) of the template resource ``arn`` refers to."""
        logical = self.r.owner(arn)
        if logical is not None and logical in self.queues and "SQS" in kinds:
            return "queue", self.queues[logical]
        if logical is not None and logical in self.topics and "SNS" in kinds:
            return "topic", self.topics[logical]
        if logical is not None and logical in self.functions and "Lambda" in kinds:
            return "function", self.functions[logical]
        return None

    def _consumed(self, kind: str, name: str) -> bool:
        """Whether a function of the template consumes queue (or subscribes to
        topic) ``name``: else nimbus has nothing that takes its messages."""
        etype, key, names = (("SQS", "Queue", self.queues) if kind == "queue" else
                             ("SNS", "Topic", self.topics))
        for logical, res in self.kept.items():
            if res["Type"] != FUNCTION:
                continue
            for fn in (self.global_fn, res.get("Properties") or {}):
                events = fn.get("Events") if isinstance(fn, dict) else None
                for ev in events.values() if isinstance(events, dict) else ():
                    if isinstance(ev, dict) and ev.get("Type") == etype:
                        ref = ev.get("Properties", {}).get(key) if isinstance(
                            ev.get("Properties"), dict) else None
                        owner = self.r.owner(self.r.resolve(ref, ("Resources", logical)))
                        if owner is not None and names.get(owner) == name:
                            return True
        return False

    def _async(self, props: dict[str, Any], at: Any, put: Any, name: str) -> None:
        eic = props.get("EventInvokeConfig")
        if isinstance(eic, dict):
            for prop, key, low, high in (("MaximumRetryAttempts", "retries", 0, 2),
                                         ("MaximumEventAgeInSeconds", "max_event_age_s",
                                          60, 21600)):
                if prop not in eic:
                    continue
                value = eic[prop]
                if isinstance(value, str) and value.isascii() and value.isdigit():
                    value = int(value)  # a Number parameter's text
                if type(value) is not int or not low <= value <= high:
                    raise self.error(at("EventInvokeConfig", prop), f"expected an integer "
                                     f"from {low} to {high} (Lambda's range), got {show(value)}")
                put(key, "EventInvokeConfig", _num(value), prop)
            dest = eic.get("DestinationConfig") or {}
            for when, key in (("OnSuccess", "on_success"), ("OnFailure", "on_failure")):
                d = dest.get(when) if isinstance(dest, dict) else None
                if not isinstance(d, dict):
                    continue
                loc = at("EventInvokeConfig", "DestinationConfig", when)
                dtype = d.get("Type")
                if dtype not in ("SQS", "SNS", "Lambda"):
                    raise self.error(loc + ("Type",), f"destination Type {show(dtype)} is not "
                                     "provided by nimbus (SQS, SNS and Lambda are)")
                target = self._target(d.get("Destination"), loc + ("Destination",),
                                      {dtype: dtype})
                if target is None:
                    raise self.error(loc + ("Destination",), f"{when} destination "
                                     f"{show(d.get('Destination'))} is not a {dtype} resource "
                                     "of this template")
                kind, tname = target
                if kind != "function" and not self._consumed(kind, tname):
                    what = (f"{kind} {tname}, which no function of the template "
                            f"{'consumes' if kind == 'queue' else 'subscribes to'}")
                    if key == "on_failure":
                        self.notices.append(f"{name}: {when} to {what}, is kept in "
                                            "nimbus's dead letters instead "
                                            f"({self.where(loc)})")
                        put("dead_letter", "EventInvokeConfig", True, "DestinationConfig")
                    else:
                        self.not_provided(f"{name}: {when} to {what}", loc)
                    continue
                self.locs[("functions", name, "destinations")] = at("EventInvokeConfig")
                self.rich["functions"][name].setdefault("destinations", {})[key] = {kind: tname}
                self.locs[("functions", name, "destinations", key)] = loc
        dlq = props.get("DeadLetterQueue")
        if dlq is not None and not isinstance(dlq, dict):
            raise self.error(at("DeadLetterQueue"),
                             f"expected {{Type, TargetArn}}, got {show(dlq)}")
        if isinstance(dlq, dict):
            loc = at("DeadLetterQueue")
            target = self._target(dlq.get("TargetArn"), loc, {"SQS": "SQS", "SNS": "SNS"})
            if target is None:
                raise self.error(loc + ("TargetArn",), "DeadLetterQueue TargetArn must be an "
                                 f"{QUEUE} or {TOPIC} of this template, got "
                                 f"{show(dlq.get('TargetArn'))}")
            kind, tname = target
            if self._consumed(kind, tname):
                fn = self.rich["functions"][name]
                fn.setdefault("destinations", {})["dead_letter_queue"] = {kind: tname}
                self.locs[("functions", name, "destinations")] = loc
                self.locs[("functions", name, "destinations", "dead_letter_queue")] = loc
            else:
                self.notices.append(f"{name}: failed events are kept in nimbus's dead letters "
                                    f"(nimbus dead-letters), not sent to {kind} {tname} "
                                    f"({self.where(loc)})")

    def _alias(self, props: dict[str, Any], at: Any, put: Any, base: Loc) -> None:
        # SAM moves the AutoPublishAlias to each new version (shifting traffic
        # as DeploymentPreference says): in nimbus that is what ``live`` does.
        # Another nimbus alias would stay on the version it was first set to.
        alias = props.get("AutoPublishAlias")
        if alias is not None and alias != "live":
            self.notices.append(f"{base[1]}: AutoPublishAlias {alias} is served by nimbus's "
                                "live alias, which every deploy moves to the new version "
                                f"({self.where(at('AutoPublishAlias'))})")
        dp = props.get("DeploymentPreference")
        if isinstance(dp, dict) and dp.get("Enabled", True) not in (False, "false"):
            if alias is None:
                raise self.error(at("DeploymentPreference"), "DeploymentPreference needs "
                                 "AutoPublishAlias (as in SAM)")
            if "Type" in dp:
                put("rollout", "DeploymentPreference", {"strategy": dp["Type"]}, "Type")
                self.locs[base + ("rollout", "strategy")] = at("DeploymentPreference", "Type")
            for key in ("Alarms", "Hooks", "TriggerConfigurations", "Role"):
                if dp.get(key):
                    self.not_provided(f"DeploymentPreference {key} (nimbus rolls back on its "
                                      "own error and latency rule)",
                                      at("DeploymentPreference", key))

    def _layers(self, props: dict[str, Any], at: Any, put: Any) -> None:
        layers = props.get("Layers")
        if layers is None:
            return
        if not isinstance(layers, list):
            raise self.error(at("Layers"), f"expected a list of layers, got {show(layers)}")
        folders = []
        for i, layer in enumerate(layers):
            logical = self.r.owner(layer)
            if logical is None or logical not in self.layers:
                raise self.error(at("Layers", i), f"layer {show(layer)} is not an {LAYER} of "
                                 "this template with a ContentUri folder: its code would be "
                                 "missing (add the layer's folder to the app and declare it)")
            folders.append(self.layers[logical])
        put("layers", "Layers", folders)

    # -- events ------------------------------------------------------------------

    def _event(self, name: str, base: Loc, loc: Loc, ev_name: str, ev: Any) -> None:
        if not isinstance(ev, dict) or not isinstance(ev.get("Type"), str):
            raise self.error(loc, "expected an event with a Type")
        etype = ev["Type"]
        p = ev.get("Properties") or {}
        ploc = loc + ("Properties",)
        if not isinstance(p, dict):
            raise self.error(ploc, f"expected a mapping of properties, got {show(p)}")
        if etype not in _EVENT_TYPES:
            raise self.error(loc + ("Type",), f"event type {etype} is not provided by nimbus, "
                             f"so {name} would never run for it (nimbus triggers: "
                             f"{', '.join(_EVENT_TYPES)})")
        fn = self.rich["functions"][name]
        if etype in ("Api", "HttpApi"):
            auth = p.get("Auth")
            if isinstance(auth, dict):
                for key, value in auth.items():
                    if key == "Authorizer" and value == "NONE":
                        continue
                    if key == "ApiKeyRequired" and value in (False, "false"):
                        continue
                    raise self.error(ploc + ("Auth", key), f"Auth.{key}: nimbus does not "
                                     "provide API Gateway authorizers or API keys; serving "
                                     "this route without it would let every request in")
            model = p.get("RequestModel")
            if isinstance(model, dict) and model.get("ValidateBody") in (True, "true"):
                raise self.error(ploc + ("RequestModel", "ValidateBody"), "request "
                                 "validation is not provided by nimbus; the handler would "
                                 "get bodies API Gateway refuses (validate in the handler)")
            api_props: dict[str, Any] = {}
            api_key = "RestApiId" if etype == "Api" else "ApiId"
            if p.get(api_key) is not None:
                owner = self.r.owner(p[api_key])
                if owner is None or owner not in self.apis:
                    raise self.error(ploc + (api_key,), f"{api_key} {show(p[api_key])} is not "
                                     "an API of this template")
                api_props = self.apis[owner]
            if etype == "Api":
                payload = "1.0"
                if "Path" not in p or "Method" not in p:
                    raise self.error(ploc, "an Api event needs Path and Method")
            else:
                payload = str(p.get("PayloadFormatVersion",
                                    api_props.get("PayloadFormatVersion", "2.0")))
                if payload not in ("1.0", "2.0"):
                    raise self.error(ploc + ("PayloadFormatVersion",), "expected "
                                     f"PayloadFormatVersion 1.0 or 2.0, got {payload!r}")
            method = p.get("Method", "ANY")
            if not isinstance(method, str):
                raise self.error(ploc + ("Method",), f"expected an HTTP method such as get or "
                                 f"ANY, got {show(method)}")
            method = method.upper()
            path = p.get("Path", "/{proxy+}")
            if path == "$default":
                path = "/{proxy+}"
            route: dict[str, Any] = {"method": method, "path": path}
            routes = fn.setdefault("http", [])
            self.locs[base + ("http", len(routes))] = loc
            self.locs[base + ("http", len(routes), "path")] = ploc + ("Path",)
            self.locs[base + ("http", len(routes), "method")] = ploc + ("Method",)
            routes.append(route)
            self.payloads[name].append(payload)
            return
        if etype in ("Schedule", "ScheduleV2"):
            key = "Schedule" if etype == "Schedule" else "ScheduleExpression"
            enabled = p.get("Enabled", True) not in (False, "false") and \
                str(p.get("State", "ENABLED")).upper() != "DISABLED"
            if not enabled:
                self.notices.append(f"{name}: schedule {ev_name} is disabled, so nimbus "
                                    f"registers no schedule for it ({self.where(loc)})")
                return
            entry: dict[str, Any] = {"expression": p.get(key)}
            if etype == "ScheduleV2" and "ScheduleExpressionTimezone" in p:
                entry["timezone"] = p["ScheduleExpressionTimezone"]
            if "Input" in p:  # EventBridge passes it as the whole event
                try:
                    entry["input"] = json.loads(p["Input"]) if isinstance(p["Input"], str) \
                        else p["Input"]
                except ValueError as exc:
                    raise self.error(ploc + ("Input",), f"Input is not JSON: {exc}") from None
                entry["input_as_event"] = True
            schedules = fn.setdefault("schedule", [])
            self.locs[base + ("schedule", len(schedules))] = ploc + (key,)
            self.locs[base + ("schedule", len(schedules), "input")] = ploc + ("Input",)
            self.locs[base + ("schedule", len(schedules), "timezone")] = \
                ploc + ("ScheduleExpressionTimezone",)
            schedules.append(entry)
            return
        if etype == "SQS":
            if p.get("Enabled", True) in (False, "false"):
                self.notices.append(f"{name}: SQS event {ev_name} is disabled, so nimbus "
                                    f"does not consume it ({self.where(loc)})")
                return
            if p.get("FilterCriteria"):
                raise self.error(ploc + ("FilterCriteria",), "FilterCriteria is not provided "
                                 "by nimbus; the function would see messages it filters out")
            target = self._target(p.get("Queue"), ploc + ("Queue",), {"SQS": "SQS"})
            if target is None:
                raise self.error(ploc + ("Queue",), f"Queue {show(p.get('Queue'))} is not an "
                                 f"{QUEUE} of this template (e.g. !GetAtt MyQueue.Arn)")
            if "queue" in fn:
                raise self.error(loc, f"{name} already consumes queue {fn['queue']['name']}; "
                                 "a nimbus function consumes one queue")
            queue: dict[str, Any] = {"name": target[1]}
            if "BatchSize" in p:
                queue["batch_size"] = _num(p["BatchSize"])
            if "MaximumBatchingWindowInSeconds" in p:
                queue["max_batching_window_s"] = _num(p["MaximumBatchingWindowInSeconds"])
            types = p.get("FunctionResponseTypes") or []
            queue["report_batch_failures"] = "ReportBatchItemFailures" in types
            self.put(base + ("queue",), loc, queue)
            for rich_key, prop in (("name", "Queue"), ("batch_size", "BatchSize"),
                                   ("max_batching_window_s", "MaximumBatchingWindowInSeconds")):
                self.locs[base + ("queue", rich_key)] = ploc + (prop,)
            return
        # SNS
        if p.get("FilterPolicy"):
            raise self.error(ploc + ("FilterPolicy",), "FilterPolicy is not provided by "
                             "nimbus; the function would see messages it filters out")
        target = self._target(p.get("Topic"), ploc + ("Topic",), {"SNS": "SNS"})
        if target is None:
            raise self.error(ploc + ("Topic",), f"Topic {show(p.get('Topic'))} is not an "
                             f"{TOPIC} of this template (e.g. !Ref MyTopic)")
        topics = fn.setdefault("topic", [])
        self.locs[base + ("topic", len(topics))] = ploc + ("Topic",)
        topics.append(target[1])

    def _unconsumed_queues(self) -> None:
        consumed = {f["queue"]["name"] for f in self.rich["functions"].values() if "queue" in f}
        for logical, qname in self.queues.items():
            if qname not in consumed:
                self.notices.append(f"{QUEUE} {logical} has no SQS event consuming it: nimbus "
                                    "makes a queue for the function that consumes it "
                                    f"({self.where(('Resources', logical))})")


def _merge(glob: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """SAM's Globals rule: maps merge key by key, lists add up, scalars are overridden."""
    out = dict(glob)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def _num(value: Any) -> Any:
    """A number given as text (a String parameter, say) as the number; anything else as is."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value
