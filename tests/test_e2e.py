"""End to end: real ``nimbus up`` processes, real sockets, real instances."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import signal
import time

import httpx
import pytest

from tests.apps import make_wheel, write_kitchen, write_seed
from tests.conftest import ROOT, Nimbus, alive

pytestmark = pytest.mark.e2e


def logs_until(n, function: str, rid: str, text: str, timeout_s: float = 10.0) -> str:
    """``nimbus logs FUNCTION --request-id RID`` once it shows ``text``
    (logs are flushed every 100 ms); fails with the last output past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = n.cli("logs", function, "--request-id", rid)
        assert out.returncode == 0, out.stderr
        if text in out.stdout:
            return out.stdout
        assert time.monotonic() < deadline, out.stdout
        time.sleep(0.2)


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """One ``nimbus up`` of the kitchen app for the tests that only send it
    requests (an instance they time out, kill or starve is replaced)."""
    root = tmp_path_factory.mktemp("kitchen")
    n = Nimbus(write_kitchen(root), root / "state", root / "state.out")
    yield n
    n.stop()


@pytest.fixture
def own_kitchen(start_nimbus, tmp_path):
    """A kitchen of the test's own, for tests that stop or kill the platform."""
    return start_nimbus(write_kitchen(tmp_path))


def test_seed_app_verbatim(start_nimbus):
    n = start_nimbus(ROOT / "examples" / "hello")
    r = n.http.get("/hello")
    assert r.status_code == 200
    assert r.text == "Hello, World!"
    assert r.headers["x-nimbus-request-id"]
    assert "served by Python 3." in n.output()  # the runtime notice
    assert n.http.get("/_nimbus/health").json() == {"status": "ok", "region": "local"}


def test_path_parameters_query_and_headers(kitchen):
    r = kitchen.http.get("/users/42?a=1&a=2&b=x%20y", headers={"X-Thing": "t"})
    assert r.status_code == 200
    ev = r.json()
    assert ev["pathParameters"] == {"id": "42"}
    assert ev["routeKey"] == "GET /users/{id}"
    assert ev["rawQueryString"] == "a=1&a=2&b=x%20y"
    assert ev["queryStringParameters"] == {"a": "1,2", "b": "x y"}
    assert ev["headers"]["x-thing"] == "t"
    assert ev["requestContext"]["http"]["method"] == "GET"
    assert ev["requestContext"]["http"]["sourceIp"] == "127.0.0.1"
    assert ev["requestContext"]["requestId"] == r.headers["x-nimbus-request-id"]
    greedy = kitchen.http.delete("/files/a/b/c.txt").json()
    assert greedy["pathParameters"] == {"key": "a/b/c.txt"}


def test_binary_and_text_bodies(kitchen):
    raw = bytes(range(256)) * 4
    ev = kitchen.http.post("/echo", content=raw,
                           headers={"content-type": "application/octet-stream"}).json()
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == raw
    ev = kitchen.http.post("/echo", json={"k": "v"}).json()
    assert ev["isBase64Encoded"] is False and json.loads(ev["body"]) == {"k": "v"}


def test_plain_return_is_json(kitchen):
    out = kitchen.cli("invoke", "plain", "--data", '{"x": 1}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"got": {"x": 1}}


def test_error_statuses(kitchen):
    h = kitchen.http
    r = h.get("/nope")
    assert r.status_code == 404 and r.headers["x-nimbus-request-id"]
    r = h.delete("/echo")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    r = h.post("/echo", content=b"x" * (6 * 1024 * 1024 + 1))
    assert r.status_code == 413
    r = h.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"errorMessage": "kaboom", "errorType": "ValueError",
                        "requestId": r.headers["x-nimbus-request-id"]}
    assert "Traceback" not in r.text


def test_a_malformed_response_is_500_and_logged_for_the_function(kitchen):
    r = kitchen.http.get("/badb64")
    assert r.status_code == 500
    assert r.json()["errorType"] == "Runtime.InvalidResponse"
    rid = r.headers["x-nimbus-request-id"]
    out = logs_until(kitchen, "badb64", rid, "Runtime.InvalidResponse")
    assert "base64" in out


def test_timeout_answers_504_and_replaces_the_instance(kitchen):
    t0 = time.monotonic()
    r = kitchen.http.get("/slow")
    assert r.status_code == 504
    assert time.monotonic() - t0 < 10
    rid = r.headers["x-nimbus-request-id"]
    logs_until(kitchen, "slow", rid, "Task timed out after 1.00 seconds")
    # the platform still serves the other functions, and slow gets a new instance
    assert kitchen.http.get("/echo").status_code == 200
    r = kitchen.http.get("/slow")
    assert r.status_code == 504


def test_dead_instance_answers_502_and_is_replaced(kitchen):
    r = kitchen.http.get("/die")
    assert r.status_code == 502
    assert r.json()["requestId"] == r.headers["x-nimbus-request-id"]
    assert kitchen.http.get("/die").status_code == 502  # a fresh instance died again
    assert kitchen.http.get("/echo").status_code == 200


def test_memory_limit(kitchen):
    r = kitchen.http.get("/hog")
    assert r.status_code == 500
    body = r.json()
    assert body["errorType"] == "Runtime.OutOfMemory"
    assert "64 MB" in body["errorMessage"]
    assert kitchen.http.get("/echo").status_code == 200  # the platform is unharmed


def test_context_env_and_tmp(kitchen):
    r = kitchen.http.get("/ctx")
    assert r.status_code == 200
    c = r.json()
    assert c["aws_request_id"] == r.headers["x-nimbus-request-id"]
    assert c["function_name"] == "ctx"
    assert c["function_version"] == "1"
    assert c["memory_limit_in_mb"] == "256"
    assert c["invoked_function_arn"].endswith(":function:ctx")
    assert c["log_group_name"] == "/aws/lambda/ctx"
    assert c["log_stream_name"]
    assert 0 < c["remaining"] <= 3000
    assert c["env"]["AWS_LAMBDA_FUNCTION_NAME"] == "ctx"
    assert c["env"]["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert c["env"]["GREETING"] == "hi"
    assert c["env"]["_HANDLER"] == "handlers.ctx"
    assert c["env"]["LAMBDA_TASK_ROOT"] == c["cwd"]
    assert c["tmp_writable"] is True


def test_logs_by_request_id(kitchen):
    r1 = kitchen.http.get("/print")
    r2 = kitchen.http.get("/print")
    rid1, rid2 = r1.text, r2.text
    assert rid1 != rid2
    out = logs_until(kitchen, "printer", rid1, f"hello from {rid1}")
    assert f"hello from {rid1}" in out
    assert "to stderr" in out
    assert rid2 not in out
    every = kitchen.cli("logs", "printer").stdout
    assert rid1 in every and rid2 in every
    # the handler's traceback goes to the logs (not to the client)
    r = kitchen.http.get("/boom")
    rid = r.headers["x-nimbus-request-id"]
    out = logs_until(kitchen, "boom", rid, "kaboom")
    assert "Traceback" in out


def test_logs_follow(kitchen):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbus.cli.main", "logs", "printer", "-f",
         "--state-dir", str(kitchen.state)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        rid = kitchen.http.get("/print").text
        deadline = time.monotonic() + 10
        seen = ""
        while rid not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert rid in seen
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_cli_ls_status_invoke(kitchen):
    out = kitchen.cli("ls")
    assert out.returncode == 0, out.stderr
    assert "echo" in out.stdout and "GET /users/{id}" in out.stdout
    kitchen.http.get("/echo")
    out = kitchen.cli("status")
    assert out.returncode == 0, out.stderr
    assert "echo" in out.stdout and "PSS" in out.stdout
    out = kitchen.cli("invoke", "boom")
    assert out.returncode == 1
    assert "ValueError: kaboom" in out.stderr
    out = kitchen.cli("invoke", "nosuch")
    assert out.returncode == 1 and "nosuch" in out.stderr
    out = kitchen.cli("invoke", "plain", "--data", "{not json")
    assert out.returncode == 2 and "not valid JSON" in out.stderr


def test_control_api_requires_the_token(kitchen):
    r = httpx.get(kitchen.control_url + "/v1/functions")
    assert r.status_code == 401
    r = httpx.get(kitchen.control_url + "/v1/functions",
                  headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.get(kitchen.control_url + "/v1/functions",
                  headers={"authorization": f"Bearer {kitchen.token}"})
    assert r.status_code == 200


def test_redeploy_versions(start_nimbus, tmp_path):
    app = write_seed(tmp_path)
    n = start_nimbus(app)
    out = n.cli("deploy", str(app))
    assert out.returncode == 0, out.stderr
    assert "version 1 (unchanged)" in out.stdout
    (app / "hello.py").write_text(
        "def hello(event, context):\n    return {'statusCode': 200, 'body': 'v2'}\n")
    out = n.cli("deploy", str(app))
    assert out.returncode == 0, out.stderr
    assert "version 2" in out.stdout and "unchanged" not in out.stdout
    assert n.http.get("/hello").text == "v2"  # live when deploy returns


def test_failed_deploy_keeps_the_running_version(start_nimbus, tmp_path):
    app = write_seed(tmp_path)
    n = start_nimbus(app)
    (app / "hello.py").write_text("import nosuchmodule_xyz\n\ndef hello(e, c):\n    return 1\n")
    out = n.cli("deploy", str(app))
    assert out.returncode == 1
    assert "nosuchmodule_xyz" in out.stderr
    assert "Traceback" not in out.stderr
    assert n.http.get("/hello").text == "Hello, World!"


def test_manifest_error_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    app = write_seed(tmp_path)
    (app / "app.yaml").write_text("runtime: python3.8\nhandlers:\n  - function: hello\n"
                                  "    event: http\n    method: fetch\n")
    out = subprocess.run([sys.executable, "-m", "nimbus.cli.main", "up", str(app), "--port", "0",
                          "--control-port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "app.yaml:5" in lines[0] and "method" in lines[0]
    assert "Traceback" not in out.stderr


def test_requirements_venv(start_nimbus, tmp_path):
    app = tmp_path / "withreq"
    app.mkdir()
    make_wheel(app)
    (app / "requirements.txt").write_text("./nimbusdemo-1.0-py3-none-any.whl\n")
    (app / "app.yaml").write_text(
        "functions:\n"
        "  a:\n    handler: h.a\n    requirements: requirements.txt\n"
        "    http: [{method: GET, path: /a}]\n"
        "  b:\n    handler: h.b\n    requirements: requirements.txt\n"
        "    http: [{method: GET, path: /b}]\n")
    (app / "h.py").write_text(
        "import nimbusdemo\n\n"
        "def a(event, context):\n    return {'statusCode': 200, 'body': nimbusdemo.VALUE}\n\n"
        "def b(event, context):\n    return {'statusCode': 200, 'body': nimbusdemo.__file__}\n")
    n = start_nimbus(app)
    assert n.http.get("/a").text == "from the wheel"
    venvs = [p for p in (n.state / "venvs").iterdir() if p.is_dir()]
    assert len(venvs) == 1  # one venv for both functions
    # the venv's site-packages, as the instance sees it (under full
    # containment at /var/nimbus/venvs/<hash> in its view)
    assert f"/venvs/{venvs[0].name}/lib/" in n.http.get("/b").text
    assert "pip install" in n.output()  # progress was shown
    # a failing install fails the deploy and keeps the running version
    (app / "requirements.txt").write_text("./missing-1.0-py3-none-any.whl\n")
    (app / "h.py").write_text((app / "h.py").read_text() + "\n# changed\n")
    out = n.cli("deploy", str(app))
    assert out.returncode == 1
    assert "missing-1.0-py3-none-any.whl" in out.stderr
    assert n.http.get("/a").text == "from the wheel"


def test_shutdown_drains_and_leaves_nothing_behind(own_kitchen):
    own_kitchen.http.get("/echo")  # start some instances
    own_kitchen.http.get("/ctx")
    before = own_kitchen.descendants()
    assert len(before) >= 3  # zygote + instances (+ spares)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(own_kitchen.http.get, "/nap", params={"s": "1.5"})
        time.sleep(0.5)
        own_kitchen.proc.send_signal(signal.SIGTERM)
        r = inflight.result(timeout=30)
    assert r.status_code == 200 and r.text == "rested"  # drained, not dropped
    assert own_kitchen.proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 5
    while any(alive(p) for p in before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in before if alive(p)]


def test_sigkill_of_the_platform_takes_its_processes_along(own_kitchen):
    own_kitchen.http.get("/echo")
    before = own_kitchen.descendants()
    assert before
    own_kitchen.proc.send_signal(signal.SIGKILL)
    own_kitchen.proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in before if alive(p)]


def test_state_survives_restart(start_nimbus, tmp_path):
    app = write_seed(tmp_path, body="persisted")
    n = start_nimbus(app, name="s1")
    assert n.http.get("/hello").text == "persisted"
    assert n.stop() == 0
    # restart on the same state folder without an app: routes come from the store
    n2 = start_nimbus(None, name="s2", state=n.state)
    assert n2.http.get("/hello").text == "persisted"


def test_concurrent_requests_all_succeed(kitchen):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: kitchen.http.get(f"/users/{i}"), range(200)))
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["pathParameters"]["id"] for r in results] == [str(i) for i in range(200)]


def test_dependency_set_zygote_preloads_the_requirements(start_nimbus, tmp_path):
    app = tmp_path / "preloaded"
    app.mkdir()
    make_wheel(app, code="import os\nIMPORTED_IN = os.getpid()\n")
    (app / "requirements.txt").write_text("./nimbusdemo-1.0-py3-none-any.whl\n")
    (app / "app.yaml").write_text(
        "functions:\n"
        "  p:\n    handler: h.p\n    requirements: requirements.txt\n"
        "    http: [{method: GET, path: /p}]\n")
    (app / "h.py").write_text(
        "import os\nimport nimbusdemo\n\n"
        "def p(event, context):\n"
        "    return {'imported_in': nimbusdemo.IMPORTED_IN, 'pid': os.getpid(),\n"
        "            'ppid': os.getppid()}\n")
    n = start_nimbus(app)
    got = n.http.get("/p").json()
    r = httpx.get(n.control_url + "/v1/status", headers={"authorization": f"Bearer {n.token}"})
    # imported once, in the zygote (the instance's parent), not in the instance
    # (pids as the function sees them: under full containment the zygote is
    # pid 1 of its own PID namespace)
    assert got["imported_in"] != got["pid"]
    assert got["imported_in"] == got["ppid"]
    deps = [z for z in r.json()["zygotes"] if z["preload"]]
    assert [z["preload"] for z in deps] == [["nimbusdemo", "os"]]  # the top-level imports
    assert any(p.endswith("site-packages") for p in deps[0]["sys_path"])


def test_a_failed_first_deploy_keeps_no_function_names(start_nimbus, tmp_path):
    n = start_nimbus(None)
    bad = tmp_path / "first"
    bad.mkdir()
    (bad / "app.yaml").write_text(
        "functions:\n  shared:\n    handler: h.f\n    http: [{method: GET, path: /shared}]\n")
    (bad / "h.py").write_text("import nosuchmodule_abc\n\ndef f(e, c):\n    return 1\n")
    out = n.cli("deploy", str(bad))
    assert out.returncode == 1 and "nosuchmodule_abc" in out.stderr
    good = tmp_path / "second"
    good.mkdir()
    (good / "app.yaml").write_text((bad / "app.yaml").read_text())
    (good / "h.py").write_text("def f(e, c):\n    return {'statusCode': 200, 'body': 'mine'}\n")
    out = n.cli("deploy", str(good))
    assert out.returncode == 0, out.stderr  # the name was not kept by the failed app
    assert n.http.get("/shared").text == "mine"


def test_a_dependency_set_zygote_no_version_uses_is_stopped(start_nimbus, tmp_path):
    app = tmp_path / "deps"
    app.mkdir()
    make_wheel(app)
    (app / "requirements.txt").write_text("./nimbusdemo-1.0-py3-none-any.whl\n")
    (app / "app.yaml").write_text(
        "functions:\n  d:\n    handler: h.d\n    requirements: requirements.txt\n"
        "    http: [{method: GET, path: /d}]\n")
    (app / "h.py").write_text(
        "import nimbusdemo\n\ndef d(event, context):\n"
        "    return {'statusCode': 200, 'body': nimbusdemo.VALUE}\n")
    n = start_nimbus(app)
    assert n.http.get("/d").text == "from the wheel"

    def zygotes():
        r = httpx.get(n.control_url + "/v1/status",
                      headers={"authorization": f"Bearer {n.token}"})
        return {z["pid"]: z for z in r.json()["zygotes"] if z["pid"]}

    old = [pid for pid, z in zygotes().items() if z["sys_path"]]
    assert len(old) == 1
    # the new version drops the requirements: its zygote is the base one
    (app / "app.yaml").write_text(
        "functions:\n  d:\n    handler: h.d\n    http: [{method: GET, path: /d}]\n")
    (app / "h.py").write_text("def d(event, context):\n    return {'statusCode': 200, "
                              "'body': 'plain'}\n")
    out = n.cli("deploy", str(app))
    assert out.returncode == 0, out.stderr
    assert n.http.get("/d").text == "plain"
    deadline = time.monotonic() + 15
    while alive(old[0]) or old[0] in zygotes():
        assert time.monotonic() < deadline, "the unused zygote kept running"
        time.sleep(0.1)
    assert n.http.get("/d").text == "plain"
