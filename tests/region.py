"""A real region on loopback for tests: ``nimbus cluster up`` as a
subprocess (3 NATS servers, controllers, workers, gateways), found through
its state folder, every process addressed by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

START_TIMEOUT_S = 120.0


class Region:
    def __init__(self, app: Path | None, state: Path, *, workers: int = 2, gateways: int = 2,
                 controllers: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.state = state
        self.log_path = state.parent / f"{state.name}.log"
        args = [sys.executable, "-m", "nimbus", "cluster", "up"]
        if app is not None:
            args.append(str(app))
        args += ["--workers", str(workers), "--gateways", str(gateways),
                 "--controllers", str(controllers), "--port", "0", "--control-port", "0",
                 "--state-dir", str(state), "--containment", "rlimits", *extra]
        self._out = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT,
                                     cwd=state.parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"serving (state" not in self.output_bytes():
            if self.proc.poll() is not None:
                self._out.close()
                raise RuntimeError(f"nimbus cluster up exited {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nimbus cluster up did not start:\n{self.output()}")
            time.sleep(0.1)
        self.reload()
        self.token = (state / "token").read_text().strip()

    def reload(self) -> None:
        self.cluster: dict[str, Any] = orjson.loads((self.state / "cluster.json").read_bytes())
        control = orjson.loads((self.state / "control.json").read_bytes())
        self.gateway_urls: list[str] = control["gateway_urls"]
        self.control_urls: list[str] = control["control_urls"]

    def processes(self, role: str) -> list[dict[str, Any]]:
        return [p for p in self.cluster["processes"] if p["role"] == role]

    def output_bytes(self) -> bytes:
        if not self._out.closed:
            self._out.flush()
        return self.log_path.read_bytes()

    def output(self) -> str:
        return self.output_bytes().decode(errors="replace")

    def control(self, method: str, path: str, *, url: str | None = None,
                **kw: Any) -> httpx.Response:
        return httpx.request(method, (url or self.control_urls[0]) + path,
                             headers={"authorization": f"Bearer {self.token}"},
                             timeout=kw.pop("timeout", 30.0), **kw)

    def status(self, url: str | None = None) -> dict[str, Any]:
        r = self.control("GET", "/v1/status", url=url)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nimbus", *args, "--state-dir",
                               str(self.state)], capture_output=True, text=True,
                              timeout=timeout, cwd=self.state.parent)

    def restart_nats(self, index: int, timeout_s: float = 60.0) -> int:
        """Wait for ``nimbus cluster up`` to restart NATS server ``index``
        (it revives servers that die); returns the new PID."""
        old = self.cluster["nats"][index]["pid"]

        def new_pid() -> int | None:
            self.reload()
            pid = self.cluster["nats"][index]["pid"]
            return pid if pid != old else None

        pid: int = wait_until(new_pid, timeout_s, f"NATS server {index + 1} restarted")
        return pid

    def kill(self, pid: int) -> None:
        """SIGKILL one process of this region (by its PID)."""
        os.kill(pid, signal.SIGKILL)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def small_region(root: Path, name: str, manifest: str, handlers: str,
                 extra: tuple[str, ...] = ()) -> Region:
    """One controller, worker and gateway under ``root`` serving the app
    ``name`` (``app.yaml`` = ``manifest``, ``h.py`` = ``handlers``)."""
    app = root / name
    app.mkdir()
    (app / "app.yaml").write_text(manifest)
    (app / "h.py").write_text(handlers)
    return Region(app, root / "state", workers=1, gateways=1, controllers=1, extra=extra)


def app_with_runs(tmp_path: Path, name: str, manifest: str,
                  handlers: str) -> tuple[Path, Path]:
    """An app folder ``name`` whose handlers (``handlers``, formatted with
    ``runs=``) append what they did to a ``runs.jsonl`` any uid may write."""
    app = tmp_path / name
    app.mkdir()
    runs = tmp_path / "runs.jsonl"
    runs.touch()
    runs.chmod(0o666)
    (app / "app.yaml").write_text(manifest)
    (app / "h.py").write_text(handlers.format(runs=runs))
    return app, runs


def wait_until(predicate: Any, timeout_s: float, what: str, step_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(step_s)
