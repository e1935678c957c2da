"""Versions and aliases end to end on one ``nimbus up``: weighted splits,
sticky clients, async invocations pinned at accept time, a route on an
alias, qualifiers, and the CLI's output and errors."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e

MANIFEST = """\
name: ab
functions:
  api:
    handler: handlers.api
    http:
      - {method: GET, path: /api}
      - {method: GET, path: /beta, alias: beta}
"""

HANDLERS = '''\
CODE = "{code}"

def api(event, context):
    return {{"statusCode": 200, "body": CODE + ":" + context.function_version}}
'''


def write_app(folder: Path, code: str) -> None:
    (folder / "app.yaml").write_text(MANIFEST)
    (folder / "handlers.py").write_text(HANDLERS.format(code=code))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nimbus, httpx.Client]]:
    root = tmp_path_factory.mktemp("aliases")
    app = root / "ab"
    app.mkdir()
    write_app(app, "one")
    n = Nimbus(app, root / "state", root / "state.out")
    ctl = httpx.Client(base_url=n.control_url, timeout=30.0,
                       headers={"authorization": f"Bearer {n.token}"})
    try:
        write_app(app, "two")
        p = n.cli("deploy", str(app))
        assert p.returncode == 0, p.stderr
        yield n, ctl
    finally:
        ctl.close()
        n.stop()


def set_alias(ctl: httpx.Client, alias: str, weights: dict[str, int]) -> httpx.Response:
    return ctl.put(f"/v1/functions/api/aliases/{alias}", json={"weights": weights})


def test_a_route_on_an_alias_keeps_its_version_across_a_deploy(env: Any) -> None:
    n, ctl = env
    assert n.http.get("/api").text == "two:2"
    assert n.http.get("/beta").text == "one:1"  # set to the version first deployed with it
    view = ctl.get("/v1/functions/api/aliases").json()
    assert view["aliases"] == {"live": {"2": 100}, "beta": {"1": 100}}
    assert {"method": "GET", "path": "/beta", "alias": "beta"} in view["routes"]


def test_weighted_live_splits_within_five_percent_and_sticky_clients_stay(env: Any) -> None:
    n, ctl = env
    r = set_alias(ctl, "live", {"1": 70, "2": 30})
    assert r.status_code == 200, r.text
    try:
        seen = collections.Counter(n.http.get("/api").text for _ in range(2000))
        assert set(seen) == {"one:1", "two:2"}
        assert abs(seen["one:1"] - 1400) <= 100, seen
        # 50 sticky clients x 20 requests: each on one version only
        by_client: dict[str, set[str]] = collections.defaultdict(set)
        for i in range(50):
            for j in range(20):
                key = f"client-{i}"
                if j % 2:
                    got = n.http.get("/api", headers={"x-nimbus-sticky": key})
                else:
                    got = n.http.get("/api", headers={"cookie": f"a=b; nimbus-sticky={key}"})
                by_client[key].add(got.text)
        assert all(len(v) == 1 for v in by_client.values()), by_client
        assert len({next(iter(v)) for v in by_client.values()}) == 2  # both versions in use
        # the route on beta is untouched by live's split
        assert {n.http.get("/beta").text for _ in range(20)} == {"one:1"}
    finally:
        assert set_alias(ctl, "live", {"2": 100}).status_code == 200
    assert {n.http.get("/api").text for _ in range(20)} == {"two:2"}


def settled(ctl: httpx.Client, iid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rec = ctl.get(f"/v1/invocations/{iid}").json()
        if rec.get("status") in ("succeeded", "failed", "dead"):
            return dict(rec)
        time.sleep(0.05)
    raise AssertionError(f"invocation {iid} did not settle: {rec}")


def test_async_invocations_run_on_the_version_chosen_when_accepted(env: Any) -> None:
    n, ctl = env
    assert set_alias(ctl, "live", {"1": 50, "2": 50}).status_code == 200
    try:
        ids = []
        for i in range(20):
            r = n.http.get("/api", params={"i": str(i)},
                           headers={"x-nimbus-invocation-type": "Event"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["invocationId"])
        r = ctl.post("/v1/functions/api/invoke", content=b"{}",
                     params={"async": "true", "qualifier": "1"})
        assert r.status_code == 202
        ids.append(r.json()["invocationId"])
        recs = [settled(ctl, iid) for iid in ids]
    finally:
        assert set_alias(ctl, "live", {"2": 100}).status_code == 200
    ran: collections.Counter[str] = collections.Counter()
    for rec in recs:
        assert rec["status"] == "succeeded", rec
        pinned = rec["attributes"]["nimbus.version"]
        assert rec["result"]["body"].endswith(f":{pinned}"), rec
        ran[pinned] += 1
    assert recs[-1]["attributes"]["nimbus.version"] == "1"
    assert set(ran) == {"1", "2"}, ran


def test_qualifiers_on_invoke(env: Any) -> None:
    n, ctl = env
    r = ctl.post("/v1/functions/api/invoke", params={"qualifier": "beta"})
    assert r.json()["result"]["body"] == "one:1" and r.json()["version"] == 1
    p = n.cli("invoke", "api", "--qualifier", "1")
    assert p.returncode == 0 and '"one:1"' in p.stdout, p.stderr
    p = n.cli("invoke", "api", "--qualifier", "gamma")
    assert p.returncode == 1
    assert ("function 'api' has no version or alias 'gamma'; its aliases: live, beta; "
            "its versions: 1, 2") in p.stderr, p.stderr


def test_cli_alias_and_versions(env: Any) -> None:
    n, ctl = env
    p = n.cli("alias", "set", "api", "canary", "1=50,2=50")
    assert p.returncode == 0, p.stderr
    assert "canary  2 (50%), 1 (50%)" in p.stdout, p.stdout
    p = n.cli("alias", "ls", "api")
    lines = [" ".join(line.split()) for line in p.stdout.splitlines()]
    assert "live 2 (100%) GET /api" in lines and "beta 1 (100%) GET /beta" in lines, lines
    p = n.cli("versions", "api")
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()[1:]]
    assert rows[0][:2] == ["2", "(stable)"] and rows[1][0] == "1", rows
    assert "live 100%, canary 50%" in p.stdout and "beta 100%, canary 50%" in p.stdout
    assert len(rows[0][2]) == 12  # the code hash
    p = n.cli("versions", "api", "--json")
    data = __import__("json").loads(p.stdout)
    assert [v["version"] for v in data["versions"]] == [2, 1]
    assert data["versions"][1]["shares"] == {"beta": 100, "canary": 50}
    p = n.cli("alias", "rm", "api", "canary")
    assert p.returncode == 0 and "removed alias canary" in p.stdout
    # errors: one line, naming what is wrong
    for args, code, words in [
        (("alias", "set", "api", "live", "1=60,2=50"), 2, "sum to 110, not 100"),
        (("alias", "set", "api", "live", "9"), 1, "no version 9; its versions: 1, 2"),
        (("alias", "set", "api", "Beta!", "1"), 2, "alias name 'Beta!' is not valid"),
        (("alias", "rm", "api", "live"), 2, "cannot be removed"),
        (("alias", "rm", "api", "beta"), 1, "used by the route GET /beta"),
        (("alias", "ls", "nope"), 1, "function 'nope' is not deployed"),
    ]:
        p = n.cli(*args)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        assert p.stderr.startswith("nimbus: error: ") and words in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert n.http.get("/api").text == "two:2"


TRIGGERED = """\
name: tq
functions:
  consumer:
    handler: jobs.consumer
    queue: jobs
    trigger_alias: stable
"""

CONSUMER = '''\
CODE = "{code}"

def consumer(event, context):
    for record in event.get("Records", ()):
        print("ran", record["body"], "on", CODE + ":" + context.function_version)
    return CODE + ":" + context.function_version
'''


def test_a_queue_trigger_runs_the_alias_its_function_names(env: Any, tmp_path: Path) -> None:
    n, ctl = env
    app = tmp_path / "tq"
    app.mkdir()
    (app / "app.yaml").write_text(TRIGGERED)

    def deploy(code: str) -> None:
        (app / "jobs.py").write_text(CONSUMER.format(code=code))
        p = n.cli("deploy", str(app))
        assert p.returncode == 0, p.stderr

    def ran_on() -> str:
        mark = f"job-{time.monotonic_ns()}"
        r = ctl.post("/v1/publish/jobs", content=mark.encode())
        assert r.status_code == 202, r.text
        assert settled(ctl, r.json()["deliveries"][0]["id"])["status"] == "succeeded"
        lines = ctl.get("/v1/functions/consumer/logs", params={"tail": "50"}).text
        return next(line.split(" on ")[1].split('"')[0] for line in lines.splitlines()
                    if f"ran {mark} on " in line)

    deploy("one")
    deploy("two")  # live moves to version 2; the alias the trigger names stays on 1
    view = ctl.get("/v1/functions/consumer/aliases").json()
    assert view["aliases"] == {"live": {"2": 100}, "stable": {"1": 100}}
    assert ran_on() == "one:1"
    assert ctl.post("/v1/functions/consumer/invoke").json()["result"] == "two:2"
    r = ctl.put("/v1/functions/consumer/aliases/stable", json={"weights": {"2": 100}})
    assert r.status_code == 200, r.text
    assert ran_on() == "two:2"
    r = ctl.delete("/v1/functions/consumer/aliases/stable")
    assert r.status_code == 400
    assert "what its triggers invoke (trigger_alias)" in r.json()["errorMessage"], r.text
