"""A worker carries out its placement: ``placement/<worker id>`` -> pools.

For every target placed here the reconciler makes the code ready on this
node, once per content hash (the bundle fetched from the blobs by digest,
unpacked and byte-compiled; the requirements venv built), starts a first
instance (an import error is reported, not retried in a loop), then holds
the pool at the placed count (:meth:`~nimbus.worker.pool.FunctionPool.place`).
Versions no longer placed are drained: in-flight invocations finish first.

The worker runs with ``autoscale=False``: the leader's placement is the only
thing that decides instance counts, and the reconciler re-applies it every
``resync_s`` so a crashed instance is replaced without waiting for the
leader. What is ready is reported through the node's registration
(:meth:`Reconciler.info`); a failure to prepare or start a target is written
to ``status/<worker id>/<fn>/<version>``, where a deploy waiting for its new
version reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from nimbus.aio import cancel_and_wait, wait_event
from nimbus.cluster.keys import ClusterStore, KeyWatch, placement_key, status_key, warm_key
from nimbus.cluster.placement import parse_target_key
from nimbus.control.deploy import prepare_code, target_from_record, version_key
from nimbus.control.venvs import ensure_venv
from nimbus.errors import NimbusError
from nimbus.store.base import Blobs
from nimbus.worker.target import Target, code_dir_for
from nimbus.worker.worker import Worker

log = logging.getLogger("nimbus.cluster")

RETRY_FAILED_S = 5.0  # a target that failed to prepare or start is tried again after


class Reconciler:
    def __init__(self, store: ClusterStore, blobs: Blobs, worker: Worker, worker_id: str,
                 state_dir: Path, on_change: Callable[[], None] | None = None,
                 resync_s: float = 0.5) -> None:
        self.store = store
        self.blobs = blobs
        self.worker = worker
        self.worker_id = worker_id
        self.state_dir = state_dir
        self.on_change = on_change  # e.g. Registration.refresh: ready counts changed
        self.resync_s = resync_s
        self.key = placement_key(worker_id)
        self.placement: dict[str, int] = {}
        self.targets: dict[str, Target] = {}  # prepared and started once
        self.failures: dict[str, tuple[str, float, str]] = {}  # target -> (hash, retry at, why)
        self._preparing: dict[str, asyncio.Task[None]] = {}
        self._unpacking: dict[str, asyncio.Lock] = {}  # per bundle digest
        self._statuses: set[str] = set()  # status keys written by us
        self._last_ready: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._watch = KeyWatch(store, "placement/", on_change=self._placed)
        self._task: asyncio.Task[None] | None = None

    # -- what the registration reports ------------------------------------------

    def ready(self) -> dict[str, int]:
        """Ready instances per placed target (``"fn@v"``)."""
        out: dict[str, int] = {}
        for t, target in self.targets.items():
            pool = self.worker.pools.get(target.key)
            if pool is not None and pool.target == target and pool.instances:
                out[t] = len(pool.instances)
        return out

    def info(self) -> dict[str, Any]:
        """The worker's part of its registration: ready counts and budget."""
        b = self.worker.budget
        return {"ready": self.ready(),
                "budget": {"max_instances": b.max_instances, "memory_mb": b.memory_mb}}

    # -- the loop -----------------------------------------------------------------

    async def start(self) -> None:
        await self._watch.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _placed(self, watch: KeyWatch) -> None:
        e = watch.entries.get(self.key)
        placement: dict[str, int] = {}
        if e is not None:
            try:
                raw = orjson.loads(e.value)
                placement = {str(t): int(n) for t, n in raw.items() if int(n) > 0}
                for t in placement:
                    parse_target_key(t)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
                log.warning("ignoring a malformed placement at %s: %s", self.key, exc)
                return
        if placement != self.placement:
            log.info("placement of %s: %s", self.worker_id, placement)
            self.placement = placement
            self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - next round tries again
                log.exception("reconcile failed")
            await wait_event(self._wake, self.resync_s)

    async def reconcile(self) -> None:
        """One round: prepare what is new, hold pools at their counts, drain
        the rest, clean up statuses, report a change of ready counts."""
        now = asyncio.get_running_loop().time()
        placement = dict(self.placement)
        keep: set[tuple[str, int]] = set()
        for t, n in placement.items():
            target = self.targets.get(t)
            if target is None:
                failed = self.failures.get(t)
                if t not in self._preparing and (failed is None or now >= failed[1]):
                    self._preparing[t] = asyncio.get_running_loop().create_task(
                        self._prepare(t))
                continue
            keep.add(target.key)
            self.worker.pool(target).place(n)
        for key in self._preparing:
            with contextlib.suppress(ValueError):
                keep.add(parse_target_key(key))
        self.worker.retire(keep)
        for t in [t for t in self.targets if t not in placement]:
            del self.targets[t]
        for t in [t for t in self.failures if t not in placement]:
            del self.failures[t]
        for t in [t for t in self._statuses if t not in placement]:
            self._statuses.discard(t)
            with contextlib.suppress(NimbusError):
                await self.store.delete(status_key(self.worker_id, t))
        ready = self.ready()
        if ready != self._last_ready:
            self._last_ready = ready
            if self.on_change is not None:
                self.on_change()

    async def _record(self, t: str) -> dict[str, Any] | None:
        fn, version = parse_target_key(t)
        e = await self.store.get(version_key(fn, version))
        if e is None:  # a deploy warming a version it has not recorded yet
            e = await self.store.get(warm_key(t))
        return orjson.loads(e.value) if e is not None else None

    async def _prepare(self, t: str) -> None:
        rec: dict[str, Any] | None = None
        try:
            rec = await self._record(t)
            if rec is None:
                raise NimbusError(f"no version record for {t}")
            target = await self.prepare_target(rec)
            pool = self.worker.pool(target)
            if not pool.instances:
                await pool.ensure_warm()  # an import error shows here, once
            self.targets[t] = target
            self.failures.pop(t, None)
            if t in self._statuses:
                self._statuses.discard(t)
                await self.store.delete(status_key(self.worker_id, t))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the store and the log
            why = str(exc) or type(exc).__name__
            log.warning("could not start %s on %s: %s", t, self.worker_id, why)
            chash = str((rec or {}).get("config_hash", ""))
            self.failures[t] = (chash, asyncio.get_running_loop().time() + RETRY_FAILED_S, why)
            with contextlib.suppress(Exception):
                fn, version = parse_target_key(t)
                stale = self.worker.pools.get((fn, version))
                if stale is not None and not stale.instances:
                    self.worker.discard([stale.target])
            with contextlib.suppress(NimbusError):
                await self.store.put(status_key(self.worker_id, t), orjson.dumps(
                    {"state": "failed", "error": why, "config_hash": chash,
                     "worker": self.worker_id, "at": time.time()}))
                self._statuses.add(t)
        finally:
            self._preparing.pop(t, None)
            self._wake.set()

    async def prepare_target(self, rec: dict[str, Any]) -> Target:
        """The code of ``rec`` ready on this node (cached by content hash)."""
        target = target_from_record(rec["app"], rec)
        code_dir = code_dir_for(self.state_dir, target.digest)
        # the functions of one app share a bundle: fetch and unpack it once
        async with self._unpacking.setdefault(target.digest, asyncio.Lock()):
            if not code_dir.exists():
                data = await self.blobs.get(target.digest)
                await asyncio.to_thread(prepare_code, data, code_dir)
        self._unpacking.pop(target.digest, None)
        if target.spec.requirements:
            built = await ensure_venv(self.state_dir, code_dir / target.spec.requirements,
                                      lambda line: log.info("%s: %s", target.function, line),
                                      self.worker.containment, code_dir)
            if built != target.requirements_hash:
                log.warning("venv of %s hashed %s here, %s in its record", target.function,
                            built, target.requirements_hash)
                target = Target(target.app, target.version, target.spec, target.digest, built)
        return target

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for task in list(self._preparing.values()):
            await cancel_and_wait(task)
        await self._watch.aclose()
