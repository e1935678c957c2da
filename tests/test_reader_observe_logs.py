"""A second reader's checks of logs and the dashboard, written from the
README: Lambda's text and JSON log formats, platform lines, ``nimbus logs``
filters and their errors, the log stream (SSE), and the dashboard's auth
over plain HTTP (cookie flags, forged cookies, CSRF, the token never shown).
One ``nimbus up`` for the module."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Nimbus
from tests.region import wait_until

MANIFEST = """\
name: logsapp
functions:
  lg:
    handler: lg.handler
    http: [{method: GET, path: /lg}]
  jl:
    handler: jl.handler
    log_format: JSON
    http: [{method: GET, path: /jl}]
  lvl:
    handler: lvl.handler
    log_level: WARN
    http: [{method: GET, path: /lvl}]
  many:
    handler: many.handler
    timeout_s: 30
    http: [{method: GET, path: /many}]
  quit:
    handler: quit.handler
    http: [{method: GET, path: /quit}]
  slow:
    handler: quit.slow
    timeout_s: 1
    http: [{method: GET, path: /slow}]
  sour:
    handler: quit.sour
    retries: 0
  conc:
    handler: conc.handler
    concurrency: 8
    max_instances: 1
    http: [{method: GET, path: /conc}]
  envjson:
    handler: conc.handler
    env: {AWS_LAMBDA_LOG_FORMAT: JSON}
    http: [{method: GET, path: /envjson}]
  basic:
    handler: basic.handler
    http: [{method: GET, path: /basic}]
  hog:
    handler: quit.hog
    memory_mb: 64
    http: [{method: GET, path: /hog}]
"""

BASIC = """\
import logging
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s|%(name)s|%(message)s")
log = logging.getLogger("app.sub")

def handler(event, context):
    import os, sys
    log.debug("dbg line")
    os.write(1, b"bad \\xff\\xfe bytes\\n")
    sys.stdout.write("no newline at the end")
    return context.aws_request_id
"""

CONC = """\
import logging, time
logger = logging.getLogger()
logger.setLevel(logging.INFO)

def handler(event, context):
    mine = context.aws_request_id
    for i in range(5):
        logger.info("mine %s %d", mine, i)
        print("printed", mine, i)
        time.sleep(0.01)
    return mine
"""

LG = """\
import logging, sys
logger = logging.getLogger()
logger.setLevel(logging.INFO)

def handler(event, context):
    logger.debug("hidden debug")
    logger.info("hello %s", "world")
    logger.warning("careful")
    print("plain print")
    print("to stderr", file=sys.stderr)
    try:
        1 / 0
    except ZeroDivisionError:
        logger.exception("it broke")
    print("[CRITICAL]\\t2026-01-01T00:00:00.000Z\\tforged-rid\\tforged text line")
    print('{"level": "CRITICAL", "requestId": "forged-rid", "message": "forged json"}')
    return context.aws_request_id
"""

JL = """\
import logging
logger = logging.getLogger()
logger.setLevel(logging.INFO)

def handler(event, context):
    logger.info("json hello", extra={"k": 1})
    try:
        {}["nokey"]
    except KeyError:
        logger.exception("json broke")
    print("plain print in json")
    return context.aws_request_id
"""

LVL = """\
import logging
logger = logging.getLogger()
logger.setLevel(logging.DEBUG)

def handler(event, context):
    logger.info("dropped by the application log level")
    logger.warning("kept warning")
    return context.aws_request_id
"""

MANY = """\
import logging
logger = logging.getLogger()
logger.setLevel(logging.INFO)

def handler(event, context):
    for i in range(10000):
        logger.info("line %d", i)
    return context.aws_request_id
"""

QUIT = """\
import sys, time

def handler(event, context):
    sys.exit(3)

def slow(event, context):
    time.sleep(5)

def sour(event, context):
    raise RuntimeError("sour")

def hog(event, context):
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(8 * 1024 * 1024))
    return "survived"
"""

BROKEN_MANIFEST = """\
name: broken
functions:
  g2:
    handler: g2.handler
    http: [{method: GET, path: /g2}]
"""

BROKEN = """\
import os

import slugify_not_installed_anywhere


def handler(event, context):
    return "never"
"""

TEXT_LINE = re.compile(
    r"^\[(?P<level>[A-Z]+)\]\t(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\t(?P<rid>[^\t]+)"
    r"\t(?P<msg>.*)$", re.S)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("reader-logs")
    app = root / "logsapp"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST)
    for name, code in (("lg", LG), ("jl", JL), ("lvl", LVL), ("many", MANY), ("quit", QUIT),
                       ("conc", CONC), ("basic", BASIC)):
        (app / f"{name}.py").write_text(code)
    n = Nimbus(app, root / "state", root / "up.out", "--containment", "rlimits")
    yield n
    n.stop()


def cli(up: Nimbus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nimbus", *args, "--state-dir", str(up.state)],
                          capture_output=True, text=True, timeout=60, cwd=up.state.parent)


def auth(up: Nimbus) -> dict[str, str]:
    return {"authorization": f"Bearer {up.token}"}


def records(up: Nimbus, fn: str, **params: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{up.control_url}/v1/functions/{fn}/logs", params=params,
                  headers=auth(up), timeout=60)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def call(up: Nimbus, path: str, status: int = 200) -> str:
    r = httpx.get(up.url + path, timeout=60)
    assert r.status_code == status, (path, r.status_code, r.text)
    return r.headers["x-nimbus-request-id"]


def of_request(up: Nimbus, fn: str, rid: str, n: int) -> list[dict[str, Any]]:
    """The records of one request, once at least ``n`` are there."""
    got: list[dict[str, Any]] = wait_until(
        lambda: (lambda rs: rs if len(rs) >= n else None)(
            records(up, fn, request_id=rid, tail="100000")), 15, f"{n} log lines of {fn}")
    return got


# -- formats ---------------------------------------------------------------------------------


def test_lambda_text_format_exactly(up: Nimbus) -> None:
    rid = call(up, "/lg")
    recs = of_request(up, "lg", rid, 8)
    texts = [r["text"] for r in recs]
    assert all(r["rid"] == rid for r in recs)
    assert not any("hidden debug" in t for t in texts), "DEBUG is below the INFO set"
    info = [r for r in recs if "hello world" in r["text"]]
    assert len(info) == 1, texts
    m = TEXT_LINE.match(info[0]["text"])
    assert m, repr(info[0]["text"])
    assert m["level"] == "INFO" and m["rid"] == rid and m["msg"] == "hello world"
    assert info[0].get("level") == "INFO"
    warn = next(r for r in recs if "careful" in r["text"])
    assert TEXT_LINE.match(warn["text"])["level"] == "WARNING"  # type: ignore[index]
    assert warn.get("level") == "WARNING"
    plain = [r for r in recs if r["text"] == "plain print"]
    assert len(plain) == 1 and plain[0]["stream"] == "stdout" and "level" not in plain[0], recs
    err = [r for r in recs if r["text"] == "to stderr"]
    assert len(err) == 1 and err[0]["stream"] == "stderr", recs
    # logger.exception: the message, then the traceback
    exc_at = next(i for i, r in enumerate(recs) if "it broke" in r["text"])
    m = TEXT_LINE.match(recs[exc_at]["text"])
    assert m and m["level"] == "ERROR", recs[exc_at]
    after = "\n".join(r["text"] for r in recs[exc_at:])
    assert "Traceback (most recent call last):" in after, after
    assert "ZeroDivisionError: division by zero" in after, after
    assert "1 / 0" in after, after
    # printed lines that look like logger lines are still print output of this request
    forged = [r for r in recs if "forged" in r["text"]]
    assert len(forged) == 2, recs
    for r in forged:
        assert r["rid"] == rid and r["stream"] == "stdout", r
        assert "level" not in r, f"print output given a level: {r}"
    # the CLI shows the same line
    shown = cli(up, "logs", "lg", "--request-id", rid)
    assert shown.returncode == 0, shown.stderr
    assert info[0]["text"] in shown.stdout, shown.stdout


def test_lambda_json_format(up: Nimbus) -> None:
    rid = call(up, "/jl")
    recs = of_request(up, "jl", rid, 3)
    objs = {}
    for r in recs:
        f = r.get("fields")
        if isinstance(f, dict) and "message" in f:
            objs[f["message"]] = (r, f)
        else:
            assert r["text"] == "plain print in json", r
    r, f = objs["json hello"]
    assert json.loads(r["text"]) == f
    assert f["level"] == "INFO" and r.get("level") == "INFO"
    assert f["requestId"] == rid
    assert f["logger"] == "root"
    assert f["k"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", f["timestamp"]), f
    r, f = objs["json broke"]
    assert f["level"] == "ERROR" and f["errorType"] == "KeyError", f
    assert f["errorMessage"] in ("'nokey'", "nokey"), f
    assert isinstance(f["stackTrace"], list) and f["stackTrace"], f
    assert any("nokey" in line for line in f["stackTrace"]), f["stackTrace"]


def test_application_log_level_drops_records_below_it(up: Nimbus) -> None:
    rid = call(up, "/lvl")
    texts = [r["text"] for r in of_request(up, "lvl", rid, 1)]
    assert not any("dropped by" in t for t in texts), texts
    assert sum("kept warning" in t for t in texts) == 1, texts


def test_basic_config_at_import_sets_level_and_format(up: Nimbus) -> None:
    rid = call(up, "/basic")
    recs = of_request(up, "basic", rid, 1)
    dbg = [r for r in recs if "dbg line" in r["text"]]
    assert len(dbg) == 1, recs
    assert dbg[0]["text"] == "DEBUG|app.sub|dbg line", dbg
    assert dbg[0].get("level") == "DEBUG" and dbg[0]["rid"] == rid, dbg
    # bytes that are not UTF-8, and a last line without its newline, are still lines of it
    recs = of_request(up, "basic", rid, 3)
    texts = [r["text"] for r in recs]
    assert any(t.startswith("bad ") and t.endswith(" bytes") for t in texts), texts
    assert "no newline at the end" in texts, texts
    shown = cli(up, "logs", "basic", "--request-id", rid)
    assert shown.returncode == 0 and "no newline at the end" in shown.stdout, shown.stderr


def test_ten_thousand_lines_all_arrive_in_order(up: Nimbus) -> None:
    rid = call(up, "/many")
    recs = of_request(up, "many", rid, 10000)
    assert len(recs) == 10000, len(recs)
    msgs = [TEXT_LINE.match(r["text"])["msg"] for r in recs]  # type: ignore[index]
    assert msgs == [f"line {i}" for i in range(10000)]
    tail = records(up, "many", request_id=rid, tail="5")
    assert [r["text"].rsplit("\t", 1)[1] for r in tail] == [f"line {i}" for i in
                                                             range(9995, 10000)]


def test_concurrent_invocations_log_under_their_own_request_ids(up: Nimbus) -> None:
    """One instance runs 8 invocations at once: each line, logger or print,
    carries the request id of the invocation that wrote it."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        rids = list(pool.map(lambda _: call(up, "/conc"), range(8)))
    assert len(set(rids)) == 8
    every: list[dict[str, Any]] = wait_until(
        lambda: (lambda rs: rs if len(rs) >= 80 else None)(
            [r for r in records(up, "conc", tail="1000") if r["rid"] in rids]),
        15, "80 lines of conc")
    assert len(every) == 80, every
    for r in every:
        assert r["rid"] in r["text"], f"a line of another invocation: {r}"
        if r.get("level"):
            m = TEXT_LINE.match(r["text"])
            assert m and m["rid"] == r["rid"], r
    assert {r["rid"] for r in every} == set(rids)


def test_json_format_from_the_lambda_env_variable(up: Nimbus) -> None:
    rid = call(up, "/envjson")
    recs = of_request(up, "envjson", rid, 10)
    logged = [r for r in recs if r.get("level")]
    assert len(logged) == 5, recs
    for r in logged:
        f = r.get("fields")
        assert isinstance(f, dict) and f.get("requestId") == rid, r
        assert f["message"].startswith(f"mine {rid}"), f


def test_out_of_memory_leaves_its_platform_line(up: Nimbus) -> None:
    rid = call(up, "/hog", 500)
    recs = of_request(up, "hog", rid, 1)
    assert any(r["stream"] == "platform" and r.get("level") == "ERROR" and
               "Runtime.OutOfMemory: function exceeded its memory limit of 64 MB" in r["text"]
               for r in recs), recs


# -- platform lines -----------------------------------------------------------------------------


def test_sys_exit_and_timeout_leave_platform_lines(up: Nimbus) -> None:
    rid = call(up, "/quit", 500)
    recs = of_request(up, "quit", rid, 1)
    plat = [r for r in recs if r["stream"] == "platform"]
    assert any("Runtime.ExitError: handler exited: SystemExit(3)" in r["text"] for r in plat), recs
    assert all(r.get("level") == "ERROR" for r in plat), plat
    rid = call(up, "/slow", 504)
    recs = of_request(up, "slow", rid, 1)
    assert any(r["stream"] == "platform" and "Task timed out after 1.00 seconds" in r["text"]
               and r.get("level") == "ERROR" for r in recs), recs


def test_import_error_names_function_file_and_line(up: Nimbus, tmp_path: Path) -> None:
    app = tmp_path / "broken"
    app.mkdir()
    (app / "app.yaml").write_text(BROKEN_MANIFEST)
    (app / "g2.py").write_text(BROKEN)
    r = cli(up, "deploy", str(app))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert "Traceback" not in r.stderr, "the deploy names the failure in one line"
    assert "function g2: g2.py, line 3: handler failed to import: ModuleNotFoundError" in out, out
    shown = cli(up, "logs", "g2")
    assert shown.returncode == 0, shown.stderr
    assert "Traceback (most recent call last):" in shown.stdout, shown.stdout
    assert "slugify_not_installed_anywhere" in shown.stdout
    assert 'g2.py", line 3' in shown.stdout, shown.stdout
    plat = records(up, "g2", level="ERROR")
    assert plat and all(p["stream"] == "platform" for p in plat), plat


# -- nimbus logs: filters and their errors -------------------------------------------------------


@pytest.mark.parametrize("args,names", [
    (("--since", "yesterday"), "--since"),
    (("--since", "-10m"), "--since"),
    (("--since", "2026-13-45T00:00:00Z"), "--since"),
    (("--level", "LOUD"), "--level"),
])
def test_bad_logs_options_are_usage_errors(up: Nimbus, args: tuple[str, ...],
                                           names: str) -> None:
    r = cli(up, "logs", "lg", *args)
    assert r.returncode == 2, (args, r.returncode, r.stdout[-300:], r.stderr[-800:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nimbus: error:"), r.stderr
    assert names.lstrip("-") in lines[0], lines[0]


def test_level_and_since_filters(up: Nimbus) -> None:
    rid = call(up, "/lg")
    of_request(up, "lg", rid, 6)
    got = records(up, "lg", request_id=rid, level="WARNING")
    assert got and {g.get("level") for g in got} <= {"WARNING", "ERROR", "CRITICAL"}, got
    assert not any(g["text"] == "plain print" for g in got)
    assert any(g["text"] == "plain print" for g in records(up, "lg", request_id=rid,
                                                           level="INFO"))
    assert records(up, "lg", request_id=rid, since="2099-01-01T00:00:00Z") == []
    # --tail counts the lines the other filters keep
    last = records(up, "lg", request_id=rid, level="WARNING", tail="1")
    assert len(last) == 1 and last[0]["text"] == got[-1]["text"], (last, got)
    s = cli(up, "logs", "lg", "--request-id", rid, "--since", "10m", "--level", "warning",
            "--json")
    assert s.returncode == 0, s.stderr
    shown = [json.loads(x) for x in s.stdout.splitlines() if x.strip()]
    assert [x["text"] for x in shown] == [g["text"] for g in got]


def test_bad_log_parameters_of_the_api_are_400s(up: Nimbus) -> None:
    for params in ({"since": "yesterday"}, {"level": "LOUD"}, {"tail": "0"},
                   {"follow": "maybe"}, {"since": "1" * 400 + "d"}):
        r = httpx.get(f"{up.control_url}/v1/functions/lg/logs", params=params,
                      headers=auth(up), timeout=30)
        assert r.status_code == 400, (params, r.status_code, r.text[:300])
        body = r.json()
        assert set(body) == {"errorType", "errorMessage"}
        assert next(iter(params)) in body["errorMessage"], body


def test_since_spans_and_bad_cluster_files(up: Nimbus, tmp_path: Path) -> None:
    rid = call(up, "/lg")
    of_request(up, "lg", rid, 6)
    for span in ("90s", "1h30m", "1d"):
        assert records(up, "lg", request_id=rid, since=span), span
    # ISO times: an offset is honoured, none means UTC
    from datetime import UTC, datetime, timedelta, timezone
    minute_ago = datetime.now(UTC) - timedelta(seconds=60)
    east = minute_ago.astimezone(timezone(timedelta(hours=5)))
    for iso in (east.isoformat(timespec="seconds"),
                minute_ago.replace(tzinfo=None).isoformat(timespec="seconds"),
                minute_ago.strftime("%Y-%m-%dT%H:%M:%SZ")):
        assert records(up, "lg", request_id=rid, since=iso), iso
    in_a_minute = (datetime.now(UTC) + timedelta(seconds=60)).astimezone(
        timezone(timedelta(hours=-5)))
    assert records(up, "lg", request_id=rid, since=in_a_minute.isoformat()) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: [\n")
    for f in (str(bad), str(tmp_path / "missing.yaml")):
        r = cli(up, "logs", "lg", "--cluster", f)
        assert r.returncode == 2, (f, r.returncode, r.stderr)
        assert r.stderr.startswith("nimbus: error:") and "Traceback" not in r.stderr, r.stderr


def test_nimbus_trace_says_tracing_is_off(up: Nimbus) -> None:
    rid = call(up, "/lg")
    r = cli(up, "trace", rid)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("nimbus: error:") and "Traceback" not in r.stderr, r.stderr
    assert "--trace" in r.stderr or "off" in r.stderr, r.stderr


def test_logs_of_a_function_that_does_not_exist(up: Nimbus) -> None:
    r = cli(up, "logs", "no-such-function")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("nimbus: error:") and "no-such-function" in r.stderr, r.stderr
    a = httpx.get(f"{up.control_url}/v1/functions/no-such-function/logs", headers=auth(up),
                  timeout=30)
    assert a.status_code == 404 and set(a.json()) == {"errorType", "errorMessage"}, a.text


def test_logs_stream_as_server_sent_events(up: Nimbus) -> None:
    got: list[dict[str, Any]] = []
    rid_box: list[str] = []
    done = threading.Event()

    def poke() -> None:
        time.sleep(0.5)
        rid_box.append(call(up, "/lg"))

    t = threading.Thread(target=poke)
    t.start()
    headers = {**auth(up), "accept": "text/event-stream"}
    deadline = time.monotonic() + 20
    with httpx.stream("GET", f"{up.control_url}/v1/functions/lg/logs",
                      params={"follow": "1", "tail": "1", "level": "WARNING"},
                      headers=headers,
                      timeout=httpx.Timeout(20)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        event = None
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                assert event == "log", line
                rec = json.loads(line.split(":", 1)[1])
                if rid_box and rec.get("rid") == rid_box[0]:
                    got.append(rec)
                    if "it broke" in rec["text"]:
                        done.set()
                        break
    t.join(20)
    assert done.is_set(), got
    assert any("careful" in g["text"] for g in got), got
    assert all(g.get("level") in ("WARNING", "ERROR") for g in got), \
        f"--level WARNING while following let through: {got}"


# -- the dashboard over plain HTTP ---------------------------------------------------------------

UI_PATHS = ["/ui", "/ui/", "/ui/api/overview", "/ui/api/functions/lg", "/ui/api/edge",
            "/ui/api/scrapes", "/ui/static/app.js", "/ui/static/index.html",
            "/ui/api/functions/..%2f..%2fetc"]


def login(up: Nimbus) -> httpx.Response:
    return httpx.post(up.control_url + "/ui/login", data={"token": up.token}, timeout=30)


def cookie_of(resp: httpx.Response) -> tuple[str, str, str]:
    raw = resp.headers["set-cookie"]
    name, rest = raw.split("=", 1)
    value = rest.split(";", 1)[0]
    return name, value, raw


def test_nothing_under_ui_without_a_session(up: Nimbus) -> None:
    for path in UI_PATHS:
        for cookies in ({}, {"nimbus_session": "forged"}):
            with httpx.Client(cookies=cookies, timeout=30) as c:
                r = c.get(up.control_url + path)
            assert r.status_code in (303, 302, 401, 404), (path, r.status_code)
            if r.status_code in (302, 303):
                assert r.headers["location"].endswith("/ui/login"), r.headers
            assert "hello world" not in r.text and '"functions"' not in r.text, (path, r.text)
    # the token in a query string or a header does not sign a page in
    for kw in ({"params": {"token": up.token}},
               {"headers": auth(up)}):
        r = httpx.get(up.control_url + "/ui/api/overview", timeout=30, **kw)  # type: ignore
        assert r.status_code == 401, (kw, r.status_code)


def test_login_refuses_a_wrong_token_and_sets_no_cookie(up: Nimbus) -> None:
    wrong = "W" * len(up.token)
    r = httpx.post(up.control_url + "/ui/login", data={"token": wrong}, timeout=30)
    assert r.status_code in (401, 403), r.status_code
    assert "set-cookie" not in r.headers
    assert wrong not in r.text, "the submitted token is echoed back"
    r = httpx.post(up.control_url + "/ui/login", data={"token": ""}, timeout=30)
    assert r.status_code in (400, 401, 403) and "set-cookie" not in r.headers
    r = httpx.post(up.control_url + "/ui/login", params={"token": up.token}, timeout=30)
    assert "set-cookie" not in r.headers, "a token in the query string signed in"
    r = httpx.get(up.control_url + "/ui/login", params={"token": up.token}, timeout=30)
    assert "set-cookie" not in r.headers


def test_session_cookie_flags_and_the_token_never_shown(up: Nimbus) -> None:
    r = login(up)
    assert r.status_code in (302, 303), r.status_code
    name, value, raw = cookie_of(r)
    flags = [f.strip().lower() for f in raw.split(";")[1:]]
    assert "httponly" in flags, raw
    assert "samesite=strict" in flags, raw
    assert "secure" not in flags, "plain http: a Secure cookie would never come back"
    assert any(f.startswith("path=/") for f in flags), raw
    assert "max-age=43200" in flags, f"12 hours, says the README: {raw}"
    assert up.token not in raw and up.token not in value
    assert len(value) >= 32, "a guessable session id"
    jar = {name: value}
    for path in ("/ui", "/ui/static/app.js", "/ui/api/overview", "/ui/api/functions/lg",
                 "/ui/api/edge", "/ui/api/scrapes", "/ui/login"):
        p = httpx.get(up.control_url + path, cookies=jar, timeout=30)
        assert p.status_code in (200, 303), (path, p.status_code)
        assert up.token not in p.text, f"the token is in {path}"
    # a tampered session id is refused
    for bad in (value[:-1] + ("A" if value[-1] != "A" else "B"), value + "x", value[:16],
                up.token):
        f = httpx.get(up.control_url + "/ui/api/overview", cookies={name: bad}, timeout=30)
        assert f.status_code == 401, bad


def test_state_changing_calls_need_the_csrf_header(up: Nimbus) -> None:
    r = httpx.post(f"{up.control_url}/v1/functions/sour/invoke?async=1", content=b"{}",
                   headers=auth(up), timeout=30)
    assert r.status_code == 202, r.text

    def dead() -> int:
        d = httpx.get(f"{up.control_url}/v1/functions/sour/invocations",
                      params={"status": "dead"}, headers=auth(up), timeout=30)
        assert d.status_code == 200, d.text
        body = d.json()
        items = body if isinstance(body, list) else body.get("invocations", [])
        return len(items)

    wait_until(lambda: dead() == 1, 20, "a dead letter")
    name, value, _ = cookie_of(login(up))
    jar = {name: value}
    url = f"{up.control_url}/v1/functions/sour/dlq/redrive"
    for headers in ({}, {"x-nimbus-csrf": "0"}, {"x-nimbus-csrf": ""},
                    {"content-type": "application/x-www-form-urlencoded"}):
        r = httpx.post(url, cookies=jar, headers=headers, timeout=30)
        assert r.status_code in (401, 403), (headers, r.status_code, r.text)
    assert dead() == 1, "a refused redrive moved the dead letter"
    g = httpx.get(f"{up.control_url}/v1/functions", cookies=jar, timeout=30)
    assert g.status_code == 401, "reads too need the header (README)"
    r = httpx.post(url, cookies=jar, headers={"x-nimbus-csrf": "1"}, timeout=30)
    assert r.status_code == 200 and r.json().get("redriven") == 1, r.text
    # logout needs the header too, and ends the session on the server
    lo = httpx.post(up.control_url + "/ui/logout", cookies=jar, timeout=30)
    assert lo.status_code in (401, 403)
    assert httpx.get(up.control_url + "/ui/api/overview", cookies=jar,
                     timeout=30).status_code == 200
    lo = httpx.post(up.control_url + "/ui/logout", cookies=jar,
                    headers={"x-nimbus-csrf": "1"}, timeout=30)
    assert lo.status_code in (200, 204)
    assert httpx.get(up.control_url + "/ui/api/overview", cookies=jar,
                     timeout=30).status_code == 401
