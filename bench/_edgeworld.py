"""Bench plumbing for several regions: ``nimbus up --region`` processes on
127.0.0.2, 127.0.0.3, ... (fixed ports, so a killed region comes back where
it was), their cluster file, and an edge in front. Every process is started
and stopped by its PID."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import wait_http  # noqa: E402
from nimbus.chaos.procs import kill_tree, wait_gone  # noqa: E402
from nimbus.multiregion.clusterfile import RegionEntry, write_cluster  # noqa: E402

APP = """\
name: bench
functions:
  hello:
    handler: h.hello
    min_instances: 1
    concurrency: 4
    max_instances: 8
    http: [{method: GET, path: /hello}]
"""

HANDLERS = """\
def hello(event, context):
    return {"statusCode": 200, "body": "Hello, World!"}
"""


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RegionUp:
    def __init__(self, name: str, host: str, root: Path, app: Path) -> None:
        self.name, self.host, self.app = name, host, app
        self.state = root / name
        self.log = root / f"{name}.log"
        self.port, self.control_port = free_port(host), free_port(host)
        self.gateway_url = f"http://{host}:{self.port}"
        self.control_url = f"http://{host}:{self.control_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nimbus", "up", str(self.app), "--region", self.name,
                 "--host", self.host, "--port", str(self.port), "--control-host", self.host,
                 "--control-port", str(self.control_port), "--state-dir", str(self.state),
                 "--containment", "rlimits", "--grace", "2"],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                info = self.state / "control.json"
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if orjson.loads(info.read_bytes())["pid"] == self.proc.pid:
                        with contextlib.suppress(httpx.HTTPError):
                            if client.get(self.gateway_url + "/hello").status_code == 200:
                                return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"region {self.name} did not start; see {self.log}")
                time.sleep(0.05)

    @property
    def token(self) -> str:
        return (self.state / "token").read_text().strip()

    def kill(self) -> list[int]:
        """SIGKILL every process of the region at once."""
        assert self.proc is not None
        pids = kill_tree([self.proc.pid])
        self.proc.wait(10)
        wait_gone(pids, time.monotonic() + 10)
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                kill_tree([self.proc.pid])
                self.proc.wait(10)


@dataclass
class World:
    regions: list[RegionUp]
    edge: str       # the edge's URL
    edge_pid: int


@contextlib.contextmanager
def edge_world(names: tuple[str, ...] = ("eu", "us")) -> Iterator[World]:
    """The regions (started) and the edge in front of them."""
    root = Path(tempfile.mkdtemp(prefix="nimbus-bench-regions-"))
    app = root / "bench"
    app.mkdir()
    (app / "app.yaml").write_text(APP)
    (app / "h.py").write_text(HANDLERS)
    regions = [RegionUp(n, f"127.0.0.{i + 2}", root, app) for i, n in enumerate(names)]
    edge: subprocess.Popen[bytes] | None = None
    try:
        for r in regions:
            r.start()
        token_files = {}
        for r in regions:
            (root / f"{r.name}.token").write_text(r.token + "\n")
            (root / f"{r.name}.token").chmod(0o600)
            token_files[r.name] = f"{r.name}.token"
        cluster = root / "nimbus.cluster.yaml"
        write_cluster(cluster, [RegionEntry(r.name, r.control_url, r.token, (r.gateway_url,))
                                for r in regions], token_files)
        port = free_port("127.0.0.1")
        with open(root / "edge.log", "ab") as out:
            edge = subprocess.Popen(
                [sys.executable, "-m", "nimbus", "edge", "--cluster", str(cluster),
                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/_nimbus/health")
        wait_http(url + "/hello")
        yield World(regions, url, edge.pid)
    finally:
        if edge is not None and edge.poll() is None:
            edge.send_signal(signal.SIGTERM)
            edge.wait(20)
        for r in regions:
            r.stop()
        shutil.rmtree(root, ignore_errors=True)
