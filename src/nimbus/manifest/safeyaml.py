"""A YAML loader that hostile manifests cannot blow up.

``yaml.SafeLoader`` is safe from code execution, not from work: aliases are
cheap to write and expand multiplicatively ("billion laughs"), so a 700-byte
file can stand for billions of nodes, which everything after parsing
(line indexing, validation) walks one by one. This loader counts nodes *as
expanded* while it composes them (an alias costs the size of the node it
names, computed once per node), and bounds the depth the same way, so both
limits hold before anything walks the tree. Values that Python cannot
build (``2001-13-45`` as a date, an integer of 5,000 digits) become YAML
errors at their line instead of escaping as ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_NODES = 100_000  # scalars, lists and mappings, aliases expanded
MAX_DEPTH = 100  # nesting, aliases expanded


class LimitError(yaml.MarkedYAMLError):
    """The document is over a size limit (nodes or depth); ``problem_mark`` is where."""


class ManifestLoader(yaml.SafeLoader):
    """``SafeLoader`` with bounded expansion; see the module docstring."""

    def __init__(self, stream: str, *, max_nodes: int = MAX_NODES,
                 max_depth: int = MAX_DEPTH) -> None:
        super().__init__(stream)
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self._nodes = 0
        self._depth = 0
        self._done: set[int] = set()  # ids of nodes composed to the end
        self._measured: dict[int, tuple[int, int]] = {}  # id -> (size, depth), capped

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if self.check_event(AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # an undefined one is PyYAML's error to report
                if id(node) not in self._done:
                    raise LimitError(None, None, f"alias *{event.anchor} is used inside "
                                     "the node it names (recursive aliases are not "
                                     "supported)", event.start_mark)
                size, depth = self._measure(node)
                self._count(size, self._depth + depth, event.start_mark,
                            f" (alias *{event.anchor} expands to {self._show(size)} nodes)")
            aliased = super().compose_node(parent, index)
            assert aliased is not None
            return aliased
        self._depth += 1
        try:
            self._count(1, self._depth, event.start_mark, "")
            composed = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert composed is not None
        self._done.add(id(composed))
        return composed

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError, TypeError, RecursionError) as exc:
            why = str(exc).split(";")[0]  # not Python's advice on its own settings
            raise ConstructorError(None, None, f"cannot read this value: {why}",
                                   node.start_mark) from None

    def _count(self, nodes: int, depth: int, mark: Any, why: str) -> None:
        self._nodes += nodes
        if self._nodes > self.max_nodes:
            raise LimitError(None, None, f"the manifest has more than {self.max_nodes} values "
                             f"once aliases are expanded{why}", mark)
        if depth > self.max_depth:
            raise LimitError(None, None, f"the manifest nests deeper than {self.max_depth} "
                             f"levels{' once aliases are expanded' if why else ''}", mark)

    def _measure(self, node: Node) -> tuple[int, int]:
        """(size, depth) of ``node`` with aliases expanded, each capped just past its limit."""
        got = self._measured.get(id(node))
        if got is not None:
            return got
        size, depth = 1, 1
        if isinstance(node, SequenceNode | MappingNode):
            children: list[Node] = (list(node.value) if isinstance(node, SequenceNode) else
                                    [n for pair in node.value for n in pair])
            for child in children:
                s, d = self._measure(child)
                size = min(size + s, self.max_nodes + 1)
                depth = max(depth, min(d + 1, self.max_depth + 1))
        self._measured[id(node)] = (size, depth)
        return size, depth

    def _show(self, size: int) -> str:
        return f"more than {self.max_nodes}" if size > self.max_nodes else str(size)
