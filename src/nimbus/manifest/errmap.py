"""Turn pydantic validation errors into :class:`ManifestError` with file, line and field.

Pydantic reports *where* (a ``loc`` tuple) and *what kind* (an error type);
this module adds the YAML line, a dotted field name and a message written
for people editing app.yaml rather than for Python programmers.
"""

from __future__ import annotations

import difflib
import types
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from nimbus.errors import ManifestError

if TYPE_CHECKING:
    from nimbus.manifest.source import Source

MISSING: Any = object()  # "no value here" while walking the raw data

# Fallback wording when the field has no description of its own.
_EXPECTED_BY_TYPE = {
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
}


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, short enough for one line."""
    if value is MISSING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_loc(loc: tuple[Any, ...]) -> str:
    """``("functions", "users", "http", 0)`` -> ``functions.users.http[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def unknown_key(key: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key {show(key)}; did you mean {close[0]!r}?"
    return f"unknown key {show(key)}; valid keys: {', '.join(valid)}"


def from_validation_error(
    exc: ValidationError, model: type[BaseModel], src: Source
) -> ManifestError:
    """The error that comes first in the file (pydantic orders by schema, not by line)."""
    converted = [_convert(err, model, src) for err in exc.errors(include_url=False)]
    return min(converted, key=lambda e: e.line or 0)


def _convert(err: Any, model: type[BaseModel], src: Source) -> ManifestError:
    loc = tuple(err["loc"])
    etype = err["type"]
    about_key = bool(loc) and loc[-1] == "[key]"
    if about_key:
        loc = loc[:-1]
    path, given, field = _walk(src.data, loc)
    info, parent = _resolve(model, loc)
    name = loc[-1] if loc else ""
    if etype == "extra_forbidden":
        valid = list(parent.model_fields) if parent is not None else []
        message = unknown_key(name, valid)
    elif etype == "missing":
        message = f"required key {name!r} is missing"
        if info is not None and info.description:
            message += f" (expected {info.description})"
    elif etype == "nimbus":  # our own validators already wrote the whole message
        message = err["msg"]
    elif not about_key and info is not None and info.description:
        message = f"expected {info.description}, got {show(given)}"
    elif etype in _EXPECTED_BY_TYPE:
        message = f"expected {_EXPECTED_BY_TYPE[etype]}, got {show(given)}"
    else:
        message = f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {show(given)}"
    on_key = about_key or etype in ("extra_forbidden", "missing")
    return ManifestError(message, file=src.file, line=src.line(path, key=on_key),
                         field=field or None)


def _walk(data: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, str]:
    """The user-visible path for ``loc``, the raw value found there and the field name.

    A single route mapping given for ``http`` is wrapped in a list before
    validation; its phantom ``[0]`` is dropped so the field names what the
    user actually wrote. A shorthand scalar (``schedule: rate(1 hour)`` for
    ``[{expression: ...}]``) is named itself, not the parts it expands to.
    Integer mapping keys print as ``.1``, indexes as ``[1]``.
    """
    path: list[Any] = []
    field = ""
    cur = data
    for part in loc:
        if isinstance(part, int) and isinstance(cur, dict) and part not in cur:
            continue
        if path and cur is not MISSING and not isinstance(cur, (dict, list)):
            break
        path.append(part)
        if isinstance(cur, list) and isinstance(part, int):
            field += f"[{part}]"
        else:
            field += f".{part}" if field else str(part)
        if (isinstance(cur, dict) and part in cur
                or isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)):
            cur = cur[part]
        else:
            cur = MISSING
    return tuple(path), cur, field


def _strip(tp: Any) -> Any:
    # Annotated[X, ...] -> X and Optional[X] -> X, so containers and models show through.
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _resolve(
    model: type[BaseModel], loc: tuple[Any, ...]
) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    """The field at ``loc`` and the model that owns (or rejected) its last part."""
    tp: Any = model
    info: FieldInfo | None = None
    parent: type[BaseModel] | None = None
    for part in loc:
        tp = _strip(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            info = tp.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return None, parent
            tp = info.annotation
            continue
        origin, args = get_origin(tp), get_args(tp)
        if origin is list and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None, None
        info, parent = None, None
    return info, parent
