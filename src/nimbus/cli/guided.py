"""``nimbus deploy --guided``: ask, show the plan, deploy, remember.

As ``sam deploy --guided``: every answer has a default (the manifest's, or
the last guided deploy's from ``nimbus.toml``), a bad answer is explained
and asked again, and the answers are saved to ``APP_DIR/nimbus.toml`` so a
plain ``nimbus deploy APP_DIR`` repeats them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from nimbus.cli.regions import cluster_deploy, open_cluster
from nimbus.errors import ManifestError, UserInputError
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry, write_cluster
from nimbus.multiregion.deploy import plan_deploy
from nimbus.multiregion.settings import POLICIES, DeploySettings, read_settings, write_settings
from nimbus.region import REGION_NAME

_APP_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_CLUSTER = "nimbus.cluster.yaml"


def _say_bad(message: str) -> None:
    click.echo(f"  {message}; try again.")


def _ask(text: str, default: Any = None, **kw: Any) -> Any:
    return click.prompt(text, default=default, **kw)


def ask_app_name(app_dir: Path, saved: DeploySettings | None,
                 parameters: dict[str, str] | None = None) -> str:
    probe = "nimbus-no-name-given"  # what the app is called when app.yaml names it not
    declared = load_app(app_dir, default_name=probe, parameters=parameters).name
    manifest_name = None if declared == probe else declared
    default = manifest_name or (saved.name if saved else None) or load_app(
        app_dir, parameters=parameters).name
    while True:
        name = str(_ask("App name", default)).strip()
        if not _APP_NAME.match(name):
            _say_bad(f"{name!r} is not an app name (lower-case letters, digits and '-', "
                     "at most 63, starting and ending with a letter or digit)")
        elif manifest_name and name != manifest_name:
            _say_bad(f"app.yaml names the app {manifest_name!r}; answer {manifest_name!r} "
                     "or change name: in app.yaml")
        else:
            return name


def ask_cluster(saved: DeploySettings | None) -> ClusterFile:
    here = Path(DEFAULT_CLUSTER)
    default = str(saved.cluster) if saved else (DEFAULT_CLUSTER if here.exists() else "")
    while True:
        answer = str(_ask("Cluster file (leave empty to enter each region's control URL)",
                          default, show_default=bool(default))).strip()
        if not answer:
            return write_new_cluster()
        try:
            return open_cluster(Path(answer))
        except UserInputError as exc:
            _say_bad(str(exc))


def _url(text: str) -> str | None:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in (
            "", "/") or parts.query or parts.fragment:
        return None
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return None
    return text.rstrip("/")


def ask_region(known: list[str]) -> tuple[RegionEntry, str] | None:
    while True:
        name = str(_ask("Region name (leave empty when done)", "",
                        show_default=False)).strip()
        if not name:
            return None
        if not REGION_NAME.fullmatch(name):
            _say_bad(f"{name!r} is not a region name (1 to 64 letters, digits, '_' or '-')")
        elif name in known:
            _say_bad(f"region {name!r} is given already")
        else:
            break
    while True:
        control = _url(str(_ask(f"  control URL of {name} (http://HOST:PORT)")).strip())
        if control:
            break
        _say_bad("expected http://HOST:PORT or https://HOST:PORT")
    while True:
        token_file = str(_ask(f"  token file of {name}")).strip()
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            _say_bad(f"cannot read {token_file}: {getattr(exc, 'strerror', None) or exc}")
            continue
        if not token:
            _say_bad(f"{token_file} is empty")
            continue
        break
    while True:
        raw = str(_ask(f"  gateway URLs of {name} (comma-separated)")).strip()
        gateways = [_url(g.strip()) for g in raw.split(",") if g.strip()]
        if gateways and all(gateways):
            break
        _say_bad("expected one or more http://HOST:PORT, separated by commas")
    entry = RegionEntry(name=name, control=control, token=token,
                        gateways=tuple(g for g in gateways if g))
    return entry, str(Path(token_file).expanduser().resolve())


def write_new_cluster() -> ClusterFile:
    entries: list[RegionEntry] = []
    token_files: dict[str, str] = {}
    while True:
        got = ask_region([e.name for e in entries])
        if got is None:
            if entries:
                break
            _say_bad("a cluster needs at least one region")
            continue
        entries.append(got[0])
        token_files[got[0].name] = got[1]
    while True:
        path = Path(str(_ask("Write the cluster file to", DEFAULT_CLUSTER)).strip())
        if path.exists() and not click.confirm(f"  {path} exists; replace it?", default=False):
            continue
        try:
            write_cluster(path, entries, {r: os.path.relpath(f, path.resolve().parent)
                                          for r, f in token_files.items()})
            return open_cluster(path)
        except (OSError, UserInputError) as exc:
            _say_bad(str(exc))


def ask_regions(cluster: ClusterFile, default: tuple[str, ...]) -> tuple[str, ...]:
    click.echo(f"Regions in {cluster.path}: {', '.join(cluster.names)}")
    while True:
        raw = str(_ask("Regions to deploy to, in order of preference (comma-separated)",
                       ", ".join(default))).strip()
        names = tuple(r.strip() for r in raw.split(",") if r.strip())
        unknown = [r for r in names if r not in cluster.regions]
        if not names:
            _say_bad("name at least one region")
        elif unknown:
            _say_bad(f"{', '.join(unknown)} not in the cluster file (it has "
                     f"{', '.join(cluster.names)})")
        elif len(set(names)) != len(names):
            _say_bad("a region is named twice")
        else:
            return names


def ask_weights(regions: tuple[str, ...], saved: dict[str, int]) -> dict[str, int]:
    while True:
        weights: dict[str, int] = {}
        for r in regions:
            weights[r] = int(_ask(f"  weight of {r}", saved.get(r, 100 // len(regions)),
                                  type=click.IntRange(0, 1_000_000)))
        if any(weights.values()):
            return weights
        _say_bad("at least one weight must be above 0")


def run_guided(app_dir: Path, timeout_s: float,
               parameters: dict[str, str] | None = None) -> int:
    """``parameters``: a SAM template's parameter overrides (for this deploy;
    not saved)."""
    parameters = parameters or None
    app = load_app(app_dir, parameters=parameters)  # a broken app stops before any question
    saved = read_settings(app_dir)
    name = ask_app_name(app_dir, saved, parameters)
    cluster = ask_cluster(saved)
    manifest = app.regions
    default_regions: tuple[str, ...] = tuple(
        r for r in (saved.regions if saved else
                    (manifest.names if manifest and manifest.names else cluster.names))
        if r in cluster.regions) or cluster.names
    regions = ask_regions(cluster, default_regions)
    default_policy = saved.policy if saved else (manifest.policy if manifest else "failover")
    policy = str(_ask("Routing policy", default_policy, type=click.Choice(POLICIES)))
    weights: dict[str, int] = {}
    if policy == "weighted":
        weights = ask_weights(regions, (saved.weights if saved else None)
                              or (dict(manifest.weights) if manifest else {}))
    settings = DeploySettings(name=name, cluster=cluster.path.resolve(), regions=regions,
                              policy=policy, weights=weights)
    try:
        override = RegionsSpec.from_dict(settings.routing())
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"these answers are not valid routing: {exc}",
                            field="regions") from None
    plan = plan_deploy(app_dir, cluster, name=name, override=override, parameters=parameters)
    click.echo("Plan:")
    for line in plan.describe():
        click.echo(f"  {line}")
    for r in plan.regions:
        entry = cluster.regions[r]
        click.echo(f"  {r}: control {entry.control}, gateways {', '.join(entry.gateways)}")
    if not click.confirm("Deploy this plan?", default=True):
        click.echo("nothing deployed; nothing saved")
        return 0
    path = write_settings(app_dir, settings)
    click.echo(f"saved the answers to {path}; `nimbus deploy {app_dir}` repeats them")
    return cluster_deploy(app_dir, cluster.path, wait_all=False, timeout_s=timeout_s,
                          plan=plan)
