"""Region names, the manifest's ``regions:``, the cluster file, and what a
region tells the world about its apps (``GET /v1/apps``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nimbus.control.bundle import make_bundle
from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import RegionsSpec
from nimbus.multiregion.clusterfile import load_cluster
from tests.multiregion import RegionProc, write_app, write_cluster_file

APP = """\
runtime: python3.8
regions: {names: [eu, us], policy: failover}
handlers:
  - {function: hello, event: http, method: get}
  - {function: item, event: http, method: get, path: "/items/{id}", handler: hello.item}
"""
CODE = """\
import os
def hello(event, context):
    return {"arn": context.invoked_function_arn, "aws_region": os.environ["AWS_REGION"]}
item = hello
"""


def _app(folder: Path, manifest: str = APP) -> Path:
    return write_app(folder, manifest, "hello", CODE)


# ------------------------------------------------------------ regions: block


@pytest.mark.parametrize("text,names,policy,weights", [
    ("regions: [eu, us]", ("eu", "us"), "failover", {}),
    ("regions: {names: [us, eu], policy: latency}", ("us", "eu"), "latency", {}),
    ("regions: {policy: weighted, weights: {eu: 80, us: 20}}", ("eu", "us"), "weighted",
     {"eu": 80, "us": 20}),
    ("regions: {policy: failover}", None, "failover", {}),
])
def test_manifest_regions_forms(tmp_path: Path, text: str, names: tuple[str, ...] | None,
                                policy: str, weights: dict[str, int]) -> None:
    app = _app(tmp_path / "a", APP.replace("regions: {names: [eu, us], policy: failover}", text))
    spec = load_app(app).regions
    assert spec == RegionsSpec(names=names, policy=policy, weights=weights)
    assert RegionsSpec.from_dict(spec.to_dict()) == spec


def test_an_app_without_regions_runs_everywhere(tmp_path: Path) -> None:
    app = _app(tmp_path / "a", APP.replace("regions: {names: [eu, us], policy: failover}\n", ""))
    assert load_app(app).regions is None


@pytest.mark.parametrize("text,needle", [
    ("regions: {names: [eu, us], policy: nearest}", "policy"),
    ("regions: {names: [eu], policy: failover, weights: {eu: 1}}", "weights only applies"),
    ("regions: {names: [eu], policy: weighted, weights: {us: 10}}", "not in regions.names"),
    ("regions: {policy: weighted}", "needs a weight"),
    ("regions: [eu, eu]", "twice"),
    ("regions: [\"e u\"]", "region names"),
    ("regions: 5", "expected a list of region names"),
    ("regions: {names: [eu], colour: blue}", "unknown field"),
])
def test_bad_regions_blocks_name_file_line_and_problem(tmp_path: Path, text: str,
                                                       needle: str) -> None:
    app = _app(tmp_path / "a", APP.replace("regions: {names: [eu, us], policy: failover}", text))
    with pytest.raises(ManifestError) as info:
        load_app(app)
    message = str(info.value)
    assert "app.yaml:2: regions" in message and needle in message, message


# ---------------------------------------------------------------- cluster file


def _cluster(tmp_path: Path, text: str, token: str | None = "s3cret-token") -> Path:
    if token is not None:
        (tmp_path / "eu.token").write_text(token + "\n")
        (tmp_path / "us.token").write_text("other\n")
    path = tmp_path / "nimbus.cluster.yaml"
    path.write_text(text)
    return path


GOOD = """\
regions:
  us:
    control: http://127.0.0.3:8081
    token_file: us.token
    gateways: [http://127.0.0.3:8080]
  eu:
    control: http://127.0.0.2:8081/
    token_env: NIMBUS_TEST_EU_TOKEN
    gateways: [http://127.0.0.2:8080, "http://127.0.0.2:8082"]
"""


def test_cluster_file_keeps_order_and_resolves_tokens(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIMBUS_TEST_EU_TOKEN", "from-the-env")
    cluster = load_cluster(_cluster(tmp_path, GOOD))
    assert cluster.names == ("us", "eu")
    assert cluster.regions["us"].token == "other"
    assert cluster.regions["eu"].token == "from-the-env"
    assert cluster.regions["eu"].control == "http://127.0.0.2:8081"
    assert cluster.regions["eu"].gateways == ("http://127.0.0.2:8080", "http://127.0.0.2:8082")
    assert cluster.region_of_gateway("http://127.0.0.2:8082") == "eu"


@pytest.mark.parametrize("edit,line,needle", [
    (("token_file: us.token", "token_file: missing.token"), 4, "cannot read"),
    (("http://127.0.0.3:8081", "ftp://x"), 3, "expected a URL"),
    (("http://127.0.0.3:8081", "http://h:port"), 3, "expected a URL"),
    (("    gateways: [http://127.0.0.3:8080]", "    gateways: []"), 5, "non-empty list"),
    (("    gateways: [http://127.0.0.3:8080]", "    gateways: [http://127.0.0.2:8080]"), 9,
     "also a gateway of region us"),
    (("token_file: us.token", "token_file: us.token\n    colour: red"), 5, "unknown key colour"),
    (("  us:", "  \"u s\":"), 2, "region name"),
    (("token_env: NIMBUS_TEST_EU_TOKEN", "token_env: NIMBUS_TEST_UNSET_VAR"), 8, "not set"),
])
def test_cluster_file_errors_name_file_line_and_field(tmp_path: Path, edit: tuple[str, str],
                                                      line: int, needle: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIMBUS_TEST_EU_TOKEN", "from-the-env")
    monkeypatch.delenv("NIMBUS_TEST_UNSET_VAR", raising=False)
    path = _cluster(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ManifestError) as info:
        load_cluster(path)
    message = str(info.value)
    assert f"nimbus.cluster.yaml:{line}:" in message and needle in message, message


def test_a_missing_cluster_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such cluster file"):
        load_cluster(tmp_path / "nope.yaml")


# ------------------------------------------------------------ a named region


@pytest.fixture(scope="module")
def eu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegionProc]:
    root = tmp_path_factory.mktemp("eu")
    region = RegionProc("eu", "127.0.0.2", root, _app(root / "app")).start()
    try:
        yield region
    finally:
        region.stop()


def test_the_region_name_reaches_context_env_and_health(eu: RegionProc) -> None:
    body = eu.get("/hello").json()
    assert body["arn"].startswith("arn:aws:lambda:eu:") and body["aws_region"] == "eu"
    assert httpx.get(eu.gateway_url + "/_nimbus/health").json() == {"status": "ok",
                                                                    "region": "eu"}
    assert httpx.get(eu.control_url + "/v1/health").json()["region"] == "eu"
    status = httpx.get(eu.control_url + "/v1/status",
                       headers={"Authorization": f"Bearer {eu.token}"}).json()
    assert status["region"] == "eu"


def test_apps_lists_digest_routing_and_routes(eu: RegionProc) -> None:
    r = httpx.get(eu.control_url + "/v1/apps", headers={"Authorization": f"Bearer {eu.token}"})
    assert r.status_code == 200, r.text
    (app,) = r.json()
    assert app["name"] == "app"
    assert app["digest"] == hashlib.sha256(make_bundle(eu.app)).hexdigest()  # type: ignore[arg-type]
    assert app["regions"] == {"names": ["eu", "us"], "policy": "failover", "weights": {}}
    assert {"method": "GET", "path": "/items/{id}"} in app["routes"]
    assert app["functions"] == ["hello", "item"] and app["version"] >= 1
    assert httpx.get(eu.control_url + "/v1/apps").status_code == 401


def test_a_deploy_can_replace_the_manifests_routing(eu: RegionProc, tmp_path: Path) -> None:
    app = _app(tmp_path / "app")
    bundle = make_bundle(app)
    auth = {"Authorization": f"Bearer {eu.token}"}
    routing = {"names": ["us", "eu"], "policy": "weighted", "weights": {"us": 3, "eu": 1}}
    r = httpx.post(eu.control_url + "/v1/deploy", content=bundle, headers=auth, timeout=60,
                   params={"name": "app", "regions": json.dumps(routing)})
    assert r.status_code == 200 and '"result"' in r.text, r.text
    apps = httpx.get(eu.control_url + "/v1/apps", headers=auth).json()
    assert apps[0]["regions"] == routing
    bad = httpx.post(eu.control_url + "/v1/deploy", content=bundle, headers=auth, timeout=60,
                     params={"name": "app", "regions": '{"policy": "random"}'})
    assert bad.status_code == 400 and "regions.policy" in bad.json()["errorMessage"], bad.text


def test_region_names_are_checked_on_the_command_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "nimbus", "up", str(tmp_path), "--region",
                          "eu/west"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--region" in out.stderr and "Traceback" not in out.stderr


def test_a_cluster_file_written_for_regions_loads_back(eu: RegionProc, tmp_path: Path) -> None:
    cluster = write_cluster_file(tmp_path, [eu])
    assert cluster.regions["eu"].token == eu.token
    assert cluster.regions["eu"].gateways == (eu.gateway_url,)


def test_a_demo_or_cluster_state_folder_in_the_app_is_never_bundled(tmp_path: Path) -> None:
    import io
    import zipfile

    app = _app(tmp_path / "a")
    for folder in (".nimbus-demo", ".nimbus-cluster", ".nimbus-cluster-prod.yaml"):
        (app / folder).mkdir()
        (app / folder / "eu.token").write_text("secret")
    (app / "nimbus.cluster.yaml").write_text("regions: {}\n")
    names = zipfile.ZipFile(io.BytesIO(make_bundle(app))).namelist()
    assert not [n for n in names if "token" in n], names
    assert "hello.py" in names and "app.yaml" in names


def test_a_cluster_deploy_never_bundles_the_cluster_file_or_its_tokens(tmp_path: Path) -> None:
    import io
    import zipfile

    from nimbus.multiregion.deploy import plan_deploy

    app = _app(tmp_path / "a")
    (app / "eu.token").write_text("eu-secret\n")
    (app / "us.token").write_text("us-secret\n")
    (app / "keep.token").write_text("the app's own file, not a region token\n")
    (app / "nimbus.cluster.yaml").write_text(GOOD.replace(
        "token_env: NIMBUS_TEST_EU_TOKEN", "token_file: eu.token"))
    cluster = load_cluster(app / "nimbus.cluster.yaml")
    plan = plan_deploy(app, cluster)
    names = zipfile.ZipFile(io.BytesIO(plan.bundle)).namelist()
    assert "eu.token" not in names and "us.token" not in names, names
    assert "nimbus.cluster.yaml" not in names
    assert "keep.token" in names and "hello.py" in names
