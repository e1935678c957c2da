"""Versions and aliases in an app record: pure functions, no I/O.

An app record names one *stable* version per function (``functions[fn]``):
what the ``live`` alias serves fully when no rollout runs. Aliases map a
name to weights over versions (``aliases[fn]["live"] = {"7": 90, "8": 10}``);
``versions[fn]`` holds the records of the other versions some alias names.
A record without ``aliases``/``versions`` is exactly what deploys always
wrote, and every function here leaves such a record in that shape when
nothing is split: ``live`` at 100% on the stable version is implicit.

Sticky clients: a key hashes (crc32, the same in every process) to a bucket
0..9999; :func:`bucket_table` gives the newest version the lowest buckets,
so as its share grows a client moves at most once, old to new, never back.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any

from nimbus.errors import NotFoundError, UserInputError

DEFAULT_ALIAS = "live"
BUCKETS = 10_000
MAX_VERSIONS_PER_ALIAS = 10

_ALIAS = re.compile(r"[a-z][a-z0-9-]{0,62}")

App = Mapping[str, Any]


def check_alias_name(name: str) -> str:
    """``name`` when it is a valid alias name, else a UserInputError."""
    if not isinstance(name, str) or not _ALIAS.fullmatch(name) or name.isdigit():
        raise UserInputError(
            f"alias name {name!r} is not valid: use 1 to 63 characters, lower-case letters, "
            "digits and '-', starting with a letter")
    return name


def parse_weights(text: str) -> dict[int, int]:
    """``"8"`` -> ``{8: 100}``; ``"7=90,8=10"`` -> ``{7: 90, 8: 10}``.
    Weights are whole percents (0..100) summing to 100."""
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise UserInputError("weights are empty: give a version (8) or versions with "
                             "weights (7=90,8=10)")
    if "=" not in text and "," not in text:
        return {_version(text, text): 100}
    weights: dict[int, int] = {}
    for part in text.split(","):
        version_text, sep, weight_text = part.strip().partition("=")
        if not sep:
            raise UserInputError(f"weights {text!r}: {part.strip()!r} has no '=WEIGHT' "
                                 "(write 7=90,8=10)")
        version = _version(version_text.strip(), text)
        if version in weights:
            raise UserInputError(f"weights {text!r}: version {version} is named twice")
        weights[version] = _weight(weight_text.strip(), version, text)
    return check_weights(weights, text)


def _version(raw: Any, where: Any) -> int:
    if isinstance(raw, bool):
        raw = None
    if isinstance(raw, int):
        number = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 9:
        number = int(raw)
    else:
        raise UserInputError(f"weights {where!r}: version {raw!r} is not a version number")
    if number < 1:
        raise UserInputError(f"weights {where!r}: version {number} is not a version number "
                             "(versions start at 1)")
    return number


def _weight(raw: Any, version: int, where: Any) -> int:
    if isinstance(raw, str) and raw.endswith("%"):
        raw = raw[:-1]
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 3:
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 100:
        raise UserInputError(f"weights {where!r}: the weight of version {version} must be a "
                             f"whole percent from 0 to 100, got {raw!r}")
    return raw


def check_weights(weights: dict[Any, Any], where: Any = None) -> dict[int, int]:
    """Weights from JSON (``{"7": 90, "8": 10}``) or parsed text, checked:
    versions are numbers, weights whole percents summing to 100."""
    shown = where if where is not None else weights
    if not isinstance(weights, dict) or not weights:
        raise UserInputError(f"weights {shown!r}: expected at least one version with a weight")
    if len(weights) > MAX_VERSIONS_PER_ALIAS:
        raise UserInputError(f"weights {shown!r}: at most {MAX_VERSIONS_PER_ALIAS} versions "
                             "per alias")
    out: dict[int, int] = {}
    for raw_version, raw_weight in weights.items():
        version = _version(raw_version, shown)
        if version in out:
            raise UserInputError(f"weights {shown!r}: version {version} is named twice")
        out[version] = _weight(raw_weight, version, shown)
    total = sum(out.values())
    if total != 100:
        raise UserInputError(f"weights {shown!r} sum to {total}, not 100")
    return out


def stable_version(app: App, fn: str) -> int:
    try:
        return int(app["functions"][fn]["version"])
    except KeyError:
        raise NotFoundError(f"function {fn!r} is not in app {app.get('name')!r}") from None


def aliases_of(app: App, fn: str) -> dict[str, dict[int, int]]:
    """Every alias of ``fn`` with its weights, ``live`` always first
    (implicit: 100% on the stable version)."""
    stable = stable_version(app, fn)
    stored = (app.get("aliases") or {}).get(fn) or {}
    out = {DEFAULT_ALIAS: {stable: 100}}
    for name in sorted(stored):
        out[name] = {int(v): int(w) for v, w in stored[name].items()}
    return out


def weights_of(app: App, fn: str, alias: str = DEFAULT_ALIAS) -> dict[int, int]:
    """The weights of ``fn``'s ``alias`` (version -> percent)."""
    aliases = aliases_of(app, fn)
    weights = aliases.get(alias)
    if weights is None:
        raise NotFoundError(f"function {fn!r} has no alias {alias!r}; its aliases: "
                            f"{', '.join(aliases)}")
    return weights


def records_of(app: App, fn: str) -> dict[int, dict[str, Any]]:
    """The version records ``app`` holds for ``fn``: the stable one and the
    ones other aliases name, by version number (stable first)."""
    stable = app["functions"].get(fn)
    if stable is None:
        raise NotFoundError(f"function {fn!r} is not in app {app.get('name')!r}")
    out = {int(stable["version"]): stable}
    for v, rec in sorted(((app.get("versions") or {}).get(fn) or {}).items(),
                         key=lambda kv: int(kv[0])):
        out.setdefault(int(v), rec)
    return out


def referenced(app: App) -> list[tuple[str, dict[str, Any]]]:
    """Every (function, version record) ``app`` names: what must have pools
    (kept warm) and must survive garbage collection."""
    return [(fn, rec) for fn in app["functions"] for rec in records_of(app, fn).values()]


def live_choices(weights: dict[int, int]) -> list[tuple[int, int]]:
    """(version, weight) of the versions that get traffic, newest first."""
    return sorted(((v, w) for v, w in weights.items() if w > 0), reverse=True)


def bucket(key: str) -> int:
    """A sticky key's bucket, 0..9999, the same in every process."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS


def bucket_table(weights: dict[int, int]) -> list[tuple[int, int]]:
    """(end bucket, version), newest version first: a bucket ``b`` goes to
    the first entry with ``b < end``. The newest version has the lowest
    buckets, so raising its weight only moves clients to it."""
    table = []
    end = 0
    for version, weight in live_choices(weights):
        end += weight * (BUCKETS // 100)
        table.append((end, version))
    return table


def version_for_bucket(table: list[tuple[int, int]], b: int) -> int:
    for end, version in table:
        if b < end:
            return version
    return table[-1][1]


def normalized(app: App) -> dict[str, Any]:
    """``app`` with its aliases tidy: ``live`` at 100% on the stable version
    left implicit, records nobody names dropped from ``versions``, empty
    maps removed (a record with nothing split has the plain deploy shape)."""
    out = dict(app)
    aliases: dict[str, dict[str, dict[str, int]]] = {}
    versions: dict[str, dict[str, dict[str, Any]]] = {}
    stored_aliases = app.get("aliases") or {}
    for fn, stable in app["functions"].items():
        known = records_of(app, fn)
        named: set[int] = set()
        for name, weights in (stored_aliases.get(fn) or {}).items():
            ints = {int(v): int(w) for v, w in weights.items()}
            if name == DEFAULT_ALIAS and ints == {int(stable["version"]): 100}:
                continue
            aliases.setdefault(fn, {})[name] = {str(v): w for v, w in sorted(ints.items())}
            named.update(ints)
        for v in sorted(named - {int(stable["version"])}):
            if v not in known:
                raise NotFoundError(f"function {fn!r} has no version {v}")
            versions.setdefault(fn, {})[str(v)] = known[v]
    out.pop("aliases", None)
    out.pop("versions", None)
    if aliases:
        out["aliases"] = aliases
    if versions:
        out["versions"] = versions
    return out


def with_weights(app: App, fn: str, alias: str, weights: dict[int, int],
                 extra_records: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A new app record with ``fn``'s ``alias`` set to ``weights``.
    ``extra_records`` supplies records of versions the app does not hold yet
    (read from ``functions/<fn>/versions/``). Setting ``live`` to one
    serving version makes it the stable version (:func:`promote`); versions
    it names at weight 0 stay named."""
    check_alias_name(alias)
    weights = check_weights(weights)
    known = records_of(app, fn)
    for v, rec in (extra_records or {}).items():
        known.setdefault(int(v), rec)
    missing = [v for v in weights if v not in known]
    if missing:
        raise NotFoundError(f"function {fn!r} has no version {missing[0]}; its versions: "
                            f"{', '.join(str(v) for v in sorted(known))}")
    serving = [v for v, w in weights.items() if w > 0]
    if alias == DEFAULT_ALIAS and len(serving) == 1:
        app = promote(app, fn, serving[0], {serving[0]: known[serving[0]]})
        if len(weights) == 1:
            return app
        # versions at weight 0 stay named (and warm) like any alias's
    out = dict(app)
    versions = {f: dict(recs) for f, recs in (app.get("versions") or {}).items()}
    stable = stable_version(app, fn)
    for v in weights:
        if v != stable:
            versions.setdefault(fn, {})[str(v)] = known[v]
    aliases = {f: dict(a) for f, a in (app.get("aliases") or {}).items()}
    aliases.setdefault(fn, {})[alias] = {str(v): w for v, w in sorted(weights.items())}
    out["aliases"] = aliases
    out["versions"] = versions
    return normalized(out)


def without_alias(app: App, fn: str, alias: str) -> dict[str, Any]:
    """A new app record without ``fn``'s ``alias`` (never ``live``, nor an
    alias a route or the function's triggers name)."""
    if alias == DEFAULT_ALIAS:
        raise UserInputError(f"alias {DEFAULT_ALIAS!r} cannot be removed: every function "
                             "has it (set it to a version instead)")
    weights_of(app, fn, alias)  # NotFoundError naming the aliases
    for route in app.get("routes", ()):
        if route[2] == fn and route_alias(route) == alias:
            raise UserInputError(f"alias {alias!r} of {fn!r} is used by the route "
                                 f"{route[0]} {route[1]}: remove the route from the "
                                 "manifest first")
    rec = (app.get("functions") or {}).get(fn) or {}
    if rec.get("spec", {}).get("trigger_alias") == alias:
        raise UserInputError(f"alias {alias!r} of {fn!r} is what its triggers invoke "
                             "(trigger_alias): change the manifest first")
    out = dict(app)
    aliases = {f: dict(a) for f, a in (app.get("aliases") or {}).items()}
    aliases[fn].pop(alias, None)
    out["aliases"] = aliases
    return normalized(out)


def promote(app: App, fn: str, version: int,
            extra_records: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A new app record where ``version`` is ``fn``'s stable version and
    ``live`` serves it fully; other aliases are kept."""
    known = records_of(app, fn)
    for v, rec in (extra_records or {}).items():
        known.setdefault(int(v), rec)
    if version not in known:
        raise NotFoundError(f"function {fn!r} has no version {version}; its versions: "
                            f"{', '.join(str(v) for v in sorted(known))}")
    out = dict(app)
    out["functions"] = {**app["functions"], fn: known[version]}
    versions = {f: dict(recs) for f, recs in (app.get("versions") or {}).items()}
    versions.setdefault(fn, {}).update({str(v): rec for v, rec in known.items()})
    versions[fn].pop(str(version), None)
    aliases = {f: dict(a) for f, a in (app.get("aliases") or {}).items()}
    aliases.get(fn, {}).pop(DEFAULT_ALIAS, None)
    out["versions"] = versions
    out["aliases"] = aliases
    return normalized(out)


def route_alias(route: list[Any] | tuple[Any, ...]) -> str:
    """The alias a stored route points at (3 elements: ``live``)."""
    return str(route[3]) if len(route) > 3 else DEFAULT_ALIAS


def route_payload(route: list[Any] | tuple[Any, ...]) -> str:
    """The payload format of a stored route's events (4 elements or fewer: ``2.0``)."""
    return str(route[4]) if len(route) > 4 else "2.0"


def after_deploy(previous: App | None, app: App) -> dict[str, Any]:
    """The app record a deploy writes: ``app`` (its new stable versions and
    routes) with the aliases ``previous`` had kept (``live`` follows the
    deploy) and every alias a route names but nobody set yet pointing at the
    deployed version (so do the aliases functions' triggers name)."""
    out = dict(app)
    aliases: dict[str, dict[str, dict[str, int]]] = {}
    versions: dict[str, dict[str, dict[str, Any]]] = {}
    if previous is not None:
        for fn, named in ((previous.get("aliases") or {}).items()):
            if fn not in app["functions"] or fn not in previous.get("functions", {}):
                continue
            kept = {a: dict(w) for a, w in named.items() if a != DEFAULT_ALIAS}
            if kept:
                aliases[fn] = kept
                versions[fn] = {str(v): r for v, r in records_of(previous, fn).items()}
    named = [(route[2], route_alias(route)) for route in app.get("routes", ())]
    named += [(fn, rec["spec"]["trigger_alias"]) for fn, rec in app["functions"].items()
              if rec.get("spec", {}).get("trigger_alias")]
    for fn, alias in named:
        if alias != DEFAULT_ALIAS and alias not in aliases.get(fn, {}):
            aliases.setdefault(fn, {})[alias] = {str(stable_version(app, fn)): 100}
    out["aliases"] = aliases
    out["versions"] = versions
    return normalized(out)
