"""Garbage collection of deployed code: what no kept version needs goes.

Every deploy leaves a bundle blob, an unpacked code folder
(``state/code/<digest>``) and maybe a requirements venv
(``state/venvs/<hash>``); failed deploys and crashes leave the same plus
temporary folders. A version is *kept* when it is live (an app record
points at it) or among the newest ``keep_versions`` version records of its
function (for rollback); older version records are deleted. Anything on
disk that no kept version, running pool or deploy in progress refers to is
removed.

The store is read on the event loop (it is async); the disk is walked and
deleted in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from nimbus.errors import NimbusError
from nimbus.rollout.traffic import referenced
from nimbus.store.base import Blobs, Store

log = logging.getLogger("nimbus.gc")

_VERSION_KEY = re.compile(r"functions/([^/]+)/versions/([0-9]+)")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# A blob's temporary file younger than this may be a write under way.
_BLOB_TMP_AGE_S = 3600.0


@dataclass
class Keep:
    """What must stay: code digests and venv hashes."""

    digests: set[str] = field(default_factory=set)
    venvs: set[str] = field(default_factory=set)

    def add(self, rec: dict[str, Any]) -> None:
        if isinstance(rec.get("digest"), str):
            self.digests.add(rec["digest"])
        if isinstance(rec.get("requirements_hash"), str):
            self.venvs.add(rec["requirements_hash"])


@dataclass
class Collected:
    """What one run removed."""

    versions: list[str] = field(default_factory=list)  # store keys
    code: list[str] = field(default_factory=list)  # folder names under code/
    blobs: list[str] = field(default_factory=list)  # digests
    venvs: list[str] = field(default_factory=list)  # folder names under venvs/

    def __bool__(self) -> bool:
        return bool(self.versions or self.code or self.blobs or self.venvs)


async def kept_versions(store: Store, keep_versions: int) -> tuple[Keep, list[tuple[str, int]]]:
    """What the live and newest versions refer to, and the (key, revision) of
    version records that are neither (to delete)."""
    keep = Keep()
    live: set[tuple[str, int]] = set()
    for entry in await store.list("apps/"):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            for name, rec in referenced(orjson.loads(entry.value)):
                keep.add(rec)
                live.add((name, rec["version"]))
    by_function: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for entry in await store.list("functions/"):
        m = _VERSION_KEY.fullmatch(entry.key)
        if m:
            by_function[m.group(1)].append((int(m.group(2)), entry))
    stale: list[tuple[str, int]] = []
    for name, versions in by_function.items():
        versions.sort(key=lambda v: v[0])
        for i, (number, entry) in enumerate(versions):
            if i >= len(versions) - keep_versions or (name, number) in live:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    keep.add(orjson.loads(entry.value))
            else:
                stale.append((entry.key, entry.revision))
    return keep, stale


async def collect(state_dir: Path, store: Store, blobs: Blobs, *, keep_versions: int,
                  in_use: Keep, sweep_venvs: bool = True) -> Collected:
    """One collection. ``in_use``: what running pools and deploys under way need,
    whatever the store says; ``sweep_venvs`` False leaves every venv alone (one
    may be under construction)."""
    keep, stale = await kept_versions(store, keep_versions)
    done = Collected()
    for key, revision in stale:
        with contextlib.suppress(NimbusError):  # moved meanwhile: next time
            if await store.delete(key, revision=revision):
                done.versions.append(key)
    keep.digests |= in_use.digests
    keep.venvs |= in_use.venvs
    blob_root = getattr(blobs, "root", None)
    code, blob_digests, venvs = await asyncio.to_thread(
        _sweep, state_dir, Path(blob_root) if blob_root is not None else None, keep,
        sweep_venvs)
    done.code, done.blobs, done.venvs = code, blob_digests, venvs
    return done


def _sweep(state_dir: Path, blob_root: Path | None, keep: Keep,
           sweep_venvs: bool) -> tuple[list[str], list[str], list[str]]:
    code = _sweep_folder(state_dir / "code", keep.digests)
    venvs = _sweep_folder(state_dir / "venvs", keep.venvs) if sweep_venvs else []
    blob_digests = _sweep_blobs(blob_root, keep.digests) if blob_root is not None else []
    return code, blob_digests, venvs


def _sweep_folder(root: Path, keep: set[str]) -> list[str]:
    """Remove entries of ``root`` whose key (the name up to the first dot:
    ``<digest>``, ``<digest>.tmp123``, ``<hash>.building``) is not kept."""
    removed: list[str] = []
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.split(".", 1)[0] in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry.name)
    return removed


def _sweep_blobs(root: Path, keep: set[str]) -> list[str]:
    """Bundle blobs (``<root>/sha256/<2 hex>/<digest>``) not kept, and stale temp files."""
    removed = []
    now = time.time()
    for shard in sorted((root / "sha256").glob("??")):
        for entry in sorted(shard.iterdir()):
            try:
                if _DIGEST.fullmatch(entry.name):
                    if entry.name in keep:
                        continue
                    entry.unlink()
                    removed.append(entry.name)
                elif now - entry.stat().st_mtime > _BLOB_TMP_AGE_S:
                    entry.unlink()
            except FileNotFoundError:
                continue
        with contextlib.suppress(OSError):
            shard.rmdir()  # only if empty
    return removed
