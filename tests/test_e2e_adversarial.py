"""Adversarial end-to-end tests against the promises of the platform (HTTP, errors, CLI).

Written from the outside: real ``nimbus up`` processes, real sockets, real
instances, no mocks. Every wait has a deadline; nothing sleeps to assert
timing. Most tests share one platform (``adv``) that serves an app built to
misbehave; tests that break the platform on purpose start their own.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from nimbus.control.bundle import make_bundle
from tests.conftest import HOST_FILES, Nimbus

pytestmark = pytest.mark.e2e

MB = 1024 * 1024

ADV_MANIFEST = """\
name: adv
functions:
  hello:
    handler: adv.hello
    http: [{{method: GET, path: /hello}}]
  conc:
    handler: adv.conc
    concurrency: 4
    max_instances: 1
    timeout_s: 15
    http: [{{method: GET, path: /conc}}]
  chatty:
    handler: adv.chatty
    timeout_s: 20
    http: [{{method: GET, path: /chatty}}]
  big:
    handler: adv.big
    memory_mb: 512
    timeout_s: 20
    http: [{{method: GET, path: /big}}]
  shape:
    handler: adv.shape
    http: [{{method: GET, path: /shape/{{kind}}}}]
  quit:
    handler: adv.quit
    timeout_s: 5
    http: [{{method: GET, path: /quit/{{how}}}}]
  quitconc:
    handler: adv.quit
    concurrency: 2
    timeout_s: 3
    http: [{{method: GET, path: /quitconc/{{how}}}}]
  cookies:
    handler: adv.cookies
    http: [{{method: GET, path: /cookies}}]
  serial:
    handler: adv.serial
    max_instances: 1
    timeout_s: 3
    http: [{{method: GET, path: /serial}}]
  queue:
    handler: adv.queue
    max_instances: 1
    timeout_s: 1
    env: {{MARKS: "{marks}"}}
    http: [{{method: GET, path: /queue}}]
  upload:
    handler: adv.upload
    max_instances: 1
    memory_mb: 256
    http: [{{method: POST, path: /upload}}]
  logmod:
    handler: logmod.handler
    http: [{{method: GET, path: /logmod}}]
  threads:
    handler: adv.threads
    http: [{{method: GET, path: /threads}}]
  fdwrite:
    handler: adv.fdwrite
    http: [{{method: GET, path: /fdwrite}}]
"""

ADV_HANDLERS = r'''
import base64, hashlib, json, os, random, sys, threading, time

def hello(event, context):
    return {"statusCode": 200, "body": "Hello, World!"}

_barriers = {}
_barriers_lock = threading.Lock()

def conc(event, context):
    q = event.get("queryStringParameters") or {}
    with _barriers_lock:
        barrier = _barriers.setdefault(q["group"], threading.Barrier(int(q["n"]), timeout=5))
    rid = context.aws_request_id
    barrier.wait()  # raises unless n invocations run in this process at the same time
    for i in range(int(q.get("lines", "0"))):
        sys.stdout.write(f"[{rid}] step {i} ...")  # a progress line, finished after some work
        time.sleep(0.001)
        print(" ok")
    return {"pid": os.getpid(), "rid": rid}

def chatty(event, context):
    n = int((event.get("queryStringParameters") or {}).get("n", "20000"))
    rid = context.aws_request_id
    for i in range(n):
        print(f"line {i} of {rid}")
    sys.stdout.write("tail-without-newline")
    return {"statusCode": 200, "body": rid}

def big(event, context):
    q = event.get("queryStringParameters") or {}
    mb = int(q.get("mb", "8"))
    if q.get("binary"):
        data = random.Random(mb).randbytes(mb * 1024 * 1024)
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "isBase64Encoded": True, "body": base64.b64encode(data).decode()}
    return {"statusCode": 200, "body": "x" * (mb * 1024 * 1024)}

class _Opaque:
    pass

SHAPES = {
    "object": lambda: {"statusCode": 200, "body": _Opaque()},
    "set": lambda: {1, 2, 3},
    "bytes": lambda: b"raw bytes",
    "surrogate": lambda: {"statusCode": 200, "body": "bad \udcff"},
    "badb64": lambda: {"statusCode": 200, "isBase64Encoded": True,
                       "body": "this is not base64 !!"},
    "nonascii_b64": lambda: {"statusCode": 200, "isBase64Encoded": True, "body": "h\u00e9llo"},
    "crlf_header": lambda: {"statusCode": 200, "headers": {"x-bad": "a\r\nx-injected: yes"},
                            "body": "x"},
    "bad_header_name": lambda: {"statusCode": 200, "headers": {"bad name": "x"}, "body": "x"},
    "nocontent": lambda: {"statusCode": 204, "body": "should not be sent"},
    "own_length": lambda: {"statusCode": 200, "headers": {"Content-Length": "5"},
                           "body": "exact"},
    "wrong_length": lambda: {"statusCode": 200, "headers": {"Content-Length": "999"},
                             "body": "short"},
}

def shape(event, context):
    return SHAPES[event["pathParameters"]["kind"]]()

def quit(event, context):
    how = event["pathParameters"]["how"]
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt
    return {"statusCode": 200, "body": "still here"}

def cookies(event, context):
    return {"statusCode": 200,
            "cookies": ["s=1; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT", "t=2; HttpOnly"],
            "headers": {"content-type": "application/json"},
            "body": json.dumps({"cookies": event.get("cookies")})}

def serial(event, context):
    t0 = time.time()
    time.sleep(0.15)
    return {"pid": os.getpid(), "start": t0, "end": time.time()}

def queue(event, context):
    q = event.get("queryStringParameters") or {}
    open(os.path.join(os.environ["MARKS"], q["tag"]), "w").close()
    time.sleep(float(q.get("s", "0")))
    return {"statusCode": 200, "body": q["tag"]}

_seen = []

def upload(event, context):
    body = event.get("body") or ""
    raw = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()
    _seen.append(len(raw))
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"len": len(raw), "sha": hashlib.sha256(raw).hexdigest(),
                                "seen": _seen})}

def threads(event, context):
    rid = context.aws_request_id
    t = threading.Thread(target=lambda: print(f"from a thread of {rid}"))
    t.start()
    t.join()
    print("done", rid)  # a sentinel, written after the thread's line
    return {"statusCode": 200, "body": rid}

def fdwrite(event, context):
    rid = context.aws_request_id
    os.write(1, f"fd1 of {rid}\n".encode())
    os.write(2, f"fd2 of {rid}\n".encode())
    print("done", rid)  # a sentinel, written after
    return {"statusCode": 200, "body": rid}
'''

LOGMOD = '''\
import logging

# The usual way Python code sets up logging: once, at import.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
log = logging.getLogger("logmod")

def handler(event, context):
    log.info("logged by %s", context.aws_request_id)
    print("done", context.aws_request_id)  # a sentinel, captured for sure, written after
    return {"statusCode": 200, "body": context.aws_request_id}
'''


# -- fixtures and helpers ----------------------------------------------------


@pytest.fixture(scope="module")
def adv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adv")


@pytest.fixture(scope="module")
def adv(adv_root: Path) -> Iterator[Nimbus]:
    marks = adv_root / "marks"
    marks.mkdir()
    app = adv_root / "adv"
    app.mkdir()
    (app / "app.yaml").write_text(ADV_MANIFEST.format(marks=marks))
    (app / "adv.py").write_text(ADV_HANDLERS)
    (app / "logmod.py").write_text(LOGMOD)
    # Its handlers leave marks in the test's folder: run them as our user.
    n = Nimbus(app, adv_root / "state", adv_root / "state.out", *HOST_FILES)
    n.marks = marks  # type: ignore[attr-defined]
    try:
        yield n
    finally:
        n.stop()


def control(n: Nimbus) -> httpx.Client:
    return httpx.Client(base_url=n.control_url, timeout=30.0,
                        headers={"authorization": f"Bearer {n.token}"})


def log_records(n: Nimbus, function: str, request_id: str | None = None) -> list[dict]:
    params = {"request_id": request_id} if request_id else {}
    with control(n) as c:
        r = c.get(f"/v1/functions/{function}/logs", params=params)
    assert r.status_code == 200, r.text
    return [orjson.loads(line) for line in r.text.splitlines() if line]


def wait_logs(n: Nimbus, function: str, request_id: str | None, predicate,
              timeout_s: float = 10.0) -> list[dict]:
    """Poll the logs until ``predicate(records)`` holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = log_records(n, function, request_id)
        if predicate(recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def texts(recs: list[dict]) -> list[str]:
    return [r["text"] for r in recs]


def assert_clean_error(r: httpx.Response, statuses: tuple[int, ...] = (500, 502)) -> dict:
    """A clean error: the expected status, a JSON Lambda-shaped body, the request id."""
    rid = r.headers.get("x-nimbus-request-id")
    assert r.status_code in statuses, (r.status_code, r.headers, r.text[:500])
    assert rid, f"no x-nimbus-request-id on a {r.status_code}: {dict(r.headers)}"
    body = r.json()
    assert body.get("requestId") == rid, body
    assert "Traceback" not in r.text
    return body


def cli(*args: str, cwd: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nimbus.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{out.stderr}"
    return lines[0]


def write_app(root: Path, name: str, manifest: str, **files: str) -> Path:
    app = root / name
    app.mkdir(exist_ok=True)
    (app / "app.yaml").write_text(manifest)
    for fname, text in files.items():
        (app / fname).write_text(text)
    return app


# -- concurrency inside one instance ------------------------------------------


def test_concurrency_serves_simultaneous_invocations_in_one_process(adv):
    # The handler blocks on a 4-party barrier: it only returns if 4 invocations
    # run inside the same instance at once (concurrency: 4, max_instances: 1).
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda _: adv.http.get("/conc", params={"group": "g1", "n": "4"}),
                         range(4)))
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    assert len({r.json()["pid"] for r in rs}) == 1
    assert {r.json()["rid"] for r in rs} == {r.headers["x-nimbus-request-id"] for r in rs}


def test_concurrent_invocations_keep_their_log_lines_apart(adv):
    lines = 40
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda _: adv.http.get(
            "/conc", params={"group": "g2", "n": "4", "lines": str(lines)}), range(4)))
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    rids = [r.headers["x-nimbus-request-id"] for r in rs]

    def complete(recs):
        got = texts(recs)
        return all(any(f"[{rid}] step {lines - 1}" in t for t in got) for rid in rids)

    recs = wait_logs(adv, "conc", None, complete)
    mine = [r for r in recs if r["rid"] in rids or any(rid in r["text"] for rid in rids)]
    wrong = [r for r in mine
             if r["rid"] not in rids or any(o in r["text"] for o in rids if o != r["rid"])
             or r["text"] != r["text"].strip() or "ok" not in r["text"]]
    assert not wrong, "log lines tagged with the wrong request id or glued together:\n" + \
        "\n".join(f"  rid={r['rid']}: {r['text']!r}" for r in wrong[:8])
    for rid in rids:
        got = set(texts([r for r in recs if r["rid"] == rid]))
        want = {f"[{rid}] step {i} ... ok" for i in range(lines)}
        assert want <= got, sorted(want - got)[:5]


# -- logs: volume, partial lines, other ways of writing ------------------------


def test_a_handler_that_prints_a_lot_and_without_newline(adv):
    r = adv.http.get("/chatty", params={"n": "20000"})
    assert r.status_code == 200, r.text
    rid = r.text
    recs = wait_logs(adv, "chatty", rid, lambda recs: "tail-without-newline" in texts(recs))
    got = texts(recs)
    assert got.count("tail-without-newline") == 1
    lines = [t for t in got if t.startswith("line ")]
    assert lines == [f"line {i} of {rid}" for i in range(20000)]
    assert adv.http.get("/hello").status_code == 200


def test_logging_module_configured_at_import_reaches_the_invocation_logs(adv):
    r = adv.http.get("/logmod")
    assert r.status_code == 200, r.text
    rid = r.text
    want = f"INFO logged by {rid}"
    recs = wait_logs(adv, "logmod", rid, lambda recs: f"done {rid}" in texts(recs))
    assert f"done {rid}" in texts(recs)
    assert want in texts(recs), (
        f"`logging` output of the invocation is not in `nimbus logs logmod` "
        f"(records for {rid}: {texts(recs)}); platform output has it: "
        f"{want in adv.output()}")


def test_output_of_a_thread_the_handler_starts_is_tagged_with_the_request(adv):
    r = adv.http.get("/threads")
    assert r.status_code == 200, r.text
    rid = r.text
    want = f"from a thread of {rid}"
    recs = wait_logs(adv, "threads", rid, lambda recs: f"done {rid}" in texts(recs))
    assert f"done {rid}" in texts(recs)
    untagged = [x for x in log_records(adv, "threads") if x["text"] == want]
    assert want in texts(recs), f"the line was logged as {untagged}"


def test_output_written_to_the_stdout_and_stderr_file_descriptors_is_captured(adv):
    r = adv.http.get("/fdwrite")
    assert r.status_code == 200, r.text
    rid = r.text
    want = {f"fd1 of {rid}", f"fd2 of {rid}"}
    recs = wait_logs(adv, "fdwrite", rid, lambda recs: f"done {rid}" in texts(recs))
    assert f"done {rid}" in texts(recs)
    if not want <= set(texts(recs)):  # fd output may travel another way: a little longer
        recs = wait_logs(adv, "fdwrite", rid, lambda recs: want <= set(texts(recs)),
                         timeout_s=2)
    assert want <= set(texts(recs)), (
        f"os.write(1/2) output is not in the logs; it went to the platform's own "
        f"output: {f'fd1 of {rid}' in adv.output()}")


# -- results the gateway must survive ------------------------------------------


def test_huge_response_bodies_arrive_intact(adv):
    r = adv.http.get("/big", params={"mb": "5"})
    assert r.status_code == 200
    assert len(r.content) == 5 * MB and r.content == b"x" * (5 * MB)
    # past Lambda's 6 MB response limit: a clean error, as on Lambda
    r = adv.http.get("/big", params={"mb": "8"})
    assert r.status_code == 500, r.status_code
    assert r.json()["errorType"] == "Function.ResponseSizeTooLarge"
    r = adv.http.get("/big", params={"mb": "3", "binary": "1"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(r.content).hexdigest() == \
        hashlib.sha256(random.Random(3).randbytes(3 * MB)).hexdigest()


@pytest.mark.parametrize("kind", ["object", "set", "bytes", "surrogate"])
def test_unserialisable_results_are_a_clean_error(adv, kind):
    t0 = time.monotonic()
    r = adv.http.get(f"/shape/{kind}")
    assert time.monotonic() - t0 < 2.5, "took as long as the timeout: the result was lost"
    assert_clean_error(r, (500, 502))
    assert adv.http.get("/hello").text == "Hello, World!"


@pytest.mark.parametrize("kind", ["badb64", "nonascii_b64"])
def test_invalid_base64_result_body_is_a_clean_error(adv, kind):
    r = adv.http.get(f"/shape/{kind}")
    assert_clean_error(r, (500, 502))


@pytest.mark.parametrize("kind", ["crlf_header", "bad_header_name"])
def test_unsendable_result_headers_are_a_clean_error_with_a_request_id(adv, kind):
    # A handler must not be able to inject headers, and the answer must still be
    # nimbus's own: JSON error, x-nimbus-request-id (every response).
    r = adv.http.get(f"/shape/{kind}")
    assert "x-injected" not in r.headers
    assert_clean_error(r, (500, 502))


def test_204_with_a_body_does_not_corrupt_the_connection(adv):
    with httpx.Client(base_url=adv.url, timeout=10.0) as c:
        r = c.get("/shape/nocontent")
        assert r.status_code == 204
        assert r.content == b""
        r2 = c.get("/hello")  # same keep-alive connection
        assert r2.status_code == 200 and r2.text == "Hello, World!"


@pytest.mark.parametrize("kind,body", [("own_length", b"exact"), ("wrong_length", b"short")])
def test_a_content_length_set_by_the_handler_is_not_sent_twice(adv, kind, body):
    # WSGI/ASGI adapters (serverless-wsgi, Mangum, ...) return Content-Length among
    # their headers; API Gateway sends one, matching the body it sends.
    host, port = urlsplit(adv.url).hostname, urlsplit(adv.url).port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET /shape/{kind} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lengths = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    assert lengths == [f"content-length: {len(body)}".encode()], head.decode()
    assert rest == body


# -- handlers that try to leave -------------------------------------------------


@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_sys_exit_and_keyboard_interrupt_are_clean_errors(adv, how):
    t0 = time.monotonic()
    r = adv.http.get(f"/quit/{how}")
    assert time.monotonic() - t0 < 4, "answered only at the timeout"
    assert_clean_error(r, (500, 502))
    assert adv.http.get("/quit/stay").text == "still here"  # replaced, serving
    assert adv.proc.poll() is None


@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_sys_exit_in_an_instance_with_concurrency_is_a_clean_error_not_a_timeout(adv, how):
    t0 = time.monotonic()
    r = adv.http.get(f"/quitconc/{how}")
    elapsed = time.monotonic() - t0
    assert r.status_code != 504, f"{how}: answered 504 after {elapsed:.1f} s: {r.text}"
    assert_clean_error(r, (500, 502))
    assert adv.http.get("/quitconc/stay").text == "still here"


# -- queueing behind a busy instance ------------------------------------------


def test_requests_queue_behind_a_busy_single_instance(adv):
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda _: adv.http.get("/serial"), range(6)))
    assert [r.status_code for r in rs] == [200] * 6, [r.text for r in rs]
    runs = sorted((r.json()["start"], r.json()["end"]) for r in rs)
    assert len({r.json()["pid"] for r in rs}) == 1  # max_instances: 1
    for (_s1, e1), (s2, _e2) in zip(runs, runs[1:], strict=False):
        assert s2 >= e1, "two invocations overlapped in an instance with concurrency 1"


def test_requests_queued_behind_a_timed_out_invocation_are_served(adv):
    # max_instances: 1, timeout_s: 1. Request a runs past its timeout (504; the
    # instance is killed and replaced). b, c, d queued behind it must be served
    # by the replacement, not fail with it.
    marks = adv.marks
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        a = ex.submit(adv.http.get, "/queue", params={"tag": "a", "s": "5"})
        deadline = time.monotonic() + 10
        while not (marks / "a").exists():
            assert time.monotonic() < deadline, "request a never started"
            time.sleep(0.01)
        rest = [ex.submit(adv.http.get, "/queue", params={"tag": t}) for t in "bcd"]
        ra = a.result(timeout=30)
        rs = [f.result(timeout=30) for f in rest]
    assert ra.status_code == 504, ra.text
    got = [(r.status_code, r.text) for r in rs]
    assert got == [(200, "b"), (200, "c"), (200, "d")], got


# -- request bodies -------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413(adv):
    def chunks():
        piece = b"z" * 65536
        for _ in range(7 * MB // len(piece)):
            yield piece

    with httpx.Client(base_url=adv.url, timeout=30.0) as c:
        r = c.post("/upload", content=chunks(),
                   headers={"content-type": "application/octet-stream"})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413, r.text[:300]
        assert r.headers["x-nimbus-request-id"]
        r = c.post("/upload", content=b"after")  # the connection/platform is still fine
        assert r.status_code == 200 and r.json()["len"] == 5


def test_chunked_body_at_the_limit_is_accepted_whole(adv):
    payload = random.Random(6).randbytes(6 * MB)

    def chunks():
        for i in range(0, len(payload), 100_000):
            yield payload[i:i + 100_000]

    with httpx.Client(base_url=adv.url, timeout=30.0) as c:
        r = c.post("/upload", content=chunks(),
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["len"] == 6 * MB
    assert r.json()["sha"] == hashlib.sha256(payload).hexdigest()


def test_a_body_cut_off_by_the_client_is_not_invoked(adv):
    # Content-Length says 100000; the client sends 777 bytes and hangs up. The
    # handler must never see a truncated body as if it were the request.
    host, port = urlsplit(adv.url).hostname, urlsplit(adv.url).port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
                  + b"q" * 777)
        s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not s.recv(65536):
                break
    # max_instances: 1, FIFO: a later request runs after any invocation of the cut one
    r = adv.http.post("/upload", content=b"marker")
    assert r.status_code == 200
    assert 777 not in r.json()["seen"], r.json()["seen"]


# -- HEAD and cookies -------------------------------------------------------------


def test_head_requests(adv):
    with httpx.Client(base_url=adv.url, timeout=10.0) as c:
        r = c.head("/hello")
        assert r.status_code == 200
        assert r.content == b""
        assert r.headers["x-nimbus-request-id"]
        assert r.headers["content-length"] == str(len("Hello, World!"))
        assert c.get("/hello").text == "Hello, World!"  # same connection still in sync
        assert c.head("/_nimbus/health").status_code == 200
        r = c.head("/nope")
        assert r.status_code == 404 and r.headers["x-nimbus-request-id"]
        r = c.head("/upload")  # POST only
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        assert c.get("/hello").text == "Hello, World!"


def test_cookies_both_ways(adv):
    r = adv.http.get("/cookies", headers={"cookie": "a=1; b=two; c="})
    assert r.status_code == 200
    assert r.json()["cookies"] == ["a=1", "b=two", "c="]
    assert r.headers.get_list("set-cookie") == [
        "s=1; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT", "t=2; HttpOnly"]


# -- control API and CLI ------------------------------------------------------------


def test_control_api_rejects_bad_tokens_on_every_endpoint(adv, adv_root):
    intruder = write_app(adv_root, "intruder",
                         "functions:\n  intruder:\n    handler: i.h\n"
                         "    http: [{method: GET, path: /intruder}]\n",
                         **{"i.py": "def h(e, c):\n    return 'in'\n"})
    bundle = make_bundle(intruder)
    endpoints = [
        ("POST", "/v1/deploy", {"content": bundle, "params": {"name": "intruder"}}),
        ("GET", "/v1/functions", {}),
        ("POST", "/v1/functions/hello/invoke", {"content": b"{}"}),
        ("POST", "/v1/functions/nosuch/invoke", {"content": b"{}"}),
        ("GET", "/v1/functions/hello/logs", {}),
        ("GET", "/v1/functions/hello/logs", {"params": {"follow": "1"}}),
        ("GET", "/v1/status", {}),
    ]
    bad = [None, "Bearer wrong", f"Bearer {adv.token}x", f"Bearer {adv.token[:-1]}",
           adv.token, f"Basic {adv.token}", "Bearer", f"Bearer  {adv.token}",
           f"{adv.token} Bearer"]
    failures = []
    with httpx.Client(base_url=adv.control_url, timeout=10.0) as c:
        for method, path, kw in endpoints:
            for auth in bad:
                headers = {"authorization": auth} if auth is not None else {}
                r = c.request(method, path, headers=headers, **kw)
                if r.status_code != 401 or r.json().get("errorType") != "Unauthorized":
                    failures.append((method, path, auth, r.status_code, r.text[:100]))
    assert not failures, failures
    with control(adv) as c:
        names = [f["name"] for f in c.get("/v1/functions").json()]
    assert "intruder" not in names
    assert adv.http.get("/intruder").status_code == 404


def test_usage_errors_are_one_line_exit_2(tmp_path):
    # "errors as one line, exit 2 for usage errors"
    failures = []
    for argv in (["up", "--bogus"], ["deploy", "--bogus"], ["invoke", "x", "--bogus"],
                 ["ls", "--bogus"], ["logs", "x", "--bogus"], ["status", "--bogus"],
                 ["frobnicate"], ["logs", "x", "--tail", "0"]):
        out = cli(*argv, cwd=tmp_path)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        if out.returncode != 2 or len(lines) != 1 or "Traceback" in out.stderr:
            failures.append(f"nimbus {' '.join(argv)} -> exit {out.returncode}, "
                            f"{len(lines)} lines: {lines}")
    assert not failures, "\n".join(failures)


def test_deploy_of_a_folder_with_manifest_errors(adv, adv_root):
    cases = {
        "typo": ("functions:\n  hello2:\n    handler: h.h\n    timout_s: 3\n", "app.yaml:4",
                 "timeout_s"),
        "yaml": ("functions:\n  hello2:\n    handler: h.h\n    http: [{method: GET\n", "app.yaml:",
                 None),
        "method": ("functions:\n  hello2:\n    handler: h.h\n"
                   "    http: [{method: FETCH, path: /x}]\n", "app.yaml:4", "method"),
        "callable": ("functions:\n  hello2:\n    handler: h.nothere\n", "app.yaml:3", "nothere"),
    }
    for name, (manifest, where, word) in cases.items():
        app = write_app(adv_root, f"bad-{name}", manifest,
                        **{"h.py": "def h(e, c):\n    return 1\n"})
        out = cli("deploy", str(app), "--state-dir", str(adv.state), cwd=adv_root)
        line = one_line_error(out, 2)
        assert where in line, (name, line)
        if word:
            assert word in line, (name, line)
    with control(adv) as c:
        assert "hello2" not in [f["name"] for f in c.get("/v1/functions").json()]


def test_invoke_data_from_missing_or_unreadable_files(adv, adv_root):
    missing = adv_root / "does-not-exist.json"
    line = one_line_error(cli("invoke", "hello", "--data", f"@{missing}",
                              "--state-dir", str(adv.state), cwd=adv_root), 2)
    assert str(missing) in line
    line = one_line_error(cli("invoke", "hello", "--data", f"@{adv_root}",
                              "--state-dir", str(adv.state), cwd=adv_root), 2)
    assert str(adv_root) in line
    bad = adv_root / "bad.json"
    bad.write_text("{nope")
    one_line_error(cli("invoke", "hello", "--data", f"@{bad}",
                       "--state-dir", str(adv.state), cwd=adv_root), 2)


def test_invoke_of_an_odd_function_name_is_one_line(adv, adv_root):
    # a name with a slash reaches a control API path that does not exist
    out = cli("invoke", "a/b", "--state-dir", str(adv.state), cwd=adv_root)
    one_line_error(out, 1)


def test_invoke_of_a_failing_handler_is_one_line_exit_1(adv, adv_root):
    out = cli("invoke", "shape", "--state-dir", str(adv.state), cwd=adv_root)
    # the event has no pathParameters: the handler raises KeyError -> exit 1, one line
    line = one_line_error(out, 1)
    assert "KeyError" in line


# -- redeploys --------------------------------------------------------------------


STEADY_MANIFEST = """\
functions:
  steady:
    handler: s.h
    max_instances: 1
    http: [{method: GET, path: /steady}]
"""


def steady_code(body: str) -> str:
    return ("import time\n\ndef h(e, c):\n    time.sleep(0.01)\n"
            f"    return {{'statusCode': 200, 'body': {body!r}}}\n")


def test_requests_during_a_redeploy_all_succeed(adv, adv_root):
    app = write_app(adv_root, "flow", STEADY_MANIFEST, **{"s.py": steady_code("old")})
    out = cli("deploy", str(app), "--state-dir", str(adv.state), cwd=adv_root)
    assert out.returncode == 0, out.stderr
    assert adv.http.get("/steady").text == "old"
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def stream() -> None:
        with httpx.Client(base_url=adv.url, timeout=30.0) as c:
            while not stop.is_set():
                r = c.get("/steady")
                with lock:
                    results.append((r.status_code, r.text))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(results) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        (app / "s.py").write_text(steady_code("new"))
        # all at once, named: under this load a faster machine passes the
        # 100 invocations a minute that make a plain deploy a canary
        out = cli("deploy", str(app), "--strategy", "all-at-once", "--state-dir",
                  str(adv.state), cwd=adv_root)
        assert out.returncode == 0, out.stderr
        with lock:
            at_deploy = len(results)
        deadline = time.monotonic() + 10
        while len(results) < at_deploy + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    bad = [x for x in results if x[0] != 200 or x[1] not in ("old", "new")]
    assert not bad, f"{len(bad)} of {len(results)} requests failed during the redeploy: " \
                    f"{bad[:3]}"
    # live when deploy returns: anything that finished after the 4 requests then in flight is new
    assert results[-1] == (200, "new")
    assert all(b == "new" for _s, b in results[at_deploy + 4:]), results[at_deploy:]


FRAGILE_MANIFEST = """\
functions:
  fragile:
    handler: f.h
    env: {{FLAG: "{flag}"}}
    http: [{{method: GET, path: /fragile}}]
"""


def fragile_code(body: str) -> str:
    return (
        "import os\n"
        "if os.path.exists(os.environ['FLAG']):\n"
        "    raise RuntimeError('import broke')\n\n"
        "def h(event, context):\n"
        "    if (event.get('queryStringParameters') or {}).get('die'):\n"
        "        os._exit(1)\n"
        f"    return {{'statusCode': 200, 'body': {body!r}}}\n")


def test_module_that_fails_at_import_after_a_redeploy(adv, adv_root):
    flag = adv_root / "fragile.flag"
    app = write_app(adv_root, "fragile", FRAGILE_MANIFEST.format(flag=flag),
                    **{"f.py": fragile_code("v1")})
    assert cli("deploy", str(app), "--state-dir", str(adv.state), cwd=adv_root).returncode == 0
    assert adv.http.get("/fragile").text == "v1"
    (app / "f.py").write_text(fragile_code("v2"))
    out = cli("deploy", str(app), "--state-dir", str(adv.state), cwd=adv_root)
    assert out.returncode == 0, out.stderr
    assert adv.http.get("/fragile").text == "v2"
    flag.write_text("")  # from now on, a new instance fails to import
    try:
        r = adv.http.get("/fragile", params={"die": "1"})
        assert_clean_error(r, (502,))
        t0 = time.monotonic()
        r = adv.http.get("/fragile")
        assert time.monotonic() - t0 < 5, "waited for an instance that can never start"
        body = assert_clean_error(r, (500, 502))
        assert "import broke" in body["errorMessage"], body
        assert adv.http.get("/hello").text == "Hello, World!"  # the platform is unharmed
    finally:
        flag.unlink()
    deadline = time.monotonic() + 10
    while (r := adv.http.get("/fragile")).text != "v2":
        assert time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.05)


# -- platform-level damage (own platforms) ---------------------------------------


def test_a_handler_that_kills_the_zygote_does_not_take_the_platform_down(start_nimbus, tmp_path):
    app = write_app(tmp_path, "killer",
                    "functions:\n"
                    "  killer:\n    handler: k.kill\n    timeout_s: 5\n"
                    "    http: [{method: GET, path: /kill}]\n"
                    "  calm:\n    handler: k.calm\n    http: [{method: GET, path: /calm}]\n",
                    **{"k.py": "import os, signal, time\n\n"
                               "def kill(e, c):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                               "    time.sleep(10)\n\n"
                               "def calm(e, c):\n"
                               "    return {'statusCode': 200, 'body': 'calm'}\n"})
    # Contained (the default as root), the handler may not signal the zygote
    # at all: a clean error. As the platform's user it can: the zygote dies,
    # the request gets 502, and the platform starts a new one.
    for contained, extra, expected in ((True, (), 500), (False, HOST_FILES, 502)):
        n = start_nimbus(app, *extra, name=f"state-{contained}")
        assert n.http.get("/calm").text == "calm"
        t0 = time.monotonic()
        r = n.http.get("/kill")
        assert time.monotonic() - t0 < 4.5
        body = assert_clean_error(r, (expected,))
        if contained:
            assert body["errorType"] == "PermissionError", body
        deadline = time.monotonic() + 15
        while True:
            r = n.http.get("/calm")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert (r.status_code, r.text) == (200, "calm")
        assert n.proc.poll() is None
        r = n.http.get("/calm")
        assert (r.status_code, r.text) == (200, "calm")
        n.stop()


def test_the_shared_platform_survived_everything_above(adv):
    assert adv.http.get("/_nimbus/health").json() == {"status": "ok", "region": "local"}
    assert adv.proc.poll() is None
    assert adv.http.get("/hello").text == "Hello, World!"
