"""Ephemeral storage: an instance's /tmp, all its files together, stays
within ``ephemeral_storage_mb``.

``RLIMIT_FSIZE`` bounds each file as it is written; this loop bounds the
sum. Every ``interval_s`` it measures each live instance's folder (off the
event loop, each scan bounded by the limit and an entry budget) and ends an
instance that holds more than its limit, with a line in the function's logs
saying why; its files go with it. Disk use is counted in allocated blocks,
at least one 4 KiB block per entry so that millions of empty files count.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from nimbus.aio import cancel_and_wait
from nimbus.worker.instance import Instance
from nimbus.worker.pool import FunctionPool

log = logging.getLogger("nimbus.worker")

BLOCK = 4096
MAX_ENTRIES = 200_000  # a scan stops here: that many entries is over any limit anyway


def usage_bytes(folder: Path, stop_at: int) -> int:
    """Bytes ``folder`` holds, counting stops once past ``stop_at``."""
    total = 0
    entries = 0
    stack = [str(folder)]
    while stack and total <= stop_at:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue  # gone meanwhile, or not a folder
        with it:
            for e in it:
                entries += 1
                if entries > MAX_ENTRIES:
                    return max(total, stop_at + 1)
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += max(st.st_blocks * 512, BLOCK)
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return total


def over_limit(usage: int, limit_mb: int) -> bool:
    return usage > limit_mb * 1024 * 1024


class TmpWatch:
    def __init__(self, pools: dict[tuple[str, int], FunctionPool],
                 folder_of: Callable[[Instance], Path], interval_s: float = 2.0) -> None:
        self.pools = pools
        self.folder_of = folder_of
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - one bad round must not stop the watch
                log.exception("ephemeral storage round failed")

    async def round(self) -> None:
        watched = [(pool, inst, pool.target.spec.ephemeral_storage_mb)
                   for pool in list(self.pools.values()) for inst in list(pool.instances)
                   if inst.alive]
        if not watched:
            return
        sizes = await asyncio.to_thread(lambda: [
            usage_bytes(self.folder_of(inst), limit * 1024 * 1024)
            for _pool, inst, limit in watched])
        for (pool, inst, limit), size in zip(watched, sizes, strict=True):
            if over_limit(size, limit) and inst.alive:
                pool.log(None, "platform",
                         f"instance {inst.id} stopped: its /tmp holds more than "
                         f"ephemeral_storage_mb ({limit} MB)")
                inst.kill()

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
