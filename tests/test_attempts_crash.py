"""Tries are counted when a handler starts, not when its message is leased,
on real ``nimbus up`` processes killed with SIGKILL.

Handlers leave one file per start in a host folder (``$OUT``). The
dispatcher leases far ahead of what it runs (up to 256 messages per
consumer), so when the process tree is killed most leased messages have
not started. After the restart, every record's ``attempts`` equals the
starts of its handler (one more at most, for a try begun as the process
died), and an always-failing invocation with ``retries: N`` starts exactly
N + 1 times: leases that never ran cost no try, and a run cut short costs
its one.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.events_client import control, wait_for
from tests.test_events_crash import async_stats, kill_tree, submit, wait_settled

pytestmark = pytest.mark.e2e

HANDLERS_WRITE_HOST_FILES = True  # they count their starts in files: see conftest.start_nimbus

RETRIES = 2
WORK, DOOMED = 300, 40

APP = """\
name: tries
functions:
  work:
    handler: h.work
    env: {{OUT: {out}}}
    retries: 2
    retry_delay_s: 0.05
    max_instances: 4
  doomed:
    handler: h.doomed
    env: {{OUT: {out}}}
    retries: {retries}
    retry_delay_s: 0.05
    max_instances: 2
"""

HANDLERS = """\
import os, random, time, uuid

OUT = os.environ["OUT"]


def _started(kind, context):
    # one file per start: created before anything else the handler does
    name = f"{kind}-{context.aws_request_id}-{uuid.uuid4().hex}"
    os.close(os.open(os.path.join(OUT, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def work(event, context):
    _started("work", context)
    time.sleep(0.03)
    if random.random() < 0.3:
        raise RuntimeError("unlucky")
    return {"ok": True}


def doomed(event, context):
    _started("doomed", context)
    time.sleep(0.1)  # slow enough that a loaded machine still kills it half-way
    raise ValueError("never works")
"""


def starts(out: Path, kind: str) -> Counter[str]:
    """Handler starts per invocation id."""
    ids: Counter[str] = Counter()
    for name in os.listdir(out):
        k, _, rest = name.partition("-")
        if k == kind:
            ids[rest.rsplit("-", 1)[0]] += 1
    return ids


def test_after_sigkill_attempts_are_the_handler_starts(tmp_path: Path,
                                                        start_nimbus: Any) -> None:
    out = tmp_path / "out"
    out.mkdir()
    app = tmp_path / "tries"
    app.mkdir()
    (app / "app.yaml").write_text(APP.format(out=out, retries=RETRIES))
    (app / "h.py").write_text(HANDLERS)

    first = start_nimbus(app, name="state")
    with control(first) as ctl:
        doomed = submit(ctl, "doomed", DOOMED)
        work = submit(ctl, "work", WORK)
        # Kill with runs under way and most work leased ahead, not yet started.
        wait_for("some runs of each", lambda: len(starts(out, "doomed")) >= 6
                 and len(starts(out, "work")) >= 30, 60)
        before = {fn: async_stats(ctl, fn) for fn in ("work", "doomed")}
    kill_tree(first.proc.pid)
    first.proc.wait(timeout=10)
    for fn, total in (("work", WORK), ("doomed", DOOMED)):
        s = before[fn]
        assert s["running"] >= 20 and s["succeeded"] + s["dead"] < total * 0.8, \
            f"{fn}: killed with much leased and most of it to do: {before}"
    began_before = sum(starts(out, "work").values()) + sum(starts(out, "doomed").values())

    second = start_nimbus(app, state=tmp_path / "state", name="second")
    with control(second) as ctl:
        wait_settled(ctl, "work", 120)
        wait_settled(ctl, "doomed", 120)
        recs = {r["id"]: r for fn in ("work", "doomed") for r in ctl.get(
            f"/v1/functions/{fn}/invocations", params={"limit": "1000"}).json()}
    assert set(recs) == set(work) | set(doomed), "every accepted invocation has its record"
    ran = starts(out, "work") + starts(out, "doomed")
    assert sum(ran.values()) > began_before, "the restart ran the rest"

    # One more than the starts only for a try begun as the process died: at
    # most one per instance slot (4 + 2), never for work merely leased.
    over = {i: (r["attempts"], ran[i]) for i, r in recs.items() if r["attempts"] != ran[i]}
    some = list(over.items())[:5]
    assert all(a == n + 1 for a, n in over.values()), \
        f"(attempts, starts) differ by more than one try begun: {some}"
    assert len(over) <= 6, \
        f"{len(over)} records count more tries than their handler began, e.g. {some}"

    for iid in doomed:
        rec = recs[iid]
        assert rec["status"] == "dead" and rec["attempts"] == RETRIES + 1, rec
        # retries: N runs exactly N + 1 times (N, if its last try was begun
        # but cut off before the handler's first line)
        assert ran[iid] == RETRIES + 1 or (iid in over and ran[iid] == RETRIES), \
            (iid, ran[iid], rec)
        assert rec["error"]["errorType"] in ("ValueError", "Interrupted"), rec
    for iid in work:
        rec = recs[iid]
        assert rec["status"] in ("succeeded", "dead"), rec
        assert 1 <= rec["attempts"] <= RETRIES + 1, rec
        if rec["status"] == "succeeded":
            assert ran[iid] >= 1, rec
