"""The edge's view of the regions, for the dashboard, from a cluster file.

The control process probes every region's gateways itself with the edge's
own parts (:class:`~nimbus.edge.prober.Prober` feeding a
:class:`~nimbus.edge.health.HealthBook`), at a gentler pace than an edge:
the same rules (down after ``fall`` failed probes, up again after
``rise_s`` of success), so the page shows what an edge with this cluster
file would decide, whether or not one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from nimbus.edge.health import HealthBook, HealthConfig
from nimbus.edge.prober import Prober
from nimbus.multiregion.clusterfile import ClusterFile, load_cluster

PROBES = HealthConfig(interval_s=1.0, timeout_s=0.5, fall=2, rise_s=3.0)


class EdgeView:
    def __init__(self, cluster: ClusterFile, config: HealthConfig = PROBES) -> None:
        self.cluster = cluster
        self.book = HealthBook(cluster, config, time.monotonic())
        self.prober = Prober(cluster, self.book, config)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, path: Path) -> EdgeView:
        """Raises ManifestError naming the file, line and field."""
        return cls(load_cluster(path))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.prober.run())

    def snapshot(self) -> dict[str, Any]:
        snap = self.book.snapshot(time.monotonic())
        snap["cluster_file"] = str(self.cluster.path)
        snap["order"] = list(self.cluster.names)
        snap["probe_rounds"] = self.prober.rounds
        return snap

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
