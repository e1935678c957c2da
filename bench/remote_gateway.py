"""A gateway process whose routes call worker processes over frames.

    python bench/remote_gateway.py --app DIR --worker ID=HOST:PORT [--worker ...]
        --token-file F [--port P]

The app folder gives the routes and the functions' settings (as a deploy
would); every function runs on the given workers (``python -m
nimbus.worker.frameserver`` serving the same folder). Prints
``{"url": ...}`` once a worker reports a ready instance of every function.
For the benchmarks, until the ``nimbus gateway`` command wires the same
parts to the cluster registry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nimbus.control.server import _bind  # noqa: E402
from nimbus.gateway.app import Gateway, Invoker  # noqa: E402
from nimbus.gateway.connections import (  # noqa: E402
    ConnectionGuard,
    ConnectionLimits,
    guarded_protocol,
)
from nimbus.gateway.remote import RemoteInvoker, WorkerDirectory  # noqa: E402
from nimbus.gateway.router import Router  # noqa: E402
from nimbus.manifest.loader import load_app  # noqa: E402
from nimbus.manifest.model import AppSpec  # noqa: E402
from nimbus.worker.target import Target  # noqa: E402


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # ours, below
        yield


async def serve(args: argparse.Namespace, app: AppSpec, token: str) -> None:
    directory = WorkerDirectory(token)
    for spec in args.worker:
        worker_id, _, address = spec.partition("=")
        directory.update(worker_id, address, {})
    invokers = {name: RemoteInvoker(Target(app.name, 1, fn, "app", None), directory)
                for name, fn in app.functions.items()}
    routes: list[tuple[str, str, Invoker]] = [
        (r.method, r.path, invokers[name])
        for name, fn in app.functions.items() for r in fn.routes]
    gateway = Gateway()
    gateway.set_router(Router(routes))
    async with asyncio.timeout(60):
        while any(not directory.ready(inv.key) for inv in invokers.values()):
            await asyncio.sleep(0.01)
    sock = _bind("127.0.0.1", args.port)
    guard = ConnectionGuard("gateway", ConnectionLimits())
    server = _Server(uvicorn.Config(
        gateway, http=guarded_protocol(guard), lifespan="off", access_log=False,
        log_level="warning", loop="none", server_header=False, date_header=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    print(orjson.dumps({"url": f"http://127.0.0.1:{sock.getsockname()[1]}"}).decode(),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await directory.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--app", required=True)
    ap.add_argument("--worker", action="append", required=True, help="ID=HOST:PORT")
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    import uvloop
    uvloop.run(serve(args, load_app(args.app), Path(args.token_file).read_text().strip()))


if __name__ == "__main__":
    main()
