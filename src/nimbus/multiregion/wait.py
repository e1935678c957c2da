"""Converge a cluster and wait until every region runs what was deployed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nimbus.multiregion.clusterfile import ClusterFile
from nimbus.multiregion.converge import Converger, RoundReport
from nimbus.multiregion.status import cluster_status

ROUND_PAUSE_S = 0.5


async def wait_converged(cluster: ClusterFile, state_dir: Path, timeout_s: float, *,
                         on_round: Callable[[RoundReport], None] | None = None,
                         probe_timeout_s: float = 2.0) -> dict[str, Any]:
    """Converge in rounds until the status shows no drift and nothing
    pending, or ``timeout_s`` passes; returns the last status document."""
    deadline = time.monotonic() + timeout_s
    conv = Converger(cluster, state_dir, push_timeout_s=max(1.0, timeout_s),
                     probe_timeout_s=probe_timeout_s, retry_min_s=ROUND_PAUSE_S,
                     retry_max_s=2.0)
    while True:
        left = deadline - time.monotonic()
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    report = await conv.converge_once(time.monotonic())
                    if on_round is not None:
                        on_round(report)
        doc = await cluster_status(cluster, state_dir,
                                   min(probe_timeout_s, max(0.2, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if doc["converged"] or left <= 0:
            return doc
        await asyncio.sleep(min(ROUND_PAUSE_S, left))
