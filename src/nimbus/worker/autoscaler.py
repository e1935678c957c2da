"""The autoscaler loop: sample every pool, decide, carry the decision out.

The decision itself is pure (:class:`nimbus.autoscale.decider.Decider`);
this loop only feeds it samples and applies what it says, once per tick.
Requests never wait for a tick: a request that finds no free instance
starts one itself (see :class:`nimbus.worker.pool.FunctionPool`), and the
autoscaler then keeps, grows or shrinks the pool from the observed demand.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nimbus.aio import cancel_and_wait
from nimbus.clock import Clock, SystemClock
from nimbus.worker.pool import FunctionPool

log = logging.getLogger("nimbus.autoscaler")


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    tick_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.tick_s <= 1.0:
            raise ValueError(f"tick_s must be in (0, 1], was: {self.tick_s}")


def tick(pools: list[FunctionPool], now: float) -> None:
    """One round: record each pool's demand, decide, scale. No awaits, so a
    round sees every pool in one consistent state."""
    for pool in pools:
        if pool.retired:
            continue
        pool.decider.record(now, pool.in_flight + pool.held, pool.take_arrivals())
        ready = len(pool.instances) + pool.starting
        decision = pool.decider.decide(now, ready)
        if pool.decision is None or decision.desired != pool.decision.desired:
            log.debug("%s v%d: %d -> %d (%s)", pool.target.function, pool.target.version,
                      ready, decision.desired, decision.reason)
        pool.decision = decision
        pool.scale_to(decision.desired)


class Autoscaler:
    def __init__(self, pools: dict[tuple[str, int], FunctionPool],
                 config: AutoscalerConfig | None = None, clock: Clock | None = None) -> None:
        self.pools = pools
        self.config = config or AutoscalerConfig()
        self.clock = clock or SystemClock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                tick(list(self.pools.values()), self.clock.monotonic())
            except Exception:  # noqa: BLE001 - one bad round must not stop scaling
                log.exception("autoscaler round failed")
            await asyncio.sleep(self.config.tick_s)

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
