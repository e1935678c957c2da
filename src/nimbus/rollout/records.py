"""Reading and changing the app record that owns a function (store I/O).

Every change is a compare-and-set on ``apps/<app>``: the record is read,
changed by a pure function (:mod:`nimbus.rollout.traffic`) and written only
if nobody wrote it meanwhile; a lost race reads again and retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from nimbus.errors import ConflictError, NotFoundError
from nimbus.store.base import Store

MAX_TRIES = 10


async def app_of(store: Store, fn: str) -> tuple[dict[str, Any], int]:
    """The app record owning ``fn`` and its revision."""
    owner = await store.get(f"functions/{fn}/owner")
    if owner is None:
        raise NotFoundError(f"function {fn!r} is not deployed")
    name = orjson.loads(owner.value)["app"]
    entry = await store.get(f"apps/{name}")
    if entry is None:
        raise NotFoundError(f"function {fn!r} is not deployed (app {name!r} has no record)")
    app = orjson.loads(entry.value)
    if fn not in app.get("functions", {}):
        raise NotFoundError(f"function {fn!r} is not deployed (app {name!r} does not have it)")
    return app, entry.revision


async def version_records(store: Store, fn: str) -> dict[int, dict[str, Any]]:
    """Every version record of ``fn`` still stored (``functions/<fn>/versions/``)."""
    entries = await store.list(f"functions/{fn}/versions/")
    return {int(e.key.rsplit("/", 1)[1]): orjson.loads(e.value) for e in entries}


async def change_app(store: Store, fn: str,
                     change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Apply ``change`` to the app record owning ``fn`` with compare-and-set,
    retried when another writer got there first; returns the written record
    (unwritten when ``change`` returned it unchanged)."""
    for _ in range(MAX_TRIES):
        app, revision = await app_of(store, fn)
        new = change(app)
        if new == app:
            return app
        try:
            await store.update(f"apps/{app['name']}", orjson.dumps(new), revision)
        except ConflictError:
            continue
        return new
    raise ConflictError(f"the app record of {fn!r} kept changing; "
                        f"gave up after {MAX_TRIES} tries")
