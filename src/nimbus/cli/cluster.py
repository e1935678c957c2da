"""``nimbus cluster up``: a whole region on one machine, for trying the
distributed mode — a 3-server NATS cluster from the wheel, controllers,
workers and gateways as separate processes on loopback — in the foreground.

Every process is started and stopped by its PID. The state folder holds
``token`` (the region token: NATS password, worker-frame secret, control API
token), ``nats/`` (the servers' data), one folder per process (``controller-1``,
``worker-1``, ``gateway-1``, ...) with its ``node.json`` once it serves,
``cluster.json`` (every process and server) and ``control.json`` (how the CLI
finds the region, as for ``nimbus up``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson

from nimbus.control import statedir
from nimbus.control.statelock import StateLock
from nimbus.errors import NimbusError, UnavailableError
from nimbus.natsd import NatsCluster, _die_with_parent
from nimbus.store.private import write_private

NODE_FILE = "node.json"
CLUSTER_FILE = "cluster.json"
START_TIMEOUT_S = 60.0


@dataclass
class Child:
    role: str
    index: int
    state_dir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def role_argv(role: str, *, store_url: str, region: str, token_file: Path, state_dir: Path,
              port: int | None = None, extra: list[str] | None = None) -> list[str]:
    argv = [sys.executable, "-m", "nimbus", role, "--store", store_url, "--region", region,
            "--token-file", str(token_file), "--state-dir", str(state_dir)]
    if port is not None:
        argv += ["--control-port" if role == "controller" else "--port", str(port)]
    return argv + (extra or [])


def wait_node_file(child: Child, deadline: float) -> dict[str, Any]:
    """The child's ``node.json``, written once it serves; an error naming the
    child (and the end of its log) if it exits or the deadline passes."""
    path = child.state_dir / NODE_FILE
    assert child.proc is not None
    while True:
        if path.exists():
            with contextlib.suppress(orjson.JSONDecodeError, OSError):
                info: dict[str, Any] = orjson.loads(path.read_bytes())
                if info.get("pid") == child.proc.pid:
                    return info
        if child.proc.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with code {child.proc.returncode}" if child.proc.poll() is not None
                   else "did not start in time")
            tail = ""
            with contextlib.suppress(OSError):
                tail = (child.state_dir / "process.log").read_bytes()[-1500:].decode(
                    errors="replace")
            raise UnavailableError(f"{child.name} {why}; its log ends:\n{tail}")
        time.sleep(0.05)


class LocalRegion:
    """The processes of one region on this machine, supervised by PID."""

    def __init__(self, state_dir: Path, *, region: str, workers: int, gateways: int,
                 controllers: int, port: int, control_port: int, host: str = "127.0.0.1",
                 worker_args: list[str] | None = None,
                 role_args: list[str] | None = None) -> None:
        for name, n in (("workers", workers), ("gateways", gateways),
                        ("controllers", controllers)):
            if n < 1:
                raise click.BadParameter(f"at least 1, got {n}", param_hint=f"--{name}")
        self.state_dir = state_dir
        self.region = region
        self.counts = {"controller": controllers, "worker": workers, "gateway": gateways}
        self.port = port
        self.control_port = control_port
        self.host = host
        self.worker_args = worker_args or []
        self.role_args = role_args or []  # every role's (--trace)
        self.nats: NatsCluster | None = None
        self.children: list[Child] = []
        self.lock: StateLock | None = None

    @property
    def token_file(self) -> Path:
        return self.state_dir / "token"

    def start(self) -> None:
        from nimbus.control.server import ensure_token

        statedir.prepare(self.state_dir)
        # one region per state folder: a second `cluster up` here would start
        # NATS servers on the same data
        self.lock = StateLock.acquire(self.state_dir)
        token = ensure_token(self.state_dir)
        self.nats = NatsCluster(self.state_dir / "nats", token, name=f"nimbus-{self.region}")
        self.nats.start()
        try:
            for role in ("controller", "worker", "gateway"):
                self._start_role(role, self.nats.store_url)
            self._write_files()
        except BaseException:
            self.stop()
            raise

    def _start_role(self, role: str, store_url: str) -> None:
        started = []
        for i in range(1, self.counts[role] + 1):
            port = None
            extra: list[str] = []
            if role == "gateway":
                port = self.port + i - 1 if self.port else 0
                extra = ["--host", self.host]
            elif role == "controller":
                port = self.control_port + i - 1 if self.control_port else 0
                extra = ["--control-host", self.host]
            else:
                extra = ["--listen", f"{self.host}:0", *self.worker_args]
            child = Child(role, i, self.state_dir / f"{role}-{i}", [])
            child.argv = role_argv(role, store_url=store_url, region=self.region,
                                   token_file=self.token_file, state_dir=child.state_dir,
                                   port=port, extra=extra + self.role_args)
            self.spawn(child)
            self.children.append(child)
            started.append(child)
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in started:
            child.info = wait_node_file(child, deadline)

    def spawn(self, child: Child) -> None:
        child.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            (child.state_dir / NODE_FILE).unlink()
        log = open(child.state_dir / "process.log", "ab")  # noqa: SIM115 - the child's
        try:
            child.proc = subprocess.Popen(child.argv, stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _write_files(self) -> None:
        assert self.nats is not None
        gateways = [c for c in self.children if c.role == "gateway"]
        controllers = [c for c in self.children if c.role == "controller"]
        cluster = {
            "pid": os.getpid(), "region": self.region, "store": self.nats.store_url,
            "nats": [{"name": s.name, "pid": s.pid, "url": s.url,
                      "monitor": f"http://{s.host}:{s.http_port}"} for s in self.nats.servers],
            "processes": [{"role": c.role, "name": c.name, "pid": c.info.get("pid"),
                           "state_dir": str(c.state_dir), **c.info} for c in self.children],
        }
        write_private(self.state_dir / CLUSTER_FILE,
                      orjson.dumps(cluster, option=orjson.OPT_INDENT_2))
        write_private(self.state_dir / "control.json", orjson.dumps({
            "pid": os.getpid(), "control_url": controllers[0].info["url"],
            "control_urls": [c.info["url"] for c in controllers],
            "gateway_url": gateways[0].info["url"],
            "gateway_urls": [c.info["url"] for c in gateways]}))

    def revive_nats(self) -> list[str]:
        """Start again any NATS server that died (same ports and data: it
        catches up from the others); returns the names restarted."""
        if self.nats is None:
            return []
        revived = []
        for i, server in enumerate(self.nats.servers):
            if server.proc is not None and not server.running():
                self.nats.restart(i)
                revived.append(server.name)
        if revived:
            self._write_files()
        return revived

    def exited(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def stop(self, grace_s: float = 20.0) -> None:
        """Gateways first (no new requests), then workers, then controllers;
        SIGTERM, then SIGKILL past ``grace_s``; then the NATS servers."""
        for role in ("gateway", "worker", "controller"):
            group = [c for c in self.children if c.role == role and c.proc is not None]
            for c in group:
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in group:
                assert c.proc is not None
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait(5)
        if self.nats is not None:
            self.nats.stop()
        if self.lock is not None:  # the files are ours only while we hold the folder
            for name in ("control.json", CLUSTER_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / name).unlink()
            self.lock.release()
            self.lock = None


def run_cluster_up(app_dir: Path | None, *, state_dir: Path, region: str, workers: int,
                   gateways: int, controllers: int, port: int, control_port: int,
                   worker_args: list[str], role_args: list[str] | None = None,
                   parameters: dict[str, str] | None = None) -> int:
    from nimbus.cli.client import Client, Connection
    from nimbus.cli.output import print_deploy_stream
    from nimbus.control.bundle import make_bundle
    from nimbus.manifest.loader import MANIFEST_NAMES, load_app

    os.umask(0o077)
    bundle = None
    if app_dir is not None and any((app_dir / n).exists() for n in MANIFEST_NAMES):
        load_app(app_dir, parameters=parameters or None)  # manifest errors before anything starts
        bundle = make_bundle(app_dir)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    local = LocalRegion(state_dir.resolve(), region=region, workers=workers, gateways=gateways,
                        controllers=controllers, port=port, control_port=control_port,
                        worker_args=worker_args, role_args=role_args)
    code = 0
    started = False
    try:
        local.start()
        started = True
        assert local.nats is not None
        for c in local.children:
            click.echo(f"nimbus: {c.name} pid {c.info.get('pid')} {c.info.get('url', '')}",
                       err=True)
        click.echo(f"nimbus: NATS {local.nats.urls} (data in {local.state_dir / 'nats'})",
                   err=True)
        if bundle is not None and app_dir is not None:
            ctl = next(c for c in local.children if c.role == "controller")
            token = local.token_file.read_text().strip()
            client = Client(Connection(ctl.info["url"], token), timeout_s=900.0)
            gw = next(c for c in local.children if c.role == "gateway")
            try:
                print_deploy_stream(client.stream_lines(
                    "POST", "/v1/deploy", content=bundle,
                    params={"name": app_dir.resolve().name}
                    | ({"parameters": orjson.dumps(parameters).decode()} if parameters else {}),
                    headers={"content-type": "application/zip"}), gateway_url=gw.info["url"])
            except NimbusError as exc:
                click.echo(f"nimbus: error: {exc}", err=True)
                code = 1
        if code == 0:
            click.echo(f"nimbus: region {region} serving (state {local.state_dir}); "
                       "Ctrl-C to stop", err=True)
            seen: set[str] = set()
            while not stop:
                try:
                    for name in local.revive_nats():
                        click.echo(f"nimbus: NATS server {name} had stopped: restarted",
                                   err=True)
                except UnavailableError as exc:
                    click.echo(f"nimbus: {exc}", err=True)
                for c in local.exited():
                    if c.name not in seen:
                        seen.add(c.name)
                        assert c.proc is not None
                        click.echo(f"nimbus: {c.name} (pid {c.proc.pid}) exited with code "
                                   f"{c.proc.returncode}", err=True)
                time.sleep(0.2)
        click.echo("nimbus: stopping the region", err=True)
    except NimbusError as exc:
        click.echo(f"nimbus: error: {exc}", err=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        local.stop()
    if started:
        click.echo("nimbus: stopped", err=True)
    return code
