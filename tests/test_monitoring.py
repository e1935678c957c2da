"""Monitoring as an operator sets it up: the rules pass promtool (and their
unit tests fire and spare every alert), the rules and the dashboard name
only families nimbus exports, ``nimbus metrics targets`` lists a nimbus up
and a cluster, a real Prometheus scrapes through that file, and the edge's
``/_nimbus/metrics`` counts requests and a failover exactly.

One world per module: two regions (``nimbus up --region eu|us``) and an
edge in front of them; the last test kills eu."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

import nimbus.cli.metrics  # noqa: F401 - registers nimbus metrics
import nimbus.edge.metrics
import nimbus.observe.metrics
from nimbus.cli.main import cli
from tests.edgeworld import EdgeProc, wait_for
from tests.multiregion import RegionProc, free_port, write_app, write_cluster_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "docs" / "monitoring"
RULES = MONITORING / "nimbus-rules.yml"
DASHBOARD = MONITORING / "grafana-nimbus.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

APP = """\
runtime: python3.8
handlers:
  - {function: hello, handler: shop.hello, event: http, method: get, path: /hello}
"""
CODE = """\
import os

def hello(event, context):
    return {"region": os.environ["AWS_REGION"]}
"""


# -- the rules and the dashboard ---------------------------------------------------------

def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_rules_pass_promtool_and_their_unit_tests() -> None:
    check = promtool("check", "rules", RULES.name)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = promtool("test", "rules", "nimbus-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a unit test that expects it to fire
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    fired = {t["alertname"] for case in
             yaml.safe_load((MONITORING / "nimbus-rules.test.yml").read_text())["tests"]
             for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts == fired


KINDS = {"Counter": "counter", "CounterMetricFamily": "counter", "Gauge": "gauge",
         "GaugeMetricFamily": "gauge", "Histogram": "histogram",
         "HistogramMetricFamily": "histogram"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
TARGET_LABELS = {"instance", "job", "region", "role"}   # what a scrape adds


def exported() -> dict[str, set[str]]:
    """Every series name nimbus exports (the families declared in
    nimbus.observe.metrics and nimbus.edge.metrics) -> its labels."""
    names: dict[str, set[str]] = {}
    for module in (nimbus.observe.metrics, nimbus.edge.metrics):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        lists = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in KINDS and node.args
                    and isinstance(node.args[0], ast.Constant)):
                continue
            kind = KINDS[node.func.id]
            labels_node = next((k.value for k in node.keywords if k.arg == "labels"),
                               node.args[2] if len(node.args) > 2 else None)
            labels = strings(labels_node, lists)
            base = str(node.args[0].value)
            for suffix in SUFFIXES[kind]:
                names[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def strings(node: ast.AST | None, lists: dict[str, ast.expr]) -> set[str]:
    """The strings of a list of labels (``[*names, "state"]`` too, ``names``
    resolved through the module's assignments)."""
    if isinstance(node, ast.Name):
        return strings(lists.get(node.id), lists)
    if isinstance(node, ast.Starred):
        return strings(node.value, lists)
    if isinstance(node, ast.List | ast.Tuple):
        return set().union(*(strings(e, lists) for e in node.elts))
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    return set()


def dashboard_exprs() -> list[str]:
    dash = orjson.loads(DASHBOARD.read_bytes())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


# a name not followed by "(" (that is a function or an aggregation), with its matchers
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()\s*(\{[^}]*\})?")
NOT_SERIES = {"by", "on", "and", "or", "unless", "without", "ignoring", "group_left",
              "group_right", "bool", "offset"}


def series_in(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names matched) of every selector in ``expr``."""
    expr = re.sub(r'"[^"]*"', '""', expr)           # no names inside strings
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)           # ranges
    out = []
    for m in SELECTOR.finditer(expr):
        name, matchers = m.group(1), m.group(2) or ""
        if name in NOT_SERIES or name.startswith("$") or re.fullmatch(r"[0-9.e]+", name):
            continue
        out.append((name, set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))))
    return out


def test_rules_and_dashboard_name_only_exported_series_and_labels() -> None:
    names = exported()
    assert {"nimbus_invocations_total", "nimbus_edge_region_up",
            "nimbus_edge_detection_seconds_bucket", "nimbus_instances_desired"} <= set(names)
    rules = yaml.safe_load(RULES.read_text())["groups"]
    recorded = {r["record"] for g in rules for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in rules for r in g["rules"]] + dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        for name, labels in series_in(expr):
            if name in recorded or name == "up":
                continue
            assert name in names, f"{name} (in {expr!r}) is not a series nimbus exports"
            unknown = labels - names[name] - TARGET_LABELS
            assert not unknown, f"{name} has no label {unknown} (in {expr!r})"
            used.add(name)
    # the rules and the dashboard between them look at every family
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    assert {family(n) for n in names} - {family(n) for n in used} == set()


def test_dashboard_is_importable_and_its_queries_parse(tmp_path: Path) -> None:
    dash = orjson.loads(DASHBOARD.read_bytes())
    assert dash["schemaVersion"] >= 30 and dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    # Grafana's own variables replaced as Grafana would, every query is valid PromQL
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$region": ".*", "$function": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "dashboard", "rules": rules}]}))
    check = promtool("check", "rules", "dash.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


# -- the world: two regions and an edge ----------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("monitoring")
    app = write_app(root / "shop", APP, "shop", CODE)
    # Prometheus starts first (it takes a while), with no targets yet: a test
    # writes them with nimbus metrics targets, and it picks them up
    targets = root / "sd" / "nimbus.json"
    targets.parent.mkdir()
    targets.write_text("[]\n")
    prom = Prometheus(root, prometheus_config(root, targets))
    try:
        with two_regions(root, app) as (eu, us):
            cluster = write_cluster_file(root, [eu, us])
            edge = EdgeProc(cluster.path, root / "edge.out", 2.0)
            try:
                wait_for(lambda: all(r["up"] for r in edge.regions()["regions"].values()), 10,
                         "both regions up")
                wait_for(lambda: "shop" in edge.regions()["apps"], 10, "the apps table")
                yield {"eu": eu, "us": us, "edge": edge, "root": root, "cluster": cluster.path,
                       "targets": targets, "prometheus": prom}
            finally:
                edge.stop()
    finally:
        prom.stop()


@contextmanager
def two_regions(root: Path, app: Path) -> Iterator[tuple[RegionProc, RegionProc]]:
    """eu on 127.0.0.2 and us on 127.0.0.3, started side by side."""
    eu, us = RegionProc("eu", "127.0.0.2", root, app), RegionProc("us", "127.0.0.3", root, app)
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(r.start) for r in (eu, us)]
    try:
        for started in starts:
            started.result()
        yield eu, us
    finally:
        with ThreadPoolExecutor(2) as pool:
            stops = [pool.submit(r.stop) for r in (eu, us)]
        for stopped in stops:
            stopped.exception()       # each stopped whatever happened to the other


def nimbus_cli(*args: str) -> Result:
    """The nimbus command, run in this process (saves a Python start per call)."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                      float]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def edge_metrics(edge: EdgeProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return scrape(edge.url + "/_nimbus/metrics")


def test_targets_of_a_nimbus_up(world: dict[str, Any]) -> None:
    eu: RegionProc = world["eu"]
    out = nimbus_cli("metrics", "targets", "--state-dir", str(eu.state))
    assert out.exit_code == 0, out.stderr
    assert orjson.loads(out.stdout) == [
        {"targets": [f"127.0.0.2:{eu.control_port}"], "labels": {"role": "up", "region": "eu"}}]
    lister = nimbus.cli.metrics.TargetLister(None, eu.state, None, None, False)
    world["up_lister"], world["up_listed"] = lister, lister.render([])
    assert world["up_listed"].decode() == out.stdout


def test_targets_of_a_cluster_and_its_edge(world: dict[str, Any]) -> None:
    eu, us, edge = world["eu"], world["us"], world["edge"]
    out_file = world["targets"]
    out = nimbus_cli("metrics", "targets", "--cluster", str(world["cluster"]),
                     "--edge", edge.url, "--out", str(out_file))
    assert out.exit_code == 0, out.stderr
    assert out.stdout == ""
    assert out_file.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out_file.parent.iterdir()] == ["nimbus.json"]  # no temp file left
    assert orjson.loads(out_file.read_bytes()) == [
        {"targets": [edge.url.removeprefix("http://")],
         "labels": {"role": "edge", "__metrics_path__": "/_nimbus/metrics"}},
        {"targets": [f"127.0.0.2:{eu.control_port}"], "labels": {"role": "up", "region": "eu"}},
        {"targets": [f"127.0.0.3:{us.control_port}"], "labels": {"role": "up", "region": "us"}},
    ]
    world["targets_written"] = True
    # what --watch runs every N seconds: it remembers each region's last list
    lister = nimbus.cli.metrics.TargetLister(world["cluster"], None, None, None, False)
    world["lister"], world["listed"] = lister, lister.render([])
    bad = nimbus_cli("metrics", "targets", "--cluster", str(world["cluster"]), "--watch", "1")
    assert bad.exit_code == 2 and "--watch needs --out" in bad.stderr, bad.stderr


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 500ms
  scrape_timeout: 500ms
scrape_configs:
{jobs}
"""
JOB = """\
  - job_name: {name}
    honor_labels: true
{auth}    file_sd_configs:
      - files: [{targets}]
        refresh_interval: 1s
    relabel_configs:
      - source_labels: [{label}]
        regex: {value}
        action: keep
"""


def prometheus_config(root: Path, targets: Path) -> str:
    """A job per region (its token) and one for the edges, all from one
    file_sd file, as docs/monitoring.md sets it up."""
    auth = "    authorization:\n      credentials_file: {}\n"
    jobs = [JOB.format(name=f"nimbus-{r}", targets=targets, label="region", value=r,
                       auth=auth.format(root / f"{r}.token")) for r in ("eu", "us")]
    jobs.append(JOB.format(name="nimbus-edge", targets=targets, label="role", value="edge",
                           auth=""))
    return PROMETHEUS_CONFIG.format(jobs="".join(jobs))


class Prometheus:
    def __init__(self, root: Path, config: str) -> None:
        (root / "prometheus.yml").write_text(config)
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "prometheus.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def values(self, promql: str, by: str) -> dict[str, float]:
        try:
            return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(promql)}
        except httpx.HTTPError:
            return {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def test_prometheus_scrapes_every_process_through_the_targets_file(
        world: dict[str, Any]) -> None:
    if not world.get("targets_written"):
        pytest.skip("needs the targets file of test_targets_of_a_cluster_and_its_edge")
    prom: Prometheus = world["prometheus"]
    us, edge = world["us"], world["edge"]
    with httpx.Client(timeout=10) as c:
        for _ in range(3):
            assert c.get(us.gateway_url + "/hello").status_code == 200
        for _ in range(5):
            r = c.get(edge.url + "/hello")
            assert r.status_code == 200 and r.headers["x-nimbus-region"] == "eu"
    wait_for(lambda: prom.values("up", "job") == {"nimbus-eu": 1.0, "nimbus-us": 1.0,
                                                   "nimbus-edge": 1.0}, 30,
             "Prometheus to scrape the two regions and the edge")
    want = {"eu": 5.0, "us": 3.0}
    wait_for(lambda: prom.values(
        'sum by (region) (nimbus_invocations_total{function="hello",outcome="success"})',
        "region") == want, 15, f"Prometheus to count the invocations {want}")
    # the target's labels reach every series, the process's own kept (honor_labels)
    roles = prom.values('count by (role) (process_cpu_seconds_total)', "role")
    assert roles == {"up": 2.0, "edge": 1.0}
    wait_for(lambda: prom.values('sum by (region) (nimbus_edge_requests_total{code="200"})',
                                 "region") == {"eu": 5.0}, 15,
             "Prometheus to read the edge's count")
    out = (world["root"] / "prometheus.out").read_text(errors="replace")
    assert "level=error" not in out, out[-3000:]


def test_up_metrics_need_the_token(world: dict[str, Any]) -> None:
    eu: RegionProc = world["eu"]
    assert httpx.get(eu.control_url + "/metrics", timeout=5).status_code == 401
    assert ("nimbus_invocations_total", (("function", "hello"), ("outcome", "success"),
                                         ("region", "eu"), ("version", "1"))) in scrape(
        eu.control_url + "/metrics", eu.token)


def test_edge_counts_requests_and_a_failover_exactly(world: dict[str, Any]) -> None:
    eu, edge = world["eu"], world["edge"]
    before = edge_metrics(edge)

    def delta(now: dict[Any, float], name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return now.get(key, 0.0) - before.get(key, 0.0)

    with httpx.Client(base_url=edge.url, timeout=10) as c:
        for _ in range(20):
            assert c.get("/hello").status_code == 200
        assert c.get("/_nimbus/regions").status_code == 200       # the edge's own: not counted
        now = edge_metrics(edge)
        assert delta(now, "nimbus_edge_requests_total", region="eu", code="200") == 20
        assert delta(now, "nimbus_edge_requests_total", region="us", code="200") == 0
        assert now[("nimbus_edge_region_up", (("region", "eu"),))] == 1.0

        # eu stops answering: the request in flight there is moved to us once
        # the probes find eu down (a request waits for that, so exactly one
        # is caught), and the rest go straight to us
        eu.pause()
        answers: Counter[str] = Counter()
        moved: Counter[str] = Counter()
        for _ in range(10):
            r = c.get("/hello")
            assert r.status_code == 200, r.text
            answers[r.headers["x-nimbus-region"]] += 1
            for failed in filter(None, r.headers.get("x-nimbus-retried-from", "").split(",")):
                moved[failed] += 1
    eu.kill()
    assert answers == {"us": 10}
    assert moved == {"eu": 1}
    now = edge_metrics(edge)
    assert delta(now, "nimbus_edge_requests_total", region="us", code="200") == 10
    assert delta(now, "nimbus_edge_requests_total", region="eu", code="200") == 20
    assert delta(now, "nimbus_edge_failovers_total", region="eu") == 1
    assert delta(now, "nimbus_edge_retries_total", region="eu") == 1
    assert delta(now, "nimbus_edge_failovers_total", region="us") == 0
    assert now[("nimbus_edge_region_up", (("region", "eu"),))] == 0.0
    assert now[("nimbus_edge_region_up", (("region", "us"),))] == 1.0
    assert delta(now, "nimbus_edge_detection_seconds_count", region="eu") == 1
    assert delta(now, "nimbus_edge_detection_seconds_count", region="us") == 0
    # a hung region is down on its second missed probe: timed from the first
    assert delta(now, "nimbus_edge_detection_seconds_sum", region="eu") > 0


def test_a_watched_region_that_stops_answering_keeps_its_targets(
        world: dict[str, Any]) -> None:
    eu: RegionProc = world["eu"]
    if eu.running():
        pytest.skip("runs after the test that kills eu")
    # eu is gone: the watchers keep what they knew (Prometheus reports it down) ...
    assert world["lister"].render([]) == world["listed"]
    assert world["up_lister"].render([]) == world["up_listed"]
    # ... where a fresh look can only name its control URL
    fresh = nimbus_cli("metrics", "targets", "--cluster", str(world["cluster"]))
    assert fresh.exit_code == 0
    assert {"targets": [f"127.0.0.2:{eu.control_port}"],
            "labels": {"role": "controller", "region": "eu"}} in orjson.loads(fresh.stdout)
    assert f"nimbus: warning: region eu: cannot reach {eu.control_url}" in fresh.stderr
