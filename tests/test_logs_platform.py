"""Function logs on a real ``nimbus up``: Lambda's root logger (text and
JSON), platform lines for every failure the platform sees (import errors
with their traceback, out of memory, exits, timeouts, throttles, async
retries and dead letters), the filters, the Server-Sent Events stream,
following, and ``nimbus logs --cluster`` across two regions. One
``nimbus up --region eu`` for the whole module, and a second region (us)
started for the cluster tests."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Nimbus
from tests.multiregion import RegionProc, write_app, write_cluster_file
from tests.region import wait_until

MANIFEST = """\
name: logsapp
functions:
  rootlog:
    handler: h.rootlog
    http: [{method: GET, path: /rootlog}]
  jlog:
    handler: j.jlog
    log_format: JSON
    log_level: DEBUG
    http: [{method: GET, path: /jlog}]
  hog:
    handler: h.hog
    memory_mb: 64
    http: [{method: GET, path: /hog}]
  bye:
    handler: h.bye
    http: [{method: GET, path: /bye}]
  slow:
    handler: h.slow
    timeout_s: 0.5
    http: [{method: GET, path: /slow}]
  busy:
    handler: h.busy
    max_instances: 1
    max_queue: 0
    min_instances: 1
    http: [{method: GET, path: /busy}]
  talk:
    handler: h.talk
    http: [{method: GET, path: /talk}]
  flaky:
    handler: h.flaky
    retries: 1
    retry_delay_s: 0.05
"""

HANDLERS = '''\
import logging, os, sys, time
logger = logging.getLogger()
logger.setLevel(logging.INFO)

def rootlog(event, context):
    logger.info("x")
    logger.debug("not shown: below the level the handler set")
    logger.warning("careful")
    print("plain print")
    return {"statusCode": 200, "body": context.aws_request_id}

def hog(event, context):
    return len([bytearray(8 << 20) for _ in range(64)])

def bye(event, context):
    sys.exit(3)

def slow(event, context):
    time.sleep(30)

def busy(event, context):
    gate = event["queryStringParameters"]["gate"]  # held until the test opens it
    deadline = time.time() + 20
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.02)
    return "done"

def talk(event, context):
    logging.warning("from %s", os.environ["AWS_REGION"])
    print("chatter")
    return {"statusCode": 200, "body": context.aws_request_id}

def flaky(event, context):
    raise RuntimeError("always fails")
'''

JSON_HANDLERS = '''\
import logging

def jlog(event, context):
    if (event.get("queryStringParameters") or {}).get("boom"):
        raise ValueError("boom")
    logging.getLogger("orders").debug("order %s", 7, extra={"order_id": 7})
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("orders").exception("failed")
    return {"statusCode": 200, "body": context.aws_request_id}
'''

BROKEN_MANIFEST = """\
name: brokenapp
functions:
  g1:
    handler: fine.handler
  g2:
    handler: g2.handler
"""


TALK_MANIFEST = """\
name: talk
functions:
  talk:
    handler: h.talk
    http: [{method: GET, path: /talk}]
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def eu(root: Path) -> Iterator[RegionProc]:
    """The module's nimbus: region eu, every test function deployed."""
    app = write_app(root / "app", MANIFEST, "h", HANDLERS)
    (app / "j.py").write_text(JSON_HANDLERS)
    region = RegionProc("eu", "127.0.0.2", root, app).start()
    yield region
    region.stop()


@pytest.fixture(scope="module")
def up(eu: RegionProc) -> Nimbus:
    assert eu.nimbus is not None
    return eu.nimbus


@pytest.fixture(scope="module")
def world(root: Path, eu: RegionProc) -> Iterator[tuple[list[RegionProc], Path]]:
    """A second region, us, with only ``talk``, and a cluster file of both."""
    us = RegionProc("us", "127.0.0.3", root, write_app(root / "small", TALK_MANIFEST, "h",
                                                        HANDLERS)).start()
    try:
        yield [eu, us], write_cluster_file(root / "cluster", [eu, us]).path
    finally:
        us.stop()


def records(n: Nimbus, fn: str, **params: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{n.control_url}/v1/functions/{fn}/logs", params=params,
                  headers={"authorization": f"Bearer {n.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return [orjson.loads(line) for line in r.text.splitlines() if line]


def wait_records(n: Nimbus, fn: str, predicate: Any, what: str,
                 **params: str) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        recs = records(n, fn, **params)
        return recs if predicate(recs) else None

    got: list[dict[str, Any]] = wait_until(ready, 15, what)
    return got


def texts(recs: list[dict[str, Any]], stream: str | None = None) -> list[str]:
    return [r["text"] for r in recs if stream is None or r["stream"] == stream]


def test_the_root_logger_prints_lambdas_text_line_with_the_request_id(up: Nimbus) -> None:
    rid = up.http.get("/rootlog").text  # type: ignore[union-attr]
    recs = wait_records(up, "rootlog", lambda rs: len(rs) >= 3, "rootlog's lines",
                        request_id=rid)
    assert len(recs) == 3
    info, warning, plain = recs
    assert re.fullmatch(rf"\[INFO\]\t\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z\t{rid}\tx",
                        info["text"]), info
    assert (info["stream"], info["level"], info["rid"]) == ("stdout", "INFO", rid)
    assert warning["level"] == "WARNING" and warning["text"].startswith("[WARNING]\t")
    assert warning["text"].endswith(f"\t{rid}\tcareful")
    assert plain["text"] == "plain print" and "level" not in plain  # print stays as it was


def test_json_format_and_level_from_the_manifest(up: Nimbus) -> None:
    rid = up.http.get("/jlog").text  # type: ignore[union-attr]
    recs = wait_records(up, "jlog", lambda rs: any(r.get("level") == "ERROR" for r in rs),
                        "jlog's lines", request_id=rid)
    debug = recs[0]
    assert debug["level"] == "DEBUG"  # log_level: DEBUG set the root logger's level
    assert orjson.loads(debug["text"]) == debug["fields"]
    fields = debug["fields"]
    assert set(fields) == {"timestamp", "level", "message", "logger", "requestId", "order_id"}
    assert (fields["message"], fields["logger"], fields["requestId"], fields["order_id"]) == (
        "order 7", "orders", rid, 7)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["timestamp"])
    error = [r for r in recs if r.get("level") == "ERROR"]
    assert len(error) == 1
    assert error[0]["fields"]["errorType"] == "ZeroDivisionError"
    assert error[0]["fields"]["errorMessage"] == "division by zero"
    assert any("1 / 0" in line for line in error[0]["fields"]["stackTrace"])
    # an exception the handler lets out is a JSON record too
    failed = up.http.get("/jlog", params={"boom": "1"})  # type: ignore[union-attr]
    assert failed.status_code == 500
    recs = wait_records(up, "jlog", lambda rs: len(rs) == 1, "the uncaught error",
                        request_id=failed.headers["x-nimbus-request-id"])
    assert (recs[0]["stream"], recs[0]["level"]) == ("stderr", "ERROR")
    fields = recs[0]["fields"]
    assert (fields["errorType"], fields["errorMessage"], fields["message"]) == (
        "ValueError", "boom", "ValueError: boom")
    assert orjson.loads(recs[0]["text"]) == fields


def test_out_of_memory_exit_and_timeout_are_platform_lines(up: Nimbus) -> None:
    assert up.http is not None
    answers = {fn: up.http.get(f"/{fn}") for fn in ("hog", "bye", "slow")}
    assert [a.status_code for a in answers.values()] == [500, 500, 504]
    expected = {
        "hog": "Runtime.OutOfMemory: function exceeded its memory limit of 64 MB",
        "bye": "Runtime.ExitError: handler exited: SystemExit(3)",
        "slow": "Task timed out after 0.50 seconds",
    }
    for fn, line in expected.items():
        rid = answers[fn].headers["x-nimbus-request-id"]
        recs = wait_records(up, fn, lambda rs: any(r["stream"] == "platform" for r in rs),
                            f"{fn}'s platform line", request_id=rid)
        platform = [r for r in recs if r["stream"] == "platform"]
        assert [(r["text"], r["level"]) for r in platform] == [(line, "ERROR")], fn


def status(n: Nimbus) -> dict[str, Any]:
    r = httpx.get(f"{n.control_url}/v1/status", headers={"authorization": f"Bearer {n.token}"},
                  timeout=10)
    return {f["name"]: f for f in r.json()["functions"]}


def test_an_idle_instance_that_dies_is_a_platform_line(up: Nimbus) -> None:
    assert up.http is not None and up.http.get("/rootlog").status_code == 200
    inst = wait_until(lambda: status(up)["rootlog"]["instances"], 10, "rootlog's instance")[0]
    os.kill(inst["pid"], signal.SIGKILL)
    line = (f"instance {inst['id']} exited while idle (killed, or its zygote or a process "
            "it started took it down)")
    recs = wait_records(up, "rootlog", lambda rs: any(r["text"] == line for r in rs),
                        "the line about the instance's death", level="ERROR")
    assert [(r["rid"], r["level"]) for r in recs if r["text"] == line] == [(None, "ERROR")]


def test_throttles_are_counted_into_one_line_per_second(up: Nimbus, tmp_path: Path) -> None:
    assert up.http is not None
    gate = tmp_path / "gate"
    url = up.url + f"/busy?gate={gate}"
    first: list[int] = []
    holder = threading.Thread(target=lambda: first.append(httpx.get(url, timeout=10).status_code))
    holder.start()
    wait_until(lambda: any(f["name"] == "busy" and f["concurrency"] == 1
                           for f in httpx.get(f"{up.control_url}/v1/status", headers={
                               "authorization": f"Bearer {up.token}"}).json()["functions"]),
               10, "the first request in flight")
    codes = [httpx.get(url, timeout=10).status_code for _ in range(5)]
    gate.touch()
    holder.join(20)
    assert codes == [429] * 5 and first == [200]
    def counted(recs: list[dict[str, Any]]) -> int:
        total = 0
        for r in recs:
            if r["stream"] == "platform":
                m = re.fullmatch(r"throttled (\d+) requests? in the last 1 s "
                                 r"\((\d+) at the concurrency limit with the queue full\)",
                                 r["text"])
                assert m and m[1] == m[2] and r["level"] == "WARNING", r
                total += int(m[1])
        return total

    recs = wait_records(up, "busy", lambda rs: counted(rs) == 5, "the throttle lines")
    # one line per second at most: five quick refusals fit in one or two windows
    assert 1 <= sum(r["stream"] == "platform" for r in recs) <= 2


def test_async_retries_and_dead_letters_are_platform_lines(up: Nimbus) -> None:
    r = httpx.post(f"{up.control_url}/v1/functions/flaky/invoke", content=b"{}",
                   headers={"authorization": f"Bearer {up.token}",
                            "x-nimbus-invocation-type": "Event"}, timeout=10)
    assert r.status_code == 202, r.text
    inv = r.json()["invocationId"]
    recs = wait_records(up, "flaky", lambda rs: any("dead-lettered" in r["text"] for r in rs),
                        "the dead-letter line")
    platform = [r for r in recs if r["stream"] == "platform"]
    assert len(platform) == 2
    retry, dead = platform
    assert retry["level"] == "WARNING" and re.fullmatch(
        rf"async invocation {inv} failed on try 1 \(RuntimeError: always fails\); "
        r"retrying in \d+\.\d s", retry["text"]), retry
    assert (dead["level"], dead["text"]) == (
        "ERROR", f"async invocation {inv} dead-lettered after 2 tries "
                 "(RuntimeError: always fails); failed after 2 tries (retries: 1)")
    # the handler's own traceback is there too, at level ERROR
    errors = [r for r in recs if r["stream"] == "stderr" and r.get("level") == "ERROR"]
    assert [r["text"] for r in errors if r["text"].startswith("[ERROR]")] == [
        "[ERROR] RuntimeError: always fails"] * 2


def test_a_failing_import_names_function_file_and_line_and_its_logs_stay(
        up: Nimbus, tmp_path: Path) -> None:
    app = tmp_path / "brokenapp"
    app.mkdir()
    (app / "app.yaml").write_text(BROKEN_MANIFEST)
    (app / "fine.py").write_text("def handler(event, context):\n    return 1\n")
    (app / "g2.py").write_text("import os\n\nimport slugify\n\n"
                               "def handler(event, context):\n    return 1\n")
    out = up.cli("deploy", str(app))
    assert out.returncode == 1
    assert ("nimbus: error: function g2: g2.py, line 3: handler failed to import: "
            "ModuleNotFoundError: No module named 'slugify'") in out.stderr, out.stderr
    shown = up.cli("logs", "g2")  # not deployed, but it has logs
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].endswith(" - platform:ERROR function g2: g2.py, line 3: handler failed "
                             "to import: ModuleNotFoundError: No module named 'slugify'")
    body = [line.split(" platform:ERROR ", 1)[1] for line in lines[1:]]
    assert body[0] == "Traceback (most recent call last):"
    assert re.fullmatch(r'  File ".*/g2.py", line 3, in <module>', body[1]), body
    assert body[2:] == ["    import slugify", "ModuleNotFoundError: No module named 'slugify'"]
    missing = httpx.get(f"{up.control_url}/v1/functions/never-deployed/logs",
                        headers={"authorization": f"Bearer {up.token}"})
    assert missing.status_code == 404
    assert missing.json()["errorMessage"] == (
        "function 'never-deployed' is not deployed and has no logs")


def test_filters_since_level_request_id_and_json(up: Nimbus) -> None:
    assert up.http is not None
    rids = [up.http.get("/rootlog").text for _ in range(2)]
    wait_records(up, "rootlog", lambda rs: len(rs) == 3, "the second request's lines",
                 request_id=rids[1])
    warnings = up.cli("logs", "rootlog", "--level", "warn", "--request-id", rids[1], "--json")
    assert warnings.returncode == 0, warnings.stderr
    got = [orjson.loads(line) for line in warnings.stdout.splitlines()]
    assert [(r["rid"], r["level"], r["text"].split("\t")[-1]) for r in got] == [
        (rids[1], "WARNING", "careful")]
    info = records(up, "rootlog", level="INFO", request_id=rids[0])
    assert [(r["rid"], r.get("level")) for r in info] == [
        (rids[0], "INFO"), (rids[0], "WARNING"), (rids[0], None)]  # print counts as INFO
    assert records(up, "rootlog", since="2h", request_id=rids[0]) == records(
        up, "rootlog", request_id=rids[0])
    assert records(up, "rootlog", since="2999-01-01T00:00:00Z") == []
    assert len(records(up, "rootlog", tail="2", level="WARNING")) == 2
    for key, value in (("since", "yesterday"), ("level", "LOUD")):
        r = httpx.get(f"{up.control_url}/v1/functions/rootlog/logs", params={key: value},
                      headers={"authorization": f"Bearer {up.token}"})
        assert r.status_code == 400
        assert r.json()["errorMessage"].startswith(f"query parameter {key} must be"), r.text


def test_server_sent_events_stream_and_follow(up: Nimbus) -> None:
    assert up.http is not None
    rid = up.http.get("/rootlog").text
    wait_records(up, "rootlog", lambda rs: len(rs) == 3, "the lines", request_id=rid)
    r = httpx.get(f"{up.control_url}/v1/functions/rootlog/logs", params={"request_id": rid},
                  headers={"authorization": f"Bearer {up.token}",
                           "accept": "text/event-stream"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and len(events) == 4
    for event, rec in zip(events[:3], records(up, "rootlog", request_id=rid), strict=True):
        kind, data = event.split("\n")
        assert kind == "event: log" and orjson.loads(data.removeprefix("data: ")) == rec
    # following: a line written after the stream began arrives on it
    follower = subprocess.Popen(
        [sys.executable, "-m", "nimbus.cli.main", "logs", "rootlog", "-f", "--tail", "1",
         "--level", "WARNING", "--state-dir", str(up.state)],
        stdout=subprocess.PIPE, text=True)
    try:
        lines = line_reader(follower)
        assert lines.get(timeout=15).rstrip().endswith(f"\t{rid}\tcareful")
        later = up.http.get("/rootlog").text
        assert lines.get(timeout=15).rstrip().endswith(f"\t{later}\tcareful")
    finally:
        follower.terminate()
        follower.wait(10)
        assert follower.stdout is not None
        follower.stdout.close()


def line_reader(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's output lines, read by a thread (``get`` takes a deadline)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


# -- several regions: nimbus logs --cluster ----------------------------------------


def nimbus(*args: str) -> list[str]:
    return [sys.executable, "-m", "nimbus.cli.main", *args]


def test_logs_of_every_region_labelled_and_merged(world: tuple[list[RegionProc], Path]
                                                  ) -> None:
    started, cluster = world
    rids = {r.name: r.get("/talk").text for r in started}
    for r in started:  # both lines written in each region before the one CLI run
        assert r.nimbus is not None
        wait_records(r.nimbus, "talk", lambda rs: len(rs) == 2, f"{r.name}'s lines")
    out = subprocess.run(nimbus("logs", "talk", "--cluster", str(cluster), "--json"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert sorted((r["region"], r["rid"], r.get("level", "-"), r["text"].split("\t")[-1])
                  for r in got) == sorted(
        [(name, rid, "WARNING", f"from {name}") for name, rid in rids.items()]
        + [(name, rid, "-", "chatter") for name, rid in rids.items()])
    assert [r["ts"] for r in got] == sorted(r["ts"] for r in got)  # merged in time order


def test_follow_across_regions(world: tuple[list[RegionProc], Path]) -> None:
    started, cluster = world
    follower = subprocess.Popen(
        nimbus("logs", "talk", "-f", "--cluster", str(cluster), "--level", "WARNING",
               "--since", "1h", "--tail", "1"),
        stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = {lines.get(timeout=20)[:4] for _ in started}  # each region's last warning
        assert first == {"[eu]", "[us]"}
        for r in reversed(started):
            rid = r.get("/talk").text
            line = lines.get(timeout=20).rstrip()
            assert line.startswith(f"[{r.name}] ") and line.endswith(
                f"\t{rid}\tfrom {r.name}"), line
    finally:
        follower.terminate()
        follower.wait(10)
        assert follower.stdout is not None
        follower.stdout.close()
