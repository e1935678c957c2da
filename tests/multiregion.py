"""Several embedded regions on one machine, for tests: each region is a
``nimbus up --region NAME`` bound to its own loopback address (127.0.0.2,
127.0.0.3, ...) on fixed ports (so a cluster file can name them and a
killed region comes back where it was)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry, load_cluster, write_cluster
from tests.conftest import Nimbus, alive, descendants

# Handlers in these tests write to files in the test's folder: they run as
# the platform's user (full containment has tests of its own).
DEFAULT_EXTRA = ("--containment", "rlimits", "--grace", "2")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_app(folder: Path, manifest: str, module: str, code: str) -> Path:
    """An app folder: ``app.yaml`` and one handler module."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.yaml").write_text(manifest)
    (folder / f"{module}.py").write_text(code)
    return folder


def shared_file(path: Path) -> Path:
    """An empty file that handlers (whichever user they run as) append to."""
    path.touch()
    path.chmod(0o666)
    return path


class RegionProc:
    """One region: a ``nimbus up`` process tree on ``host``."""

    def __init__(self, name: str, host: str, root: Path, app: Path | None = None,
                 *extra: str) -> None:
        self.name = name
        self.host = host
        self.app = app
        self.extra = (*DEFAULT_EXTRA, *extra)
        self.state = root / f"region-{name}"
        self.log = root / f"region-{name}.out"
        self.port = free_port(host)
        self.control_port = free_port(host)
        self.nimbus: Nimbus | None = None
        self.gateway_url = f"http://{host}:{self.port}"
        self.control_url = f"http://{host}:{self.control_port}"

    def start(self) -> RegionProc:
        self.nimbus = Nimbus(self.app, self.state, self.log, "--region", self.name,
                             "--host", self.host, "--port", str(self.port),
                             "--control-host", self.host,
                             "--control-port", str(self.control_port), *self.extra)
        return self

    @property
    def pid(self) -> int:
        assert self.nimbus is not None
        return self.nimbus.proc.pid

    @property
    def token(self) -> str:
        return (self.state / "token").read_text().strip()

    def running(self) -> bool:
        return self.nimbus is not None and self.nimbus.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL every process of the region (its instances and zygotes too)."""
        assert self.nimbus is not None
        pids = [self.pid, *descendants(self.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nimbus.stop(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.nimbus is not None:
            if self.running():
                self.resume()
            self.nimbus.stop(signal.SIGTERM, timeout=15)

    def entry(self) -> RegionEntry:
        return RegionEntry(name=self.name, control=self.control_url, token=self.token,
                           gateways=(self.gateway_url,))

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nimbus", *args, "--state-dir",
                               str(self.state)], capture_output=True, text=True,
                              timeout=timeout)

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.gateway_url + path, timeout=10, **kw)  # type: ignore[arg-type]


def write_cluster_file(folder: Path, regions: list[RegionProc],
                       name: str = "nimbus.cluster.yaml") -> ClusterFile:
    """A cluster file naming ``regions`` in order, with a token file each."""
    folder.mkdir(parents=True, exist_ok=True)
    token_files: dict[str, str] = {}
    for r in regions:
        token = folder / f"{r.name}.token"
        token.write_text(r.token + "\n")
        token.chmod(0o600)
        token_files[r.name] = token.name
    path = folder / name
    write_cluster(path, [r.entry() for r in regions], token_files)
    return load_cluster(path)


@contextmanager
def regions(root: Path, app: Path | None, names: tuple[str, ...] = ("eu", "us"),
            *extra: str) -> Iterator[list[RegionProc]]:
    """Start one region per name on 127.0.0.2, 127.0.0.3, ... and stop them all."""
    started: list[RegionProc] = []
    try:
        for i, name in enumerate(names):
            started.append(RegionProc(name, f"127.0.0.{i + 2}", root, app, *extra).start())
        yield started
    finally:
        for r in started:
            try:
                r.stop()
            except Exception:  # noqa: BLE001 - stop the others whatever happens
                pass
