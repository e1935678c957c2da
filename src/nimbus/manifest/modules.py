"""Find a handler's module file and check, without importing it, that it defines the callable.

User code is never imported here: importing runs it, with its side effects
and dependencies, in the CLI or control-plane process. Reading the module's
syntax tree catches the common mistakes (typo in the file or function
name) for free; a module that builds its namespace dynamically is given
the benefit of the doubt.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Names an app module cannot take: an instance has imported (or would import)
# these from the standard library or from nimbus's own runtime before the
# app's code, so an app file of the same name would never run or would break
# the modules that expect the real one.
RESERVED_MODULES = frozenset(sys.stdlib_module_names) | {"nimbus", "orjson"}


def module_candidates(app_dir: Path, module: str) -> tuple[Path, Path]:
    parts = module.split(".")
    return (app_dir.joinpath(*parts[:-1], parts[-1] + ".py"),
            app_dir.joinpath(*parts, "__init__.py"))


def find_module(app_dir: Path, module: str) -> Path | None:
    for candidate in module_candidates(app_dir, module):
        if candidate.is_file():
            return candidate
    return None


def top_level_modules(app_dir: Path) -> Iterator[tuple[str, Path]]:
    """(name, file) of every importable top-level module or regular package in ``app_dir``."""
    try:
        entries = sorted(app_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.suffix == ".py" and entry.is_file():
            yield entry.stem, entry
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            yield entry.name, entry / "__init__.py"


@dataclass(frozen=True, slots=True)
class ModuleNames:
    """Top-level names a module binds; ``names`` is None when that cannot be known statically."""

    names: frozenset[str] | None


class ModuleSyntaxError(Exception):
    def __init__(self, file: Path, line: int | None, message: str) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.message = message


def top_level_names(file: Path) -> ModuleNames:
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except SyntaxError as exc:
        raise ModuleSyntaxError(file, exc.lineno, exc.msg) from None
    except ValueError as exc:  # e.g. null bytes in the source
        raise ModuleSyntaxError(file, None, str(exc)) from None
    names: set[str] = set()
    for stmt in _statements(tree.body):
        if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names):
            return ModuleNames(None)  # star import: anything may arrive
        for name in _bound(stmt):
            names.add(name)
    if "__getattr__" in names or _uses_globals(tree):
        return ModuleNames(None)  # names resolved at run time
    return ModuleNames(frozenset(names))


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at module level, including inside if/try/with/for/while/match."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue  # their bodies are other scopes
        for attr in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(stmt, attr, []) or [])
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _statements(handler.body)
        for case in getattr(stmt, "cases", []) or []:
            yield from _statements(case.body)


def _bound(stmt: ast.stmt) -> Iterator[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield stmt.name
    elif isinstance(stmt, ast.Assign):
        for target in stmt.targets:
            yield from _targets(target)
    elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
        if isinstance(stmt, ast.AugAssign) or stmt.value is not None:
            yield from _targets(stmt.target)
    elif isinstance(stmt, ast.Import):
        for alias in stmt.names:
            yield alias.asname or alias.name.split(".")[0]
    elif isinstance(stmt, ast.ImportFrom):
        for alias in stmt.names:
            yield alias.asname or alias.name
    elif isinstance(stmt, ast.For | ast.AsyncFor):
        yield from _targets(stmt.target)
    elif isinstance(stmt, ast.With | ast.AsyncWith):
        for item in stmt.items:
            if item.optional_vars is not None:
                yield from _targets(item.optional_vars)
    # Walrus assignments in top-level expressions also bind module names.
    if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        for node in _shallow_walk(stmt):
            if isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
                yield node.target.id


def _targets(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for elt in target.elts:
            yield from _targets(elt)
    elif isinstance(target, ast.Starred):
        yield from _targets(target.value)


def _shallow_walk(stmt: ast.stmt) -> Iterator[ast.AST]:
    # The statement's own expressions, not nested statements (visited separately)
    # and not lambda bodies (their own scope; a walrus in a comprehension does
    # bind in the module, so comprehensions are walked).
    stack: list[ast.AST] = [c for c in ast.iter_child_nodes(stmt) if not isinstance(c, ast.stmt)]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.Lambda):
            continue
        stack.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.stmt))


def _uses_globals(tree: ast.Module) -> bool:
    # globals()["handler"] = ... binds names we cannot see.
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "globals"
               for n in ast.walk(tree))
