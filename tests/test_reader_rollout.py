"""A second reader's checks of safe rollouts, written from the issue,
README.md ("Safe rollouts", the CLI and manifest tables) and
docs/rollouts.md only: versions and aliases from the CLI, weighted and
sticky splits, async invocations pinned to a version, rollbacks by hand
(with and without a rollout, twice in a row, ``--to``), a failing canary
rolled back with its reason in status, logs and metrics, a linear rollout
promoting, the manifest's ``rollout:`` block and its errors, and the
refusals of ``--strategy`` and ``--rollback-on``.

One ``nimbus up`` for the module; each concern has its own app (and so its
own bundle) so that a rollout of one never touches another."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Nimbus

pytestmark = pytest.mark.e2e

HANDLER = '''\
CODE = "{code}"

def h(event, context):
    if CODE.startswith("bad"):
        raise RuntimeError("bad version")
    return {{"statusCode": 200, "body": CODE + ":" + context.function_version}}
'''

MANIFESTS = {
    # versions, aliases, async, sticky, rollbacks without a rollout
    "al": "name: al\nfunctions:\n  al:\n    handler: h.h\n    http:\n"
          "      - {method: GET, path: /al}\n"
          "      - {method: GET, path: /al-beta, alias: beta}\n",
    # a canary that fails
    "cb": "name: cb\nfunctions:\n  cb:\n    handler: h.h\n    http: [{method: GET, path: /cb}]\n",
    # a linear rollout that promotes
    "ln": "name: ln\nfunctions:\n  ln:\n    handler: h.h\n    http: [{method: GET, path: /ln}]\n",
    # the manifest's rollout: block (function keys over the app's)
    "mr": "name: mr\nrollout:\n  strategy: linear:10%:5m\n  min_requests: 5\n"
          "functions:\n  mr:\n    handler: h.h\n    http: [{method: GET, path: /mr}]\n"
          "    rollout:\n      strategy: canary:20%:30s\n",
    # strategies and refusals
    "ex": "name: ex\nfunctions:\n  ex:\n    handler: h.h\n",
}

Env = tuple[Nimbus, httpx.Client, Path]


def write(root: Path, app: str, code: str, manifest: str | None = None) -> Path:
    folder = root / app
    folder.mkdir(exist_ok=True)
    (folder / "app.yaml").write_text(manifest if manifest is not None else MANIFESTS[app])
    (folder / "h.py").write_text(HANDLER.format(code=code))
    return folder


def run_cli(n: Nimbus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nimbus.cli.main", *args, "--state-dir", str(n.state)],
        capture_output=True, text=True, timeout=60, cwd=n.state.parent)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with exactly one line on stderr (no traceback)."""
    assert p.returncode != 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("nimbus: error:")]
    assert len(errors) == 1, p.stderr
    # only progress lines (bundle ...) may come before it
    assert all(ln == errors[0] or ln.startswith("bundle ") for ln in lines), p.stderr
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("reader-rollout")
    for app in MANIFESTS:
        write(root, app, "v1")
    n = Nimbus(root / "al", root / "state", root / "state.out")
    ctl = httpx.Client(base_url=n.control_url, timeout=30.0,
                       headers={"authorization": f"Bearer {n.token}"})
    try:
        # the other apps' first versions, side by side
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda a: run_cli(n, "deploy", str(root / a)),
                                 ["cb", "ln", "mr", "ex"]))
        assert all(p.returncode == 0 for p in done), [p.stderr for p in done]
        # al: versions 2 and 3; mr: version 2 at once (its manifest has a canary)
        write(root, "al", "v2")
        assert run_cli(n, "deploy", str(root / "al")).returncode == 0
        write(root, "al", "v3")
        write(root, "mr", "v2")
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda a: run_cli(n, *a), [
                ("deploy", str(root / "al")),
                ("deploy", str(root / "mr"), "--strategy", "all-at-once")]))
        assert all(p.returncode == 0 for p in done), [p.stderr for p in done]
        yield n, ctl, root
    finally:
        ctl.close()
        n.stop()


def rollout(ctl: httpx.Client, fn: str) -> dict[str, Any]:
    r = ctl.get(f"/v1/functions/{fn}/rollout")
    assert r.status_code == 200, r.text
    return dict(r.json())


def aliases(ctl: httpx.Client, fn: str) -> dict[str, dict[str, int]]:
    return dict(ctl.get(f"/v1/functions/{fn}/aliases").json()["aliases"])


def put_alias(ctl: httpx.Client, fn: str, alias: str, weights: dict[str, int]) -> None:
    r = ctl.put(f"/v1/functions/{fn}/aliases/{alias}", json={"weights": weights})
    assert r.status_code == 200, r.text


def metrics(ctl: httpx.Client) -> str:
    r = ctl.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def drive(n: Nimbus, path: str, until: Callable[[], bool], timeout: float,
          ) -> tuple[collections.Counter[str], int]:
    """Requests one after another until ``until()``; bounded by ``timeout``.
    Returns the 200 bodies counted and the number of other answers."""
    ok: collections.Counter[str] = collections.Counter()
    failed = 0
    deadline = time.monotonic() + timeout
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now >= next_check:
            if until():
                return ok, failed
            next_check = now + 0.2
        assert now < deadline, f"not done in {timeout}s: {ok} {failed} failed"
        r = n.http.get(path)
        if r.status_code == 200:
            ok[r.text] += 1
        else:
            failed += 1


# ---------------------------------------------------------------------------
# versions and aliases


def test_versions_lists_newest_first_with_hash_config_stable_and_traffic(env: Env) -> None:
    n, ctl, _ = env
    p = run_cli(n, "versions", "al")
    assert p.returncode == 0, p.stderr
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    assert lines[0].split() == ["VERSION", "CODE", "CREATED", "(UTC)", "CONFIG", "TRAFFIC"]
    rows = lines[1:]
    assert [r.split()[0] for r in rows] == ["3", "2", "1"]
    assert rows[0].startswith("3 (stable) ")
    assert "(stable)" not in rows[1] + rows[2]
    for r in rows:
        assert re.search(r" [0-9a-f]{12} +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +128 MB, 3 s ", r), r
    assert rows[0].endswith("live 100%")
    assert rows[1].endswith("-")
    assert rows[2].endswith("beta 100%")  # the route's alias, set by the first deploy
    js = ctl.get("/v1/functions/al/versions").json()
    assert [v["version"] for v in js["versions"]] == [3, 2, 1]
    codes = [r.split()[2] if "(stable)" in r else r.split()[1] for r in rows]
    assert codes == [v["digest"][:12] for v in js["versions"]]
    assert len(set(codes)) == 3


def test_alias_split_shows_in_alias_ls_and_versions(env: Env) -> None:
    n, ctl, _ = env
    p = run_cli(n, "alias", "set", "al", "live", "1=90,3=10")
    try:
        assert p.returncode == 0, p.stderr
        assert aliases(ctl, "al")["live"] == {"1": 90, "3": 10}
        ls = run_cli(n, "alias", "ls", "al").stdout
        live = next(ln.split() for ln in ls.splitlines() if ln.split()[:1] == ["live"])
        assert sorted(" ".join(live[1:5]).split(", ")) == ["1 (90%)", "3 (10%)"]
        assert live[-2:] == ["GET", "/al"]
        vs = run_cli(n, "versions", "al").stdout.splitlines()
        row = {ln.split()[0]: ln.rstrip() for ln in vs[1:] if ln.strip()}
        assert row["1"].endswith("live 90%, beta 100%")
        assert row["3"].endswith("live 10%")
    finally:
        put_alias(ctl, "al", "live", {"3": 100})


def test_a_version_at_weight_zero_stays_named(env: Env) -> None:
    n, ctl, _ = env
    p = run_cli(n, "alias", "set", "al", "beta", "1=0,2=100")
    try:
        assert p.returncode == 0, p.stderr
        # "Every version an alias names keeps its instances warm, even at weight 0"
        assert aliases(ctl, "al")["beta"] == {"1": 0, "2": 100}
        assert {n.http.get("/al-beta").text for _ in range(10)} == {"v2:2"}
    finally:
        put_alias(ctl, "al", "beta", {"1": 100})


def test_live_at_weight_zero_stays_named_like_any_alias(env: Env) -> None:
    n, ctl, _ = env
    p = run_cli(n, "alias", "set", "al", "live", "1=0,3=100")
    try:
        assert p.returncode == 0, p.stderr
        assert aliases(ctl, "al")["live"] == {"1": 0, "3": 100}
    finally:
        put_alias(ctl, "al", "live", {"3": 100})


BAD_WEIGHTS = ["1=90,3=20", "1=101", "1=50,1=50", "1=90.5,3=9.5"]


def test_alias_set_refuses_bad_weights_with_one_line(env: Env) -> None:
    n, ctl, _ = env
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda w: run_cli(n, "alias", "set", "al", "beta", w), BAD_WEIGHTS))
    for w, p in zip(BAD_WEIGHTS, got, strict=True):
        line = one_line_error(p)
        assert p.returncode == 2, (w, line)
    assert "sum to 110, not 100" in one_line_error(got[0])
    assert aliases(ctl, "al")["beta"] == {"1": 100}


def test_alias_set_unknown_version_names_the_versions_that_exist(env: Env) -> None:
    n, ctl, _ = env
    p = run_cli(n, "alias", "set", "al", "beta", "1=90,9=10")
    line = one_line_error(p)
    assert p.returncode == 1
    assert "no version 9" in line and "1, 2, 3" in line, line
    assert aliases(ctl, "al")["beta"] == {"1": 100}


@pytest.mark.parametrize("name", ["Beta", "a_b", "a" * 64])
def test_alias_names_out_of_the_rules_are_refused(env: Env, name: str) -> None:
    n, ctl, _ = env
    p = run_cli(n, "alias", "set", "al", name, "2")
    line = one_line_error(p)
    assert "alias name" in line and "not valid" in line, line
    assert name not in aliases(ctl, "al")


def test_alias_set_ls_rm_round_trip_and_rm_refusals(env: Env) -> None:
    n, ctl, _ = env
    name = "a" * 63  # the longest name allowed
    assert run_cli(n, "alias", "set", "al", name, "2").returncode == 0
    assert aliases(ctl, "al")[name] == {"2": 100}
    assert '"body": "v2:2"' in n.cli("invoke", "al", "--qualifier", name).stdout
    p = run_cli(n, "alias", "rm", "al", name)
    assert p.returncode == 0, p.stderr
    assert name not in aliases(ctl, "al")
    # a second rm: unknown, naming the aliases there are; live cannot be
    # removed; nor an alias a route serves
    with ThreadPoolExecutor(3) as pool:
        again, live, beta = pool.map(lambda a: run_cli(n, "alias", "rm", "al", a),
                                     [name, "live", "beta"])
    line = one_line_error(again)
    assert "live" in line and "beta" in line, line
    line = one_line_error(live)
    assert "live" in line and "cannot be removed" in line, line
    line = one_line_error(beta)
    assert "GET /al-beta" in line, line
    assert aliases(ctl, "al") == {"live": {"3": 100}, "beta": {"1": 100}}


def test_unknown_function_is_one_line_everywhere(env: Env) -> None:
    n, _, _ = env
    cmds = [("versions", "nofn"), ("rollback", "nofn"), ("rollout", "status", "nofn", "--json"),
            ("rollout", "status", "al")]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: run_cli(n, *c), cmds))
    for c, p in zip(cmds[:3], got[:3], strict=True):
        assert "nofn" in one_line_error(p), c
    line = one_line_error(got[3])  # al never had a rollout
    assert "no rollout" in line, line


# ---------------------------------------------------------------------------
# weighted split, sticky clients, async pinning


def test_weighted_split_follows_weights(env: Env) -> None:
    n, ctl, _ = env
    put_alias(ctl, "al", "live", {"1": 25, "3": 75})
    try:
        seen = collections.Counter(n.http.get("/al").text for _ in range(400))
    finally:
        put_alias(ctl, "al", "live", {"3": 100})
    assert set(seen) == {"v1:1", "v3:3"}, seen
    # 400 draws at p=0.25: sd ~8.7; 40 is over 4.5 sd
    assert abs(seen["v1:1"] - 100) <= 40, seen


def test_sticky_key_keeps_a_version_header_and_cookie_alike_and_moves_only_forward(
        env: Env) -> None:
    n, ctl, _ = env
    keys = [f"user-{i}" for i in range(40)]

    def versions_of(key: str) -> set[str]:
        got = set()
        for j in range(4):
            h = ({"x-nimbus-sticky": key} if j % 2 else
                 {"cookie": f"theme=dark; nimbus-sticky={key}"})
            got.add(n.http.get("/al", headers=h).text)
        return got

    put_alias(ctl, "al", "live", {"1": 70, "3": 30})
    try:
        first = {}
        for k in keys:
            v = versions_of(k)
            assert len(v) == 1, (k, v)
            first[k] = v.pop()
        assert set(first.values()) == {"v1:1", "v3:3"}, first  # both in use
        # the new version's share grows: nobody moves back to the old one
        put_alias(ctl, "al", "live", {"1": 30, "3": 70})
        second = {}
        for k in keys:
            v = versions_of(k)
            assert len(v) == 1, (k, v)
            second[k] = v.pop()
        back = [k for k in keys if first[k] == "v3:3" and second[k] == "v1:1"]
        assert back == []
        assert sum(v == "v3:3" for v in second.values()) >= sum(
            v == "v3:3" for v in first.values())
    finally:
        put_alias(ctl, "al", "live", {"3": 100})


def test_async_invocations_are_pinned_to_the_version_chosen_when_accepted(env: Env) -> None:
    n, ctl, _ = env
    put_alias(ctl, "al", "live", {"2": 50, "3": 50})
    try:
        ids = []
        for i in range(16):
            r = n.http.get("/al", params={"i": str(i)},
                           headers={"x-nimbus-invocation-type": "Event"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["invocationId"])
        pinned = {}
        for iid in ids:
            rec = ctl.get(f"/v1/invocations/{iid}").json()
            pinned[iid] = rec["attributes"]["nimbus.version"]
        assert set(pinned.values()) <= {"2", "3"}
    finally:
        # the split ends before the work has surely run: each still runs on
        # the version it was given (2 and 3 both stay named)
        put_alias(ctl, "al", "live", {"3": 100})
        put_alias(ctl, "al", "beta", {"1": 50, "2": 50})
    try:
        deadline = time.monotonic() + 15
        for iid in ids:
            while True:
                rec = ctl.get(f"/v1/invocations/{iid}").json()
                if rec["status"] in ("succeeded", "failed", "dead"):
                    break
                assert time.monotonic() < deadline, rec
                time.sleep(0.05)
            assert rec["status"] == "succeeded", rec
            v = pinned[iid]
            assert rec["result"]["body"] == f"v{v}:{v}", (rec, v)
        assert len(set(pinned.values())) == 2, pinned  # 16 fair draws: both
    finally:
        put_alias(ctl, "al", "beta", {"1": 100})


# ---------------------------------------------------------------------------
# rollbacks without a rollout


def test_rollback_without_a_rollout_twice_then_nothing_before_then_to(env: Env) -> None:
    n, ctl, _ = env
    p = run_cli(n, "rollback", "al")
    assert p.returncode == 0, p.stderr
    assert "version 2 serves all traffic (was 3)" in p.stdout, p.stdout
    assert {n.http.get("/al").text for _ in range(5)} == {"v2:2"}
    p = run_cli(n, "rollback", "al")  # again: the one before the new stable
    assert p.returncode == 0, p.stderr
    assert "version 1 serves all traffic (was 2)" in p.stdout, p.stdout
    assert aliases(ctl, "al")["live"] == {"1": 100}
    line = one_line_error(run_cli(n, "rollback", "al"))
    assert "no version before 1" in line, line
    line = one_line_error(run_cli(n, "rollback", "al", "--to", "9"))
    assert "no version 9" in line and "1, 2, 3" in line, line
    p = run_cli(n, "rollback", "al", "--to", "3")
    assert p.returncode == 0, p.stderr
    assert "version 3 serves all traffic (was 1)" in p.stdout, p.stdout
    # 3's instances may be gone: the command says the first requests may cold-start
    assert "cold-start" in p.stdout, p.stdout
    assert {n.http.get("/al").text for _ in range(5)} == {"v3:3"}
    assert [v["stable"] for v in ctl.get("/v1/functions/al/versions").json()["versions"]] == [
        True, False, False]
    # a rollback by hand is a platform line in the function's logs
    logs = run_cli(n, "logs", "al", "--tail", "20").stdout
    assert "rolled back al: version 3 serves all traffic (was 1)" in logs, logs


# ---------------------------------------------------------------------------
# strategies and rule refusals: nothing is deployed

REFUSALS = [
    (["--strategy", "canary:150%:5m"],
     "nimbus: error: --strategy 'canary:150%:5m': share '150%' must be within 1..99% for canary"),
    (["--strategy", "canary:10%:500ms"],
     "nimbus: error: --strategy 'canary:10%:500ms': wait '500ms' must be within 1s..7d "
     "(each step needs time to be measured)"),
    (["--rollback-on", "p98 > 1s"],
     "nimbus: error: --rollback-on: unknown metric 'p98' at column 1 (metrics: error_rate, "
     "throttles, timeouts, deaths, p50, p90, p95, p99, mean)"),
    (["--rollback-on", "error_rate > 2"],
     "nimbus: error: --rollback-on: error_rate is a rate within 0..1 (0..100%) but '2' at "
     "column 14 is more (write 2% or 0.02)"),
    (["--rollback-on", "p99 > 250"],
     "nimbus: error: --rollback-on: p99 is a latency: '250' at column 7 needs a unit "
     "(write 250ms or 1.5s, or 2x baseline)"),
    (["--strategy", "linear:60%:1m"], "60%"),
    (["--rollback-on", "(p99 > 1s or"], "column"),
]


@pytest.fixture(scope="module")
def refusals(env: Env) -> list[subprocess.CompletedProcess[str]]:
    n, _, root = env
    write(root, "ex", "v2-refused")
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda a: run_cli(n, "deploy", str(root / "ex"), *a[0]), REFUSALS))


@pytest.mark.parametrize("i", range(len(REFUSALS)),
                         ids=[" ".join(a) for a, _ in REFUSALS])
def test_a_wrong_strategy_or_rule_is_refused_in_one_line(
        refusals: list[subprocess.CompletedProcess[str]], i: int) -> None:
    args, want = REFUSALS[i]
    p = refusals[i]
    line = one_line_error(p)
    assert p.returncode == 2, (args, line)
    if want.startswith("nimbus: error:"):
        assert line == want
    else:
        assert want in line, line


def test_refused_deploys_made_no_version(env: Env,
                                         refusals: list[subprocess.CompletedProcess[str]],
                                         ) -> None:
    _, ctl, _ = env
    assert len(refusals) == len(REFUSALS)
    assert [v["version"] for v in ctl.get("/v1/functions/ex/versions").json()["versions"]] == [1]


@pytest.mark.parametrize(("strategy", "short", "code"), [
    ("CodeDeployDefault.LambdaCanary10Percent5Minutes", "canary:10%:5m", "v2"),
    ("Linear10PercentEvery1Minute", "linear:10%:1m", "v3"),
    ("canary:7:1500ms", "canary:7%:", "v4"),
])
def test_strategy_forms_start_a_rollout_shown_in_the_short_form(
        env: Env, refusals: Any, strategy: str, short: str, code: str) -> None:
    n, ctl, root = env
    write(root, "ex", code)
    p = run_cli(n, "deploy", str(root / "ex"), "--strategy", strategy)
    assert p.returncode == 0, p.stderr
    try:
        assert "rolling out over version 1 with " + short in p.stdout, p.stdout
        got = rollout(ctl, "ex")
        assert got["state"] == "running" and got["strategy"].startswith(short), got
        if short == "canary:7%:":
            assert got["steps"][0]["share"] == 7 and got["steps"][0]["wait_s"] == 1.5, got
            # no traffic: the step's time runs out and it holds for requests
            deadline = time.monotonic() + 5
            while "time is over" not in (got.get("waiting") or ""):
                assert time.monotonic() < deadline, got
                time.sleep(0.2)
                got = rollout(ctl, "ex")
            assert got["state"] == "running" and got["step"] == 0, got
            assert got["waiting"].startswith("too few requests: 0 of 20 requests"), got
        if short.startswith("linear"):
            assert [s["share"] for s in got["steps"]] == [10 * i for i in range(1, 11)]
            assert all(s["wait_s"] == 60.0 for s in got["steps"][:-1])
    finally:
        r = ctl.post("/v1/functions/ex/rollback", json={})
        assert r.status_code == 200, r.text
    assert rollout(ctl, "ex")["state"] != "running"
    assert aliases(ctl, "ex")["live"] == {"1": 100}


def test_a_hold_is_one_decision_while_the_wait_stays_the_same(env: Env) -> None:
    n, ctl, root = env
    write(root, "ex", "v6-hold")
    p = run_cli(n, "deploy", str(root / "ex"), "--strategy", "canary:10%:1m")
    assert p.returncode == 0, p.stderr
    try:
        time.sleep(1.5)  # no traffic: it waits for requests all along
        got = rollout(ctl, "ex")
        assert got["state"] == "running" and got["waiting"].startswith("too few requests")
        logs = run_cli(n, "logs", "ex").stdout
        mine = f"rollout {got['from']} -> {got['to']} (canary:10%:1m): holding: too few requests"
        holds = [ln for ln in logs.splitlines() if mine in ln]
        assert len(holds) == 1, holds
    finally:
        ctl.post("/v1/functions/ex/rollback", json={})


def test_a_step_of_seven_days_written_7d_is_accepted(env: Env, tmp_path: Path) -> None:
    n, _, _ = env
    app = write(tmp_path, "sd", "v1", "name: sd\nfunctions:\n  sd:\n    handler: h.h\n")
    p = run_cli(n, "deploy", str(app), "--strategy", "canary:10%:7d")
    assert p.returncode == 0, p.stderr  # a new function: live at once, whatever the strategy
    assert "deployed sd/sd: version 1" in p.stdout, p.stdout


def test_all_at_once_by_codedeploy_name_goes_live_at_once(env: Env) -> None:
    n, ctl, root = env
    write(root, "ex", "v5")
    p = run_cli(n, "deploy", str(root / "ex"), "--strategy", "AllAtOnce")
    assert p.returncode == 0, p.stderr
    assert "rolling out" not in p.stdout, p.stdout
    live = aliases(ctl, "ex")["live"]
    assert list(live.values()) == [100] and live != {"1": 100}, live


def test_changing_only_the_rollout_block_rolls_out_under_the_new_settings(env: Env) -> None:
    n, ctl, root = env
    before = ctl.get("/v1/functions/ex/versions").json()["versions"]
    (root / "ex" / "app.yaml").write_text(
        MANIFESTS["ex"] + "    rollout: {strategy: 'canary:5%:1m', min_requests: 7}\n")
    p = run_cli(n, "deploy", str(root / "ex"))
    try:
        assert p.returncode == 0, p.stderr
        assert "rolling out over version" in p.stdout and "canary:5%:1m" in p.stdout, p.stdout
        after = ctl.get("/v1/functions/ex/versions").json()["versions"]
        assert max(v["version"] for v in after) == max(v["version"] for v in before) + 1
        got = rollout(ctl, "ex")
        assert (got["state"], got["strategy"], got["min_requests"]) == (
            "running", "canary:5%:1m", 7), got
    finally:
        if rollout(ctl, "ex")["state"] == "running":
            ctl.post("/v1/functions/ex/rollback", json={})


# ---------------------------------------------------------------------------
# manifest rollout: block errors

BAD_BLOCKS = [
    ("rollout:\n  strategy: canary:0%:5m\n", 6,
     "functions.f.rollout.strategy: strategy 'canary:0%:5m': share '0%' must be within "
     "1..99% for canary"),
    ("rollout:\n  rollback_on: p98 > 1s\n", 6, "functions.f.rollout.rollback_on: "),
    ("rollout:\n  stratgy: all-at-once\n", 6, "functions.f.rollout.stratgy: "),
    ("rollout:\n  on_region_failure: maybe\n", 6, "functions.f.rollout.on_region_failure: "),
    ("rollout: canary:10%:5m\n", 5, "functions.f.rollout: "),
]


@pytest.fixture(scope="module")
def block_errors(env: Env, tmp_path_factory: pytest.TempPathFactory,
                 ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each bad block deployed once, three at a time."""
    n, _, _ = env
    root = tmp_path_factory.mktemp("bad-blocks")
    apps = []
    for i, (block, _, _) in enumerate(BAD_BLOCKS):
        app = root / f"bad{i}"
        app.mkdir()
        indented = "".join("    " + ln + "\n" for ln in block.splitlines())
        (app / "app.yaml").write_text(
            "name: bad\nfunctions:\n  f:\n    handler: h.h\n" + indented)
        (app / "h.py").write_text(HANDLER.format(code="v1"))
        apps.append(app)
    with ThreadPoolExecutor(3) as pool:
        done = list(pool.map(lambda a: run_cli(n, "deploy", str(a)), apps))
    return {b[0]: p for b, p in zip(BAD_BLOCKS, done, strict=True)}


@pytest.mark.parametrize(("block", "line", "want"), BAD_BLOCKS,
                         ids=[b[2].split(":")[0] + str(i) for i, b in enumerate(BAD_BLOCKS)])
def test_manifest_rollout_block_errors_name_file_line_field(
        block_errors: dict[str, subprocess.CompletedProcess[str]], block: str, line: int,
        want: str) -> None:
    p = block_errors[block]
    got = one_line_error(p)
    assert p.returncode == 2, got
    assert f"app.yaml:{line}: {want}" in got, got
    if "stratgy" in want:
        assert "did you mean 'strategy'" in got, got


def test_app_level_rollout_block_error_names_its_field(env: Env, tmp_path: Path) -> None:
    n, _, _ = env
    app = tmp_path / "bad"
    app.mkdir()
    (app / "app.yaml").write_text(
        "name: bad\nrollout:\n  strategy: linear:60%:1m\nfunctions:\n  f:\n    handler: h.h\n")
    (app / "h.py").write_text(HANDLER.format(code="v1"))
    got = one_line_error(run_cli(n, "deploy", str(app)))
    assert "app.yaml:3: rollout.strategy: " in got and "60%" in got, got


# ---------------------------------------------------------------------------
# a rollout from the manifest; refusals while it runs; rollback by hand twice


def test_manifest_rollout_runs_locks_live_refuses_deploys_and_rolls_back_twice(
        env: Env) -> None:
    n, ctl, root = env
    write(root, "mr", "v3")
    p = run_cli(n, "deploy", str(root / "mr"))  # no flag: the function's block wins
    assert p.returncode == 0, p.stderr
    assert "deployed mr/mr: version 3: rolling out over version 2 with canary:20%:30s" \
        in p.stdout, p.stdout
    got = rollout(ctl, "mr")
    assert (got["state"], got["from"], got["to"], got["min_requests"]) == (
        "running", 2, 3, 5), got
    assert got["rollback_on"] == ("error_rate > 2% or (p99 > 2x baseline and p99 > 100ms) "
                                  "or throttles > 1%")
    assert aliases(ctl, "mr")["live"] == {"2": 80, "3": 20}
    text = run_cli(n, "rollout", "status", "mr").stdout
    assert text.splitlines()[0] == \
        "rollout of mr (mr): version 2 -> 3 with canary:20%:30s: running", text
    assert "at least 5 requests a step" in text and "step 1 of 2" in text, text

    deadline = time.monotonic() + 3  # the gauges follow the runner's next turn
    while sample(m := metrics(ctl), "nimbus_rollout_share", function="mr", version="3") is None:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert sample(m, "nimbus_rollout_share", function="mr", version="3") == 20.0, m
    assert sample(m, "nimbus_rollouts_running") == 1.0

    # sticky clients during the rollout
    for i in range(10):
        seen = {n.http.get("/mr", headers={"x-nimbus-sticky": f"s{i}"}).text for _ in range(3)}
        assert len(seen) == 1, seen

    # a deploy that changes mr is refused; the same code again is fine
    write(root, "mr", "v4")
    line = one_line_error(run_cli(n, "deploy", str(root / "mr")))
    assert "a rollout of mr is in progress (2 -> 3, step 1 of 2): wait, or nimbus rollback mr" \
        in line, line
    write(root, "mr", "v3")
    cmds = [("deploy", str(root / "mr")),
            ("alias", "set", "mr", "live", "3"),  # live is the rollout's
            ("alias", "set", "mr", "beta", "3"),  # another alias is fine
            ("rollback", "mr", "--to", "1")]  # --to is not for a running rollout
    with ThreadPoolExecutor(2) as pool:
        same, live, beta, to = pool.map(lambda c: run_cli(n, *c), cmds)
    assert same.returncode == 0 and "version 3 (unchanged)" in same.stdout, same
    assert "nimbus rollback mr" in one_line_error(live)
    assert beta.returncode == 0, beta.stderr
    assert "leave out --to" in one_line_error(to)
    assert rollout(ctl, "mr")["state"] == "running"
    assert aliases(ctl, "mr")["live"] == {"2": 80, "3": 20}

    p = run_cli(n, "rollback", "mr")
    assert p.returncode == 0, p.stderr
    assert "version 2 serves all traffic" in p.stdout, p.stdout
    assert "cold-start" not in p.stdout, p.stdout  # kept warm
    assert aliases(ctl, "mr")["live"] == {"2": 100}
    assert {n.http.get("/mr").text for _ in range(10)} == {"v2:2"}
    got = rollout(ctl, "mr")
    assert got["state"] != "running" and "rolled back by hand" in got["reason"], got
    deadline = time.monotonic() + 3  # the gauge follows the runner's next turn
    while sample(metrics(ctl), "nimbus_rollouts_running") != 0.0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert sample(metrics(ctl), "nimbus_rollout_share", function="mr") is None

    # again: nothing moves (a retried command never goes two versions back) ...
    p = run_cli(n, "rollback", "mr")
    assert p.returncode == 0, p.stderr
    assert "mr already serves version 2: its rollout to version 3 was rolled back" \
        in p.stdout, p.stdout
    assert aliases(ctl, "mr")["live"] == {"2": 100}
    # ... unless told where: live moves to that version
    p = run_cli(n, "rollback", "mr", "--to", "1")
    assert p.returncode == 0, p.stderr
    assert "version 1 serves all traffic (was 2)" in p.stdout, p.stdout
    assert aliases(ctl, "mr")["live"] == {"1": 100}
    assert rollout(ctl, "mr")["state"] == got["state"]  # the old record is left alone


# ---------------------------------------------------------------------------
# a failing canary rolls back by itself; a healthy linear one promotes


def test_failing_canary_rolls_back_with_its_reason_everywhere(env: Env) -> None:
    n, ctl, root = env
    write(root, "cb", "bad2")
    p = run_cli(n, "deploy", str(root / "cb"), "--strategy", "canary:20%:30s",
                "--min-requests", "5", "--rollback-on", "error_rate > 2%")
    assert p.returncode == 0, p.stderr
    assert "rolling out over version 1 with canary:20%:30s" in p.stdout, p.stdout
    t0 = time.monotonic()
    ok, failed = drive(n, "/cb", lambda: rollout(ctl, "cb")["state"] != "running", timeout=10)
    took = time.monotonic() - t0
    total = sum(ok.values()) + failed
    # the old version answered everything that did not fail; the canary
    # failed at most its share of the traffic plus what one evaluation lets through
    assert set(ok) == {"v1:1"}, ok
    assert 5 <= failed <= 0.2 * total + 15, (failed, total)
    assert took < 6, took  # well before the 30 s step is over
    got = rollout(ctl, "cb")
    assert got["state"] == "rolled_back", got
    assert re.fullmatch(r"error_rate 100\.0% > 2% over \d+ requests", got["reason"]), got
    assert aliases(ctl, "cb")["live"] == {"1": 100}
    # afterwards: the old version only, no errors
    assert collections.Counter(n.http.get("/cb").text for _ in range(30)) == {"v1:1": 30}

    text = run_cli(n, "rollout", "status", "cb").stdout
    assert text.splitlines()[0] == \
        "rollout of cb (cb): version 1 -> 2 with canary:20%:30s: rolled back", text
    assert "  rule: error_rate > 2%; at least 5 requests a step" in text, text
    assert f"  rolled back: {got['reason']}" in text, text
    assert re.search(r"step 1 \(20%\): rollback: error_rate 100\.0% > 2%", text), text
    assert re.search(r"canary +\d+ req, 100\.0% errors", text), text
    assert re.search(r"baseline +\d+ req, 0\.0% errors", text), text
    js = run_cli(n, "rollout", "status", "cb", "--json")
    assert js.returncode == 0
    doc = json.loads(js.stdout)
    assert doc["state"] == "rolled_back" and doc["reason"] == got["reason"]
    last = doc["history"][-1]
    assert last["action"] == "rollback" and last["reason"].startswith(got["reason"]), last

    logs = run_cli(n, "logs", "cb").stdout
    assert "rollout 1 -> 2 (canary:20%:30s): rolled back: error_rate 100.0% > 2%" in logs, logs
    m = metrics(ctl)
    assert sample(m, "nimbus_rollout_decisions_total", function="cb", action="rollback") == 1.0
    assert sample(m, "nimbus_rollout_decisions_total", function="cb", action="promote") is None
    assert sample(m, "nimbus_rollout_share", function="cb") is None  # no longer running
    vs = ctl.get("/v1/functions/cb/versions").json()["versions"]
    assert [(v["version"], v["stable"], v["shares"]) for v in vs] == [
        (2, False, {}), (1, True, {"live": 100})]


def test_linear_rollout_promotes_through_every_step(env: Env) -> None:
    n, ctl, root = env
    write(root, "ln", "v2")
    p = run_cli(n, "deploy", str(root / "ln"), "--strategy", "linear:40%:1s",
                "--min-requests", "5", "--rollback-on", "error_rate > 2%")
    assert p.returncode == 0, p.stderr
    assert "rolling out over version 1 with linear:40%:1s" in p.stdout, p.stdout
    ok, failed = drive(n, "/ln", lambda: rollout(ctl, "ln")["state"] != "running", timeout=15)
    assert failed == 0 and set(ok) == {"v1:1", "v2:2"}, (ok, failed)
    got = rollout(ctl, "ln")
    assert got["state"] == "promoted", got
    assert [s["share"] for s in got["steps"]] == [40, 80, 100]
    # each promotion is recorded on the step it leaves
    acts = [(h["action"], h["step"]) for h in got["history"] if h["action"] != "hold"]
    assert acts == [("start", 0), ("promote", 0), ("promote", 1)], got["history"]
    assert aliases(ctl, "ln")["live"] == {"2": 100}
    assert {n.http.get("/ln").text for _ in range(20)} == {"v2:2"}
    m = metrics(ctl)
    assert sample(m, "nimbus_rollout_decisions_total", function="ln", action="promote") == 2.0
    assert sample(m, "nimbus_rollout_decisions_total", function="ln", action="rollback") is None
    text = run_cli(n, "rollout", "status", "ln").stdout
    assert text.splitlines()[0].endswith("with linear:40%:1s: promoted"), text
    assert "healthy for" in text, text
    vs = ctl.get("/v1/functions/ln/versions").json()["versions"]
    assert [(v["version"], v["stable"], v["shares"]) for v in vs] == [
        (2, True, {"live": 100}), (1, False, {})]


def test_a_function_with_real_traffic_gets_the_default_canary(env: Env) -> None:
    n, ctl, root = env
    for _ in range(130):
        assert n.http.get("/al").text == "v3:3"
    time.sleep(1.2)  # the runner samples every second in nimbus up
    write(root, "al", "v4")
    p = run_cli(n, "deploy", str(root / "al"))
    try:
        assert p.returncode == 0, p.stderr
        assert ("deployed al/al: version 4: rolling out over version 3 with canary:10%:1m "
                "(the default: version 3 takes real traffic; --strategy all-at-once to skip); "
                "nimbus rollout status al") in p.stdout, p.stdout
        assert rollout(ctl, "al")["state"] == "running"
    finally:
        ctl.post("/v1/functions/al/rollback", json={})
