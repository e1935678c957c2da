"""What the edge tests share: a running ``nimbus edge``, a steady load of
GETs through it, waiting for a condition, and the times a region takes to
be found down and to take traffic again."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import dns.message
import dns.query
import httpx

from tests.region import wait_until


def stop_process(proc: subprocess.Popen[bytes], out: IO[bytes], wait_s: float,
                 kill_wait_s: float | None = None) -> None:
    """SIGTERM ``proc``, SIGKILL it if it is still there after ``wait_s``,
    and close ``out``, its log."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait_s)
    out.close()


class EdgeProc:
    """A running ``nimbus edge`` on a free port of 127.0.0.1."""

    def __init__(self, cluster: Path, log: Path, rise_s: float) -> None:
        self._out = open(log, "wb")  # noqa: SIM115
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nimbus", "edge", "--cluster", str(cluster),
             "--port", "0", "--rise", str(rise_s), "--grace", "2"],
            stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while b"serving http://" not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nimbus edge did not start:\n{log.read_text()}")
            time.sleep(0.05)
        self.url = log.read_bytes().split(b"serving ", 1)[1].split()[0].decode()

    def regions(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/_nimbus/regions", timeout=5).json()
        return data

    def stop(self) -> int:
        stop_process(self.proc, self._out, 15, 5)
        return self.proc.returncode


class Load:
    """A steady load of GETs from a few threads: (start, end, status, region)."""

    def __init__(self, url: str, path: str = "/hello", threads: int = 4) -> None:
        self.url = url
        self.path = path
        self.stop_flag = threading.Event()
        self.results: list[tuple[float, float, int, str]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop_flag.is_set():
                start = time.monotonic()
                try:
                    r = client.get(self.path)
                    self.results.append((start, time.monotonic(), r.status_code,
                                         r.headers.get("x-nimbus-region", "?")))
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                time.sleep(0.005)

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(15)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    wait_until(cond, timeout, what, step_s=0.05)


def down_within(edge: EdgeProc, region: str, since: float, limit: float) -> float:
    """Seconds from ``since`` until the edge reports ``region`` down."""
    while edge.regions()["regions"][region]["up"]:
        if time.monotonic() - since > limit:
            raise AssertionError(f"{region} still up {limit} s after its failure")
        time.sleep(0.02)
    return time.monotonic() - since


def comes_back(load: Load, region: str, since: float, rise_s: float) -> float:
    """Seconds from ``since`` to the first request (by start) ``region`` served."""
    wait_for(lambda: any(r[3] == region and r[0] > since for r in load.results),
             rise_s + 10, f"{region} to take traffic again")
    return min(r[0] for r in load.results if r[3] == region and r[0] > since) - since


def ask_dns(port: int, name: str, rdtype: str = "A", *, tcp: bool = False,
            timeout: float = 2.0) -> dns.message.Message:
    """``name`` asked of the DNS server on 127.0.0.1:``port``, over UDP or TCP."""
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=timeout)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout)
