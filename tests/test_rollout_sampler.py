"""Per-version counters for rollouts: read in-process (``nimbus up``) and
scraped from processes' ``/metrics`` (a region). The scrape reads a real
``nimbus up``'s control port after real invocations of two versions: the
counts equal the invocations made, version by version."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nimbus.cluster.nodes import Registration
from nimbus.observe import metrics
from nimbus.rollout.sampler import (
    LocalSampler,
    ScrapeSampler,
    region_targets,
    windows_from_text,
)
from nimbus.rollout.window import Window
from nimbus.store.sqlite import open_sqlite_store
from tests.conftest import Nimbus

MANIFEST = """\
name: sampled
functions:
  pick:
    handler: h.pick
    http: [{method: GET, path: /pick}]
  other:
    handler: h.pick
    http: [{method: GET, path: /other}]
"""

HANDLER = """\
BODY = {body!r}

def pick(event, context):
    if (event.get("queryStringParameters") or {{}}).get("fail"):
        raise ValueError("asked to fail")
    return BODY
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("sampler")
    app = root / "sampled"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    (app / "h.py").write_text(HANDLER.format(body="one"))
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits")
    yield n
    n.stop()


def invoke(up: Nimbus, n_ok: int, n_fail: int, body: str) -> None:
    assert up.http is not None
    for _ in range(n_ok):
        r = up.http.get("/pick")
        assert (r.status_code, r.json()) == (200, body)
    for _ in range(n_fail):
        assert up.http.get("/pick", params={"fail": "1"}).status_code == 500


def redeploy(up: Nimbus, app: Path, body: str) -> None:
    (app / "h.py").write_text(HANDLER.format(body=body))
    out = up.cli("deploy", str(app))
    assert out.returncode == 0, out.stderr


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_scraped_counts_equal_the_invocations_of_each_version(up: Nimbus) -> None:
    app = up.state.parent / "sampled"
    invoke(up, 5, 2, "one")
    redeploy(up, app, "two")
    invoke(up, 3, 1, "two")
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    targets = {
        "up": up.control_url,
        "gone": f"http://127.0.0.1:{closed_port()}",
        "silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
    }

    async def found() -> dict[str, str]:
        return targets

    async def sample(token: str) -> tuple[ScrapeSampler, dict]:
        s = ScrapeSampler(None, token, targets=found, timeout_s=0.3)
        try:
            return s, await s.sample({"pick"})
        finally:
            await s.aclose()

    try:
        sampler, counters = asyncio.run(sample(up.token))
        refused, nothing = asyncio.run(sample("not-the-token"))
    finally:
        silent.close()
    assert sorted(counters) == [("pick", 1), ("pick", 2)]  # "other" was not asked for
    v1, v2 = counters[("pick", 1)], counters[("pick", 2)]
    assert list(v1) == ["up"] and list(v2) == ["up"]
    assert (v1["up"].success, v1["up"].error, v1["up"].requests) == (5, 2, 7)
    assert (v2["up"].success, v2["up"].error, v2["up"].requests) == (3, 1, 4)
    # every answered invocation has a duration
    assert (v1["up"].observed, v2["up"].observed) == (7, 4)
    assert v1["up"].total_s > 0 and v1["up"].quantile(0.99) is not None
    assert (sampler.missing, sorted(sampler.errors)) == (2, ["gone", "silent"])
    assert "ConnectError" in sampler.errors["gone"]
    # a wrong token: the process is left out, not read as zero
    assert nothing == {}
    assert refused.missing == 3 and "answered 401" in refused.errors["up"]


def test_the_text_parser_turns_cumulative_buckets_into_a_window() -> None:
    s = metrics.InvocationStats("hello", 3)
    for d in (0.004, 0.004, 0.2, 40.0, 5000.0):
        s.succeeded(d)
    s.failed(ValueError("x"), 0.2)
    s.timeout = 4
    text = _exposition([s])
    got = windows_from_text(text, {"hello"})
    w = got[("hello", 3)]
    assert (w.success, w.error, w.timeout, w.requests, w.observed) == (5, 1, 4, 10, 6)
    assert w.buckets == tuple(s.buckets)
    assert w.total_s == pytest.approx(s.total_s)
    assert windows_from_text(text, {"nope"}) == {}
    with pytest.raises(ValueError):
        windows_from_text("nimbus_invocations_total{ 1 2 3\n", {"hello"})


def _exposition(stats: list[metrics.InvocationStats]) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            return metrics.invocation_families(stats, "here")

    reg = CollectorRegistry()
    reg.register(One())  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_the_local_sampler_reads_this_process_counters() -> None:
    s = metrics.invocation_stats("sampler-local-fn", 9)
    before = asyncio.run(LocalSampler().sample({"sampler-local-fn"}))
    s.succeeded(0.01)
    s.failed(ValueError("x"), 0.02)
    after = asyncio.run(LocalSampler().sample({"sampler-local-fn", "absent"}))
    assert list(after) == [("sampler-local-fn", 9)]
    w: Window = after[("sampler-local-fn", 9)]["local"]
    b = before[("sampler-local-fn", 9)]["local"]
    assert ((w - b).success, (w - b).error, (w - b).observed) == (1, 1, 2)


def test_scrape_sampler_needs_somewhere_to_look() -> None:
    with pytest.raises(ValueError, match="needs a store or a targets callable"):
        ScrapeSampler(None, "t")


def test_region_targets_are_the_live_workers_and_gateways_metrics_urls(tmp_path: Path) -> None:
    async def main() -> dict[str, str]:
        store = await open_sqlite_store(tmp_path / "region.db")
        regs = [
            Registration(store, "worker", "w1", lambda: {"metrics": "http://127.0.0.1:1001"}),
            Registration(store, "worker", "w2", dict),  # lists no metrics URL
            Registration(store, "gateway", "g1", lambda: {"metrics": "http://127.0.0.1:1002"}),
            Registration(store, "controller", "c1", lambda: {"metrics": "http://127.0.0.1:9"}),
        ]
        try:
            for r in regs:
                await r.start()
            return await region_targets(store)()
        finally:
            for r in regs:
                await r.aclose()
            await store.aclose()

    assert asyncio.run(main()) == {"w1": "http://127.0.0.1:1001",
                                   "g1": "http://127.0.0.1:1002"}
