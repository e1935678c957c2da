"""Regions in network namespaces of their own, for partition and latency
tests: each namespace is joined to the host by a veth pair on a private
/30, and its ``nimbus up`` runs inside it (``ip netns exec``).

- A partition takes the namespace's end of the veth down: packets to the
  region vanish, nothing is refused (a connection attempt times out).
- Added latency is ``tc netem delay`` on the host's end of the veth when
  the kernel has netem (``sch_netem``); a kernel without it gets the same
  delay from a small TCP relay on the way to the region
  (:class:`DelayRelay`), so the test runs either way.

Names carry the test process's pid; everything is deleted by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from nimbus.multiregion.clusterfile import RegionEntry
from tests.conftest import alive, descendants

GATEWAY_PORT = 8080
CONTROL_PORT = 8081
START_TIMEOUT_S = 60.0


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


class Netns:
    """A namespace with one veth to the host: host side ``.1``, namespace side ``.2``."""

    def __init__(self, index: int) -> None:
        pid = os.getpid()
        self.name = f"nimbus-dns-{pid}-{index}"
        self.host_if = f"nd{pid % 10**6}h{index}"          # at most 15 characters
        self.ns_if = f"nd{pid % 10**6}n{index}"
        # a /30 per (pid, index) in 10.77.0.0/16
        block = (pid * 4 + index) % (2**14)
        base = f"10.77.{block >> 6}.{(block & 63) * 4}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.host_ip = f"{prefix}.{last + 1}"
        self.ns_ip = f"{prefix}.{last + 2}"

    def create(self) -> Netns:
        self.close()        # left by a dead process that had our pid: ours to remove
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.exec("ip", "link", "set", self.ns_if, "up")
        return self

    def exec(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.name, *args)

    def has_netem(self) -> bool:
        """Whether this kernel can ``tc qdisc ... netem`` (tried on our veth)."""
        try:
            sh("tc", "qdisc", "replace", "dev", self.host_if, "root", "netem", "delay", "0ms")
        except RuntimeError:
            return False
        self.clear()
        return True

    def delay(self, ms: int) -> None:
        """Add ``ms`` to every packet from the host to the region (netem)."""
        sh("tc", "qdisc", "replace", "dev", self.host_if, "root", "netem", "delay", f"{ms}ms")

    def clear(self) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", self.host_if, "root"],
                       capture_output=True, timeout=30)   # none there: fine

    def cut(self) -> None:
        """Partition: the region's end of the veth goes down."""
        self.exec("ip", "link", "set", self.ns_if, "down")

    def heal(self) -> None:
        self.exec("ip", "link", "set", self.ns_if, "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


class NetnsRegion:
    """``nimbus up --region NAME`` inside a namespace, on its veth address."""

    def __init__(self, name: str, ns: Netns, root: Path, app: Path) -> None:
        self.name = name
        self.ns = ns
        self.state = root / f"region-{name}"
        self.log = root / f"region-{name}.out"
        self.gateway_url = f"http://{ns.ns_ip}:{GATEWAY_PORT}"
        self.control_url = f"http://{ns.ns_ip}:{CONTROL_PORT}"
        self._out = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-m", "nimbus", "up", str(app),
             "--region", name, "--host", ns.ns_ip, "--port", str(GATEWAY_PORT),
             "--control-host", ns.ns_ip, "--control-port", str(CONTROL_PORT),
             "--state-dir", str(self.state), "--containment", "rlimits", "--grace", "2"],
            stdout=self._out, stderr=subprocess.STDOUT, cwd=root)

    def wait_serving(self) -> NetnsRegion:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ((self.state / "control.json").exists()
                   and b"serving at" in self.log.read_bytes()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"region {self.name} did not start:\n"
                                   f"{self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        info = orjson.loads((self.state / "control.json").read_bytes())
        assert info["gateway_url"].startswith(self.gateway_url), info
        return self

    @property
    def token(self) -> str:
        return (self.state / "token").read_text().strip()

    def entry(self, gateway: str | None = None) -> RegionEntry:
        return RegionEntry(name=self.name, control=self.control_url, token=self.token,
                           gateways=(gateway or self.gateway_url,))

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nimbus", *args, "--state-dir",
                               str(self.state)], capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the whole tree after a few seconds."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._out.close()


class DelayRelay:
    """A TCP relay on 127.0.0.1 in front of ``upstream`` that holds every
    chunk going upstream for ``delay_s`` (order kept): a round trip through
    it takes ``delay_s`` longer. Runs its own event loop in a thread."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay_s = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), 30)
        except (OSError, TimeoutError):
            writer.close()
            self.tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pump(reader, up_writer, True),
                                 self._pump(up_reader, writer, False))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self.tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    delayed: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                dst.write(data)
                await dst.drain()
            with contextlib.suppress(OSError):
                dst.write_eof()

        sender = asyncio.create_task(send())
        try:
            while data := await src.read(65536):
                queue.put_nowait((self.loop.time() + (self.delay_s if delayed else 0), data))
            queue.put_nowait((0.0, b""))
            await sender
        finally:
            sender.cancel()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
