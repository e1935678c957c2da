"""Rollouts in ``nimbus up``: a new version deployed with a strategy takes
traffic in steps under real load, and is promoted or rolled back by the
rollout runner on its own per-version counters. One ``nimbus up`` for the
module; each test has its own app (and function)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nimbus.control.bundle import make_bundle
from tests.conftest import Nimbus
from tests.region import wait_until

HANDLER = """\
import time

VERSION = {version!r}
FAIL_EVERY = {fail!r}   # of each 10 calls, these fail
SLEEP_S = {sleep!r}
calls = 0

def handler(event, context):
    global calls
    calls += 1
    if SLEEP_S:
        time.sleep(SLEEP_S)
    if calls % 10 in FAIL_EVERY:
        raise RuntimeError("canary boom " + VERSION)
    return {{"statusCode": 200, "body": VERSION}}
"""


def write_app(root: Path, name: str, version: str, *, fail: tuple[int, ...] = (),
              sleep: float = 0.0, rollout: str = "") -> Path:
    app = root / name
    app.mkdir(parents=True, exist_ok=True)
    (app / "app.yaml").write_text(
        f"name: {name}\n{rollout}functions:\n  {name}:\n    handler: h.handler\n"
        f"    max_instances: 2\n    http: [{{method: GET, path: /{name}}}]\n")
    (app / "h.py").write_text(HANDLER.format(version=version, fail=fail, sleep=sleep))
    return app


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("rollout")
    n = Nimbus(None, root / "state", root / "up.out", "--containment", "rlimits")
    yield n
    n.stop()


@dataclass
class Load:
    """Requests to one path from a thread, one after another, until stopped."""

    url: str
    results: list[tuple[float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as c:
            while not self.stop.is_set():
                r = c.get(self.url)
                self.results.append((time.monotonic(), r.status_code, r.text))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30)

    def between(self, t0: float, t1: float) -> list[tuple[float, int, str]]:
        return [r for r in list(self.results) if t0 <= r[0] <= t1]


def deploy(up: Nimbus, app: Path, *flags: str) -> str:
    """``nimbus deploy`` (its output, for the tests that read it)."""
    r = up.cli("deploy", str(app), *flags)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout + r.stderr


def put(up: Nimbus, app: Path, **params: str) -> dict[str, Any]:
    """The same deploy through the control API (no CLI process to start)."""
    lines = httpx.post(f"{up.control_url}/v1/deploy", content=make_bundle(app),
                       params={"name": app.name, **params}, timeout=120,
                       headers={"authorization": f"Bearer {up.token}"}).text.splitlines()
    last = orjson.loads(lines[-1])
    assert "result" in last, lines
    result: dict[str, Any] = last["result"]
    return result


def rollout(up: Nimbus, fn: str) -> dict[str, Any]:
    r = httpx.get(f"{up.control_url}/v1/functions/{fn}/rollout",
                  headers={"authorization": f"Bearer {up.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def wait_state(up: Nimbus, fn: str, want: str, timeout: float = 30.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(rollout(up, fn))
        return bool(found["state"] == want)

    try:
        wait_until(done, timeout_s=timeout, what=f"rollout of {fn} {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is: {found}") from None
    return found


def scrape(up: Nimbus) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(up.control_url + "/metrics",
                  headers={"authorization": f"Bearer {up.token}"}, timeout=30)
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_a_failing_canary_rolls_back_under_load(up: Nimbus, tmp_path: Path) -> None:
    put(up, write_app(tmp_path, "pay", "v1"))
    with Load(up.url + "/pay") as load:
        wait_until(lambda: len(load.results) >= 150, timeout_s=30, what="load on v1")
        t0 = time.monotonic()
        out = deploy(up, write_app(tmp_path, "pay", "v2", fail=(0, 3, 6)),
                     "--strategy", "canary:10%:3s", "--min-requests", "10")
        assert "rolling out over version 1 with canary:10%:3s" in out
        ro = wait_state(up, "pay", "rolled_back")
        t1 = time.monotonic()
        wait_until(lambda: len(load.between(t1 + 0.5, 1e18)) >= 30, timeout_s=30,
                   what="load after")
    during = load.between(t0, t1)
    failed = [r for r in during if r[1] != 200]
    # only the canary failed, and at most its share of what was sent meanwhile
    assert all("canary boom v2" in r[2] for r in failed), failed[:3]
    assert len(failed) <= 0.1 * len(during) + 5, (len(failed), len(during))
    assert [r for r in load.results if r[1] == 200 and r[2] not in ("v1", "v2")] == []
    after = load.between(t1 + 0.5, 1e18)
    assert after and {r[2] for r in after} == {"v1"}
    assert ro["from"] == 1 and ro["to"] == 2
    assert ro["reason"].startswith("error_rate ")
    decision = ro["history"][-1]
    assert decision["action"] == "rollback" and decision["canary"]["requests"] >= 10
    assert decision["canary"]["error_rate"] > 0.2
    assert decision["baseline"]["error_rate"] == 0
    text = up.cli("rollout", "status", "pay").stdout
    assert "rolled back" in text and "error_rate" in text
    assert orjson.loads(up.cli("rollout", "status", "pay", "--json").stdout) == rollout(up, "pay")
    samples = scrape(up)
    assert samples[("nimbus_rollout_decisions_total", frozenset(
        {"function": "pay", "region": "local", "action": "rollback"}.items()))] == 1
    logs = up.cli("logs", "pay").stdout
    assert "rollout 1 -> 2 (canary:10%:3s): rolled back: error_rate" in logs

    # pay took real traffic: a deploy without a strategy rolls out as a canary
    out = put(up, write_app(tmp_path, "pay", "v3"))["functions"][0]["rollout"]
    assert (out["strategy"], out["from"], out["to"], out["defaulted"]) == (
        "canary:10%:1m", 1, 3, True)
    r = up.cli("rollback", "pay")
    assert r.returncode == 0 and "version 1 serves all traffic" in r.stdout, r.stderr


def test_a_healthy_version_promotes_through_every_step(up: Nimbus, tmp_path: Path) -> None:
    put(up, write_app(tmp_path, "calc", "v1"))
    with Load(up.url + "/calc") as load:
        # (the default rule's latency clause would judge noise: sub-millisecond
        # handlers on a busy machine)
        put(up, write_app(tmp_path, "calc", "v2"), strategy="linear:25%:2s",
            min_requests="5", rollback_on="error_rate > 2%")
        ro = wait_state(up, "calc", "promoted", timeout=40)
        t1 = time.monotonic()
        wait_until(lambda: len(load.between(t1 + 0.5, 1e18)) >= 20, timeout_s=30,
                   what="load after")
    assert [r for r in load.results if r[1] != 200] == []
    assert {r[2] for r in load.between(t1 + 0.5, 1e18)} == {"v2"}
    decisions = [(h["step"], h["share"], h["action"]) for h in ro["history"]]
    assert decisions == [(0, 25, "start"), (0, 25, "promote"), (1, 50, "promote"),
                         (2, 75, "promote")]
    assert ro["share"] == 100
    # nothing names version 1 any more: its instances drain

    def drained() -> bool:
        s = scrape(up)
        return not any(k[0] == "nimbus_instances" and ("function", "calc") in k[1]
                       and ("version", "1") in k[1] and v > 0 for k, v in s.items())

    wait_until(drained, timeout_s=30, what="version 1 of calc drained")


def test_a_slow_version_rolls_back_on_latency(up: Nimbus, tmp_path: Path) -> None:
    put(up, write_app(tmp_path, "lag", "v1", sleep=0.02))
    with Load(up.url + "/lag") as load:
        wait_until(lambda: len(load.results) >= 20, timeout_s=30, what="load on v1")
        put(up, write_app(tmp_path, "lag", "v2", sleep=0.06), strategy="canary:30%:30s",
            min_requests="10", rollback_on="p99 > 2x baseline")
        ro = wait_state(up, "lag", "rolled_back")
    assert [r for r in load.results if r[1] != 200] == []
    assert ro["reason"].startswith("p99 ")
    last = ro["history"][-1]
    assert last["canary"]["p99"] > 2 * last["baseline"]["p99"]


ROLLOUT_BLOCK = "rollout:\n  strategy: canary:50%:60s\n  min_requests: 5\n"


def test_manifest_block_refused_deploy_and_rollback_by_hand(up: Nimbus,
                                                             tmp_path: Path) -> None:
    put(up, write_app(tmp_path, "hand", "v1", rollout=ROLLOUT_BLOCK))
    v2 = write_app(tmp_path / "v2", "hand", "v2", rollout=ROLLOUT_BLOCK)
    out = deploy(up, v2)  # no flag: the manifest's block
    assert "rolling out over version 1 with canary:50%:1m" in out
    ro = rollout(up, "hand")
    assert ro["state"] == "running" and ro["share"] == 50 and ro["min_requests"] == 5
    # the same code again makes no version; other code is refused meanwhile
    again = put(up, v2)
    assert again["functions"] == [{"name": "hand", "version": 2, "changed": False,
                                   "serving": 1, "routes": ["GET /hand"]}]
    r = up.cli("deploy", str(v2), "--strategy", "canary:150%:1m")
    assert r.returncode == 2
    assert r.stderr.startswith("nimbus: error: --strategy 'canary:150%:1m': share")
    r = up.cli("deploy", str(write_app(tmp_path / "v3", "hand", "v3")))
    assert r.returncode == 1
    assert ("a rollout of hand is in progress (1 -> 2, step 1 of 2): wait, or nimbus "
            "rollback hand") in r.stderr
    s = scrape(up)
    assert s[("nimbus_rollout_share", frozenset(
        {"function": "hand", "version": "2", "region": "local"}.items()))] == 50
    assert s[("nimbus_rollouts_running", frozenset({"region": "local"}.items()))] == 1
    seen = set()
    for _ in range(40):
        seen.add(up.http.get("/hand").text)  # type: ignore[union-attr]
    assert seen == {"v1", "v2"}
    # the current step's figures, as the runner last judged them
    last: dict[str, Any] = {}

    def figures() -> dict[str, Any] | None:
        last.update(rollout(up, "hand"))
        c = last.get("current")
        return c if c and c["canary"]["requests"] >= 1 else None

    try:
        cur = wait_until(figures, timeout_s=10, what="the step's figures")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last}") from None
    assert cur["step"] == 0 and cur["canary"]["error_rate"] == 0
    assert cur["canary"]["requests"] + cur["baseline"]["requests"] <= 40
    text = up.cli("rollout", "status", "hand").stdout
    assert "version 1 -> 2 with canary:50%:1m: running" in text
    assert "now: step 1 of 2, version 2 takes 50%" in text and "canary   " in text
    r = up.cli("rollback", "hand")
    assert r.returncode == 0, r.stderr
    assert "version 1 serves all traffic (its instances were kept warm)" in r.stdout
    ro = rollout(up, "hand")
    assert ro["state"] == "rolled_back" and ro["reason"] == "rolled back by hand"
    assert "rolled back hand: version 1 serves all traffic" in up.cli("logs", "hand").stdout
    assert {up.http.get("/hand").text for _ in range(20)} == {"v1"}  # type: ignore[union-attr]
    # asked again: nothing moves further back without --to
    r = up.cli("rollback", "hand")
    assert r.returncode == 0, r.stderr
    assert ("hand already serves version 1: its rollout to version 2 was rolled back "
            "(rolled back by hand)") in r.stdout
    assert {up.http.get("/hand").text for _ in range(5)} == {"v1"}  # type: ignore[union-attr]


def test_with_metrics_off_a_strategy_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIMBUS_METRICS", "off")
    n = Nimbus(None, tmp_path / "state", tmp_path / "up.out", "--containment", "rlimits")
    try:
        put(n, write_app(tmp_path, "dark", "v1"))
        lines = httpx.post(f"{n.control_url}/v1/deploy",
                           content=make_bundle(write_app(tmp_path / "2", "dark", "v2")),
                           params={"name": "dark", "strategy": "canary:10%:1m"}, timeout=120,
                           headers={"authorization": f"Bearer {n.token}"}).text.splitlines()
        error = orjson.loads(lines[-1])["error"]
        assert error["errorType"] == "DeployError"
        assert "needs per-version metrics, and they are off (NIMBUS_METRICS=off)" in \
            error["errorMessage"]
        assert n.http.get("/dark").text == "v1"  # type: ignore[union-attr]
    finally:
        n.stop()
