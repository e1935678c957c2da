"""A region's buckets are made even while its NATS meta leader does not yet
know every server: creating a three-replica bucket then answers "no suitable
peers for placement, peer offline" (JetStream error 10005), which happened
to a region started right after its NATS servers. Opening the store or the
blobs tries again within its deadline; a cluster counts as started only once
its meta leader knows every peer as current."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

import nimbus.store.nats_blobs as nb
import nimbus.store.nats_store as ns
from nimbus.errors import UnavailableError
from nimbus.natsd import NatsCluster

NO_PEERS = nats.js.errors.BadRequestError(
    code=400, err_code=10005, description="no suitable peers for placement, peer offline")
NOT_FOUND = nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found")


class FakeConn:
    is_closed = False

    def jetstream(self, timeout: float = 5.0) -> Any:
        return None


class RefusingJetStream:
    """Answers stream info with "not found" and refuses ``refusals`` creations
    for want of peers before it creates the bucket."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.creates = 0

    async def stream_info(self, name: str) -> Any:
        raise NOT_FOUND

    async def object_store(self, bucket: str) -> Any:
        raise nats.js.errors.BucketNotFoundError()

    async def _create(self) -> str:
        self.creates += 1
        if self.creates <= self.refusals:
            raise NO_PEERS
        return "created"

    async def add_stream(self, config: Any) -> Any:
        return await self._create()

    async def create_object_store(self, bucket: str, config: Any) -> Any:
        return await self._create()


def _store(js: RefusingJetStream) -> ns.NatsStore:
    store = ns.NatsStore(FakeConn(), "placed")  # type: ignore[arg-type]
    store._js = js  # type: ignore[assignment]
    return store


def _blobs(js: RefusingJetStream) -> nb.NatsBlobs:
    blobs = nb.NatsBlobs(FakeConn(), "placed")  # type: ignore[arg-type]
    blobs._js = js  # type: ignore[assignment]
    return blobs


def test_the_store_bucket_is_created_after_placement_refusals() -> None:
    js = RefusingJetStream(refusals=3)
    asyncio.run(_store(js)._ensure_bucket(3))
    assert js.creates == 4


def test_the_blob_bucket_is_created_after_placement_refusals() -> None:
    js = RefusingJetStream(refusals=3)
    blobs = _blobs(js)
    asyncio.run(blobs._ensure_bucket(3))
    assert js.creates == 4 and blobs._obs == "created"


def test_refusals_past_the_deadline_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ns, "BUCKET_READY_S", 0.5)
    monkeypatch.setattr(nb, "BUCKET_READY_S", 0.5)
    js = RefusingJetStream(refusals=10**6)
    with pytest.raises(UnavailableError, match="nimbus-placed-store.*no suitable peers"):
        asyncio.run(_store(js)._ensure_bucket(3))
    assert 2 <= js.creates < 10, "tried a few times, 0.2 s apart, then gave up"
    js = RefusingJetStream(refusals=10**6)
    with pytest.raises(UnavailableError, match="nimbus-placed-blobs.*no suitable peers"):
        asyncio.run(_blobs(js)._ensure_bucket(3))


def test_other_refusals_are_not_tried_again() -> None:
    class Forbidden(RefusingJetStream):
        async def add_stream(self, config: Any) -> Any:
            self.creates += 1
            raise nats.js.errors.BadRequestError(code=400, err_code=10052,
                                                 description="replicas > 1 not supported")
    js = Forbidden(refusals=0)
    with pytest.raises(UnavailableError, match="replicas > 1"):
        asyncio.run(_store(js)._ensure_bucket(3))
    assert js.creates == 1


def test_a_started_cluster_s_leader_knows_every_peer_as_current(tmp_path: Path) -> None:
    with NatsCluster(tmp_path / "nats", secrets.token_urlsafe(16), size=3) as c:
        metas = []
        for s in c.servers:
            with urllib.request.urlopen(f"http://{s.host}:{s.http_port}/jsz", timeout=5) as r:
                metas.append((s.name, json.loads(r.read())["meta_cluster"]))
        leaders = [m for name, m in metas if m.get("leader") == name]
        assert len(leaders) == 1, metas
        peers = leaders[0]["replicas"]
        assert len(peers) == 2 and all(p["current"] and not p.get("offline") for p in peers), \
            peers
