"""Fixtures that start real ``nimbus up`` processes on free ports."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from nimbus.natsd import NatsCluster

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90.0
HOST_FILES = ("--containment", "rlimits")


class Nimbus:
    """A running ``nimbus up`` subprocess and ways to talk to it."""

    def __init__(self, app: Path | None, state: Path, log_path: Path, *extra: str) -> None:
        self.state = state
        self.log_path = log_path
        self.http: httpx.Client | None = None
        args = [sys.executable, "-m", "nimbus.cli.main", "up"]
        if app is not None:
            args.append(str(app))
        args += ["--port", "0", "--control-port", "0", "--state-dir", str(state), *extra]
        self._out = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT,
                                     cwd=state.parent)
        info = state / "control.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if info.exists() and b"serving at" in self.output_bytes():
                break
            if self.proc.poll() is not None:
                out = self.output()
                self._out.close()
                raise RuntimeError(f"nimbus up exited {self.proc.returncode}:\n{out}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nimbus up did not start:\n{self.output()}")
            time.sleep(0.05)
        data = orjson.loads(info.read_bytes())
        self.url = data["gateway_url"]
        self.control_url = data["control_url"]
        self.token = (state / "token").read_text().strip()
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def output_bytes(self) -> bytes:
        self._out.flush()
        return self.log_path.read_bytes()

    def output(self) -> str:
        return self.output_bytes().decode(errors="replace")

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nimbus.cli.main", *args, "--state-dir", str(self.state)],
            capture_output=True, text=True, timeout=timeout, cwd=self.state.parent)

    def descendants(self) -> set[int]:
        return descendants(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        if self.http is not None:
            self.http.close()
        return self.proc.returncode


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by walking /proc parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        nxt = {c for c, p in parents.items() if p in frontier and c not in out}
        out |= nxt
        frontier = nxt
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def start_nimbus(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    started: list[Nimbus] = []
    # Modules whose handlers report through files in the test's folder run
    # them as the platform's user (full containment hides the host's files
    # from handlers; it has tests of its own).
    if getattr(request.module, "HANDLERS_WRITE_HOST_FILES", False):
        host_files: tuple[str, ...] = HOST_FILES
    else:
        host_files = ()

    def start(app: Path | None, *extra: str, name: str = "state",
              state: Path | None = None) -> Nimbus:
        n = Nimbus(app, state or tmp_path / name, tmp_path / f"{name}.out",
                   *host_files, *extra)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop(signal.SIGKILL if n.proc.poll() is None else signal.SIGTERM)


def up_exits(app: Path | None, state: Path, timeout: float = 60.0) -> tuple[int, str, float]:
    """``nimbus up [APP]`` expected to stop by itself (a refusal): its exit
    status, its output (stdout and stderr) and the seconds it took. If it
    keeps running it is stopped and the test fails."""
    args = [sys.executable, "-m", "nimbus.cli.main", "up"]
    if app is not None:
        args.append(str(app))
    args += ["--port", "0", "--control-port", "0", "--state-dir", str(state)]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=state.parent)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"nimbus up kept running:\n{out[-2000:]}")
    return proc.returncode, out, time.monotonic() - t0


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A real 3-server NATS cluster (JetStream, credentials) for a module."""
    c = NatsCluster(tmp_path_factory.mktemp("nats"), secrets.token_urlsafe(32), size=3)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster(nats_cluster: NatsCluster) -> NatsCluster:
    return nats_cluster
