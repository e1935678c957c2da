"""Dependency sets: which zygote an instance is forked from.

Functions with the same requirements venv and the same modules to preload
share one zygote that has those modules imported already, so a cold start
of a handler that imports jinja2 costs a fork, not an import of jinja2.
The modules come from the manifest's ``preload:`` or, when it has none,
from the handler module's top-level imports of code outside the app folder
(the app's own modules change with every version and are never preloaded).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from nimbus.manifest.model import is_provided
from nimbus.worker.containment import Containment
from nimbus.worker.target import Target, code_dir_for, site_packages_in


@dataclass(frozen=True, slots=True)
class DepSet:
    sys_path: tuple[str, ...] = ()  # as the zygote sees them
    preload: tuple[str, ...] = ()
    venvs: tuple[str, ...] = ()  # requirements hashes


BASE = DepSet()


def dependency_set(target: Target, state_dir: Path, containment: Containment) -> DepSet:
    sys_path: tuple[str, ...] = ()
    venvs: tuple[str, ...] = ()
    if target.requirements_hash:
        venvs = (target.requirements_hash,)
        sys_path = (str(site_packages_in(containment.venv_dir(target.requirements_hash))),)
    if is_provided(target.spec.runtime):  # a bootstrap, not Python: nothing to preload
        return DepSet(sys_path, (), venvs)
    preload = tuple(target.spec.preload) or imported_packages(
        code_dir_for(state_dir, target.digest), target.spec.module)
    return DepSet(sys_path, tuple(sorted(set(preload))), venvs)


def imported_packages(code_dir: Path, module: str) -> tuple[str, ...]:
    """Top-level packages the module imports at its top level, minus the
    app's own modules. Never imports anything; unreadable code gives ()."""
    base = code_dir.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return ()
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    local = {n for n in names
             if (code_dir / n).is_dir() or (code_dir / f"{n}.py").exists()}
    return tuple(sorted(names - local - {"__future__"}))
