"""Code bundles: an app folder as a deterministic zip, and back.

The same folder always gives the same bytes (sorted entries, fixed
timestamps and modes), so the bundle's sha256 is the code digest and an
unchanged redeploy makes no new version.

Making a bundle (the CLI) refuses what would not travel: a symbolic link
that leaves the app folder (its target would be silently copied from
elsewhere), a dangling one, and file names that are not UTF-8 (a zip names
its entries in UTF-8). Unpacking one (the control plane, from any client)
refuses more entries than :class:`BundleLimits` allows, more unpacked bytes
(counted as written, not as declared), names that are absolute or climb
out with ``..``, and entries that are links, devices or pipes. Both run
off the event loop: their callers use a thread.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nimbus.errors import DeployError, ManifestError

MAX_BUNDLE_BYTES = 250 * 1024 * 1024  # Lambda's unzipped limit
MAX_BUNDLE_ENTRIES = 10_000
SKIP_DIRS = {".nimbus", ".git", "__pycache__", ".venv", "venv", "node_modules",
             ".pytest_cache", ".mypy_cache", ".ruff_cache", ".aws-sam"}
SKIP_SUFFIXES = (".pyc", ".pyo")
_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1024 * 1024
# Written into every state folder, so a --state-dir inside an app folder is
# never bundled, whatever its name. Folders named ``.nimbus-*`` (a demo's or
# a cluster's state: tokens, cluster files) are never bundled either.
STATE_MARKER = ".nimbus-state"


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """What an uploaded bundle may unpack to."""

    max_entries: int = MAX_BUNDLE_ENTRIES  # files and folders
    max_unpacked_bytes: int = MAX_BUNDLE_BYTES

    def __post_init__(self) -> None:
        for key in ("max_entries", "max_unpacked_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"bundle limit {key} must be a positive integer, "
                                 f"was: {value!r}")


def _shown(path: Path) -> str:
    """A path as text, undecodable bytes shown as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def make_bundle(app_dir: Path) -> bytes:
    """The app folder as a zip. Raises ManifestError (the CLI's exit 2) naming the
    file for a link that leaves the folder, a dangling link, an unreadable file
    or a name that is not UTF-8."""
    app_dir = app_dir.resolve()
    files: list[Path] = []
    for root, dirs, names in os.walk(app_dir):
        here = Path(root)
        kept = []
        for d in sorted(dirs):
            if d in SKIP_DIRS or d.startswith(".nimbus-") or (here / d / STATE_MARKER).exists():
                continue
            if (here / d).is_symlink():
                _check_link(here / d, app_dir)  # inside: left out (os.walk does not follow)
                continue
            kept.append(d)
        dirs[:] = kept
        for name in sorted(names):
            if not name.endswith(SKIP_SUFFIXES):
                files.append(here / name)
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(files):
            rel = path.relative_to(app_dir).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise ManifestError("the file name is not valid UTF-8, which a bundle "
                                    "cannot carry; rename it", file=_shown(path)) from None
            if path.is_symlink():
                _check_link(path, app_dir)
            try:
                data = path.read_bytes()
                mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            except OSError as exc:
                raise ManifestError(f"cannot read this file for the bundle: "
                                    f"{exc.strerror or exc}", file=_shown(path)) from None
            total += len(data)
            if total > MAX_BUNDLE_BYTES:
                raise DeployError(f"{app_dir}: the app is larger than {MAX_BUNDLE_BYTES} bytes")
            info = zipfile.ZipInfo(rel, _EPOCH)
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def _check_link(link: Path, app_dir: Path) -> None:
    target = os.readlink(link)
    try:
        resolved = link.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ManifestError(f"symbolic link to {target!r} points to nothing; remove it or "
                            "fix its target", file=_shown(link)) from None
    if not resolved.is_relative_to(app_dir):
        raise ManifestError(f"symbolic link to {target!r} leaves the app folder ({resolved}); "
                            "copy what it points to into the app folder, or remove the link",
                            file=_shown(link))


def count_entries(data: bytes, limit: int) -> int:
    """How many entries the zip's central directory holds, counting no further
    than ``limit + 1`` (so a bundle of millions of entries costs no more than
    one at the limit). 0 when ``data`` has no readable central directory;
    :class:`zipfile.ZipFile` then reports what is wrong."""
    eocd = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if eocd < 0 or eocd + 22 > len(data):
        return 0
    size_cd, = struct.unpack_from("<I", data, eocd + 12)
    end = eocd
    locator = eocd - 20
    if locator >= 0 and data[locator:locator + 4] == b"PK\x06\x07":
        # zip64 (over 65,535 entries, or large): its own end record comes first
        end = locator - 56  # where Python and most tools put it
        if end < 0 or data[end:end + 4] != b"PK\x06\x06":
            end, = struct.unpack_from("<Q", data, locator + 8)
            if end + 56 > len(data) or data[end:end + 4] != b"PK\x06\x06":
                return 0
        size_cd, = struct.unpack_from("<Q", data, end + 40)
    pos = end - size_cd
    count = 0
    while pos >= 0 and pos + 46 <= end and data[pos:pos + 4] == b"PK\x01\x02":
        count += 1
        if count > limit:
            break
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + name_len + extra_len + comment_len
    return count


def extract_bundle(data: bytes, dest: Path, limits: BundleLimits | None = None) -> None:
    """Unpack into ``dest`` atomically (a temp folder renamed into place);
    a no-op if ``dest`` exists. Raises DeployError for anything the module
    docstring lists as refused; nothing is left behind then."""
    limits = limits or BundleLimits()
    if dest.exists():
        return
    count = count_entries(data, limits.max_entries)
    if count > limits.max_entries:
        raise DeployError(f"the bundle has more than {limits.max_entries} entries (files and "
                          "folders), the most a deploy unpacks; leave out what the functions "
                          "do not need")
    # A name of its own per call: two unpackings of one bundle may run at
    # once (threads of one process, or processes) and must not share it.
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            _unpack(zf, tmp, limits)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployError(f"the uploaded bundle is not a valid zip file: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another deploy won the race
        if not dest.exists():
            raise


def _unpack(zf: zipfile.ZipFile, tmp: Path, limits: BundleLimits) -> None:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise DeployError(f"the bundle has {len(infos)} entries (files and folders), more "
                          f"than the {limits.max_entries} a deploy unpacks")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_unpacked_bytes:
        raise DeployError(f"the bundle unpacks to {declared} bytes, more than the "
                          f"{limits.max_unpacked_bytes} a deploy allows")
    written = 0
    for info in infos:
        parts = _entry_parts(info)
        target = tmp.joinpath(*parts) if parts else tmp
        try:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > limits.max_unpacked_bytes:
                        raise DeployError(f"the bundle unpacks to more than "
                                          f"{limits.max_unpacked_bytes} bytes (entry "
                                          f"{info.filename!r} holds more than it declares)")
                    out.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode & 0o755)
        except OSError as exc:
            raise DeployError(f"cannot unpack bundle entry {info.filename!r}: "
                              f"{exc.strerror or exc}") from None
        except (RuntimeError, NotImplementedError, zlib.error, EOFError) as exc:
            # encrypted, an unknown compression method, corrupt data
            raise DeployError(f"cannot unpack bundle entry {info.filename!r}: {exc}") from None


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = info.filename
    if "\x00" in name:
        raise DeployError(f"bundle entry {name!r} has a NUL character in its name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DeployError(f"bundle entry {name!r} escapes the app folder")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise DeployError(f"bundle entry {name!r} is a symbolic link; a bundle holds "
                          "regular files and folders only")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DeployError(f"bundle entry {name!r} is not a regular file or folder")
    return tuple(p for p in path.parts if p not in ("", "."))
