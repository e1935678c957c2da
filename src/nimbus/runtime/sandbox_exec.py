"""Run a command contained: ``python -m nimbus.runtime.sandbox_exec CONFIG -- CMD...``.

Used to install a function's requirements: pip runs as an unprivileged uid
in a filesystem view holding the OS, the Python runtime, the app's code
(read-only), the venv being built and a private /tmp — never the state
folder, the token or another app's code, so ``-r ../token`` or a build
backend in the app cannot read them. ``CONFIG`` (JSON): ``mountpoint``,
``exposed``, ``binds`` (``[host, path in view, read_only, mode]``), ``uid``,
``gid``, ``cwd``, ``env``. Must start as root; exits 126 if it cannot
contain the command (with the reason on stderr).
"""

from __future__ import annotations

import os
import sys

import orjson

from nimbus.runtime import sandbox


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.stderr.write("usage: python -m nimbus.runtime.sandbox_exec CONFIG -- CMD...\n")
        sys.exit(2)
    config = orjson.loads(sys.argv[1])
    cmd = sys.argv[3:]
    try:
        sandbox.die_with_parent(os.getppid())
        sandbox.enter_pid_namespace()  # whatever the command starts dies with it
        sandbox.build_view(config["mountpoint"], config["exposed"],
                           [tuple(b) for b in config["binds"]])
        sandbox.drop_privileges(config["uid"], config["gid"], 0)
        os.umask(0o022)
        os.chdir(config["cwd"])
    except OSError as exc:
        sys.stderr.write(f"could not contain {cmd[0]}: {exc}\n")
        sys.exit(126)
    os.execvpe(cmd[0], cmd, config["env"])


if __name__ == "__main__":
    main()
