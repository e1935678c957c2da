"""Shared bench plumbing: start servers on free ports, run wrk, parse it."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nimbus_up(app: Path, probe: str = "/hello", *extra: str,
              env: dict[str, str] | None = None,
              ) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """``nimbus up APP`` on free ports (``env`` added to this process's
    environment); yields (gateway_url, state_dir, proc)."""
    state = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbus.cli.main", "up", str(app), "--port", "0",
         "--control-port", "0", "--state-dir", str(state), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **env} if env else None)
    try:
        info = state / "control.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nimbus up did not start")
            time.sleep(0.05)
        url = orjson.loads(info.read_bytes())["gateway_url"]
        wait_http(url + probe)
        yield url, state, proc
    finally:
        stop(proc)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def baseline_up(pids: list[int] | None = None) -> Iterator[str]:
    """Bare uvicorn serving the seed handler; its pid is appended to ``pids``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--port", str(port),
         "--workers", "1", "--http", "httptools", "--loop", "uvloop", "--no-access-log",
         "--log-level", "warning"], cwd=ROOT, stdout=subprocess.DEVNULL)
    if pids is not None:
        pids.append(proc.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/hello")
        yield url
    finally:
        stop(proc)


def wrk(url: str, connections: int, seconds: int, script: str | None = None) -> dict[str, float]:
    """Run wrk (with an optional Lua ``script`` text); returns
    {"rps", "p50_ms", "p99_ms", "errors", "requests"}."""
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    extra: list[str] = []
    if script is not None:
        lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        with lua:
            lua.write(script)
        extra = ["-s", lua.name]
    try:
        out = subprocess.run(
            [exe, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url],
            capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    finally:
        if extra:
            os.unlink(extra[1])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "errors": errors,
            "requests": total}


def cpu_count() -> int:
    return os.cpu_count() or 1


def _json_line(proc: subprocess.Popen[bytes], what: str, timeout_s: float = 90.0) -> Any:
    """The first line ``proc`` prints on stdout, as JSON."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise SystemExit(f"{what} did not start")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line += os.read(proc.stdout.fileno(), 4096)
    return orjson.loads(line)


@contextlib.contextmanager
def token_file() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="nimbus-bench-token-"))
    path = folder / "token"
    path.write_text(secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    try:
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def worker_up(app: Path, node_id: str, token: Path, *extra: str,
              pids: list[int] | None = None) -> Iterator[str]:
    """A worker process serving ``app`` over frames; yields its frame address
    (its pid is appended to ``pids``)."""
    state = Path(tempfile.mkdtemp(prefix="nimbus-bench-worker-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbus.worker.frameserver", "--app", str(app),
         "--state-dir", str(state), "--token-file", str(token), "--node-id", node_id,
         *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if pids is not None:
        pids.append(proc.pid)
    try:
        yield _json_line(proc, f"worker {node_id}")["frames"]
    finally:
        stop(proc)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def remote_gateway_up(app: Path, workers: list[tuple[str, str]], token: Path,
                      probe: str = "/hello") -> Iterator[tuple[str, int]]:
    """A gateway process calling ``workers`` (id, frame address) over frames;
    yields (url, pid)."""
    args = [sys.executable, str(ROOT / "bench" / "remote_gateway.py"), "--app", str(app),
            "--token-file", str(token)]
    for worker_id, address in workers:
        args += ["--worker", f"{worker_id}={address}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        url = _json_line(proc, "the remote gateway")["url"]
        wait_http(url + probe)
        yield url, proc.pid
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def tree_cpu_s(pids: list[int], *, reaped: bool = False) -> float:
    """CPU seconds (user + system) used so far by ``pids`` and every live
    process below them: what a side of a benchmark costs, whatever the
    machine's load did to its throughput. ``reaped``: with what their
    children that ended used too (e.g. the curl a shell starts per request)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        last = 15 if reaped else 13  # utime, stime[, cutime, cstime]
        times[int(entry)] = sum(int(x) for x in fields[11:last]) / tick
    tree = set(pids)
    frontier = set(pids)
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier and c not in tree}
        tree |= frontier
    return sum(times.get(pid, 0.0) for pid in tree)
