"""Async invocations on a real ``nimbus up``, checked against the README's
"Events" section and issue 4, for behaviour the other event tests leave out:

* one Idempotency-Key shared by every way of submitting (gateway header,
  Lambda's header, ``nimbus invoke --async --idempotency-key``, the control
  API) answers the first id and runs the handler once;
* idempotency keys, records and dead letters survive a SIGTERM restart on
  the same ``--state-dir``;
* the ``nimbus invocation ID [--json]`` / ``nimbus invocations FN --status S
  --json`` views of a dead-lettered invocation, and the request id of every try;
* ``dead_letter: false`` ends ``failed``, outside ``nimbus dlq ls``;
* ``max_event_age_s``: an event that is older than its age is not run.

Handlers leave evidence as files in $OUT (one file per run), named after the
request id, which the tests count.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HOST_FILES, Nimbus
from tests.events_client import control, record, settled, wait_for

HANDLERS_WRITE_HOST_FILES = True  # see conftest.start_nimbus

pytestmark = pytest.mark.e2e


MANIFEST = """\
name: indep
functions:
  hello:
    handler: h.hello
    http: {{method: POST, path: /hello}}
    env: {{OUT: {out}}}
  broken:
    handler: h.broken
    env: {{OUT: {out}, KIND: broken}}
    retries: 1
    retry_delay_s: 0.1
  quiet:
    handler: h.broken
    env: {{OUT: {out}, KIND: quiet}}
    retries: 1
    retry_delay_s: 0.1
    dead_letter: false
  aged:
    handler: h.aged
    env: {{OUT: {out}}}
    max_instances: 1
    max_event_age_s: 1
    timeout_s: 10
    retries: 0
"""

HANDLERS = '''\
import json, os, time, uuid

OUT = os.environ["OUT"]


def _note(kind, rid, data):
    path = os.path.join(OUT, f"{kind}-{rid}-{uuid.uuid4().hex}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rid": rid, "t": time.time(), **data}, f)
    os.rename(path + ".tmp", path)


def hello(event, context):
    _note("hello", context.aws_request_id, {"event": event})
    return {"seen": event.get("body", event)}


def broken(event, context):
    kind, rid = os.environ["KIND"], context.aws_request_id
    tries = len([n for n in os.listdir(OUT)
                 if n.startswith(f"{kind}-{rid}-") and n.endswith(".json")]) + 1
    print(f"{kind} run {tries} of {rid}", flush=True)
    _note(kind, rid, {"try": tries})
    if event.get("fail", True):
        raise ValueError(f"broken on purpose (run {tries})")
    return {"fine": tries}


def aged(event, context):
    _note("aged-" + event["tag"], context.aws_request_id, {})
    time.sleep(event.get("sleep", 0))
    return {"tag": event["tag"]}
'''


# -- helpers -------------------------------------------------------------------------


def runs(out: Path, kind: str, rid: str | None = None) -> list[dict[str, Any]]:
    """The handler's notes of ``kind`` (of one request id, if given), oldest first."""
    pattern = f"{kind}-{rid}-*.json" if rid else f"{kind}-*.json"
    got = [json.loads(p.read_text()) for p in out.glob(pattern)]
    return sorted(got, key=lambda d: d["t"])


def write_app(root: Path) -> tuple[Path, Path]:
    app, out = root / "indep", root / "out"
    app.mkdir()
    out.mkdir()
    (app / "app.yaml").write_text(MANIFEST.format(out=out))
    (app / "h.py").write_text(HANDLERS)
    return app, out


def submit(ctl: httpx.Client, fn: str, event: dict[str, Any], key: str | None = None
           ) -> dict[str, Any]:
    headers = {"X-Nimbus-Invocation-Type": "Event"}
    if key is not None:
        headers["Idempotency-Key"] = key
    r = ctl.post(f"/v1/functions/{fn}/invoke", content=json.dumps(event).encode(),
                 headers=headers)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def cli_json(n: Any, *args: str) -> Any:
    p = n.cli(*args)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return json.loads(p.stdout)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield write_app(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nimbus, Path]]:
    """One ``nimbus up`` of the app and its notes folder, for the tests that
    each drive a function no other test of it touches."""
    root = tmp_path_factory.mktemp("indep")
    path, out = write_app(root)
    n = Nimbus(path, root / "state", root / "state.out", *HOST_FILES)
    yield n, out
    n.stop()


# -- tests -------------------------------------------------------------------------


def test_one_idempotency_key_across_gateway_cli_and_api_runs_once(
        shared: tuple[Nimbus, Path]) -> None:
    n, out = shared
    with control(n) as ctl:
        first = n.http.post("/hello", content=b"first",
                            headers={"X-Nimbus-Invocation-Type": "Event",
                                     "Idempotency-Key": "order-42"})
        assert first.status_code == 202, first.text
        iid = first.json()["invocationId"]
        assert first.headers["x-nimbus-invocation-id"] == iid

        # The same key through every other door: the first id, nothing new queued.
        again = n.http.post("/hello", content=b"second",
                            headers={"X-Nimbus-Invocation-Type": "Event",
                                     "Idempotency-Key": "order-42"})
        assert again.status_code == 202 and again.json()["invocationId"] == iid, again.text
        amz = n.http.post("/hello", content=b"third",
                          headers={"X-Amz-Invocation-Type": "Event",
                                   "Idempotency-Key": "order-42"})
        assert amz.status_code == 202 and amz.json()["invocationId"] == iid, amz.text
        p = n.cli("invoke", "hello", "--async", "--data", '{"via": "cli"}',
                  "--idempotency-key", "order-42")
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[0] == iid, f"the CLI answered {p.stdout!r}, not {iid}"
        r = ctl.post("/v1/functions/hello/invoke?async=1", content=b'{"via": "api"}',
                     headers={"Idempotency-Key": "order-42"})
        assert r.status_code == 202 and r.json()["invocationId"] == iid, r.text

        # Another key is another invocation (the key, not the function, decides).
        other = submit(ctl, "hello", {"via": "other"}, key="order-43")["invocationId"]
        assert other != iid

        rec = settled(ctl, iid, "succeeded")
        assert rec["attempts"] == 1
        assert rec["result"] == {"seen": "first"}, "the first submission is the one that ran"
        settled(ctl, other, "succeeded")
        recs = cli_json(n, "invocations", "hello", "--json")
    assert sorted(r["id"] for r in recs) == sorted([iid, other]), \
        "five submissions with one key and one with another make two invocations"
    assert len(runs(out, "hello", iid)) == 1, "the handler ran the keyed invocation once"
    assert len(runs(out, "hello")) == 2, "and nothing else ran but the other key's"


def test_idempotency_records_and_dead_letters_survive_a_restart(
        app: tuple[Path, Path], start_nimbus: Any, tmp_path: Path) -> None:
    path, out = app
    first = start_nimbus(path, name="state")
    with control(first) as ctl:
        r = first.http.post("/hello", content=b"before",
                            headers={"X-Nimbus-Invocation-Type": "Event",
                                     "Idempotency-Key": "restart-key"})
        assert r.status_code == 202, r.text
        iid = r.json()["invocationId"]
        dead = submit(ctl, "broken", {"n": 1})["invocationId"]
        before = settled(ctl, iid, "succeeded")
        settled(ctl, dead, "dead")
    assert first.stop(signal.SIGTERM) == 0, first.output()

    second = start_nimbus(path, state=tmp_path / "state", name="second")
    with control(second) as ctl:
        shown = cli_json(second, "invocation", iid, "--json")
        assert shown["status"] == "succeeded" and shown["attempts"] == 1
        assert shown["result"] == {"seen": "before"}
        assert shown["enqueued_at"] == before["enqueued_at"], "the same record, kept"

        p = second.cli("invoke", "hello", "--async", "--idempotency-key", "restart-key")
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[0] == iid, \
            f"after a restart the key answered {p.stdout!r}, not the first id {iid}"
        r = second.http.post("/hello", content=b"after",
                             headers={"X-Nimbus-Invocation-Type": "Event",
                                      "Idempotency-Key": "restart-key"})
        assert r.status_code == 202 and r.json()["invocationId"] == iid, r.text

        dlq = cli_json(second, "dlq", "ls", "broken", "--json")
        assert [d["id"] for d in dlq] == [dead], "the dead letter is still there"
        assert dlq[0]["error"]["errorType"] == "ValueError"

        # A fresh invocation after the repeats: once it has run, a repeat that
        # was wrongly queued (one consumer per function) would have run too.
        fresh = submit(ctl, "hello", {"n": "fresh"})["invocationId"]
        settled(ctl, fresh, "succeeded")
        assert record(ctl, iid)["status"] == "succeeded"
        ids = sorted(x["id"] for x in ctl.get("/v1/functions/hello/invocations").json())
    assert ids == sorted([iid, fresh])
    assert len(runs(out, "hello", iid)) == 1, "the keyed invocation did not run again"
    assert len(runs(out, "hello")) == 2


def test_dead_invocation_views_and_request_id_of_every_try(
        shared: tuple[Nimbus, Path]) -> None:
    n, out = shared
    with control(n) as ctl:
        dead = submit(ctl, "broken", {"order": 9})["invocationId"]
        settled(ctl, dead, "dead")
        ok = submit(ctl, "broken", {"fail": False})["invocationId"]
        settled(ctl, ok, "succeeded")

    rec = cli_json(n, "invocation", dead, "--json")
    assert rec["id"] == dead and rec["function"] == "broken"
    assert rec["status"] == "dead" and rec["attempts"] == 2, "retries: 1 is two tries"
    assert rec["error"]["errorType"] == "ValueError"
    assert rec["error"]["errorMessage"] == "broken on purpose (run 2)", "the last try's error"
    assert rec["result"] is None
    assert rec["enqueued_at"] <= rec["updated_at"]
    assert rec["request_id"] == dead
    assert json.loads(rec["body"]) == {"order": 9}

    text = n.cli("invocation", dead)
    assert text.returncode == 0, text.stderr
    assert "dead after 2 tries" in text.stdout and "ValueError" in text.stdout, text.stdout
    assert f"nimbus logs broken --request-id {dead}" in text.stdout

    only_dead = cli_json(n, "invocations", "broken", "--status", "dead", "--json")
    assert [r["id"] for r in only_dead] == [dead]
    assert only_dead[0]["status"] == "dead" and only_dead[0]["attempts"] == 2
    only_ok = cli_json(n, "invocations", "broken", "--status", "succeeded", "--json")
    assert [r["id"] for r in only_ok] == [ok] and only_ok[0]["result"] == {"fine": 1}
    both = cli_json(n, "invocations", "broken", "--json")
    assert [r["id"] for r in both] == [ok, dead], "newest first"
    assert [r["id"] for r in cli_json(n, "invocations", "broken", "--limit", "1",
                                      "--json")] == [ok]

    # Both tries ran with the invocation id as request id, and their logs say so.
    tries = runs(out, "broken", dead)
    assert [t["try"] for t in tries] == [1, 2]
    assert {t["rid"] for t in tries} == {dead}
    logs = n.cli("logs", "broken", "--request-id", dead)
    assert logs.returncode == 0, logs.stderr
    for i in (1, 2):
        assert f"broken run {i} of {dead}" in logs.stdout, logs.stdout
    assert f"of {ok}" not in logs.stdout, "only this invocation's lines"


def test_dead_letter_false_ends_failed_and_is_not_a_dead_letter(
        shared: tuple[Nimbus, Path]) -> None:
    n, out = shared
    with control(n) as ctl:
        iid = submit(ctl, "quiet", {"order": 1})["invocationId"]
        rec = settled(ctl, iid, "failed")
        assert rec["attempts"] == 2 and rec["error"]["errorType"] == "ValueError", rec
        assert len(runs(out, "quiet", iid)) == 2, "retries still apply"

        assert cli_json(n, "dlq", "ls", "quiet", "--json") == []
        ls = n.cli("dlq", "ls", "quiet")
        assert ls.returncode == 0 and iid not in ls.stdout, ls.stdout
        failed = cli_json(n, "invocations", "quiet", "--status", "failed", "--json")
        assert [r["id"] for r in failed] == [iid]
        assert cli_json(n, "invocations", "quiet", "--status", "dead", "--json") == []

        red = n.cli("dlq", "redrive", "quiet", "--id", iid)
        assert red.returncode == 1 and iid in red.stderr, (red.stdout, red.stderr)
        assert n.cli("dlq", "redrive", "quiet").stdout.strip() == "redriven: 0"
        rec = record(ctl, iid)
        assert rec["status"] == "failed" and rec["attempts"] == 2, "nothing was queued again"


def test_an_event_older_than_max_event_age_is_not_run(
        shared: tuple[Nimbus, Path]) -> None:
    """``aged`` has one slot (max_instances: 1) and max_event_age_s: 1. While
    a first event holds the slot for 2.5 s, a second one waits; when the slot
    frees it is more than 1 s old, so it must not run."""
    n, out = shared
    with control(n) as ctl:
        first = submit(ctl, "aged", {"tag": "a", "sleep": 2.5})["invocationId"]
        wait_for("the first event to run", lambda: runs(out, "aged-a"))
        second = submit(ctl, "aged", {"tag": "b"})["invocationId"]
        submitted = record(ctl, second)
        settled(ctl, first, "succeeded")
        rec = wait_for("the second event to settle", lambda: (
            r := record(ctl, second))["status"] in ("succeeded", "failed", "dead") and r)
    ran = runs(out, "aged-b")
    if ran:
        age = ran[0]["t"] - submitted["enqueued_at"]
        pytest.fail(f"an event {age:.2f} s old ran although max_event_age_s is 1 "
                    f"(record: {rec['status']}, attempts {rec['attempts']})")
    assert rec["status"] == "dead", rec
    assert rec["error"]["errorType"] == "EventAgeExceeded", rec
