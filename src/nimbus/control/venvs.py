"""Requirements venvs: one per distinct requirements file content.

The key is the sha256 of the Python version and the file's bytes, so every
function and version with the same file shares one venv, built once. A
venv is built in a temporary folder and renamed into place only when pip
succeeded: a failed install leaves nothing behind and the running version
keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from nimbus.errors import DeployError
from nimbus.worker.containment import Containment, share_read_only
from nimbus.worker.target import site_packages_for, venv_dir_for

Progress = Callable[[str], None]
INSTALL_TIMEOUT_S = 600.0
_locks: dict[str, asyncio.Lock] = {}


def requirements_hash(content: bytes) -> str:
    tag = f"python{sys.version_info.major}.{sys.version_info.minor}\n".encode()
    return hashlib.sha256(tag + content).hexdigest()[:32]


async def ensure_venv(state_dir: Path, requirements: Path, progress: Progress,
                      containment: Containment | None = None,
                      app_dir: Path | None = None) -> str:
    """Build (or reuse) the venv for ``requirements``; returns its hash.
    Raises DeployError with pip's message when the install fails. pip runs
    contained (``containment.builder_command``): as the builder uid, seeing
    only the app's folder, the venv being built and a private /tmp."""
    contain = containment or Containment("rlimits", state_dir)
    app = app_dir or requirements.parent
    content = requirements.read_bytes()  # noqa: ASYNC240 - a small file, read once per deploy
    key = requirements_hash(content)
    final = venv_dir_for(state_dir, key)
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        if site_packages_for(state_dir, key).is_dir():
            progress(f"requirements {requirements.name}: reusing venv {key[:12]}")
            return key
        tmp = final.with_name(final.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        progress(f"requirements {requirements.name}: creating venv {key[:12]}")
        try:
            # Built where instances will see it (under full containment at
            # /var/nimbus/venvs/<hash> in a view), so every path baked into it holds.
            venv = contain.venv_dir(key) if contain.full else tmp
            tmp.mkdir()
            with tempfile.TemporaryDirectory(dir=state_dir / "tmp") as scratch:
                contain.hand_over(tmp, to_builder=True)
                contain.hand_over(Path(scratch), to_builder=True)

                def contained(cmd: list[str]) -> list[str]:
                    return contain.builder_command(cmd, app, tmp, venv, Path(scratch))

                await _run(contained([sys.executable, "-m", "venv", "--without-pip", str(venv)]),
                           app, progress, "creating the venv")
                progress(f"requirements {requirements.name}: pip install")
                pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                       "install", "--disable-pip-version-check", "--no-input",
                       "--progress-bar", "off", "-r", str(requirements.relative_to(app))]
                await _run(contained(pip), app, progress, f"installing {requirements.name}")
            contain.hand_over(tmp, to_builder=False)
            share_read_only(tmp)  # every function using it reads it; none writes it
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"requirements {requirements.name}: venv {key[:12]} ready")
        return key


async def _run(cmd: list[str], cwd: Path, progress: Progress, what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                lines.append(line)
                progress(f"  {line}")

    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), INSTALL_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeployError(f"{what} took longer than {INSTALL_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-5:]
        raise DeployError(f"{what} failed: " + " | ".join(errors))
