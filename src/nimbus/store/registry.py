"""Backends picked by name, imported only when asked for (uvicorn style).

``open_store("sqlite", path)`` or ``open_store("sqlite:///abs/store.db")``;
an unknown name may also be an import string ``"package.module:factory"``.
A factory is ``async def factory(path, **kwargs) -> Store``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from nimbus.errors import UserInputError
from nimbus.store.base import Blobs, Store

STORES = {"sqlite": "nimbus.store.sqlite:open_sqlite_store"}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"no store backend {target!r}") from exc


async def open_store(url_or_name: str, path: Path | str | None = None, **kwargs: Any) -> Store:
    """Open the backend named ``url_or_name`` (a key of :data:`STORES`, a
    ``name://path`` URL, or an import string) at ``path``."""
    name = url_or_name
    if "://" in url_or_name:
        name, _, rest = url_or_name.partition("://")
        path = path if path is not None else rest
    target = STORES.get(name, name)
    if ":" not in target:
        raise UserInputError(f"unknown store {name!r}; known: {', '.join(sorted(STORES))}")
    store: Store = await _load(target)(Path(path) if path is not None else None, **kwargs)
    return store


async def open_blobs(path: Path | str) -> Blobs:
    """Content-addressed blobs in the folder ``path``."""
    from nimbus.store.files import open_file_blobs

    return await open_file_blobs(Path(path))
