"""A deploy's warm-up without a local worker: ask the leader, wait for a worker.

For each new version the deploy holds ``warm/<fn>/<version>`` (a campaign key whose
value is the version record): the leader places one instance of it, a
worker prepares and starts it, and reports it ready in its registration, or
reports the failure in ``status/<worker>/<fn>/<version>``. The deploy waits for
either, up to ``timeout_s``. On success the key is left to expire, so the
instance stays placed until the app record (written next) makes the
version live; on failure it is given up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait
from nimbus.cluster.keys import STATUS, ClusterStore, target_of_path, warm_key
from nimbus.cluster.leader import current_leader
from nimbus.cluster.nodes import live_nodes
from nimbus.cluster.placement import target_key
from nimbus.errors import ConflictError, DeployError, NimbusError

log = logging.getLogger("nimbus.cluster")


class ClusterWarmer:
    def __init__(self, store: ClusterStore, timeout_s: float = 300.0, ttl_s: float = 10.0,
                 poll_s: float = 0.2) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.poll_s = poll_s

    async def warm(self, records: list[dict[str, Any]], progress: Callable[[str], None]) -> bool:
        if not await live_nodes(self.store, "worker"):
            progress("no worker is registered: the new versions will start when one is")
            return False
        want = {target_key(rec["spec"]["name"], rec["version"]): rec for rec in records}
        held: dict[str, int] = {}
        renewer: asyncio.Task[None] | None = None
        ok = False
        try:
            for t, rec in want.items():
                rev = await self.store.campaign(warm_key(t), orjson.dumps(rec), self.ttl_s)
                if rev is None:
                    raise DeployError(f"another deploy is starting {rec['spec']['name']} "
                                      f"version {rec['version']}; retry")
                held[t] = rev
                progress(f"starting {rec['spec']['name']} version {rec['version']} "
                         "on the region's workers")
            renewer = asyncio.get_running_loop().create_task(self._renew(held))
            await self._wait(want)
            ok = True
            return True
        finally:
            await cancel_and_wait(renewer)
            if not ok:
                for t, rev in held.items():
                    with contextlib.suppress(NimbusError):
                        await self.store.resign(warm_key(t), rev)

    async def _renew(self, held: dict[str, int]) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for t, rev in list(held.items()):
                try:
                    held[t] = await self.store.renew(warm_key(t), rev, self.ttl_s)
                except ConflictError:
                    log.warning("warm request %s was lost; asking again", t)
                    e = await self.store.get(warm_key(t))
                    if e is None:
                        continue
                except NimbusError as exc:
                    log.warning("renewing warm request %s failed: %s", t, exc)

    async def _wait(self, want: dict[str, dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        waiting = set(want)
        while True:
            for e in await self.store.list(STATUS):
                worker, _, path = e.key[len(STATUS):].partition("/")
                try:
                    t = target_of_path(path)
                except ValueError:
                    continue
                if t not in waiting:
                    continue
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    status = orjson.loads(e.value)
                    if (status.get("state") == "failed"
                            and status.get("config_hash") == want[t].get("config_hash")):
                        rec = want[t]
                        raise DeployError(
                            f"{rec['spec']['name']} version {rec['version']} failed to start "
                            f"on worker {worker}: {status.get('error')}")
            for info in (await live_nodes(self.store, "worker")).values():
                ready = info.get("ready") or {}
                waiting -= {t for t in waiting if isinstance(ready, dict) and ready.get(t, 0)}
            if not waiting:
                return
            if loop.time() >= deadline:
                names = ", ".join(sorted(waiting))
                hint = ("" if await current_leader(self.store) is not None
                        else " (no controller leads the region: start `nimbus controller`)")
                raise DeployError(f"no worker reported {names} ready within "
                                  f"{self.timeout_s:g} s{hint}; the running versions keep "
                                  "serving")
            await asyncio.sleep(self.poll_s)
