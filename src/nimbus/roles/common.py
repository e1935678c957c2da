"""What every region process (controller, worker, gateway) shares: its
configuration, the region token, the node file, and a foreground run loop
that stops on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from nimbus.control import statedir
from nimbus.errors import NimbusError, UserInputError
from nimbus.ids import new_id
from nimbus.region import set_region
from nimbus.store.private import write_private

log = logging.getLogger("nimbus")

NODE_FILE = "node.json"
MIN_TOKEN_CHARS = 32
_REGION = re.compile(r"[a-z][a-z0-9-]{0,30}")


@dataclass(frozen=True, slots=True)
class RoleConfig:
    role: str
    store_url: str
    region: str
    token: str
    state_dir: Path
    node_id: str


def check_region(name: str) -> str:
    if not _REGION.fullmatch(name):
        raise UserInputError(f"--region {name!r}: a region name is 1-31 lowercase letters, "
                             "digits and '-', starting with a letter")
    return name


def check_auth(auth: str, host: str, where: str) -> None:
    """``--metrics-auth``: ``open`` only on a loopback ``host`` (UserInputError)."""
    from nimbus.observe.metrics import check_metrics_auth

    try:
        check_metrics_auth(auth, host, where)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def read_token(path: Path) -> str:
    """The region token from ``path``: printable ASCII, at least 32 characters."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise UserInputError(f"--token-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise UserInputError(f"--token-file {path}: cannot read it: {why}") from None
    if len(token) < MIN_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise UserInputError(f"--token-file {path}: the region token must be at least "
                             f"{MIN_TOKEN_CHARS} printable characters without spaces")
    return token


def role_config(role: str, store_url: str, region: str, token_file: Path | None,
                state_dir: Path) -> RoleConfig:
    os.umask(0o077)
    if not store_url.startswith(("nats://", "sqlite://")):
        raise UserInputError(f"--store {store_url!r}: expected nats://HOST:PORT[,HOST:PORT...] "
                             "or sqlite:///PATH")
    statedir.prepare(state_dir)
    token_path = token_file or Path(os.environ.get("NIMBUS_TOKEN_FILE", state_dir / "token"))
    set_region(check_region(region))
    return RoleConfig(role, store_url, region, read_token(token_path),
                      state_dir.resolve(), f"{role[0]}{new_id()[:11].replace('-', '')}")


def write_node_file(config: RoleConfig, info: dict[str, Any]) -> None:
    """``node.json`` in the process's state folder: how ``nimbus cluster up``
    and the CLI learn that it serves, and where."""
    data = {"role": config.role, "id": config.node_id, "pid": os.getpid(),
            "region": config.region, "started_at": time.time(), **info}
    write_private(config.state_dir / NODE_FILE, orjson.dumps(data))


def remove_node_file(config: RoleConfig) -> None:
    try:
        (config.state_dir / NODE_FILE).unlink()
    except FileNotFoundError:
        pass


def run_role(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` on uvloop until it returns; SIGINT/SIGTERM set ``stop``."""
    logging.basicConfig(level=logging.WARNING, format="nimbus: %(levelname)s %(message)s")

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await main(stop)
        except NimbusError as exc:
            log.error("%s", exc)
            return 1
        return 0

    try:
        import uvloop

        return uvloop.run(runner())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(runner())
