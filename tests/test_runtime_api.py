"""Custom runtimes: the manifest's ``runtime: provided``, the Runtime API's
protocol on a real socket, and a shell bootstrap (curl, as AWS's tutorial)
and awslambdaric served by a real ``nimbus up``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.runtime.runtime_api import ApiError, Invocation, RuntimeApi, take_request
from tests.apps import write_custom_runtimes
from tests.conftest import Nimbus

API = "/2018-06-01/runtime"


# -- the manifest -----------------------------------------------------------------


def _app(tmp_path: Path, manifest: str, bootstrap: str | None = "#!/bin/sh\n",
         mode: int = 0o755) -> Path:
    (tmp_path / "app.yaml").write_text(textwrap.dedent(manifest))
    if bootstrap is not None:
        (tmp_path / "bootstrap").write_text(bootstrap)
        (tmp_path / "bootstrap").chmod(mode)
    return tmp_path


PROVIDED = """\
    name: c
    functions:
      f:
        runtime: provided.al2023
        handler: any thing/at all
"""


def test_a_provided_function_keeps_its_handler_string(tmp_path):
    f = load_app(_app(tmp_path, PROVIDED)).functions["f"]
    assert (f.runtime, f.module, f.callable, f.handler) == (
        "provided.al2023", "", "any thing/at all", "any thing/at all")


def test_the_app_level_runtime_applies_and_python_handlers_are_still_checked(tmp_path):
    app = _app(tmp_path, """\
        name: c
        runtime: provided
        functions:
          f: {handler: main}
          g: {handler: main-go, runtime: python3.11}
        """)
    with pytest.raises(ManifestError) as e:
        load_app(app)
    assert str(e.value).startswith(f"{app / 'app.yaml'}:5: functions.g.handler: ")
    assert "expected 'module.callable'" in str(e.value)


@pytest.mark.parametrize(("bootstrap", "mode", "says"), [
    (None, 0, "needs an executable file bootstrap"),
    ("#!/bin/sh\n", 0o644, "bootstrap is not executable (runtime provided.al2023 runs it): "
                           "chmod +x bootstrap"),
])
def test_the_bootstrap_must_be_there_and_executable(tmp_path, bootstrap, mode, says):
    with pytest.raises(ManifestError) as e:
        load_app(_app(tmp_path, PROVIDED, bootstrap, mode))
    assert str(e.value).startswith(f"{tmp_path / 'app.yaml'}:5: functions.f.handler: ")
    assert says in str(e.value)


@pytest.mark.parametrize(("extra", "line", "says"), [
    ("requirements: r.txt", 6, "requirements is for Python runtimes, not runtime provided"),
    ("preload: [json]", 6, "preload is for Python runtimes"),
    ("concurrency: 2", 6, "concurrency must be 1 with runtime provided.al2023"),
])
def test_python_only_settings_are_refused(tmp_path, extra, line, says):
    (tmp_path / "r.txt").write_text("")
    with pytest.raises(ManifestError) as e:
        load_app(_app(tmp_path, PROVIDED + f"        {extra}\n"))
    assert str(e.value).startswith(f"{tmp_path / 'app.yaml'}:{line}: ")
    assert says in str(e.value)


def test_the_short_form_refuses_a_custom_runtime(tmp_path):
    with pytest.raises(ManifestError, match="needs the functions: form"):
        load_app(_app(tmp_path, """\
            runtime: provided
            handlers: [{function: f, event: http}]
            """))


# -- the protocol, on a real socket ------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def ready(self) -> None:
        self.calls.append(("ready",))

    def result(self, rid: str, result: Any) -> None:
        self.calls.append(("result", rid, result))

    def error(self, rid: str, error: dict[str, Any], fatal: bool = False) -> None:
        self.calls.append(("error", rid, error))

    def init_error(self, error: dict[str, Any]) -> None:
        self.calls.append(("init_error", error))


async def _request(port: int, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None, chunked: bool = False
                   ) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:])
                        if p) + b"0\r\n\r\n"
    elif body:
        head.append(f"Content-Length: {len(body)}")
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    got = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    assert int(got["content-length"]) == len(payload)
    return int(lines[0].split()[1]), got, payload


def test_the_runtime_api_protocol():
    async def main() -> None:
        sink = Sink()
        api = RuntimeApi(sink, "arn:aws:lambda:r:0:function:f:1")
        port = await api.start()
        waiting = asyncio.create_task(_request(port, "GET", f"{API}/invocation/next"))
        await asyncio.sleep(0.05)
        assert not waiting.done() and sink.calls == [("ready",)]  # init is over
        api.offer(Invocation("r1", b'{"a":1}', 1234, "Root=1-abc"))
        status, h, body = await waiting
        assert (status, body) == (200, b'{"a":1}')
        assert h["lambda-runtime-aws-request-id"] == "r1"
        assert h["lambda-runtime-deadline-ms"] == "1234"
        assert h["lambda-runtime-invoked-function-arn"] == "arn:aws:lambda:r:0:function:f:1"
        assert h["lambda-runtime-trace-id"] == "Root=1-abc"

        status, _, body = await _request(port, "POST", f"{API}/invocation/r9/response", b"1")
        assert status == 400 and json.loads(body)["errorType"] == "InvalidRequestID"
        status, _, _ = await _request(port, "POST", f"{API}/invocation/r1/response",
                                      b'{"ok": true}')
        assert status == 202 and sink.calls[-1] == ("result", "r1", {"ok": True})
        status, _, _ = await _request(port, "POST", f"{API}/invocation/r1/response", b"2")
        assert status == 400  # answered already

        api.offer(Invocation("r2", b"{}", 1, None))  # before the runtime asks: kept
        status, h, _ = await _request(port, "GET", f"{API}/invocation/next")
        assert status == 200 and h["lambda-runtime-aws-request-id"] == "r2"
        assert "lambda-runtime-trace-id" not in h
        status, _, _ = await _request(port, "POST", f"{API}/invocation/r2/error", b"oops",
                                      {"Lambda-Runtime-Function-Error-Type": "Custom.Type"})
        assert status == 202
        assert sink.calls[-1] == ("error", "r2", {"errorMessage": "oops",
                                                  "errorType": "Custom.Type",
                                                  "requestId": "r2"})

        api.offer(Invocation("r3", b"{}", 1, None))
        await _request(port, "GET", f"{API}/invocation/next")
        status, _, _ = await _request(port, "POST", f"{API}/invocation/r3/response",
                                      b"not json, " * 100, chunked=True)
        assert status == 202 and sink.calls[-1] == ("result", "r3", "not json, " * 100)

        api.offer(Invocation("r4", b"{}", 1, None))
        await _request(port, "GET", f"{API}/invocation/next")
        waiting = asyncio.create_task(_request(port, "GET", f"{API}/invocation/next"))
        await asyncio.sleep(0.05)  # asked again without answering r4: r4 fails
        assert sink.calls[-1][:2] == ("error", "r4")
        assert sink.calls[-1][2]["errorType"] == "Runtime.NoResponse"
        api.close()  # the waiting ``next`` is let go
        with pytest.raises(KeyError):  # an empty answer: the connection closed
            await waiting
        port = await api.start()

        for method, path, code in (("POST", f"{API}/init/error", 403),
                                   ("GET", f"{API}/nope", 404),
                                   ("POST", f"{API}/invocation/next", 405),
                                   ("GET", f"{API}/invocation/r4/response", 405)):
            assert (await _request(port, method, path))[0] == code, path
        assert sink.calls.count(("ready",)) == 1

        api.close()
        fresh = Sink()
        api2 = RuntimeApi(fresh, "arn")
        port2 = await api2.start()
        status, _, _ = await _request(port2, "POST", f"{API}/init/error", json.dumps(
            {"errorMessage": "no handler", "errorType": "Runtime.ImportModuleError",
             "stackTrace": ["a", "b"]}).encode())
        assert status == 202
        assert fresh.calls == [("init_error", {"errorMessage": "no handler",
                                               "errorType": "Runtime.ImportModuleError",
                                               "stackTrace": ["a", "b"]})]
        api2.close()

    asyncio.run(main())


def test_an_invocation_offered_after_its_next_hung_up_goes_to_the_next_next():
    async def main() -> None:
        sink = Sink()
        api = RuntimeApi(sink, "arn")
        port = await api.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {API}/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.sleep(0.05)
        writer.close()  # the runtime's client gave up (killed, restarted)
        await asyncio.sleep(0.05)
        api.offer(Invocation("r1", b"{}", 1, None))
        status, h, _ = await _request(port, "GET", f"{API}/invocation/next")
        assert (status, h["lambda-runtime-aws-request-id"]) == (200, "r1")
        api.close()

    asyncio.run(main())


def test_only_the_functions_own_uid_may_use_the_api():
    async def main() -> None:
        sink = Sink()
        mine = RuntimeApi(sink, "arn", peer_uid=os.getuid())
        theirs = RuntimeApi(sink, "arn", peer_uid=os.getuid() + 1)
        port, other = await mine.start(), await theirs.start()
        assert (await _request(port, "GET", f"{API}/nope"))[0] == 404
        with pytest.raises((KeyError, ConnectionResetError)):  # closed, unanswered
            await _request(other, "GET", f"{API}/invocation/next")
        assert sink.calls == []  # it never saw the request: init is not over
        mine.close()
        theirs.close()

    asyncio.run(main())


# -- end to end ---------------------------------------------------------------------

pytest_e2e = pytest.mark.e2e


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """One ``nimbus up`` serving the shell runtime, with awslambdaric's app
    deployed beside it."""
    root = tmp_path_factory.mktemp("custom")
    shell, ric = write_custom_runtimes(root, sys.executable)
    n = Nimbus(shell, root / "state", root / "state.out")
    try:
        p = n.cli("deploy", str(ric))
        assert p.returncode == 0, p.stderr
        yield n
    finally:
        n.stop()


def _sleepers() -> list[str]:
    """Processes running the shell handler's ``sleep 30.123``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() == b"sleep\x0030.123\x00":
                    found.append(entry)
        except OSError:
            continue
    return found


def _logs_until(n: Nimbus, function: str, rid: str, text: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        out = n.cli("logs", function, "--request-id", rid).stdout
        if text in out:
            return out
        assert time.monotonic() < deadline, out
        time.sleep(0.2)


@pytest_e2e
def test_a_curl_bootstrap_gets_the_event_its_environment_and_headers(custom):
    r = custom.http.get("/sh/echo", params={"q": "1"})
    assert r.status_code == 200
    rid = r.headers["x-nimbus-request-id"]
    text = r.json()
    assert text.startswith("Echoing request: '")
    event = json.loads(text[len("Echoing request: '"):-1])
    assert event["rawPath"] == "/sh/echo" and event["queryStringParameters"] == {"q": "1"}
    assert event["requestContext"]["requestId"] == rid
    # what it wrote to stderr is in its logs under the request id
    _logs_until(custom, "shell", rid, '"rawPath":"/sh/echo"')

    r = custom.http.get("/sh/env")
    name, handler, root, cwd, memory, version, arn, deadline = r.json().split()
    assert (name, handler, memory, version) == ("shell", "function.handler", "128", "1")
    assert root == cwd
    assert arn.endswith(":function:shell")
    assert 0 < int(deadline) - time.time() * 1000 <= 1000 + 50


@pytest_e2e
def test_a_posted_error_looks_like_a_python_handler_error(custom):
    r = custom.http.get("/sh/error")
    assert r.status_code == 500
    assert r.json() == {"errorMessage": "shell says no", "errorType": "ShellError",
                        "requestId": r.headers["x-nimbus-request-id"]}
    assert custom.http.get("/sh/echo").status_code == 200  # and it keeps serving
    listed = httpx.get(custom.control_url + "/v1/functions",
                       headers={"authorization": f"Bearer {custom.token}"}).json()
    assert {f["name"]: f["handler"] for f in listed} == {"shell": "function.handler",
                                                         "ric": "app.handler"}


@pytest_e2e
def test_a_bootstrap_past_its_timeout_is_replaced(custom):
    r = custom.http.get("/sh/sleep")
    assert r.status_code == 504
    rid = r.headers["x-nimbus-request-id"]
    _logs_until(custom, "shell", rid, "Task timed out after 1.00 seconds")
    # the killed instance took its bootstrap and what it started along
    deadline = time.monotonic() + 5
    while _sleepers():
        assert time.monotonic() < deadline, "the timed-out handler's sleep is still running"
        time.sleep(0.1)
    r = custom.http.get("/sh/echo")
    assert r.status_code == 200 and "/sh/echo" in r.json()


@pytest_e2e
def test_awslambdaric_runs_a_python_handler(custom):
    r = custom.http.get("/ric/hello")
    assert r.status_code == 200
    rid = r.headers["x-nimbus-request-id"]
    body = r.json()
    assert body["request_id"] == rid and body["function"] == "ric"
    assert body["arn"].endswith(":function:ric")
    assert 0 < body["remaining_ms"] <= 3000
    _logs_until(custom, "ric", rid, f"hello from {rid}")

    r = custom.http.get("/ric/boom")
    assert r.status_code == 500
    assert r.json() == {"errorMessage": "kaboom", "errorType": "ValueError",
                        "requestId": r.headers["x-nimbus-request-id"]}


@pytest_e2e
def test_a_runtime_that_fails_to_start_fails_the_deploy_like_an_import_error(custom, tmp_path):
    app = _app(tmp_path, """\
        name: broken
        functions:
          broken:
            runtime: provided
            handler: x
            http: [{method: GET, path: /broken}]
        """, "#!/bin/sh\necho starting\nexit 3\n")
    p = custom.cli("deploy", str(app))
    assert p.returncode != 0
    assert ("function broken: custom runtime failed to start: Runtime.ExitError: bootstrap "
            "exited with status 3 before asking for an invocation") in p.stderr
    assert custom.http.get("/sh/echo").status_code == 200


@pytest.mark.parametrize("chunks", [b"-6\r\n", b"+6\r\nabcdef\r\n0\r\n\r\n",
                                    b"6\r\nabcdefXX0\r\n\r\n", b"zz\r\n"])
def test_malformed_chunked_bodies_are_400(chunks: bytes) -> None:
    head = b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(ApiError) as info:
        take_request(bytearray(head + chunks))
    assert info.value.status == 400
