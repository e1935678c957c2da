"""The pure parts of cluster deploys: backoff, what counts as drift, the
status document, the desired-state folder, ``nimbus.toml`` and where a
manifest names a region the cluster file lacks. No region is started."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from nimbus.errors import ManifestError
from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry
from nimbus.multiregion.converge import Backoff, Converger, differs, wanted_by_region
from nimbus.multiregion.deploy import plan_deploy
from nimbus.multiregion.push import GatewayHealth, PushResult, RegionApps, push_bundle
from nimbus.multiregion.settings import DeploySettings, read_settings, write_settings
from nimbus.multiregion.state import ClusterState, Desired, state_dir_for
from nimbus.multiregion.status import Observed, render, summarize, unconverged_regions

D1 = hashlib.sha256(b"one").hexdigest()
D2 = hashlib.sha256(b"two").hexdigest()


def cluster(tmp_path: Path, *names: str) -> ClusterFile:
    return ClusterFile(path=tmp_path / "nimbus.cluster.yaml", regions={
        n: RegionEntry(n, f"http://127.0.0.{i + 2}:1", "t" * 40, (f"http://127.0.0.{i + 2}:2",))
        for i, n in enumerate(names)})


def test_backoff_doubles_to_its_cap_and_resets_on_success() -> None:
    b = Backoff(min_s=1.0, max_s=5.0)
    assert b.due("eu", 0.0)
    assert [b.failed("eu", 0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not b.due("eu", 4.9) and b.due("eu", 5.0)
    assert b.due("us", 0.0)  # keys are independent
    b.succeeded("eu")
    assert b.due("eu", 0.0) and b.failed("eu", 0.0) == 1.0


def test_drift_is_a_missing_app_another_digest_or_other_routing() -> None:
    routing = {"names": ["eu", "us"], "policy": "failover", "weights": {}}
    want = Desired("shop", D1, ("eu", "us"), routing)
    assert differs(want, None) == "missing"
    assert differs(want, {"digest": D2, "regions": routing}).startswith("runs ")
    assert differs(want, {"digest": D1, "regions": None}) == "routing differs"
    assert differs(want, {"digest": D1, "regions": routing}) is None
    assert differs(want, {"digest": D1}) is None  # a region that does not report routing
    # the same routing spelled otherwise is no drift
    weighted = Desired("shop", D1, ("eu", "us"), {"policy": "weighted",
                                                  "weights": {"eu": 80, "us": 20}})
    assert differs(weighted, {"digest": D1, "regions": {
        "names": ["eu", "us"], "policy": "weighted", "weights": {"eu": 80, "us": 20}}}) is None


def test_wanted_by_region_skips_regions_the_cluster_file_lacks() -> None:
    desired = {"a": Desired("a", D1, ("eu", "gone")), "b": Desired("b", D2, ("us", "eu"))}
    assert wanted_by_region(desired, ("eu", "us")) == {"eu": ["a", "b"], "us": ["b"]}


def test_status_document_separates_drift_from_what_is_fine(tmp_path: Path) -> None:
    c = cluster(tmp_path, "eu", "us", "ap")
    state = ClusterState(tmp_path / "state")
    state.record_deploy(Desired("shop", D1, ("eu", "us")), b"one")
    state.done("eu", "shop", D1)
    seen = Observed(
        apps={"eu": RegionApps("eu", {"shop": {"digest": D1, "version": 3, "regions": None},
                                      "manual": {"digest": D2, "version": 1}}),
              "us": RegionApps("us", None, "connection refused"),
              "ap": RegionApps("ap", {"shop": {"digest": D2, "version": 1}})},
        gateways={"eu": [GatewayHealth("http://127.0.0.2:2", True, "ok", "eu")],
                  "us": [GatewayHealth("http://127.0.0.3:2", False, "connection refused")],
                  "ap": [GatewayHealth("http://127.0.0.4:2", False, "draining (HTTP 503)"),
                         GatewayHealth("http://127.0.0.5:2", True, "ok", "eu")]})
    doc = summarize(c, state.snapshot(), seen)
    shop = doc["apps"]["shop"]["regions"]
    assert shop["eu"] == {"state": "ok", "version": 3, "digest": D1}
    assert shop["us"]["state"] == "unknown"
    assert shop["ap"]["state"] == "extra"  # runs there, but not meant to: no drift
    assert doc["apps"]["manual"]["regions"]["eu"]["state"] == "unmanaged"
    assert [(d["region"], d["state"]) for d in doc["drift"]] == [("us", "unknown")]
    assert [(p["region"], p["app"]) for p in doc["pending"]] == [("us", "shop")]
    assert not doc["converged"] and unconverged_regions(doc) == ["us"]
    assert doc["regions"]["us"]["control"] == {"url": "http://127.0.0.3:1", "reachable": False,
                                               "error": "connection refused"}
    assert [g["detail"] for g in doc["regions"]["ap"]["gateways"]] == [
        "draining (HTTP 503)", "serves region 'eu', not 'ap': check the cluster file"]
    text = "\n".join(render(doc))
    assert ("region us: control http://127.0.0.3:1 does not answer: connection refused"
            in text)
    assert "pending: shop" in text and "not converged: us (shop: region unreachable)" in text


def test_each_cluster_file_has_its_own_state_folder(tmp_path: Path) -> None:
    assert state_dir_for(tmp_path / "nimbus.cluster.yaml") == tmp_path / ".nimbus-cluster"
    assert state_dir_for(tmp_path / "staging.yaml") == tmp_path / ".nimbus-cluster-staging.yaml"


def test_desired_state_keeps_the_newest_deploy_per_region(tmp_path: Path) -> None:
    state = ClusterState(tmp_path / "s")
    state.record_deploy(Desired("shop", D1, ("eu", "us")), b"one")
    assert set(state.snapshot().pending) == {("eu", "shop"), ("us", "shop")}
    state.failed("us", "shop", D1, "connection refused")
    state.failed("us", "shop", D1, "timed out")
    pend = state.snapshot().pending[("us", "shop")]
    assert (pend.attempts, pend.last_error, pend.refused) == (2, "timed out", False)
    # a newer deploy, to eu only: us's pending push goes, the old bundle too
    state.record_deploy(Desired("shop", D2, ("eu",)), b"two")
    snap = state.snapshot()
    assert set(snap.pending) == {("eu", "shop")} and snap.desired["shop"].digest == D2
    assert state.bundle(D1) is None and state.bundle(D2) == b"two"
    # a late answer for the old digest neither clears nor overwrites the new one
    state.done("eu", "shop", D1)
    state.failed("eu", "shop", D1, "late")
    assert state.snapshot().pending[("eu", "shop")].digest == D2
    assert state.snapshot().pending[("eu", "shop")].attempts == 0
    state.done("eu", "shop", D2)
    assert state.snapshot().pending == {}
    assert oct((tmp_path / "s" / "bundles" / f"{D2}.zip").stat().st_mode & 0o777) == "0o600"


def test_one_push_at_a_time_per_region_and_app(tmp_path: Path) -> None:
    """A deploy under way, or another converger's push, is left alone; a
    claim for a digest the app moved on from is refused."""
    state = ClusterState(tmp_path / "s")
    state.record_deploy(Desired("shop", D1, ("eu",)), b"one", busy_s=60.0)
    assert not state.claim("eu", "shop", D1, until=time.time() + 60)  # the deploy pushes
    state.failed("eu", "shop", D1, "connection refused")  # ... and gave up: free again
    assert state.claim("eu", "shop", D1, until=time.time() + 60)
    assert not state.claim("eu", "shop", D1, until=time.time() + 60)  # a second converger
    assert state.snapshot().pending[("eu", "shop")].last_error == "connection refused"
    assert not state.claim("eu", "shop", D2, until=time.time() + 60)  # not the desired one
    state.failed("eu", "shop", D1, "timed out")
    assert state.claim("eu", "shop", D1, until=time.time() - 1)  # an expired claim
    assert state.claim("eu", "shop", D1, until=time.time() + 60)
    # a region that lost the app gets a pending mark when a converger claims it
    state.done("eu", "shop", D1)
    assert state.claim("eu", "shop", D1, until=time.time() + 60)
    assert state.snapshot().pending[("eu", "shop")].attempts == 0


def test_nimbus_toml_round_trips_and_names_what_is_wrong(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    s = DeploySettings("shop", (tmp_path / "ops" / "nimbus.cluster.yaml").resolve(),
                       ("us", "eu"), "weighted", {"us": 30, "eu": 70})
    write_settings(app, s)
    assert 'cluster = "../ops/nimbus.cluster.yaml"' in (app / "nimbus.toml").read_text()
    assert read_settings(app) == s
    assert s.routing() == {"names": ["us", "eu"], "policy": "weighted",
                           "weights": {"us": 30, "eu": 70}}
    text = (app / "nimbus.toml").read_text()
    for bad, where in [(text.replace('"weighted"', '"fastest"'), "deploy.policy: policy must"),
                       (text.replace("us = 30\n", ""), "deploy.weights: no weight for region 'us'"),
                       (text.replace('regions = ["us", "eu"]', "regions = []"), "deploy.regions"),
                       (text + "[deploy\n", "nimbus.toml:14: not valid TOML")]:
        (app / "nimbus.toml").write_text(bad)
        with pytest.raises(ManifestError, match=where):
            read_settings(app)
    assert read_settings(tmp_path) is None


@pytest.mark.parametrize("regions,line", [("regions: [eu, ap]", 1),
                                          ("regions:\n  names:\n    - eu\n    - ap", 4),
                                          ("regions: {policy: weighted, weights: {eu: 1, ap: 2}}",
                                           1)])
def test_a_region_the_cluster_file_lacks_is_named_at_its_line(tmp_path: Path, regions: str,
                                                               line: int) -> None:
    app = tmp_path / "a"
    app.mkdir()
    (app / "app.yaml").write_text(f"{regions}\nfunctions:\n  f:\n    handler: m.f\n")
    (app / "m.py").write_text("def f(event, context):\n    return 1\n")
    with pytest.raises(ManifestError) as err:
        plan_deploy(app, cluster(tmp_path, "eu", "us"))
    assert err.value.field == "regions" and err.value.line == line
    assert "region 'ap' is not in the cluster file" in err.value.message
    assert "(it has eu, us)" in err.value.message


async def _push_to(answer: bytes | None | list[bytes], timeout_s: float = 2.0) -> PushResult:
    """Push to a control API stand-in on a loopback port that answers with
    ``answer`` (None: reads the request and never answers; a list: one
    answer per request, in turn)."""
    hold: list[asyncio.StreamWriter] = []
    answers = answer if isinstance(answer, list) else None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        if answer is None:
            hold.append(writer)
            return
        writer.write(answers.pop(0) if answers else answer)  # type: ignore[arg-type]
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    region = RegionEntry("eu", f"http://127.0.0.1:{port}", "t" * 40, ())
    try:
        async with httpx.AsyncClient() as client:
            return await push_bundle(client, region, "shop", b"zip", None, timeout_s)
    finally:
        for w in hold:
            w.close()
        server.close()
        await server.wait_closed()


def _http(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize("answer,outcome,message", [
    (_http("200 OK", b'{"progress": "x"}\n{"result": {"digest": "d", "functions": '
                     b'[{"version": 4, "changed": true}, {"version": 2}]}}\n',
           "application/x-ndjson"), "deployed", ""),
    (_http("401 Unauthorized", b'{"errorType": "Unauthorized", "errorMessage": "bad token"}'),
     "refused", "bad token (HTTP 401)"),
    (_http("200 OK", b'{"error": {"errorType": "ManifestError", "errorMessage": '
                     b'"app.yaml:3: nope"}}\n', "application/x-ndjson"),
     "refused", "app.yaml:3: nope"),
    (_http("200 OK", b'{"error": {"errorType": "DeployError", "errorMessage": '
                     b'"another deploy of f is in progress; retry"}}\n', "application/x-ndjson"),
     "busy", "another deploy of f is in progress; retry"),
    (_http("503 Service Unavailable", b'{"errorMessage": "draining"}'),
     "unreachable", "draining (HTTP 503)"),
    (None, "unreachable", "no answer within 0.3 s"),
])
def test_a_push_is_sorted_by_what_the_region_answered(answer: bytes | None, outcome: str,
                                                      message: str) -> None:
    # (a busy region is asked again while more than a second is left: not here)
    result = asyncio.run(_push_to(answer, 0.3 if answer is None or outcome == "busy" else 5.0))
    assert (result.outcome, result.message) == (outcome, message)
    if outcome == "deployed":
        assert (result.version, result.digest, result.changed) == (4, "d", True)


def test_a_busy_region_is_asked_again_within_the_deadline() -> None:
    busy = _http("200 OK", b'{"error": {"errorType": "DeployError", "errorMessage": '
                           b'"another deploy of f is in progress; retry"}}\n')
    done = _http("200 OK", b'{"result": {"digest": "d", "functions": [{"version": 1}]}}\n')
    result = asyncio.run(_push_to([busy, busy, done], 10.0))
    assert (result.outcome, result.version) == ("deployed", 1)


def test_a_push_to_a_closed_port_is_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    region = RegionEntry("eu", f"http://127.0.0.1:{port}", "t" * 40, ())

    async def push() -> PushResult:
        async with httpx.AsyncClient() as client:
            return await push_bundle(client, region, "shop", b"zip", None, 5.0)

    assert asyncio.run(push()) == PushResult("eu", "unreachable", message="connection refused")


def test_a_converger_asks_a_refusing_region_again_slowly(tmp_path: Path) -> None:
    """Against a control stand-in that lists no apps and refuses every deploy:
    one push per backoff step, none in between."""
    pushes: list[float] = []
    refusal = _http("200 OK", b'{"error": {"errorType": "DeployError", "errorMessage": '
                              b'"function \'f\' already belongs to app \'x\'"}}\n')

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head.lower())
        await reader.readexactly(int(m.group(1)) if m else 0)
        if head.startswith(b"POST /v1/deploy"):
            pushes.append(time.monotonic())
            writer.write(refusal)
        else:
            writer.write(_http("200 OK", b"[]"))
        await writer.drain()
        writer.close()

    async def scenario() -> list[list[str]]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = ClusterFile(path=tmp_path / "nimbus.cluster.yaml", regions={
            "eu": RegionEntry("eu", f"http://127.0.0.1:{port}", "t" * 40, ())})
        ClusterState(state_dir_for(c.path)).record_deploy(Desired("shop", D1, ("eu",)), b"one")
        conv = Converger(c, state_dir_for(c.path))
        rounds = []
        try:
            for now in (0.0, 1.0, 9.9, 10.0, 19.0, 30.0):
                report = await conv.converge_once(now)
                rounds.append([o.what for o in report.outcomes])
        finally:
            server.close()
            await server.wait_closed()
        return rounds

    rounds = asyncio.run(scenario())
    assert rounds == [["refused"]] * 6
    assert len(pushes) == 3  # at 0, 10 and 30 (the second wait is 20 s)
    pend = ClusterState(state_dir_for(tmp_path / "nimbus.cluster.yaml")).snapshot().pending
    assert pend[("eu", "shop")].refused and pend[("eu", "shop")].attempts == 3
    assert "already belongs to app 'x'" in pend[("eu", "shop")].last_error
