"""The shapes the edge reads from the cluster file and the manifest, as
protocols: the pure modules depend on what they read, nothing more."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class RegionLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def gateways(self) -> tuple[str, ...]: ...


class ClusterLike(Protocol):
    @property
    def regions(self) -> Mapping[str, RegionLike]: ...


class RegionsSpecLike(Protocol):
    @property
    def names(self) -> tuple[str, ...] | None: ...
    @property
    def policy(self) -> str: ...
    @property
    def weights(self) -> dict[str, int]: ...
