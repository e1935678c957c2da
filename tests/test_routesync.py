"""RouteSync follows the store through watch resets: when events may have
been lost it lists ``apps/`` again, so a delete it never saw still takes
effect, and it keeps watching afterwards. The store is a real SQLite file;
the gateway and worker are stand-ins recording what they are told."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from nimbus.control.routesync import RouteSync
from nimbus.store.sqlite import open_sqlite_store


class Recorder:
    def __init__(self) -> None:
        self.routers: list[Any] = []
        self.retired: list[set[tuple[str, int]]] = []

    def set_router(self, router: Any) -> None:
        self.routers.append(router)

    def retire(self, keep: set[tuple[str, int]]) -> None:
        self.retired.append(keep)


def app(name: str) -> bytes:
    return orjson.dumps({"name": name, "functions": {}, "routes": []})


def test_a_reset_relists_apps_and_the_watch_goes_on(tmp_path: Path) -> None:
    async def body() -> None:
        store = await open_sqlite_store(tmp_path / "s.db", keep_changes=3)
        rec = Recorder()
        rs = RouteSync(store, rec, rec)  # type: ignore[arg-type]
        try:
            await store.put("apps/a", app("a"))
            await rs.start()
            assert set(rs.apps) == {"apps/a"}
            await store.put("apps/b", app("b"))
            await rs.wait_for(lambda r: "apps/b" in r.apps)
            # Submitted together, these all commit before the watcher reads
            # again; the log keeps only the last 3, so the delete of apps/a is
            # gone from it and the watch can only say "reset".
            await asyncio.gather(store.put("apps/c", app("c")), store.delete("apps/a"),
                                 *(store.put(f"other/{i}", b"") for i in range(4)))
            await rs.wait_for(lambda r: set(r.apps) == {"apps/b", "apps/c"})
            await store.put("apps/d", app("d"))  # still watching
            await rs.wait_for(lambda r: "apps/d" in r.apps)
            assert set(rs.apps) == {"apps/b", "apps/c", "apps/d"}
        finally:
            await rs.aclose()
            await store.aclose()
    asyncio.run(asyncio.wait_for(body(), 30))
