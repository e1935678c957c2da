"""Code bundles: an app folder as a deterministic zip, and back.

The same folder always gives the same bytes (sorted entries, fixed
timestamps and modes), so the bundle's sha256 is the code digest and an
unchanged redeploy makes no new version.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from nimbus.errors import DeployError

MAX_BUNDLE_BYTES = 250 * 1024 * 1024  # Lambda's unzipped limit
SKIP_DIRS = {".nimbus", ".git", "__pycache__", ".venv", "venv", "node_modules",
             ".pytest_cache", ".mypy_cache", ".ruff_cache", ".aws-sam"}
SKIP_SUFFIXES = (".pyc", ".pyo")
_EPOCH = (1980, 1, 1, 0, 0, 0)
# Written into every state folder, so a --state-dir inside an app folder is
# never bundled, whatever its name.
STATE_MARKER = ".nimbus-state"


def make_bundle(app_dir: Path) -> bytes:
    app_dir = app_dir.resolve()
    files: list[Path] = []
    for root, dirs, names in os.walk(app_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS
                         and not (Path(root) / d / STATE_MARKER).exists())
        for name in sorted(names):
            if not name.endswith(SKIP_SUFFIXES):
                files.append(Path(root) / name)
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(files):
            rel = path.relative_to(app_dir).as_posix()
            data = path.read_bytes()
            total += len(data)
            if total > MAX_BUNDLE_BYTES:
                raise DeployError(f"{app_dir}: the app is larger than {MAX_BUNDLE_BYTES} bytes")
            info = zipfile.ZipInfo(rel, _EPOCH)
            mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def extract_bundle(data: bytes, dest: Path) -> None:
    """Unpack into ``dest`` atomically (a temp folder renamed into place);
    a no-op if ``dest`` exists. Rejects entries that escape the folder."""
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = 0
            for info in zf.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts:
                    raise DeployError(f"bundle entry {info.filename!r} escapes the app folder")
                total += info.file_size
                if total > MAX_BUNDLE_BYTES:
                    raise DeployError(f"bundle unpacks to more than {MAX_BUNDLE_BYTES} bytes")
                target = tmp.joinpath(*name.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(info))
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployError("the uploaded bundle is not a zip file") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another deploy won the race
        if not dest.exists():
            raise
