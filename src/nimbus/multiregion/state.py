"""The cluster's desired state, kept in a folder beside the cluster file.

``nimbus deploy --cluster FILE`` records here what every region should run,
so a region that could not be reached at deploy time can be brought up to
date later (by ``nimbus status --cluster FILE --wait-all`` or by the
converger an edge runs), with no one typing the deploy again::

    .nimbus-cluster/                 beside nimbus.cluster.yaml
      lock                           flock: one writer at a time
      apps/<app>.json                desired: digest, regions, routing
      bundles/<digest>.zip           the bundle those regions should get
      pending/<region>/<app>.json    a deploy that has not reached a region yet
      rollouts/<app>.json            a rollout by waves: which waves are done, or
                                     why it stopped (the converger leaves the app
                                     alone until it is done)

Files are replaced atomically (temp file + rename), mode 0600 (bundles can
hold secrets in their code), and every read-modify-write holds the lock, so
a deploy and a converger in another process never lose each other's writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from nimbus.errors import NimbusError, UserInputError
from nimbus.store.private import DIR_MODE, write_private

STATE_DIR_NAME = ".nimbus-cluster"
DEFAULT_CLUSTER_NAME = "nimbus.cluster.yaml"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def state_dir_for(cluster_path: Path) -> Path:
    """Where the desired state of the cluster file at ``cluster_path`` lives:
    ``.nimbus-cluster/`` beside ``nimbus.cluster.yaml``; beside a cluster
    file of another name, ``.nimbus-cluster-<its name>/`` (two cluster files
    in one folder never share their state)."""
    path = cluster_path.resolve()
    if path.name == DEFAULT_CLUSTER_NAME:
        return path.parent / STATE_DIR_NAME
    return path.parent / f"{STATE_DIR_NAME}-{path.name}"


@dataclass(frozen=True, slots=True)
class Desired:
    """What every region of an app should run."""

    app: str
    digest: str
    regions: tuple[str, ...]                 # where the app runs, in routing order
    routing: dict[str, Any] | None = None    # RegionsSpec.to_dict() the regions should report
    override: dict[str, Any] | None = None   # sent as the deploy's ``regions`` parameter
    updated: float = 0.0                     # wall clock
    parameters: dict[str, str] | None = None  # a SAM template's parameter overrides

    def to_json(self) -> bytes:
        d = asdict(self)
        d["regions"] = list(self.regions)
        if not self.parameters:  # as before the field existed
            del d["parameters"]
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, raw: bytes) -> Desired:
        d = orjson.loads(raw)
        return cls(app=d["app"], digest=d["digest"], regions=tuple(d["regions"]),
                   routing=d.get("routing"), override=d.get("override"),
                   updated=float(d.get("updated", 0.0)), parameters=d.get("parameters"))


@dataclass(frozen=True, slots=True)
class Pending:
    """A deploy that has not reached ``region`` yet."""

    app: str
    region: str
    digest: str
    since: float                  # wall clock of the deploy that left it pending
    attempts: int = 0
    last_error: str = ""
    refused: bool = False         # the region answered and refused the app
    busy_until: float = 0.0       # wall clock: a push of it is under way until then

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Pending:
        d = orjson.loads(raw)
        return cls(app=d["app"], region=d["region"], digest=d["digest"],
                   since=float(d["since"]), attempts=int(d.get("attempts", 0)),
                   last_error=str(d.get("last_error", "")), refused=bool(d.get("refused")),
                   busy_until=float(d.get("busy_until", 0.0)))


# States of a rollout by waves (a cluster rollout): running a wave, baking
# after one, done (every wave promoted), stopped (a region failed or the
# operator rolled back; ``reason`` says why).
RUNNING, BAKING, DONE, STOPPED = "running", "baking", "done", "stopped"


@dataclass(slots=True)
class ClusterRollout:
    """A rollout of ``digest`` of ``app`` region by region.

    ``regions`` maps a region to what happened there: ``{"state":
    "pushing"|"running"|"promoted"|"rolled_back"|"failed", "functions":
    {fn: {"version": 8, "from": 7}}, "reason": ...}``. While it is not
    done, the converger pushes nothing of the app: a region not reached
    stays on the old version until the operator deploys again."""

    app: str
    digest: str
    strategy: str
    waves: tuple[tuple[str, ...], ...]
    state: str = RUNNING
    wave: int = 0                    # the wave under way (or the one that failed)
    waves_done: int = 0              # waves whose regions all promoted (and baked)
    bake_s: float = 0.0
    bake_until: float = 0.0          # wall clock
    on_region_failure: str = "rollback-all"
    rollback_on: str | None = None
    min_requests: int | None = None
    started: float = 0.0
    updated: float = 0.0
    reason: str = ""
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def unfinished(self) -> bool:
        return self.state != DONE

    def to_json(self) -> bytes:
        d = asdict(self)
        d["waves"] = [list(w) for w in self.waves]
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, raw: bytes) -> ClusterRollout:
        d = orjson.loads(raw)
        return cls(app=d["app"], digest=d["digest"], strategy=str(d["strategy"]),
                   waves=tuple(tuple(str(r) for r in w) for w in d["waves"]),
                   state=str(d.get("state", RUNNING)), wave=int(d.get("wave", 0)),
                   waves_done=int(d.get("waves_done", 0)),
                   bake_s=float(d.get("bake_s", 0.0)),
                   bake_until=float(d.get("bake_until", 0.0)),
                   on_region_failure=str(d.get("on_region_failure", "rollback-all")),
                   rollback_on=d.get("rollback_on"), min_requests=d.get("min_requests"),
                   started=float(d.get("started", 0.0)), updated=float(d.get("updated", 0.0)),
                   reason=str(d.get("reason", "")), regions=dict(d.get("regions") or {}))


@dataclass
class Snapshot:
    desired: dict[str, Desired] = field(default_factory=dict)
    pending: dict[tuple[str, str], Pending] = field(default_factory=dict)  # (region, app)
    rollouts: dict[str, ClusterRollout] = field(default_factory=dict)      # app

    def held(self, app: str) -> ClusterRollout | None:
        """The unfinished rollout by waves of the app's desired digest, if
        any: while there is one, nothing may push the app anywhere."""
        desired = self.desired.get(app)
        rollout = self.rollouts.get(app)
        if desired is None or rollout is None or rollout.digest != desired.digest:
            return None
        return rollout if rollout.unfinished else None


class ClusterState:
    """The folder of desired state. Safe to use from several processes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- paths -------------------------------------------------------------
    def _app_file(self, app: str) -> Path:
        return self.root / "apps" / f"{_checked(app, 'app')}.json"

    def _bundle_file(self, digest: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "bundles" / f"{digest}.zip"

    def _rollout_file(self, app: str) -> Path:
        return self.root / "rollouts" / f"{_checked(app, 'app')}.json"

    def _pending_file(self, region: str, app: str) -> Path:
        return self.root / "pending" / _checked(region, "region") / f"{_checked(app, 'app')}.json"

    def _ensure(self) -> None:
        for sub in ("", "apps", "bundles", "pending", "rollouts"):
            d = self.root / sub
            if not d.is_dir():
                try:
                    d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                except OSError as exc:
                    raise UserInputError(f"{d}: cannot create the cluster's state folder: "
                                         f"{exc.strerror or exc}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (between processes) for a short read-modify-write."""
        self._ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- reads -------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        apps = self.root / "apps"
        if apps.is_dir():
            for f in sorted(apps.glob("*.json")):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    d = Desired.from_json(f.read_bytes())
                    snap.desired[d.app] = d
        pend = self.root / "pending"
        if pend.is_dir():
            for f in sorted(pend.glob("*/*.json")):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    p = Pending.from_json(f.read_bytes())
                    snap.pending[(p.region, p.app)] = p
        rolls = self.root / "rollouts"
        if rolls.is_dir():
            for f in sorted(rolls.glob("*.json")):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    ro = ClusterRollout.from_json(f.read_bytes())
                    snap.rollouts[ro.app] = ro
        return snap

    def rollout(self, app: str) -> ClusterRollout | None:
        try:
            return ClusterRollout.from_json(self._rollout_file(app).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def bundle(self, digest: str) -> bytes | None:
        try:
            return self._bundle_file(digest).read_bytes()
        except (OSError, ValueError):
            return None

    # -- writes ------------------------------------------------------------
    def record_deploy(self, desired: Desired, bundle: bytes, busy_s: float = 0.0, *,
                      rollout: ClusterRollout | None = None) -> None:
        """A deploy begins: the bundle is kept and the app's desired state set;
        every region of the app is pending until its push reports otherwise.
        ``busy_s``: the deploy pushes to every region itself for that long, so
        convergers leave those regions alone meanwhile.

        With ``rollout`` (a rollout by waves), no region is marked pending:
        the rollout record, written in the same locked step as the desired
        state, holds the app back from every converger until it is done, and
        a previous deploy's marks of the app are dropped. Without, a previous
        rollout record of the app is cleared."""
        with self.locked():
            path = self._bundle_file(desired.digest)
            if not path.exists():
                _write(path, bundle, durable=True)
            if rollout is not None:
                _write(self._rollout_file(desired.app), rollout.to_json(), durable=True)
            else:
                self._rollout_file(desired.app).unlink(missing_ok=True)
            _write(self._app_file(desired.app), desired.to_json(), durable=True)
            now = desired.updated or time.time()
            for region in desired.regions:
                pend = self._pending_file(region, desired.app)
                if rollout is not None:
                    pend.unlink(missing_ok=True)
                    continue
                _write(pend, Pending(desired.app, region, desired.digest, now,
                                     busy_until=now + busy_s if busy_s else 0.0).to_json())
            self._forget_regions(desired)
            self._collect_bundles()

    def replace_rollout(self, rollout: ClusterRollout) -> None:
        """Write the app's rollout record whatever was there."""
        with self.locked():
            _write(self._rollout_file(rollout.app), rollout.to_json(), durable=True)

    def update_rollout(self, rollout: ClusterRollout) -> bool:
        """Write the rollout's progress, unless another deploy of the app
        replaced or cleared it meanwhile (no record, another digest, or a
        newer start): False then."""
        with self.locked():
            current = self.rollout(rollout.app)
            if current is None or current.digest != rollout.digest \
                    or current.started != rollout.started:
                return False
            _write(self._rollout_file(rollout.app), rollout.to_json(), durable=True)
            return True

    def _forget_regions(self, desired: Desired) -> None:
        """Pending pushes of the app to regions it no longer runs in are dropped."""
        pend = self.root / "pending"
        for f in pend.glob(f"*/{desired.app}.json"):
            if f.parent.name not in desired.regions:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def done(self, region: str, app: str, digest: str) -> None:
        """``region`` runs ``digest`` of ``app``: its pending push (of that
        digest; a newer deploy's stays) is over."""
        with self.locked():
            path = self._pending_file(region, app)
            current = self._read_pending(path)
            if current is not None and current.digest == digest:
                path.unlink(missing_ok=True)

    def claim(self, region: str, app: str, digest: str, until: float) -> bool:
        """Take the push of ``digest`` to ``region`` (a pending mark, busy
        until ``until``), unless another push of it is under way or the
        app's desired digest moved on. True: push it now."""
        with self.locked():
            desired = self._read_desired(app)
            if desired is None or desired.digest != digest:
                return False
            path = self._pending_file(region, app)
            current = self._read_pending(path)
            now = time.time()
            if current is not None and current.digest == digest and current.busy_until > now:
                return False
            base = current if current is not None and current.digest == digest else None
            _write(path, Pending(app, region, digest, base.since if base else now,
                                 base.attempts if base else 0,
                                 base.last_error if base else "",
                                 base.refused if base else False, until).to_json())
            return True

    @staticmethod
    def _read_pending(path: Path) -> Pending | None:
        try:
            return Pending.from_json(path.read_bytes())
        except (OSError, ValueError, KeyError):
            return None

    def _read_desired(self, app: str) -> Desired | None:
        try:
            return Desired.from_json(self._app_file(app).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def failed(self, region: str, app: str, digest: str, error: str, *,
               refused: bool = False) -> Pending:
        """A push of ``digest`` to ``region`` did not land: it stays pending."""
        with self.locked():
            path = self._pending_file(region, app)
            current = self._read_pending(path)
            if current is not None and current.digest != digest:
                return current  # a newer deploy replaced it meanwhile
            base = current or Pending(app, region, digest, time.time())
            updated = Pending(app, region, digest, base.since, base.attempts + 1,
                              error, refused)
            _write(path, updated.to_json())
            return updated

    def _collect_bundles(self) -> None:
        """Bundles no desired app or pending push refers to are removed."""
        keep = {d.digest for d in self.snapshot().desired.values()}
        keep |= {p.digest for p in self.snapshot().pending.values()}
        keep |= {r.digest for r in self.snapshot().rollouts.values()}
        for f in (self.root / "bundles").glob("*.zip"):
            if f.stem not in keep:
                with contextlib.suppress(OSError):
                    f.unlink()


def _write(path: Path, data: bytes, *, durable: bool = False) -> None:
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        write_private(path, data, durable=durable)
    except OSError as exc:
        raise NimbusError(f"{path}: cannot write the cluster's desired state: "
                          f"{exc.strerror or exc}") from None


def _checked(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise UserInputError(f"{what} name {name!r} cannot name a file of the cluster's "
                             "state (letters, digits, '_' and '-')")
    return name


def pending_by_region(snap: Snapshot) -> dict[str, list[Pending]]:
    out: dict[str, list[Pending]] = {}
    for (region, _app), p in sorted(snap.pending.items()):
        out.setdefault(region, []).append(p)
    return out
