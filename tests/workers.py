"""Real worker processes serving an app folder over frames, for the tests."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.conftest import descendants

START_TIMEOUT_S = 60.0
TOKEN = "t" * 20 + "-region-token-for-tests-0123456789"


def write_token(folder: Path, token: str = TOKEN) -> Path:
    path = folder / f"token-{abs(hash(token)) % 10_000}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


class WorkerProcess:
    """``python -m nimbus.worker.frameserver`` on a free port."""

    def __init__(self, app: Path, folder: Path, node_id: str, token: str = TOKEN,
                 *extra: str) -> None:
        self.node_id = node_id
        self.state = folder / f"state-{node_id}"
        self.log_path = folder / f"{node_id}.err"
        self._err = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nimbus.worker.frameserver", "--app", str(app),
             "--state-dir", str(self.state), "--token-file", str(write_token(folder, token)),
             "--node-id", node_id, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self._children: set[tuple[int, str]] = set()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"worker {node_id} did not start:\n{self.errors()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        info = orjson.loads(line)
        self.address: str = info["frames"]
        self._children = _stamped(descendants(self.proc.pid))

    def errors(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, as a machine dying would do (its instances see EOF and go)."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._children |= _stamped(descendants(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        for pid, started in self._children:  # left behind by this worker, if any
            if _start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._err.close()


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _stamped(pids: set[int]) -> set[tuple[int, str]]:
    return {(pid, t) for pid in pids if (t := _start_time(pid))}
