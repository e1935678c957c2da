"""Load app.yaml (short "seed" form or rich form) into an :class:`AppSpec`.

Steps, each raising :class:`ManifestError` with file, line and field:

1. find the manifest and parse the YAML, remembering lines (:mod:`.source`);
2. pick the form and validate it with pydantic (:mod:`.schema`);
3. turn both forms into the same per-function drafts;
4. cross-checks pydantic cannot do: keys bounded by other keys (e.g.
   ``min_instances`` by ``max_instances``) and defaults derived from them,
   routes that collide, files that must exist (handler module,
   requirements) and, with ``check_code``, that the module defines the
   callable (parsed with ``ast``, never imported).
"""

from __future__ import annotations

import difflib
import keyword
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nimbus.errors import ManifestError
from nimbus.manifest.errmap import format_loc, from_validation_error, show, unknown_key
from nimbus.manifest.model import (
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MIN_INSTANCES,
    DEFAULT_SCALE_TO_ZERO_AFTER_S,
    DEFAULT_STABLE_WINDOW_S,
    AppSpec,
    FunctionSpec,
    RolloutSpec,
    Route,
    ScheduleSpec,
    is_provided,
)
from nimbus.manifest.modules import (
    RESERVED_MODULES,
    ModuleNames,
    ModuleSyntaxError,
    find_module,
    module_candidates,
    top_level_modules,
    top_level_names,
)
from nimbus.manifest.routes import Declared, conflict_message, find_conflict
from nimbus.manifest.sam import TEMPLATE_NAMES, SamApp, read_sam
from nimbus.manifest.schema import (
    EVENT_KEYS,
    RUNTIME_RE,
    SCALING_KEYS,
    EventSettings,
    FunctionModel,
    RichApp,
    RolloutModel,
    SeedApp,
    SeedHandler,
    check_handler_ref,
    sanitise_app_name,
)
from nimbus.manifest.source import Loc, Source, read_source

APP_YAML_NAMES = ("app.yaml", "app.yml")
# Every file that makes a folder an app: app.yaml, or a SAM template.
MANIFEST_NAMES = APP_YAML_NAMES + TEMPLATE_NAMES
_FORMS = ("handlers", "functions")


@dataclass
class _Draft:
    """One function before the cross-checks, with where its parts were written."""

    name: str
    module: str
    callable: str
    runtime: str
    handler_loc: Loc
    routes: list[Declared] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    requirements_loc: Loc = ()
    # Autoscaling keys the manifest sets, and concurrency if it is set (it bounds
    # target_concurrency): key -> (value, where it was written).
    scaling: dict[str, tuple[Any, Loc]] = field(default_factory=dict)
    # Async / trigger keys: key -> (value, where); schedules and topics add up.
    events: dict[str, tuple[Any, Loc]] = field(default_factory=dict)
    schedules: list[tuple[ScheduleSpec, Loc]] = field(default_factory=list)
    topics: list[tuple[str, Loc]] = field(default_factory=list)


def load_app(
    path: str | Path, *, check_code: bool = True, default_name: str | None = None,
    parameters: dict[str, str] | None = None,
) -> AppSpec:
    """Load and validate the app at ``path`` (its folder, or its app.yaml).

    The app is named by the manifest's ``name:``, else ``default_name``
    (for callers whose folder is not named after the app, e.g. an unpacked
    bundle), else the folder's name, sanitised to ``[a-z0-9-]``.

    Handler module files and requirements files must always exist;
    ``check_code`` adds parsing each module (never importing it) to check
    that it defines the callable and has no syntax error.

    A folder with a SAM ``template.yaml`` instead of an app.yaml is read
    through :mod:`.sam`; ``parameters`` override its ``Parameters``.
    """
    try:
        return _load_app(Path(path), check_code, default_name, parameters)
    except ManifestError as exc:
        raise _one_line(exc) from None


def _one_line(exc: ManifestError) -> ManifestError:
    """``exc`` with control characters (a key holding a newline, say) escaped:
    an error is printed as one line."""
    parts = (exc.message, exc.file, exc.field)
    clean = [None if p is None else _printable(p) for p in parts]
    if clean == list(parts):
        return exc
    return ManifestError(clean[0] or "", file=clean[1], line=exc.line, field=clean[2])


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _load_app(path: Path, check_code: bool, default_name: str | None,
              parameters: dict[str, str] | None) -> AppSpec:
    file, app_dir = _locate(path)
    if file.name in TEMPLATE_NAMES:
        return _load_sam(file, app_dir, check_code, default_name, parameters or {})
    if parameters:
        raise ManifestError("parameter overrides apply to SAM templates (template.yaml); "
                            f"this app is described by {file.name}", file=file, line=1)
    src = read_source(file)
    form = _form(src)
    if form == "handlers":
        seed = _validate(SeedApp, src)
        if is_provided(seed.runtime):
            raise _error(src, ("runtime",), f"runtime {seed.runtime} needs the functions: form "
                         "(a function's handler is then any string for its bootstrap)")
        app_name, regions, drafts = seed.name, seed.regions, _seed_drafts(seed, src)
        rollouts = _rollouts(seed.rollout, {name: None for name in drafts})
    else:
        rich = _validate(RichApp, src)
        _check_rich_runtimes(rich, src)
        app_name, regions, drafts = rich.name, rich.regions, _rich_drafts(rich, src)
        rollouts = _rollouts(rich.rollout, {name: fn.rollout
                                            for name, fn in rich.functions.items()})
    return _finish(src, app_dir, check_code, drafts, AppSpec(
        name=app_name or sanitise_app_name(default_name or app_dir.resolve().name),
        source=str(file.resolve()), regions=regions, rollouts=rollouts))


def _load_sam(file: Path, app_dir: Path, check_code: bool, default_name: str | None,
              parameters: dict[str, str]) -> AppSpec:
    from nimbus.region import region
    from nimbus.worker.target import ACCOUNT

    name = sanitise_app_name(default_name or app_dir.resolve().name)
    sam = read_sam(file, app_dir, app_name=name, region=region(), account=ACCOUNT,
                   parameters=parameters)
    try:
        rich = _validate(RichApp, sam.source)
        _check_rich_runtimes(rich, sam.source)
        drafts = _rich_drafts(rich, sam.source)
        rollouts = _rollouts(rich.rollout, {n: fn.rollout for n, fn in rich.functions.items()})
        app = _finish(sam.source, app_dir, check_code, drafts, AppSpec(
            name=rich.name or name, source=str(file.resolve()), regions=rich.regions,
            rollouts=rollouts), sam)
    except ManifestError as exc:
        raise sam.error(exc) from None
    functions = {}
    for fname, fn in app.functions.items():
        payloads = sam.payloads.get(fname, [])
        fn = replace(fn, routes=tuple(replace(r, payload=p)
                                      for r, p in zip(fn.routes, payloads, strict=True)))
        functions[fname] = fn
    return replace(app, functions=functions, notices=app.notices + tuple(sam.notices))


def _finish(src: Source, app_dir: Path, check_code: bool, drafts: dict[str, _Draft],
            app: AppSpec, sam: SamApp | None = None) -> AppSpec:
    """``app`` with its functions, once the drafts pass the cross-checks."""
    for draft in drafts.values():
        draft.settings.update(_scaling_settings(draft, src))
        draft.settings.update(_event_settings(draft))
    _check_routes(drafts, src)
    _check_events(drafts, src)
    names_cache: dict[Path, ModuleNames] = {}
    for draft in drafts.values():
        _check_folders(draft, app_dir, src)
        if is_provided(draft.runtime):
            _check_bootstrap(draft, app_dir, src)
            continue
        _check_module_name(draft, src)
        _check_code(draft, app_dir, src, names_cache, check_code)
        _check_requirements(draft, app_dir, src)
    preloaded = {m.split(".")[0] for d in drafts.values() for m in d.settings.get("preload", ())}
    # the app folder, and each code folder (an import root of its own)
    for root in dict.fromkeys([app_dir] + [app_dir / d.settings["code_dir"]
                                           for d in drafts.values()
                                           if d.settings.get("code_dir")]):
        _check_shadowing(root, src, preloaded)
    functions = {d.name: _build(d) for d in drafts.values()}
    return replace(app, functions=functions, notices=_runtime_notices(
        d for d in drafts.values() if not is_provided(d.runtime)))


def _check_folders(draft: _Draft, app_dir: Path, src: Source) -> None:
    """The code and layer folders exist in the app folder."""
    code_dir = draft.settings.get("code_dir")
    where = draft.handler_loc[:-1]
    if code_dir is not None and not (app_dir / code_dir).is_dir():
        raise _error(src, where + ("code_dir",), f"code folder {code_dir!r} not found in "
                     f"{app_dir}")
    for i, layer in enumerate(draft.settings.get("layers", ())):
        if not (app_dir / layer).is_dir():
            raise _error(src, where + ("layers", i), f"layer folder {layer!r} not found in "
                         f"{app_dir}")


def _rollouts(app_block: RolloutModel | None,
              own: dict[str, RolloutModel | None]) -> dict[str, RolloutSpec]:
    """Each function's rollout settings: the app's block, then its own keys."""
    base = app_block.spec() if app_block is not None else None
    out: dict[str, RolloutSpec] = {}
    for name, block in own.items():
        spec = base
        if block is not None:
            spec = (base or RolloutSpec()).merged(block.spec())
        if spec is not None:
            out[name] = spec
    return out


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        found = [path / n for n in MANIFEST_NAMES if (path / n).is_file()]
        if not found:
            raise ManifestError(f"no {', '.join(APP_YAML_NAMES)} or SAM "
                                f"{' or '.join(TEMPLATE_NAMES)} in this folder", file=path)
        if len(found) > 1:
            raise ManifestError(f"both {' and '.join(f.name for f in found)} exist; keep one",
                                file=path)
        return found[0], path
    if path.is_file():
        return path, path.parent
    raise ManifestError("no such manifest file or app folder", file=path)


def _form(src: Source) -> str:
    data = src.data
    if data is None:
        raise ManifestError("the manifest is empty; expected a mapping with a 'handlers' list "
                            "or a 'functions' mapping", file=src.file, line=1)
    if not isinstance(data, dict):
        raise ManifestError(f"expected a mapping at the top level, got {show(data)}",
                            file=src.file, line=src.root_line)
    present = [k for k in _FORMS if k in data]
    if len(present) == 2:
        raise ManifestError("use either 'handlers' (short form) or 'functions' (rich form), "
                            "not both", file=src.file, line=src.line(("functions",), key=True),
                            field="functions")
    if present:
        return present[0]
    for key in data:  # a misspelt form key is the likeliest reason for neither
        if difflib.get_close_matches(str(key), _FORMS, n=1, cutoff=0.6):
            raise ManifestError(unknown_key(key, list(_FORMS)), file=src.file,
                                line=src.line((key,), key=True), field=str(key))
    raise ManifestError("expected a 'handlers' list (short form) or a 'functions' mapping "
                        f"(rich form); found keys: {', '.join(map(str, data))}",
                        file=src.file, line=src.root_line)


def _validate(model: type[SeedApp] | type[RichApp], src: Source) -> Any:
    try:
        return model.model_validate(src.data)
    except ValidationError as exc:
        raise from_validation_error(exc, model, src) from None


def _error(src: Source, loc: Loc, message: str, *, key: bool = False) -> ManifestError:
    return ManifestError(message, file=src.file, line=src.line(loc, key=key),
                         field=format_loc(loc))


def _seed_drafts(seed: SeedApp, src: Source) -> dict[str, _Draft]:
    drafts: dict[str, _Draft] = {}
    for i, h in enumerate(seed.handlers):
        loc: Loc = ("handlers", i)
        _check_seed_trigger(h, loc, src)
        route = Declared(h.method, h.path or f"/{h.function}", h.function,
                         format_loc(loc), src.line(loc, key=True), payload=h.payload)
        routes = [route] if h.event == "http" else []
        draft = drafts.get(h.function)
        if draft is not None and h.handler is None:
            draft.routes.extend(routes)  # another trigger for a function declared above
            _merge_scaling(draft, h, loc, src)
            _merge_events(draft, h, loc, src)
            continue
        if h.handler:
            module, func = h.handler.rsplit(".", 1)
            ref_loc = loc + ("handler",)
        else:
            # The function name doubles as module and callable, so it must be importable.
            if not h.function.isidentifier() or keyword.iskeyword(h.function):
                raise _error(src, loc + ("function",),
                             f"function name {h.function!r} is not a Python identifier, so it "
                             "cannot name the module and callable; add handler: module.callable")
            module, func, ref_loc = h.function, h.function, loc + ("function",)
        if draft is None:
            draft = drafts[h.function] = _Draft(h.function, module, func, seed.runtime, ref_loc,
                                                routes)
            _merge_scaling(draft, h, loc, src)
            _merge_events(draft, h, loc, src)
        elif (draft.module, draft.callable) != (module, func):
            # Several handlers may add triggers to one function, not redefine it.
            raise _error(src, ref_loc, f"function {h.function!r} is already declared at "
                         f"{format_loc(draft.handler_loc)} with handler "
                         f"{draft.module}.{draft.callable}, not {module}.{func}")
        else:
            draft.routes.extend(routes)
            _merge_scaling(draft, h, loc, src)
            _merge_events(draft, h, loc, src)
    return drafts


_TRIGGER_KEY = {"schedule": "schedule", "queue": "queue", "topic": "topic"}


def _check_seed_trigger(h: SeedHandler, loc: Loc, src: Source) -> None:
    """A short-form entry is one trigger: ``event: schedule`` needs ``schedule:``,
    and a trigger key belongs only to its own event."""
    need = _TRIGGER_KEY.get(h.event)
    if need is not None and need not in h.model_fields_set:
        raise _error(src, loc + ("event",), f"event: {h.event} needs a '{need}' key "
                     f"(e.g. {_EXAMPLE[need]})")
    for key in _TRIGGER_KEY.values():
        if key in h.model_fields_set and key != need:
            raise _error(src, loc + (key,), f"'{key}' belongs to event: {key}, "
                         f"but this entry is event: {h.event}", key=True)
    if h.event != "http":
        for key in ("method", "path", "payload"):
            if key in h.model_fields_set:
                raise _error(src, loc + (key,), f"'{key}' is for event: http, "
                             f"but this entry is event: {h.event}", key=True)


_EXAMPLE = {"schedule": "schedule: rate(5 minutes)", "queue": "queue: orders",
            "topic": "topic: signups"}


def _merge_events(draft: _Draft, model: EventSettings, loc: Loc, src: Source) -> None:
    """Record the async and trigger keys ``model`` sets (each scalar set once)."""
    for key in EVENT_KEYS:
        if key not in model.model_fields_set:
            continue
        value = getattr(model, key)
        if key == "schedule":
            single = not isinstance(_raw(src, loc + (key,)), list)
            for j, sch in enumerate(value):
                sloc = loc + (key,) if single else loc + (key, j)
                draft.schedules.append((ScheduleSpec(
                    sch.expression, sch.timezone, sch.missed,
                    tuple(sorted(sch.input.items())), sch.input_as_event), sloc))
            continue
        if key == "topic":
            draft.topics.extend((t, loc + (key,)) for t in value)
            continue
        if key in draft.events and draft.events[key][0] != value:
            first_loc = draft.events[key][1]
            raise _error(src, loc + (key,), f"{key} of function {draft.name!r} is already "
                         f"set at {format_loc(first_loc)} (line {src.line(first_loc)}); "
                         "set it once")
        draft.events.setdefault(key, (value, loc + (key,)))


def _raw(src: Source, loc: Loc) -> Any:
    node: Any = src.data
    for part in loc:
        node = node[part]
    return node


def _event_settings(draft: _Draft) -> dict[str, Any]:
    given = {k: v for k, (v, _loc) in draft.events.items()}
    dest = given.get("destinations")
    queue = given.get("queue")
    out: dict[str, Any] = {
        "schedules": tuple(s for s, _loc in draft.schedules),
        "topics": tuple(dict.fromkeys(t for t, _loc in draft.topics)),
        "on_success": dest.on_success.ref if dest and dest.on_success else None,
        "on_failure": dest.on_failure.ref if dest and dest.on_failure else None,
        "dead_letter_to": dest.dead_letter_queue.ref
        if dest and dest.dead_letter_queue else None,
    }
    for key in ("retries", "dead_letter"):
        if key in given:
            out[key] = given[key]
    for key in ("retry_delay_s", "max_event_age_s"):
        if key in given:
            out[key] = float(given[key])
    if given.get("trigger_alias") is not None:
        out["trigger_alias"] = given["trigger_alias"]
    if queue is not None:
        out.update(queue=queue.name, batch_size=queue.batch_size,
                   max_batching_window_s=float(queue.max_batching_window_s),
                   report_batch_failures=queue.report_batch_failures)
    return out


def _check_events(drafts: dict[str, _Draft], src: Source) -> None:
    """One consumer per queue; destinations name a function or a queue of this app."""
    consumers: dict[str, _Draft] = {}
    for d in drafts.values():
        if d.events.get("queue", (None,))[0] is None:  # absent, or null: no queue
            continue
        name = d.events["queue"][0].name
        if name in consumers:
            first = consumers[name]
            raise _error(src, d.events["queue"][1], f"queue {name!r} is already consumed by "
                         f"function {first.name!r} (line {src.line(first.events['queue'][1])}); "
                         "a queue has one consumer (use a topic to fan out)")
        consumers[name] = d
    for d in drafts.values():
        if d.events.get("destinations", (None,))[0] is None:
            continue
        dest, loc = d.events["destinations"]
        for when in ("on_success", "on_failure", "dead_letter_queue"):
            target = getattr(dest, when)
            if target is None:
                continue
            wloc = loc + (when,)
            if when == "dead_letter_queue" and target.function is not None:
                raise _error(src, wloc + ("function",), "a dead-letter queue is a queue or a "
                             "topic (as on Lambda), not a function")
            if target.function is not None and target.function not in drafts:
                raise _error(src, wloc + ("function",), f"destination function "
                             f"{target.function!r} is not a function of this app; "
                             f"functions: {', '.join(sorted(drafts))}")
            if target.queue is not None and target.queue not in consumers:
                known = ", ".join(sorted(consumers)) or "none"
                raise _error(src, wloc + ("queue",), f"destination queue {target.queue!r} is "
                             f"not consumed by any function of this app (queues: {known})")
            topics = {t for d2 in drafts.values() for t, _loc in d2.topics}
            if target.topic is not None and target.topic not in topics:
                known = ", ".join(sorted(topics)) or "none"
                raise _error(src, wloc + ("topic",), f"destination topic {target.topic!r} has "
                             f"no subscriber among this app's functions (topics: {known})")


def _merge_scaling(draft: _Draft, model: SeedHandler | FunctionModel, loc: Loc,
                   src: Source) -> None:
    """Record the autoscaling keys ``model`` sets. In the short form a function's
    keys may be spread over its handler entries, but each is set only once
    (or to the same value again)."""
    for key in SCALING_KEYS:
        if key not in model.model_fields_set:
            continue
        value = getattr(model, key)
        if key in draft.scaling and draft.scaling[key][0] != value:
            first, first_loc = draft.scaling[key]
            raise _error(src, loc + (key,), f"{key} of function {draft.name!r} is already "
                         f"set to {_num(first)} at {format_loc(first_loc)} "
                         f"(line {src.line(first_loc)}); set it once")
        draft.scaling.setdefault(key, (value, loc + (key,)))


def _rich_drafts(rich: RichApp, src: Source) -> dict[str, _Draft]:
    drafts: dict[str, _Draft] = {}
    for name, fn in rich.functions.items():
        loc: Loc = ("functions", name)
        if is_provided(fn.runtime or rich.runtime):
            module, func = "", fn.handler  # given to the bootstrap as _HANDLER
        else:
            module, func = fn.handler.rsplit(".", 1)
        single = isinstance(src.data["functions"][name].get("http"), dict)
        routes = []
        for j, r in enumerate(fn.http):
            rloc = loc + ("http",) if single else loc + ("http", j)
            routes.append(Declared(r.method, r.path, name, format_loc(rloc),
                                   src.line(rloc, key=True), r.alias, r.payload))
        settings = {
            "memory_mb": fn.memory_mb, "timeout_s": float(fn.timeout_s),
            "concurrency": fn.concurrency, "max_processes": fn.max_processes, "cpu": fn.cpu,
            "ephemeral_storage_mb": fn.ephemeral_storage_mb,
            "env": tuple(sorted(fn.env.items())), "requirements": fn.requirements,
            "code_dir": fn.code_dir, "layers": tuple(fn.layers),
        }
        draft = drafts[name] = _Draft(name, module, func, fn.runtime or rich.runtime,
                                      loc + ("handler",), routes, settings,
                                      loc + ("requirements",))
        _merge_scaling(draft, fn, loc, src)
        _merge_events(draft, fn, loc, src)
        if "concurrency" in fn.model_fields_set:
            draft.scaling["concurrency"] = (fn.concurrency, loc + ("concurrency",))
    return drafts


def _num(value: Any) -> str:
    """A value as it was most likely written: 60, not the 60.0 pydantic made of it."""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return show(value)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _scaling_settings(draft: _Draft, src: Source) -> dict[str, Any]:
    """The autoscaling fields of the function: given values checked against the
    keys that bound them, and defaults filled in. The defaults derived from other
    keys (target_concurrency, panic_window_s) are left None for FunctionSpec to resolve."""
    given = draft.scaling

    def get(key: str, default: Any) -> Any:
        return given[key][0] if key in given else default

    def bound(key: str, value: Any) -> str:
        # The other side of a failed check, saying where its value came from.
        if key in given:
            return f"{key} ({_num(value)})"
        if key == "concurrency" and key not in draft.settings:
            return f"{key} ({_num(value)}; the short form has no '{key}' key)"
        return f"{key} ({_num(value)}, the default)"

    def check(key: str, limit_key: str, limit: Any) -> None:
        if key in given and given[key][0] is not None and given[key][0] > limit:
            raise _error(src, given[key][1], f"{key} ({_num(given[key][0])}) must not exceed "
                         f"{bound(limit_key, limit)}")

    concurrency = draft.settings.get("concurrency", 1)
    max_instances = get("max_instances", DEFAULT_MAX_INSTANCES)
    stable = float(get("stable_window_s", DEFAULT_STABLE_WINDOW_S))
    check("min_instances", "max_instances", max_instances)
    check("target_concurrency", "concurrency", concurrency)
    check("panic_window_s", "stable_window_s", stable)
    return {
        "min_instances": get("min_instances", DEFAULT_MIN_INSTANCES),
        "max_instances": max_instances,
        "max_concurrency": get("max_concurrency", None),
        "target_concurrency": _float(get("target_concurrency", None)),
        "stable_window_s": stable,
        "panic_window_s": _float(get("panic_window_s", None)),
        "scale_to_zero_after_s": float(get("scale_to_zero_after_s",
                                           DEFAULT_SCALE_TO_ZERO_AFTER_S)),
        "max_queue": get("max_queue", DEFAULT_MAX_QUEUE),
        # Importing a module twice is a no-op; keep the first mention's order.
        "preload": tuple(dict.fromkeys(get("preload", ()))),
        "log_format": get("log_format", None),
        "log_level": get("log_level", None),
    }


def _check_routes(drafts: dict[str, _Draft], src: Source) -> None:
    routes = [r for d in drafts.values() for r in d.routes]
    clash = find_conflict(routes)
    if clash is not None:
        first, second = clash
        raise ManifestError(conflict_message(first, second), file=src.file, line=second.line,
                            field=second.field)


def _rename_hint(name: str) -> str:
    return f"rename it (e.g. to {name}_app) and its imports"


def _check_module_name(draft: _Draft, src: Source) -> None:
    """A handler module must not be named like a module instances import before it."""
    top = draft.module.split(".")[0]
    preload = {m.split(".")[0] for m in draft.settings.get("preload", ())}
    if top in RESERVED_MODULES or top in preload:
        what = ("a module this function preloads" if top not in RESERVED_MODULES else
                "a Python standard library module" if top in sys.stdlib_module_names else
                "a module of the nimbus runtime")
        raise _error(src, draft.handler_loc, f"handler module {draft.module!r} has the name of "
                     f"{what} ({top!r}), which an instance may import before the app's code, "
                     f"so the app's {top} would not be the module that runs; "
                     f"{_rename_hint(top)}")


def _check_shadowing(app_dir: Path, src: Source, preloaded: set[str]) -> None:
    """No top-level module or package of the app may shadow a reserved or a
    preloaded one (a zygote imports those before any app code)."""
    for name, file in top_level_modules(app_dir):
        if name in preloaded and name not in RESERVED_MODULES:
            rel = file.relative_to(app_dir).as_posix()
            raise ManifestError(f"{rel} has the name of a module the app preloads ({name!r}, "
                                "from its requirements or the environment), which its zygote "
                                f"imports before any app code, so the app's {name} would not "
                                f"be the one imported; {_rename_hint(name)} (or drop it from "
                                "preload)", file=src.file, line=src.root_line)
        if name in RESERVED_MODULES:
            rel = file.relative_to(app_dir).as_posix()
            raise ManifestError(f"{rel} has the name of the Python module {name!r}, which "
                                "instances import from the standard library or the runtime "
                                f"before any app code, so the app's {name} would not be the "
                                f"one imported; {_rename_hint(name)}",
                                file=src.file, line=src.root_line)


def _check_code(draft: _Draft, app_dir: Path, src: Source,
                cache: dict[Path, ModuleNames], check_code: bool) -> None:
    code_dir = draft.settings.get("code_dir")
    root = app_dir / code_dir if code_dir else app_dir
    module_file = find_module(root, draft.module)
    if module_file is None:
        looked = " and ".join(str(p.relative_to(app_dir)) for p in
                              module_candidates(root, draft.module))
        raise _error(src, draft.handler_loc, f"handler module {draft.module!r} not found: "
                     f"looked for {looked} in {app_dir}")
    if not check_code:
        return
    if module_file not in cache:
        try:
            cache[module_file] = top_level_names(module_file)
        except ModuleSyntaxError as exc:
            where = f"{src.file}:{src.line(draft.handler_loc)}"
            raise ManifestError(f"cannot parse handler module: {exc.message} "
                                f"(handler {draft.module}.{draft.callable}, {where})",
                                file=exc.file, line=exc.line,
                                field=format_loc(draft.handler_loc)) from None
    names = cache[module_file].names
    if names is None or draft.callable in names:
        return
    rel = module_file.relative_to(app_dir)
    message = f"{rel} defines no top-level {draft.callable!r}"
    close = difflib.get_close_matches(draft.callable, sorted(names), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    raise _error(src, draft.handler_loc, message)


def _check_rich_runtimes(rich: RichApp, src: Source) -> None:
    """Per function: a Python handler is 'module.callable'; a custom
    runtime's is any string, and it has no requirements, preload or
    concurrency above 1 (its bootstrap takes one invocation at a time)."""
    for name, fn in rich.functions.items():
        loc: Loc = ("functions", name)
        runtime = fn.runtime or rich.runtime
        if not is_provided(runtime):
            problem = check_handler_ref(fn.handler)
            if problem:
                raise _error(src, loc + ("handler",), problem)
            continue
        for key, why in (("requirements", "install them into the code folder, next to "
                                          "bootstrap"),
                         ("preload", "there is no Python zygote to preload into")):
            if key in fn.model_fields_set and getattr(fn, key):
                raise _error(src, loc + (key,), f"{key} is for Python runtimes, not runtime "
                             f"{runtime}: {why}", key=True)
        if fn.concurrency > 1:
            raise _error(src, loc + ("concurrency",), f"concurrency must be 1 with runtime "
                         f"{runtime}: its bootstrap takes one invocation at a time")


def _check_bootstrap(draft: _Draft, app_dir: Path, src: Source) -> None:
    """A custom runtime's code folder holds an executable file ``bootstrap``."""
    sub = draft.settings.get("code_dir")
    folder = app_dir / sub if sub else app_dir
    path = folder / "bootstrap"
    rel = path.relative_to(app_dir).as_posix()
    if not path.is_file():
        raise _error(src, draft.handler_loc, f"runtime {draft.runtime} needs an executable "
                     f"file {rel} in {app_dir} (the custom runtime's entry point), and there "
                     "is none")
    if not os.access(path, os.X_OK):
        raise _error(src, draft.handler_loc, f"{rel} is not executable (runtime "
                     f"{draft.runtime} runs it): chmod +x {rel}")


def _check_requirements(draft: _Draft, app_dir: Path, src: Source) -> None:
    req = draft.settings.get("requirements")
    if req is not None and not (app_dir / req).is_file():
        raise _error(src, draft.requirements_loc,
                     f"requirements file {req!r} not found in {app_dir}")


def _build(draft: _Draft) -> FunctionSpec:
    return FunctionSpec(
        name=draft.name,
        module=draft.module,
        callable=draft.callable,
        runtime=draft.runtime,
        routes=tuple(Route(r.method, r.path, r.alias, r.payload) for r in draft.routes),
        **draft.settings,
    )


def _runtime_notices(drafts: Any) -> tuple[str, ...]:
    """Declared python3.X runtimes are all served by this interpreter; say so when X differs."""
    here = sys.version_info
    by_runtime: dict[str, list[str]] = {}
    for d in drafts:
        m = RUNTIME_RE.fullmatch(d.runtime)
        if m and m.group(1) is not None and int(m.group(1)) != here.minor:
            by_runtime.setdefault(d.runtime, []).append(d.name)
    notices = []
    for runtime, names in sorted(by_runtime.items()):
        which = f"function {names[0]}" if len(names) == 1 else f"functions {', '.join(names)}"
        notices.append(f"runtime {runtime} ({which}) is served by Python {here.major}.{here.minor}")
    return tuple(notices)
