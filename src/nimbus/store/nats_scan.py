"""Read the last message of every subject under a filter, once.

The NATS store's ``list`` and the NATS queue's key listings both need "the
current value of every key under this prefix". A consumer delivering the
last message per subject gives that; the question is when it is done.

nats-py's KV watcher answers that from a consumer info asked *after*
delivery began: if every message was already sent (nothing pending) but
none had reached this client yet, it says "done" with nothing listed. Here
the consumer's create answer says how many it has delivered and how many are
pending at that moment; the scan is done when this client has received that
many, however the answer and the messages race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from nimbus.aio import wait_event

CONSUMER_IDLE_S = 30.0  # the server drops a consumer nobody listens to after this


class ScanError(Exception):
    """The scan did not complete: the consumer stopped delivering, or a
    message went missing. The caller maps it to its own error."""


@dataclass(frozen=True, slots=True)
class Last:
    subject: str
    headers: dict[str, str] | None
    data: bytes
    seq: int


async def last_per_subject(nc: NATS, js: JetStreamContext, stream: str, filter_subject: str,
                           *, timeout_s: float, headers_only: bool = False,
                           forget: Callable[[str], None] | None = None) -> list[Last]:
    """The last message of each subject of ``stream`` matching
    ``filter_subject``, in stream order (deletes included: the caller
    decides what a delete marker means). ``ScanError`` if the consumer does
    not deliver them all within ``timeout_s``.

    The consumer is deleted before this returns, or handed to ``forget``
    (the caller deletes it without waiting)."""
    got: list[Last] = []
    done = asyncio.Event()
    trouble: list[str] = []
    total: int | None = None  # known once the consumer's create answer is in

    def check_done() -> None:
        if total is not None and len(got) >= total:
            done.set()

    async def on_msg(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status"):
            return  # no heartbeats or flow control asked for
        md = msg.metadata
        if md.sequence.consumer != len(got) + 1:
            trouble.append(f"consumer sequence {md.sequence.consumer}, expected {len(got) + 1}")
            done.set()
            return
        got.append(Last(msg.subject, msg.headers, msg.data or b"", int(md.sequence.stream)))
        check_done()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        info = await js.add_consumer(stream, api.ConsumerConfig(
            deliver_subject=inbox, filter_subject=filter_subject,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE, max_deliver=1, mem_storage=True,
            num_replicas=1, headers_only=headers_only or None,
            inactive_threshold=CONSUMER_IDLE_S))
        delivered = info.delivered.consumer_seq if info.delivered else 0
        total = int(delivered or 0) + int(info.num_pending or 0)
        check_done()
        if not await wait_event(done, timeout_s):
            raise ScanError(f"the consumer delivered {len(got)} of {total} messages "
                            f"within {timeout_s:g}s")
        if trouble:
            raise ScanError(f"messages were lost ({trouble[0]})")
        if forget is not None:
            forget(info.name)
        else:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, info.name)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return got[:total]

