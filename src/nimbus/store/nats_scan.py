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

The consumer runs on one server of the stream's group, and reads that
server's copy. A follower can be behind the leader (a write is acknowledged
once a majority stored it), so a scan placed there could miss the latest
writes. The stream's leader says which replicas are behind; a consumer that
lands on one of them is dropped and made again (a few times, briefly), so
a scan normally reads a copy that had every write acknowledged before it
began. This narrows staleness; it is not a linearizable read: callers that
must not miss a key (a redrive of every dead letter) list subjects from the
leader instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from nimbus.aio import wait_event

CONSUMER_IDLE_S = 30.0  # the server drops a consumer nobody listens to after this
PLACEMENT_TRIES = 5  # consumers made again when they land on a replica that is behind


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

    generation = [0]  # messages of a consumer made again are ignored

    def receiver(gen: int) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            if gen == generation[0]:
                take(msg)
        return on_msg

    def take(msg: Msg) -> None:
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
    sub = await nc.subscribe(inbox, cb=receiver(0))
    config = api.ConsumerConfig(
        deliver_subject=inbox, filter_subject=filter_subject,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=api.AckPolicy.NONE, max_deliver=1, mem_storage=True,
        num_replicas=1, headers_only=headers_only or None,
        inactive_threshold=CONSUMER_IDLE_S)
    try:
        for attempt in range(PLACEMENT_TRIES):
            behind = await _behind(js, stream)
            info = await js.add_consumer(stream, config)
            host = info.cluster.leader if info.cluster else None
            if host not in behind or attempt == PLACEMENT_TRIES - 1:
                break
            # on a replica that is behind: its messages (if any came) are
            # dropped with the subscription, and the scan starts over
            await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, info.name)
            generation[0] += 1
            got.clear()
            trouble.clear()
            done.clear()
            await asyncio.sleep(0.02 * (attempt + 1))
            inbox = nc.new_inbox()
            config.deliver_subject = inbox
            sub = await nc.subscribe(inbox, cb=receiver(generation[0]))
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


async def _behind(js: JetStreamContext, stream: str) -> set[str]:
    """The servers of the stream's group that the leader says are behind it."""
    info = await js.stream_info(stream)
    replicas = info.cluster.replicas if info.cluster and info.cluster.replicas else []
    return {r.name for r in replicas if r.name and (r.lag or not r.current or r.offline)}

