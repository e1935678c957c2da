"""The last-per-subject scan behind the NATS store's ``list``, and the NATS
queue's dead-letter listing, on a real 3-server cluster.

The scan must end exactly when its consumer has delivered what it had,
however the consumer's messages and its create answer race (a one-replica
bucket, so the only copy is the leader's). The queue lists dead letters from
the leader: a redrive of the queue right after dead-lettering moves every one."""

from __future__ import annotations

import asyncio
import uuid

import nats
from nats.js.api import KeyValueConfig

from nimbus.natsd import NATS_USER, NatsCluster
from nimbus.store.nats_queue import open_nats_queue
from nimbus.store.nats_scan import last_per_subject
from nimbus.store.queue import Outgoing

ROUNDS = 60


def _is_delete(headers: dict[str, str] | None) -> bool:
    return bool(headers and headers.get("KV-Operation") in ("DEL", "PURGE"))


def test_every_scan_sees_every_key_written_before_it(cluster: NatsCluster) -> None:
    async def main() -> None:
        nc = await nats.connect(servers=cluster.urls.split(","), user=NATS_USER,
                                password=cluster.password, connect_timeout=5)
        try:
            js = nc.jetstream()
            bucket = f"scan{uuid.uuid4().hex[:8]}"
            kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=1))
            stream, pre = f"KV_{bucket}", f"$KV.{bucket}."
            assert await last_per_subject(nc, js, stream, pre + "x.>", timeout_s=10) == [], \
                "a filter with no subjects is an empty scan, at once"
            await kv.put("other.k", b"not under the filter")
            live: set[str] = set()
            for i in range(ROUNDS):
                await kv.put(f"x.q.k{i}", str(i).encode())
                live.add(f"x.q.k{i}")
                if i % 3 == 0:
                    await kv.delete(f"x.q.k{i}")
                    live.discard(f"x.q.k{i}")
                got = await last_per_subject(nc, js, stream, pre + "x.q.>", timeout_s=10,
                                             headers_only=bool(i % 2))
                seen = {m.subject[len(pre):] for m in got if not _is_delete(m.headers)}
                assert seen == live, f"round {i}: scanned {sorted(seen)}, live {sorted(live)}"
                if not i % 2:
                    values = {m.subject[len(pre):]: m.data for m in got
                              if not _is_delete(m.headers)}
                    assert all(values[k] == k.rsplit("k", 1)[1].encode() for k in live)
            # a consumer per scan is cleaned up (no consumers pile up)
            await asyncio.sleep(0.5)
            info = await js.stream_info(stream)
            assert info.state.consumer_count <= 1, info.state
        finally:
            await nc.close()
    asyncio.run(main())


def test_every_dead_letter_is_listed_and_redriven_at_once(cluster: NatsCluster) -> None:
    async def main() -> None:
        nc = await nats.connect(servers=cluster.urls.split(","), user=NATS_USER,
                                password=cluster.password, connect_timeout=5)
        try:
            q = await open_nats_queue(nc, region=f"t{uuid.uuid4().hex[:8]}")
            name = "dl"
            for rnd in range(1, 6):
                sent = await q.send(name, [Outgoing(b"x") for _ in range(rnd)])
                got: list = []
                for _ in range(50):
                    got += await q.receive(name, max_messages=10, visibility_s=30, wait_s=0.2)
                    if len(got) == rnd:
                        break
                assert {m.id for m in got} == {m.id for m in sent}, f"round {rnd}: {got}"
                for m in got:
                    await q.begin([m])
                    await q.dead_letter(m, error={"errorType": "E", "errorMessage": "x"})
                dead = await q.records(name, status="dead")
                assert {r.id for r in dead} == {m.id for m in sent}, f"round {rnd}: {dead}"
                moved = await q.redrive(name)
                assert moved == rnd, f"round {rnd}: redrive moved {moved} of {rnd}"
                again: list = []
                for _ in range(50):
                    again += await q.receive(name, max_messages=10, visibility_s=30, wait_s=0.2)
                    if len(again) == rnd:
                        break
                assert {m.id for m in again} == {m.id for m in sent}
                for m in again:
                    await q.ack(m)
                assert await q.redrive(name) == 0, f"round {rnd}: nothing dead is left"
            await q.aclose()
        finally:
            await nc.close()
    asyncio.run(main())
