"""``nimbus worker``: zygotes and instances on this machine, serving
invocation frames over TCP to the region's gateways.

It registers itself under ``nodes/worker/<id>`` (a campaign key renewed every
second: when the process or its machine dies, the key expires and gateways
stop routing to it), follows ``placement/<id>`` written by the controller
leader (the reconciler prepares code and scales pools), and ships its
instances' log lines to the region's log stream.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nimbus.errors import UserInputError
from nimbus.roles.common import RoleConfig, check_auth, remove_node_file, write_node_file
from nimbus.worker.budget import NodeBudget

log = logging.getLogger("nimbus.worker")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None  # the address gateways dial, when not ``host``
    budget: NodeBudget = NodeBudget()
    containment: str = "auto"
    uid_range: tuple[int, int] = (200_000, 265_535)
    grace_s: float = 10.0
    metrics_host: str | None = None  # default: host
    metrics_port: int = 0
    metrics_auth: str = "token"

    def __post_init__(self) -> None:
        check_auth(self.metrics_auth, self.metrics_host or self.host, "--metrics-host")


async def serve_worker(config: RoleConfig, options: WorkerOptions, stop: asyncio.Event) -> None:
    from nimbus.cluster.roles import WorkerAgent
    from nimbus.observe import metrics, natstraces
    from nimbus.observe.natslogs import open_region_logs
    from nimbus.roles.http import HttpServer
    from nimbus.store.registry import open_backend
    from nimbus.worker.containment import Containment
    from nimbus.worker.frameserver import FrameServer
    from nimbus.worker.worker import Worker

    backend = await open_backend(config.store_url, region=config.region, token=config.token,
                                 state_dir=config.state_dir)
    worker: Worker | None = None
    server: FrameServer | None = None
    agent: WorkerAgent | None = None
    metrics_http: HttpServer | None = None
    logs = None
    traces = None
    try:
        containment = await asyncio.to_thread(
            Containment.create, config.state_dir, options.containment, options.uid_range)
        if backend.nc is None:
            raise UserInputError("a worker needs a region on NATS: --store nats://...")
        logs, _source = await open_region_logs(backend.nc, region=config.region,
                                               worker=config.node_id)
        assert logs is not None
        traces = await natstraces.attach(backend.nc, region=config.region,
                                         node=config.node_id)
        worker = Worker(config.state_dir, logs, options.budget, containment=containment,
                        node_id=config.node_id, autoscale=False)
        await worker.start()
        metrics.set_role("worker")
        metrics.watch_worker(worker)
        metrics_http = HttpServer.for_metrics(
            options.metrics_host or options.host, options.metrics_port,
            None if options.metrics_auth == "open" else config.token)
        await metrics_http.start()
        metrics_url = metrics_http.url
        if options.advertise and not options.metrics_host:
            # the metrics port listens where the frames do: advertise it as they are
            metrics_url = f"http://{options.advertise}:{metrics_url.rsplit(':', 1)[1]}"
        server = FrameServer(worker, options.host, options.port, config.token)
        await server.start()
        port = server.address[1]
        address = f"{options.advertise or options.host}:{port}"
        agent = WorkerAgent(backend.store, backend.blobs, worker, config.node_id,
                            config.state_dir,
                            info=lambda: {"frames": address, "url": f"tcp://{address}",
                                          "metrics": metrics_url})
        await agent.start()
        write_node_file(config, {"url": f"tcp://{address}", "frames": address,
                                 "metrics": metrics_url,
                                 "containment": containment.summary()})
        log.info("worker %s serving frames on %s (%s)", config.node_id, address,
                 containment.summary())
        await stop.wait()
    finally:
        remove_node_file(config)
        if agent is not None:
            await agent.aclose()  # the region forgets it: gateways send nothing new
        if server is not None:
            await server.aclose(grace_s=min(options.grace_s, 5.0))
        if worker is not None:
            await worker.aclose(grace_s=min(options.grace_s, 5.0))
        if metrics_http is not None:
            await metrics_http.aclose()
        if logs is not None:
            await logs.aclose()
        await natstraces.detach(traces)
        await backend.aclose()
