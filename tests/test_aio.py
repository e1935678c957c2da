"""The asyncio helpers the long-running loops share: a loop that waits on
an event between rounds stops when it is cancelled, whenever the
cancellation arrives (the reason a region process once ignored SIGTERM)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from nimbus.aio import cancel_and_wait, wait_event


async def _cancel_just_after_set(spins: int) -> str:
    """A loop waiting on an event is cancelled ``spins`` loop iterations
    after the event is set: what became of it."""
    wake = asyncio.Event()
    cancelled = False

    async def rounds() -> None:
        while True:
            await wait_event(wake, 5.0)
            wake.clear()
            if cancelled:
                raise AssertionError("went round again after being cancelled")
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(rounds())
    await asyncio.sleep(0)
    wake.set()
    for _ in range(spins):
        await asyncio.sleep(0)
    cancelled = True
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    return "cancelled" if task.cancelled() else repr(task.exception())


@pytest.mark.parametrize("spins", [0, 1, 2, 3])
def test_a_loop_cancelled_just_after_its_event_is_set_stops(spins: int) -> None:
    assert uvloop.run(_cancel_just_after_set(spins)) == "cancelled"
    assert asyncio.run(_cancel_just_after_set(spins)) == "cancelled"


async def _outcomes() -> tuple[bool, bool, bool, float]:
    ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    timed_out = await wait_event(ev, 0.05)
    waited = loop.time() - t0
    loop.call_later(0.01, ev.set)
    woken = await wait_event(ev, 5.0)
    already = await wait_event(ev, 0.0)
    return timed_out, woken, already, waited


def test_wait_event_says_whether_the_event_was_set() -> None:
    timed_out, woken, already, waited = uvloop.run(_outcomes())
    assert (timed_out, woken, already) == (False, True, True)
    assert waited >= 0.04
