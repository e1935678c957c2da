"""``nimbus.cluster.yaml``: the regions of a cluster, in order.

```yaml
regions:
  eu:
    control: http://127.0.0.2:8081
    token_file: eu.token              # or token_env: NIMBUS_EU_TOKEN
    gateways: [http://127.0.0.2:8080]
```

The file's order matters: it is the failover order of an app that names no
regions. Token files are read relative to the cluster file. Every mistake
is a :class:`ManifestError` naming the file, the line and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from nimbus.errors import ManifestError
from nimbus.manifest.source import Loc, Source, read_source
from nimbus.region import REGION_NAME

CLUSTER_FILE = "nimbus.cluster.yaml"
MAX_TOKEN_BYTES = 4096
_KEYS = {"control", "token_file", "token_env", "gateways"}


@dataclass(frozen=True)
class RegionEntry:
    name: str
    control: str  # base URL, no trailing slash
    token: str  # resolved from token_file or token_env
    gateways: tuple[str, ...]  # base URLs, no trailing slash
    # the file the token was read from (None: from the environment); a
    # deploy never bundles it
    token_path: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ClusterFile:
    path: Path
    regions: dict[str, RegionEntry]  # in the file's order

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.regions)

    def secret_files(self) -> list[Path]:
        """This file and the token files it names: never part of a bundle."""
        return [self.path, *(r.token_path for r in self.regions.values() if r.token_path)]

    def region_of_gateway(self, gateway: str) -> str:
        for entry in self.regions.values():
            if gateway in entry.gateways:
                return entry.name
        raise KeyError(gateway)


def load_cluster(path: Path) -> ClusterFile:
    """Read and check the cluster file at ``path``."""
    if not path.is_file():
        raise ManifestError("no such cluster file", file=path)
    src = read_source(path)
    data = src.data
    if not isinstance(data, dict) or set(data) != {"regions"}:
        extra = sorted(set(data) - {"regions"}) if isinstance(data, dict) else []
        what = f"unknown key(s) {', '.join(map(str, extra))}" if extra else "no regions:"
        raise _error(src, (), f"expected a mapping with one key, regions ({what})")
    regions = data["regions"]
    if not isinstance(regions, dict) or not regions:
        raise _error(src, ("regions",), "expected a mapping of region names to their "
                     "control URL, token and gateways")
    entries: dict[str, RegionEntry] = {}
    for name, spec in regions.items():
        loc: Loc = ("regions", name)
        if not isinstance(name, str) or not REGION_NAME.fullmatch(name):
            raise _error(src, loc, "a region name is 1 to 64 letters, digits, '_' or '-'",
                         key=True)
        entries[name] = _entry(src, loc, name, spec)
    seen: dict[str, str] = {}
    for entry in entries.values():
        for gw in entry.gateways:
            if gw in seen:
                raise _error(src, ("regions", entry.name, "gateways"),
                             f"{gw} is also a gateway of region {seen[gw]}")
            seen[gw] = entry.name
    return ClusterFile(path=path.resolve(), regions=entries)


def _entry(src: Source, loc: Loc, name: str, spec: Any) -> RegionEntry:
    if not isinstance(spec, dict):
        raise _error(src, loc, "expected a mapping with control, token_file (or token_env) "
                     "and gateways")
    unknown = sorted(str(k) for k in set(spec) - _KEYS)
    if unknown:
        raise _error(src, (*loc, unknown[0]), f"unknown key {unknown[0]} (expected one of "
                     f"{', '.join(sorted(_KEYS))})", key=True)
    if "control" not in spec:
        raise _error(src, loc, "control: the region's control API URL is missing")
    control = _url(src, (*loc, "control"), spec["control"])
    gateways = spec.get("gateways")
    if not isinstance(gateways, list) or not gateways:
        raise _error(src, (*loc, "gateways"), "expected a non-empty list of gateway URLs")
    urls = tuple(_url(src, (*loc, "gateways", i), g) for i, g in enumerate(gateways))
    if len(set(urls)) != len(urls):
        raise _error(src, (*loc, "gateways"), "lists a gateway twice")
    token, token_path = _token(src, loc, spec)
    return RegionEntry(name=name, control=control, token=token, gateways=urls,
                       token_path=token_path)


def _url(src: Source, loc: Loc, value: Any) -> str:
    if not isinstance(value, str):
        raise _error(src, loc, "expected an http:// URL")
    parts = urlsplit(value.strip())
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise _error(src, loc, f"expected a URL like http://HOST:PORT, got {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _token(src: Source, loc: Loc, spec: dict[str, Any]) -> tuple[str, Path | None]:
    has_file, has_env = "token_file" in spec, "token_env" in spec
    if has_file == has_env:
        raise _error(src, loc, "give exactly one of token_file and token_env")
    if has_env:
        var = spec["token_env"]
        if not isinstance(var, str) or not var:
            raise _error(src, (*loc, "token_env"), "expected an environment variable name")
        token = os.environ.get(var, "").strip()
        if not token:
            raise _error(src, (*loc, "token_env"), f"${var} is not set or empty")
        return token, None
    value = spec["token_file"]
    if not isinstance(value, str) or not value:
        raise _error(src, (*loc, "token_file"), "expected a file name")
    file = (src.file.parent / value).resolve()
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise _error(src, (*loc, "token_file"),
                     f"cannot read {file}: {exc.strerror or exc}") from None
    token = raw.decode("utf-8", "replace").strip()
    if not token or len(raw) > MAX_TOKEN_BYTES:
        raise _error(src, (*loc, "token_file"), f"{file} holds no token (or more than "
                     f"{MAX_TOKEN_BYTES} bytes)")
    return token, file


def _error(src: Source, loc: Loc, message: str, *, key: bool = False) -> ManifestError:
    field = ".".join(str(p) for p in loc) or None
    return ManifestError(message, file=src.file, line=src.line(loc, key=key), field=field)


def write_cluster(path: Path, regions: list[RegionEntry], token_files: dict[str, str]) -> None:
    """Write a cluster file naming ``regions`` in order; ``token_files``
    maps each region to its token file (relative to ``path``'s folder, or
    absolute). The tokens themselves are not written here."""
    data = {"regions": {
        r.name: {"control": r.control, "token_file": token_files[r.name],
                 "gateways": list(r.gateways)}
        for r in regions}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    os.replace(tmp, path)
