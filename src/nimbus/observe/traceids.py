"""Trace ids as text: W3C ``traceparent`` and Lambda's ``_X_AMZN_TRACE_ID``.

Pure functions with no dependencies: instances import this module (the
X-Ray header is set per invocation from the event's ``traceparent``), so it
must stay cheap to import.

``traceparent`` is ``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``.
The X-Ray header Lambda puts in ``_X_AMZN_TRACE_ID`` is
``Root=1-<8 hex>-<24 hex>;Parent=<16 hex>;Sampled=<0|1>``: the W3C trace id
split after its first 8 hex digits (X-Ray's epoch part), the same span id, and
the sampled bit of the flags. The mapping is one to one both ways.
"""

from __future__ import annotations

_HEX = frozenset("0123456789abcdef")
ENV_NAME = "_X_AMZN_TRACE_ID"


def _is_hex(text: str, size: int) -> bool:
    return len(text) == size and _HEX.issuperset(text)


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` from a ``traceparent`` header value, or
    None when it is not a valid one (wrong shape, version ff, all-zero ids)."""
    parts = value.strip().lower().split("-")
    if len(parts) < 4:
        return None
    version, trace, span, flags = parts[0], parts[1], parts[2], parts[3]
    if not (_is_hex(version, 2) and _is_hex(trace, 32) and _is_hex(span, 16)
            and _is_hex(flags, 2)) or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None  # version 00 has exactly four fields
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def xray_from_ids(trace_id: int, span_id: int, sampled: bool = True) -> str:
    """Lambda's ``_X_AMZN_TRACE_ID`` value for these W3C ids."""
    t = f"{trace_id:032x}"
    return f"Root=1-{t[:8]}-{t[8:]};Parent={span_id:016x};Sampled={1 if sampled else 0}"


_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def xray_from_traceparent(value: str) -> str | None:
    """The X-Ray header for a ``traceparent`` value, or None if it is invalid."""
    # the form gateways send (version 00, lower case), by slicing: this runs
    # in the instance on every traced invocation
    if (len(value) == 55 and value[:3] == "00-" and value[35] == "-" and value[52] == "-"
            and _HEX.issuperset(value[3:35]) and _HEX.issuperset(value[36:52])
            and _HEX.issuperset(value[53:]) and value[3:35] != _ZERO_TRACE
            and value[36:52] != _ZERO_SPAN):
        return (f"Root=1-{value[3:11]}-{value[11:35]};Parent={value[36:52]};"
                f"Sampled={int(value[54], 16) & 1}")
    ids = parse_traceparent(value)
    if ids is None:
        return None
    return xray_from_ids(ids[0], ids[1], bool(ids[2] & 1))


def traceparent_from_xray(value: str) -> str | None:
    """The ``traceparent`` for an X-Ray header (``Root`` and ``Parent`` needed;
    ``Sampled`` defaults to 0 as X-Ray's does), or None if it is invalid."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, val = part.strip().partition("=")
        if sep:
            fields[key] = val.strip().lower()
    root, parent = fields.get("Root", ""), fields.get("Parent", "")
    pieces = root.split("-")
    if (len(pieces) != 3 or pieces[0] != "1" or not _is_hex(pieces[1], 8)
            or not _is_hex(pieces[2], 24) or not _is_hex(parent, 16)):
        return None
    trace_id, span_id = int(pieces[1] + pieces[2], 16), int(parent, 16)
    if not trace_id or not span_id:
        return None
    return format_traceparent(trace_id, span_id, fields.get("Sampled") == "1")
