"""What an instance sees and who it is: the kernel calls behind containment.

Full containment (the platform runs as root) happens in three places:

1. the zygote, once (:func:`enter_pid_namespace`, :func:`build_view`): it
   becomes pid 1 of a PID namespace of its own, so when it dies the kernel
   kills every process its instances started, however they detached; and it
   chroots into a *view*: a tmpfs root holding read-only bind mounts of the
   OS (``/usr``, ``/etc``, ...), the Python runtime, nimbus's own code and
   the dependency venv, a fresh ``/proc`` for its namespace, a few device
   nodes, and two root-only folders: every app's code and every instance's
   temporary folder (``/var/nimbus/code``, ``/var/nimbus/tmp``). The state
   folder, the store, the token and the logs are simply not there.
2. each instance, still root, right after the fork (:func:`enter_instance`):
   a mount namespace of its own where its code folder is bound read-only at
   ``/var/task`` and its own temporary folder at ``/tmp``; it joins its
   cgroup (both done ahead by spare children, before they know their
   function);
3. and then drops to the function's uid and gid with no supplementary
   groups and ``no_new_privs`` (:func:`drop_privileges`).

Everything here runs in a forked child of a single-threaded process (or
before ``exec``), so it calls libc directly and raises ``OSError``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Iterable

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

CODE_ROOT = "/var/nimbus/code"  # in the view: every app's code folder, root only
TMP_ROOT = "/var/nimbus/tmp"  # in the view: every instance's /tmp, root only
TASK_ROOT = "/var/task"  # an instance's own code, read-only (Lambda's LAMBDA_TASK_ROOT)
VENV_ROOT = "/var/nimbus/venvs"  # requirements venvs, read-only, at the path they were built at
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def bind(source: str, target: str, *, read_only: bool, recursive: bool = False) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    mount(None, target, None, flags)


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL when the parent dies. Cleared by a change of credentials, so
    set again after :func:`drop_privileges`."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before prctl


def enter_pid_namespace() -> None:
    """Make the caller's next child pid 1 of a new PID namespace; the caller
    stays behind as that child's waiter and exits with it (never returns in
    the parent). In the child, returns."""
    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        die_with_parent(None)  # the waiter is outside the namespace: getppid() is 0
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _pid, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _mkdirs(root: str, path: str, mode: int = 0o755) -> str:
    target = root + path
    os.makedirs(target, mode=mode, exist_ok=True)
    return target


def build_view(mountpoint: str, exposed: Iterable[str],
               binds: Iterable[tuple[str, str, bool, int]]) -> None:
    """Build a view on ``mountpoint`` (an empty folder) and chroot into it.
    ``exposed`` are host paths bound read-only at the same path (folders, or
    symlinks recreated as symlinks); ``binds`` are ``(host folder, path in
    the view, read_only, mode of the mount point)``: for the zygote, every
    app's code and every instance's temporary folder, both root-only."""
    os.umask(0o022)  # the view's folders are for everyone to traverse (nimbus's is 077)
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
    mount("nimbus-view", mountpoint, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path in exposed:
        if os.path.islink(path):
            os.makedirs(os.path.dirname(mountpoint + path), exist_ok=True)
            os.symlink(os.readlink(path), mountpoint + path)
        elif os.path.isdir(path):
            bind(path, _mkdirs(mountpoint, path), read_only=True, recursive=True)
    _mkdirs(mountpoint, "/proc")
    # Each uid sees only its own processes (the zygote, root, sees all).
    mount("proc", mountpoint + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "hidepid=invisible")
    dev = _mkdirs(mountpoint, "/dev")
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()  # noqa: SIM115 - a mount point
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        os.symlink(f"/proc/self/fd/{fd}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", f"{dev}/fd")
    os.chmod(_mkdirs(mountpoint, "/tmp"), 0o1777)
    _mkdirs(mountpoint, TASK_ROOT)
    for source, target, read_only, mode in binds:
        bind(source, _mkdirs(mountpoint, target, mode), read_only=read_only)
    mount(None, mountpoint, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(mountpoint)
    os.chdir("/")


def zygote_binds(code_root: str, tmp_root: str) -> list[tuple[str, str, bool, int]]:
    return [(code_root, CODE_ROOT, True, 0o700), (tmp_root, TMP_ROOT, False, 0o700)]


def prepare_instance(tmp_name: str) -> None:
    """In a spare child (root, inside the view), before it knows its
    function: a mount namespace of its own, with its own folder at /tmp."""
    unshare(CLONE_NEWNS)
    tmp = f"{TMP_ROOT}/{tmp_name}"
    os.mkdir(tmp, 0o700)
    # A bind takes the flags of the mount it comes from (TMP_ROOT: nosuid,
    # nodev; CODE_ROOT: read-only too), so no remount is needed.
    mount(tmp, "/tmp", None, MS_BIND)


def enter_instance(tmp_name: str, digest: str, uid: int, gid: int) -> None:
    """Once the function is known: /tmp becomes the function's, its code is
    at /var/task (read-only). CODE_ROOT and TMP_ROOT stay mounted
    (unmounting waits for an RCU grace period: milliseconds on the
    cold-start path); both are root-only 0700, which the instance no longer
    is in a moment."""
    os.chown(f"{TMP_ROOT}/{tmp_name}", uid, gid)
    mount(f"{CODE_ROOT}/{digest}", TASK_ROOT, None, MS_BIND)


MAX_OPEN_FILES = 1024  # as Lambda; the platform raised its own limit for its ports


def limit_files(ephemeral_storage_mb: int) -> None:
    """No file larger than the function's ephemeral storage, no core dumps,
    Lambda's 1024 open files."""
    size = ephemeral_storage_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))


def limit_tasks(n: int) -> None:
    """At most ``n`` processes and threads for the real uid we are about to
    become (all of a function's instances share it): the fallback for a
    host without a usable pids cgroup."""
    resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def drop_privileges(uid: int, gid: int, parent: int) -> None:
    """Become ``uid``/``gid`` for good, with no supplementary groups and no
    way to gain privileges again (setuid binaries included)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    die_with_parent(parent)
