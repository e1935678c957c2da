"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a background loop and wait until it has really stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes; whether it is set.

    Loops that stop by being cancelled must wait this way, not with
    ``asyncio.wait_for(event.wait(), timeout_s)``: on Python 3.11 that
    returns normally when the cancellation arrives just after the event
    was set, so the loop goes round again and its ``cancel_and_wait`` never
    returns (a process that ignores SIGTERM until it is killed).
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
