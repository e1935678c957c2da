"""``nimbus demo regions APP_DIR``: two regions, an edge and a DNS server on
this machine, so failover can be seen in a minute.

Region ``eu`` is ``nimbus up --region eu`` on 127.0.0.2, ``us`` the same on
127.0.0.3 (loopback addresses, so both can use the same ports). Their
cluster file goes in the demo folder with their tokens; the app is deployed
to both; an edge and a DNS server read the cluster file. Everything is a
child process, stopped by its PID on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import httpx
import orjson

from nimbus.cli.main import cli
from nimbus.errors import NimbusError, UnavailableError

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
REGIONS = (("eu", "127.0.0.2"), ("us", "127.0.0.3"))


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-1500:].decode(errors="replace")
        return ""


def _nimbus(*args: str) -> list[str]:
    return [sys.executable, "-m", "nimbus", *args]


def _with_port(argv: list[str], option: str, url: str) -> list[str]:
    i = argv.index(option)
    return [*argv[:i + 1], url.rsplit(":", 1)[1], *argv[i + 2:]]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` (the DNS server takes both)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
        return port
    raise UnavailableError(f"no free port on {host}")


def _has_command(name: str, option: str | None = None) -> bool:
    """Whether this nimbus has the command (and option): the demo uses what
    is there."""
    command = cli.commands.get(name)
    if command is None:
        return False
    return option is None or any(p.name == option for p in command.params)


class Demo:
    def __init__(self, app_dir: Path, folder: Path, *, edge_port: int, dns_port: int,
                 region_port: int, control_port: int, containment: str,
                 zone: str) -> None:
        self.app_dir = app_dir.resolve()
        self.folder = folder.resolve()
        self.edge_port = edge_port
        self.dns_port = dns_port
        self.region_port = region_port
        self.control_port = control_port
        self.containment = containment
        self.zone = zone
        self.children: list[Child] = []
        self.regions: dict[str, dict[str, str]] = {}
        self.cluster_file = self.folder / "nimbus.cluster.yaml"

    def say(self, msg: str) -> None:
        click.echo(f"nimbus demo: {msg}", err=True)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        empty = self.folder / "empty"
        empty.mkdir(exist_ok=True)
        for name, host in REGIONS:
            state = self.folder / name
            child = Child(f"region {name}", _nimbus(
                "up", str(empty), "--region", name, "--host", host, "--control-host", host,
                "--port", str(self.region_port), "--control-port", str(self.control_port),
                "--state-dir", str(state), "--containment", self.containment),
                self.folder / f"{name}.log")
            child.start()
            self.children.append(child)
        deadline = time.monotonic() + START_TIMEOUT_S
        for (name, _host), child in zip(REGIONS, self.children, strict=True):
            self.regions[name] = r = self._wait_region(child, self.folder / name, deadline)
            # started again, a region must come back where the cluster file says
            child.argv = _with_port(_with_port(child.argv, "--port", r["gateway"]),
                                    "--control-port", r["control"])
        self._write_cluster()
        self._deploy()
        self._start_edge()
        self._start_dns()

    def _wait_region(self, child: Child, state: Path, deadline: float) -> dict[str, str]:
        info = state / "control.json"
        while True:
            if info.exists() and b"serving at" in child.log.read_bytes():
                data = orjson.loads(info.read_bytes())
                if data.get("pid") == child.pid:
                    token = (state / "token").read_text().strip()
                    return {"gateway": data["gateway_url"], "control": data["control_url"],
                            "token": token}
            if not child.running() or time.monotonic() > deadline:
                raise UnavailableError(f"{child.name} did not start; its log ends:\n"
                                       f"{child.log_tail()}")
            time.sleep(0.05)

    def _write_cluster(self) -> None:
        from nimbus.multiregion.clusterfile import RegionEntry, write_cluster

        entries, token_files = [], {}
        for name, r in self.regions.items():
            tok = self.folder / f"{name}.token"
            fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(r["token"] + "\n")
            entries.append(RegionEntry(name=name, control=r["control"], token=r["token"],
                                       gateways=(r["gateway"],)))
            token_files[name] = tok.name
        write_cluster(self.cluster_file, entries, token_files)

    def _deploy(self) -> None:
        if _has_command("deploy", "cluster"):
            wait = ["--wait-all"] if _has_command("deploy", "wait_all") else []
            runs = [_nimbus("deploy", str(self.app_dir), "--cluster", str(self.cluster_file),
                            *wait)]
        else:  # one region at a time
            runs = [_nimbus("deploy", str(self.app_dir), "--url", r["control"],
                            "--token", r["token"]) for r in self.regions.values()]
        for argv in runs:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise UnavailableError(f"deploying {self.app_dir} failed: "
                                       f"{(out.stderr or out.stdout).strip()}")

    def _start_edge(self) -> None:
        port = self.edge_port or free_port()
        child = Child("edge", _nimbus("edge", "--cluster", str(self.cluster_file),
                                      "--host", "127.0.0.1", "--port", str(port)),
                      self.folder / "edge.log")
        child.start()
        self.children.append(child)
        self.edge_url = f"http://127.0.0.1:{port}"
        self._wait_http(child, self.edge_url + "/_nimbus/health")

    def _start_dns(self) -> None:
        self.dns_port_used: int | None = None
        if not _has_command("dns"):
            self.say("no `nimbus dns` here: DNS server skipped")
            return
        port = self.dns_port or free_port()
        child = Child("dns", _nimbus("dns", "--cluster", str(self.cluster_file), "--zone",
                                     self.zone, "--host", "127.0.0.1", "--port", str(port)),
                      self.folder / "dns.log")
        child.start()
        self.children.append(child)
        time.sleep(0.3)
        if not child.running():
            raise UnavailableError(f"the DNS server did not start; its log ends:\n"
                                   f"{child.log_tail()}")
        self.dns_port_used = port

    def _wait_http(self, child: Child, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            if not child.running() or time.monotonic() > deadline:
                raise UnavailableError(f"{child.name} did not start; its log ends:\n"
                                       f"{child.log_tail()}")
            time.sleep(0.05)

    def app(self) -> tuple[str, list[str]]:
        """The deployed app's name and GET routes (from the first region)."""
        r = next(iter(self.regions.values()))
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError,
                                 IndexError):
            apps = httpx.get(r["control"] + "/v1/apps", timeout=5.0,
                             headers={"authorization": f"Bearer {r['token']}"}).json()
            return str(apps[0]["name"]), [rt["path"] for rt in apps[0].get("routes", [])
                                          if rt.get("method") in ("GET", "ANY")]
        return self.app_dir.name, []

    def print_summary(self) -> None:
        app, routes = self.app()
        plain = [p for p in routes if "{" not in p]
        path = plain[0] if plain else (routes[0] if routes else "/")
        echo = click.echo
        echo(f"cluster file  {self.cluster_file}")
        for (name, _host), child in zip(REGIONS, self.children, strict=False):
            r = self.regions[name]
            echo(f"region {name}     gateway {r['gateway']}  control {r['control']}  "
                 f"pid {child.pid}")
        echo(f"edge          {self.edge_url}  (regions: {self.edge_url}/_nimbus/regions)")
        if self.dns_port_used:
            echo(f"dns           127.0.0.1:{self.dns_port_used} udp+tcp, zone {self.zone}:  "
                 f"dig @127.0.0.1 -p {self.dns_port_used} {app}.{self.zone} A")
        echo(f"try           curl -si {self.edge_url}{path} | grep -i x-nimbus-region")
        first = REGIONS[0][0]
        echo(f"kill {first}       kill -9 {self.children[0].pid}    "
             f"# region {first} dies: the edge fails over to {REGIONS[1][0]} in under a second")
        echo("Ctrl-C stops everything.")
        sys.stdout.flush()

    def watch(self, stop: list[bool]) -> None:
        reported: set[str] = set()
        while not stop:
            for c in self.children:
                if not c.running() and c.name not in reported:
                    reported.add(c.name)
                    assert c.proc is not None
                    self.say(f"{c.name} (pid {c.pid}) exited with code {c.proc.returncode}; "
                             f"to start it again: {shlex.join(c.argv)}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to every child (the edge and DNS first), SIGKILL past the
        deadline; each by its PID."""
        for c in reversed(self.children):
            if c.running():
                assert c.proc is not None
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(5)


@cli.group()
def demo() -> None:
    """Try nimbus features on one machine."""


@demo.command()
@click.argument("app_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--dir", "folder", type=click.Path(path_type=Path, file_okay=False),
              help="Where the regions keep their state and the cluster file "
                   "[APP_DIR/.nimbus-demo].")
@click.option("--edge-port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="The edge's port on 127.0.0.1 (0 picks a free one).")
@click.option("--dns-port", default=5300, show_default=True, type=click.IntRange(0, 65535),
              help="The DNS server's port on 127.0.0.1, UDP and TCP (0 picks a free one).")
@click.option("--region-port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Each region's gateway port on its own address (0 picks free ones).")
@click.option("--control-port", default=8081, show_default=True,
              type=click.IntRange(0, 65535), help="Each region's control API port.")
@click.option("--zone", default="nimbus.internal", show_default=True,
              help="The DNS zone the app's name is served under.")
@click.option("--containment", default="auto", show_default=True,
              type=click.Choice(["auto", "full", "rlimits"]), help="As for nimbus up.")
def regions(app_dir: Path, folder: Path | None, edge_port: int, dns_port: int,
            region_port: int, control_port: int, zone: str, containment: str) -> None:
    """Run APP_DIR in two regions (eu on 127.0.0.2, us on 127.0.0.3) behind an
    edge and a DNS server, and print how to watch one fail over."""
    stop: list[bool] = []

    def on_signal(signum: int, frame: object) -> None:
        stop.append(True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    d = Demo(app_dir, folder or app_dir / ".nimbus-demo", edge_port=edge_port,
             dns_port=dns_port, region_port=region_port, control_port=control_port,
             containment=containment, zone=zone)
    code = 0
    try:
        d.start()
        if not stop:
            d.print_summary()
            d.watch(stop)
    except NimbusError as exc:
        click.echo(f"nimbus: error: {exc}", err=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        d.say("stopping")
        d.stop()
        d.say("stopped")
    sys.exit(code)
