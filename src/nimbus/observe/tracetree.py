"""One request's spans as a tree with durations (``nimbus trace``)."""

from __future__ import annotations

from typing import Any

_LABEL_KEYS = ("http.request.method", "url.path", "http.response.status_code",
               "nimbus.function", "nimbus.attempt", "nimbus.region", "nimbus.instance")


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def _label(span: dict[str, Any], t0: int) -> str:
    attrs = span.get("attributes") or {}
    bits = [str(attrs[k]) for k in _LABEL_KEYS if k in attrs]
    took, at = span["end_ns"] - span["start_ns"], span["start_ns"] - t0
    text = f"{span['name']}  {_ms(took)}  (at +{_ms(at)})"
    if bits:
        text += "  " + " ".join(bits)
    if span.get("status") == "error":
        text += f"  ERROR {span.get('error', '')}".rstrip()
    return text


def format_tree(spans: list[dict[str, Any]]) -> str:
    """Every trace in ``spans`` as an indented tree, children by start time.
    A span whose parent is not among them (the client's, say) is a root."""
    if not spans:
        return "(no spans)"
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in sorted(spans, key=lambda s: (s["start_ns"], s["end_ns"])):
        parent = s.get("parent_id") if s.get("parent_id") in ids else None
        children.setdefault(parent, []).append(s)
    lines: list[str] = []
    trace = None
    for root in children.get(None, []):
        if root["trace_id"] != trace:
            trace = root["trace_id"]
            lines.append(f"trace {trace}")
        t0 = root["start_ns"]
        lines.append(_label(root, t0))
        _walk(children, root["span_id"], "", t0, lines)
    return "\n".join(lines)


def _walk(children: dict[str | None, list[dict[str, Any]]], span_id: str, prefix: str,
          t0: int, lines: list[str]) -> None:
    kids = children.get(span_id, [])
    for i, kid in enumerate(kids):
        last = i == len(kids) - 1
        lines.append(f"{prefix}{'└─ ' if last else '├─ '}{_label(kid, t0)}")
        _walk(children, kid["span_id"], prefix + ("   " if last else "│  "), t0, lines)
