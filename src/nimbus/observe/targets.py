"""Prometheus ``file_sd`` targets for every nimbus process. Pure: what to
scrape, from the status a control API answers; no I/O.

- a ``nimbus up``: its control port (``/metrics``), role ``up``;
- a region (``nimbus cluster up``, status ``"mode": "region"``): each
  node's ``metrics`` URL (a controller's control API, a worker's or
  gateway's own metrics port);
- an edge: ``/_nimbus/metrics`` on its port, role ``edge``, no ``region``
  label (its series carry the region they are about).

Targets with the same labels share a group; the JSON is sorted, so the same
processes always give the same bytes (a watcher rewrites the file only when
something changed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

DEFAULT_PATH = "/metrics"
EDGE_PATH = "/_nimbus/metrics"
SCRAPED_ROLES = ("controller", "worker", "gateway")


class TargetError(ValueError):
    """A URL that cannot be a scrape target (the message names it)."""


@dataclass(frozen=True, order=True)
class Target:
    region: str          # "" for an edge
    role: str            # up | controller | worker | gateway | edge
    scheme: str
    address: str         # host:port
    path: str = DEFAULT_PATH

    def labels(self) -> dict[str, str]:
        labels = {"role": self.role}
        if self.region:
            labels["region"] = self.region
        if self.path != DEFAULT_PATH:
            labels["__metrics_path__"] = self.path
        if self.scheme != "http":
            labels["__scheme__"] = self.scheme
        return labels


def target(url: str, region: str, role: str, path: str = DEFAULT_PATH) -> Target:
    """The target for a process whose base URL is ``url``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"{url!r}: expected http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TargetError(f"{url!r}: expected a base URL (http://HOST:PORT), no path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    return Target(region, role, parts.scheme, f"{host}:{port}", path)


def edge_target(url: str) -> Target:
    return target(url.rstrip("/"), "", "edge", EDGE_PATH)


def from_status(status: dict[str, Any], control_url: str,
                region: str | None = None) -> tuple[list[Target], list[str]]:
    """The targets of one region, from its ``/v1/status`` as read from
    ``control_url``, and warnings about processes that cannot be listed."""
    name = status.get("region")
    name = name if isinstance(name, str) and name else (region or "")
    warnings: list[str] = []
    if status.get("mode") != "region":
        url = status.get("control_url")
        return [target(url if isinstance(url, str) and url else control_url, name, "up")], []
    found: list[Target] = []
    nodes = status.get("nodes")
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict) or node.get("role") not in SCRAPED_ROLES:
            continue
        role = str(node["role"])
        what = f"region {name}: {role} {node.get('id', '?')}"
        url = node.get("metrics")
        if not url and role == "controller":
            url = node.get("url")        # a controller serves /metrics on its control API
        if not isinstance(url, str) or not url:
            warnings.append(f"{what} lists no metrics URL; left out")
            continue
        try:
            found.append(target(url, name, role))
        except TargetError as exc:
            warnings.append(f"{what}: {exc}; left out")
            continue
        if _loopback(url) and not _loopback(control_url):
            warnings.append(f"{what} serves metrics at {url}, a loopback address, though "
                            f"the region answers at {control_url}: a Prometheus on another "
                            "machine cannot reach it (give the process --metrics-host)")
    if not any(t.role == "controller" for t in found):
        found.append(target(control_url, name, "controller"))
    return found, warnings


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def file_sd(targets: Iterable[Target]) -> list[dict[str, Any]]:
    """``file_sd`` groups: one per distinct set of labels, sorted."""
    groups: dict[tuple[str, str, str, str], set[str]] = {}
    for t in targets:
        groups.setdefault((t.region, t.role, t.scheme, t.path), set()).add(t.address)
    out = []
    for (region, role, scheme, path), addresses in sorted(groups.items()):
        labels = Target(region, role, scheme, "", path).labels()
        out.append({"targets": sorted(addresses), "labels": labels})
    return out


def render(targets: Iterable[Target]) -> bytes:
    return orjson.dumps(file_sd(targets), option=orjson.OPT_INDENT_2) + b"\n"
