"""Read a manifest into plain data plus the line of every key and value.

``yaml.safe_load`` forgets where things came from, so we compose the node
tree ourselves and record the ``start_mark`` of each mapping key, mapping
value and sequence item under its ``loc`` path (the same shape pydantic
uses), then construct the data from the same nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nimbus.errors import ManifestError
from nimbus.manifest.errmap import show
from nimbus.manifest.safeyaml import LimitError, ManifestLoader

Loc = tuple[Any, ...]

# Routes are naturally written `{method: GET, path: /users/{id}}`, but inside
# a flow mapping YAML reads those braces as indicators and fails. When (and
# only when) parsing fails on a line, an unquoted `path:` value holding
# braces on that line is quoted and parsing retried; quoted strings and
# comments are matched first so they are never touched.
_PARAM = r"\{[A-Za-z0-9_+]*\}"
_PLAIN = r"[^\s,\[\]{}'\"#]"
_FLOW_PATH_FIX = re.compile(
    rf"""("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|(?<=\s)\#.*)"""  # 1: left alone
    rf"|(?<=\b[Pp]ath:)(\s*)(/(?:{_PLAIN}|{_PARAM})*{_PARAM}(?:{_PLAIN}|{_PARAM})*)")  # 2, 3
_MAX_FIXES = 100
# Past this many one-line fixes, the rest are made in one pass: each fix costs
# a parse of the whole file.
_LINE_FIXES = 3
MAX_MANIFEST_BYTES = 256 * 1024

_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass
class Source:
    file: Path
    data: Any
    root_line: int = 1
    key_lines: dict[Loc, int] = field(default_factory=dict)
    value_lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Loc, *, key: bool = False) -> int:
        """The line of ``loc``; for something absent, the line of its nearest ancestor."""
        table = self.key_lines if key else self.value_lines
        while loc:
            if loc in table:
                return table[loc]
            loc = loc[:-1]
            table = self.key_lines  # an ancestor is best shown by its key ("users:")
        return self.root_line


def read_source(file: Path, loader: type[ManifestLoader] = ManifestLoader) -> Source:
    """``file`` parsed with ``loader`` (a :class:`ManifestLoader`; CloudFormation
    templates bring one that knows their ``!Ref``-style tags)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest: {exc.strerror or exc}", file=file,
                            line=1) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the manifest is larger than {MAX_MANIFEST_BYTES // 1024} KiB "
                            f"({MAX_MANIFEST_BYTES} bytes), the most nimbus reads; "
                            "an app.yaml describes functions, it does not hold data",
                            file=file, line=1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError("the manifest is not valid UTF-8 text", file=file, line=line) from None
    first: yaml.YAMLError | None = None
    last: yaml.YAMLError | None = None
    touched: set[int] = set()
    for attempt in range(_MAX_FIXES):
        try:
            return _parse(file, text, loader)
        except LimitError as exc:
            assert exc.problem_mark is not None
            raise ManifestError(str(exc.problem), file=file,
                                line=exc.problem_mark.line + 1) from None
        except RecursionError:
            raise ManifestError("the manifest nests too deeply to read", file=file,
                                line=1) from None
        except yaml.YAMLError as exc:
            first = first or exc
            last = exc
            if attempt < _LINE_FIXES:
                fixed = _fix_flow_paths(text, exc)
                if fixed is None:
                    break
                text, line = fixed
                touched.add(line)
            else:
                text, lines = _fix_all_flow_paths(text)
                if not lines - touched:
                    break
                touched |= lines
    # A later error elsewhere is the real remaining problem; one on a line we
    # rewrote means the rewrite did not help, so show what the user wrote.
    mark = getattr(last, "problem_mark", None)
    report = first if mark is None or mark.line in touched else last
    assert report is not None  # the loop returned or recorded an error
    raise _yaml_error(file, report, text) from None


def _fix_all_flow_paths(text: str) -> tuple[str, set[int]]:
    """``text`` with braced ``path:`` values quoted on every line, and the lines changed."""
    lines = text.split("\n")
    changed: set[int] = set()
    for i, line in enumerate(lines):
        fixed = _FLOW_PATH_FIX.sub(lambda m: m.group(1) or f"{m.group(2)}'{m.group(3)}'", line)
        if fixed != line:
            lines[i] = fixed
            changed.add(i)
    return "\n".join(lines), changed


def _fix_flow_paths(text: str, exc: yaml.YAMLError) -> tuple[str, int] | None:
    """``text`` with braced ``path:`` values quoted on the failing line (and that line's
    index), or None if there were none."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return None
    lines = text.split("\n")
    if mark.line >= len(lines):
        return None
    line = lines[mark.line]
    fixed = _FLOW_PATH_FIX.sub(
        lambda m: m.group(1) or f"{m.group(2)}'{m.group(3)}'", line)
    if fixed == line:
        return None
    lines[mark.line] = fixed  # adds two quote characters: no line moves
    return "\n".join(lines), mark.line


def _parse(file: Path, text: str, loader_class: type[ManifestLoader]) -> Source:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        src = Source(file=file, data=None)
        if node is None:
            return src
        src.root_line = node.start_mark.line + 1
        _index(loader, node, (), "", src)  # before construction flattens merge keys
        src.data = loader.construct_document(node)
        return src
    finally:
        loader.dispose()


def _index(loader: ManifestLoader, node: Node, loc: Loc, name: str, src: Source) -> None:
    # ``name`` is ``loc`` spelt as a field (``functions.f.http[0]``) for messages.
    # The loader refused recursive aliases and bounded the expanded size, so
    # this walk ends and is bounded too.
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            src.key_lines[loc + (i,)] = src.value_lines[loc + (i,)] = item.start_mark.line + 1
            _index(loader, item, loc + (i,), f"{name}[{i}]", src)
    elif isinstance(node, MappingNode):
        seen: dict[Any, int] = {}
        for knode, vnode in node.value:
            if knode.tag == _MERGE_TAG or not isinstance(knode, ScalarNode):
                continue  # merged and complex keys get the line of their parent
            key = loader.construct_object(knode, deep=True)
            line = knode.start_mark.line + 1
            sub = f"{name}.{key}" if name else str(key)
            if key in seen:
                # safe_load would silently keep the last one; that hides typos.
                raise ManifestError(f"duplicate key {show(key)} (first given on line {seen[key]})",
                                    file=src.file, line=line, field=sub)
            seen[key] = line
            src.key_lines[loc + (key,)] = line
            # A scalar is pointed at where it is; a nested block starts on the
            # next line, so its key line is what the user recognises.
            src.value_lines[loc + (key,)] = (
                vnode.start_mark.line + 1 if isinstance(vnode, ScalarNode) else line)
            _index(loader, vnode, loc + (key,), sub, src)


def _yaml_error(file: Path, exc: yaml.YAMLError, text: str) -> ManifestError:
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1
        return ManifestError(f"invalid YAML: unacceptable character #x{exc.character:04x}",
                             file=file, line=line)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return ManifestError(f"invalid YAML: {detail}", file=file,
                         line=mark.line + 1 if mark is not None else 1)
