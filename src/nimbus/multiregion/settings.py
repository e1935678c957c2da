"""``nimbus.toml``: a guided deploy's answers, kept beside the app.

``nimbus deploy --guided`` writes it; a later plain ``nimbus deploy APP_DIR``
reads it and repeats the deploy (app name, cluster file, regions and
routing)::

    version = 1

    [deploy]
    name = "shop"
    cluster = "../nimbus.cluster.yaml"   # relative to this file
    regions = ["eu", "us"]
    policy = "weighted"

    [deploy.weights]
    eu = 80
    us = 20
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nimbus.errors import ManifestError

FILE_NAME = "nimbus.toml"
POLICIES = ("failover", "weighted", "latency")
_VERSION = 1


@dataclass(frozen=True, slots=True)
class DeploySettings:
    name: str
    cluster: Path                          # absolute
    regions: tuple[str, ...]
    policy: str = "failover"
    weights: dict[str, int] = field(default_factory=dict)

    def routing(self) -> dict[str, Any]:
        """The deploy's ``regions`` parameter (a RegionsSpec as a dict)."""
        d: dict[str, Any] = {"names": list(self.regions), "policy": self.policy}
        if self.policy == "weighted":
            d["weights"] = dict(self.weights)
        return d


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a valid TOML basic string


def _key(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else _q(text)


def write_settings(app_dir: Path, s: DeploySettings) -> Path:
    path = app_dir / FILE_NAME
    try:
        cluster = os.path.relpath(s.cluster, app_dir.resolve())
    except ValueError:
        cluster = str(s.cluster)
    lines = ["# nimbus deploy settings, written by `nimbus deploy --guided`;",
             "# `nimbus deploy` in this folder repeats them.",
             f"version = {_VERSION}", "", "[deploy]",
             f"name = {_q(s.name)}",
             f"cluster = {_q(cluster)}",
             "regions = [" + ", ".join(_q(r) for r in s.regions) + "]",
             f"policy = {_q(s.policy)}"]
    if s.policy == "weighted":
        lines += ["", "[deploy.weights]"]
        lines += [f"{_key(k)} = {v}" for k, v in s.weights.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_settings(app_dir: Path) -> DeploySettings | None:
    """The app's ``nimbus.toml``, or None when it has none. Errors name the
    file, the line (for syntax) and the field."""
    path = app_dir / FILE_NAME
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+)", str(exc))
        raise ManifestError(f"not valid TOML: {str(exc).split(' (at ')[0]}", file=path,
                            line=int(m.group(1)) if m else None) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read it: {exc}", file=path) from None
    deploy = data.get("deploy")
    if not isinstance(deploy, dict):
        raise ManifestError("a [deploy] table is expected", file=path, field="deploy")

    def text(key: str) -> str:
        value = deploy.get(key)
        if not isinstance(value, str) or not value:
            raise ManifestError("a non-empty string is expected", file=path,
                                field=f"deploy.{key}")
        return value

    name, cluster, policy = text("name"), text("cluster"), text("policy")
    if policy not in POLICIES:
        raise ManifestError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}",
                            file=path, field="deploy.policy")
    regions = deploy.get("regions")
    if (not isinstance(regions, list) or not regions
            or not all(isinstance(r, str) and r for r in regions)):
        raise ManifestError("a non-empty list of region names is expected", file=path,
                            field="deploy.regions")
    weights = deploy.get("weights", {})
    if not isinstance(weights, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for v in weights.values()):
        raise ManifestError("a table of region = integer weight (>= 0) is expected",
                            file=path, field="deploy.weights")
    if policy == "weighted":
        missing = [r for r in regions if r not in weights]
        if missing:
            raise ManifestError(f"no weight for region {missing[0]!r}", file=path,
                                field="deploy.weights")
    return DeploySettings(name=name, cluster=(path.parent / cluster).resolve(),
                          regions=tuple(regions), policy=policy,
                          weights={k: int(v) for k, v in weights.items()})
