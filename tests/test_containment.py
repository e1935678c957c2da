"""Containment: the pure parts, and what a contained instance sees."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from nimbus.errors import UnavailableError
from nimbus.runtime.cgroups import Limits
from nimbus.worker.containment import Containment, platform_paths
from nimbus.worker.uids import UidTable

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="full containment needs root")


def test_uids_are_stable_distinct_and_persisted(tmp_path):
    table = UidTable(tmp_path / "uids.json", 300_000, 300_003)
    a, b = table.get("a"), table.get("b")
    assert a != b and {a, b} <= {300_001, 300_002, 300_003}
    assert table.builder == 300_000 not in (a, b)  # the first id builds venvs only
    again = UidTable(tmp_path / "uids.json", 300_000, 300_003)
    assert (again.get("b"), again.get("a")) == (b, a)
    assert stat.S_IMODE((tmp_path / "uids.json").stat().st_mode) == 0o600
    again.get("c")
    with pytest.raises(UnavailableError, match="no free uid left in 300000-300003"):
        again.get("d")


@pytest.mark.parametrize("first,last", [(0, 10), (5000, 5000), (70_000, 60_000)])
def test_a_bad_uid_range_is_refused(tmp_path, first, last):
    with pytest.raises(ValueError, match="uid range"):
        UidTable(tmp_path / "uids.json", first, last)


def test_cgroup_limits_for_both_versions():
    lim = Limits(memory_mb=64, max_processes=16, cpu=0.5)
    assert dict(lim.files(1)) == {
        "memory/memory.limit_in_bytes": str((64 + 32) * 1024 * 1024),
        "pids/pids.max": "16", "cpu/cpu.cfs_period_us": "100000",
        "cpu/cpu.cfs_quota_us": "50000"}
    v2 = dict(Limits(128, 32, None).files(2))
    assert v2 == {"memory.max": str(160 * 1024 * 1024), "memory.swap.max": "0",
                  "pids.max": "32"}


def test_the_view_never_holds_the_state_folder(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    paths = platform_paths(state)
    assert "/usr" in paths
    for p in paths:
        assert not str(state).startswith(p + "/") and not p.startswith(str(state))
    # no path is listed twice or inside another listed folder
    dirs = [p for p in paths if not os.path.islink(p)]
    assert not [p for p in dirs for q in dirs if p != q and p.startswith(q + "/")]


def test_rlimits_mode_describes_itself(tmp_path):
    c = Containment.create(tmp_path, "rlimits")
    assert not c.full
    assert c.describe()["uid_separation"] is False
    assert "rlimits only" in c.summary()
    with pytest.raises(ValueError, match="containment must be one of auto, full, rlimits"):
        Containment.create(tmp_path, "sometimes")


def test_without_root_it_runs_with_rlimits_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    c = Containment.create(tmp_path, "auto")
    assert c.mode == "rlimits"
    assert "not running as root" in c.summary()
    with pytest.raises(UnavailableError, match="full containment is not available"):
        Containment.create(tmp_path, "full")


PROBE_APP = """\
functions:
  probe:
    handler: h.probe
    http: [{method: GET, path: /probe}]
    memory_mb: 64
    max_processes: 8
    timeout_s: 2
    env: {GREETING: hi}
  other:
    handler: h.probe
    http: [{method: GET, path: /other}]
"""

PROBE = """\
import os, subprocess, sys, time

def probe(event, context):
    q = event.get("queryStringParameters") or {}
    what = q.get("what")
    if what == "tmp-write":
        open("/tmp/mine", "w").write("secret")
        return {"tmp": os.listdir("/tmp")}
    if what == "fork":
        n = 0
        kids = []
        try:
            for _ in range(50):
                kids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"]))
                n += 1
        except OSError as exc:
            return {"forked": n, "error": type(exc).__name__}
        finally:
            for k in kids:
                k.kill()
                k.wait()
        return {"forked": n}
    if what == "hog":
        code = "x = bytearray(200 * 1024 * 1024); print(len(x))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True)
        return {"child_rc": r.returncode}
    if what == "orphan":
        subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: pass",
                          q["marker"]], start_new_session=True)
        time.sleep(10)
    owners = {os.stat(f"/proc/{p}").st_uid for p in os.listdir("/proc") if p.isdigit()}
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "proc_owners": sorted(owners),
            "env": dict(os.environ), "tmp": os.listdir("/tmp"), "cwd": os.getcwd()}
"""


def _marked(marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


@ROOT_ONLY
def test_a_contained_instance(start_nimbus, tmp_path, monkeypatch):
    app = tmp_path / "probe"
    app.mkdir()
    (app / "app.yaml").write_text(PROBE_APP)
    (app / "h.py").write_text(PROBE)
    monkeypatch.setenv("NIMBUS_TEST_PLATFORM_SECRET", "leak")
    n = start_nimbus(app)
    assert "containment: full" in n.output()
    me = n.http.get("/probe").json()
    other = n.http.get("/other").json()
    assert me["uid"] not in (0, other["uid"]) and me["gid"] == me["uid"]
    assert me["groups"] == []
    assert me["proc_owners"] == [me["uid"]]  # no other process is even visible
    assert "NIMBUS_TEST_PLATFORM_SECRET" not in me["env"]
    assert me["env"]["GREETING"] == "hi" and me["env"]["TMPDIR"] == "/tmp"
    assert me["cwd"] == me["env"]["LAMBDA_TASK_ROOT"] == "/var/task"
    # /tmp is the instance's own
    assert n.http.get("/probe", params={"what": "tmp-write"}).json()["tmp"] == ["mine"]
    assert "mine" not in n.http.get("/other").json()["tmp"]
    # processes: bounded by max_processes, the instance survives it
    forked = n.http.get("/probe", params={"what": "fork"}).json()
    assert forked["forked"] < 8 and forked["error"] in ("BlockingIOError", "OSError")
    # memory: a child past memory_mb is killed, not the instance
    assert n.http.get("/probe", params={"what": "hog"}).json()["child_rc"] != 0
    # a detached child does not outlive its instance's timeout
    marker = f"nimbus-orphan-{os.getpid()}-{time.monotonic_ns()}"
    r = n.http.get("/probe", params={"what": "orphan", "marker": marker})
    assert r.status_code == 504
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == []
    # nimbus status says what is in force
    status = httpx.get(n.control_url + "/v1/status",
                       headers={"authorization": f"Bearer {n.token}"}).json()
    assert status["containment"]["mode"] == "full"
    assert status["containment"]["cgroups"].startswith("cgroup")
    out = n.cli("status")
    assert "contain full" in out.stdout
    assert n.http.get("/other").status_code == 200


@ROOT_ONLY
def test_nothing_a_handler_starts_outlives_the_platform(start_nimbus, tmp_path):
    app = tmp_path / "probe"
    app.mkdir()
    (app / "app.yaml").write_text(PROBE_APP.replace("timeout_s: 2", "timeout_s: 20"))
    (app / "h.py").write_text(PROBE)
    n = start_nimbus(app)
    marker = f"nimbus-survivor-{os.getpid()}-{time.monotonic_ns()}"
    with httpx.Client(base_url=n.url, timeout=30) as c:
        t = threading.Thread(target=lambda: _swallow(c, marker), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not _marked(marker):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        n.proc.kill()  # SIGKILL: no shutdown sequence at all
        n.proc.wait(10)
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == []


def _swallow(c: httpx.Client, marker: str) -> None:
    try:
        c.get("/probe", params={"what": "orphan", "marker": marker})
    except httpx.HTTPError:
        pass


@ROOT_ONLY
def test_requirements_cannot_read_the_state_folder(start_nimbus, tmp_path):
    n = start_nimbus(None)
    token = n.token
    app = tmp_path / "sneaky"
    app.mkdir()
    (app / "app.yaml").write_text(
        "functions:\n  s:\n    handler: h.s\n    requirements: requirements.txt\n")
    (app / "h.py").write_text("def s(e, c):\n    return 1\n")
    (app / "requirements.txt").write_text(f"-r {n.state / 'token'}\n")
    out = n.cli("deploy", str(app))
    assert out.returncode == 1
    assert "No such file" in out.stderr or "not found" in out.stderr.lower(), out.stderr
    assert token not in out.stderr + out.stdout


def test_tmp_usage_counts_blocks_and_entries(tmp_path):
    from nimbus.worker.tmpwatch import BLOCK, over_limit, usage_bytes

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big").write_bytes(b"x" * 100_000)
    for i in range(10):
        (tmp_path / f"empty{i}").touch()
    used = usage_bytes(tmp_path, 10**9)
    assert used >= 100_000 + 11 * BLOCK
    assert usage_bytes(tmp_path / "missing", 10**9) == 0
    assert usage_bytes(tmp_path, 1000) > 1000  # stops early, still over
    assert over_limit(16 * 1024 * 1024 + 1, 16) and not over_limit(16 * 1024 * 1024, 16)


TMP_APP = """\
functions:
  filler:
    handler: h.fill
    http: [{method: GET, path: /fill}]
    ephemeral_storage_mb: 16
    timeout_s: 20
"""

FILLER = """\
import os, time

def fill(event, context):
    q = event.get("queryStringParameters") or {}
    if q.get("one"):
        try:
            with open("/tmp/huge", "wb") as f:
                f.write(b"x" * (17 * 1024 * 1024))
        except OSError as exc:
            return {"error": type(exc).__name__, "errno": exc.errno}
        return {"error": None}
    for i in range(10):
        with open(f"/tmp/part{i}", "wb") as f:
            f.write(os.urandom(2 * 1024 * 1024))
    time.sleep(15)
    return {"survived": True}
"""


def test_ephemeral_storage_is_bounded_per_file_and_in_total(start_nimbus, tmp_path):
    app = tmp_path / "filler"
    app.mkdir()
    (app / "app.yaml").write_text(TMP_APP)
    (app / "h.py").write_text(FILLER)
    n = start_nimbus(app)
    one = n.http.get("/fill", params={"one": "1"}).json()
    assert one["error"] == "OSError" and one["errno"] == 27  # EFBIG: past the file limit
    t0 = time.monotonic()
    r = n.http.get("/fill")
    assert r.status_code == 502, r.text  # ended for holding 20 MB in a 16 MB /tmp
    assert time.monotonic() - t0 < 12
    logs = n.cli("logs", "filler").stdout
    assert "ephemeral_storage_mb (16 MB)" in logs
    assert n.http.get("/fill", params={"one": "1"}).status_code == 200  # a new instance serves


CPU_APP = """\
functions:
  capped:
    handler: h.spin
    http: [{method: GET, path: /capped}]
    cpu: 0.2
  free:
    handler: h.spin
    http: [{method: GET, path: /free}]
"""

SPIN = """\
import time

def spin(event, context):
    wall, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - wall < 1.0:
        pass
    return {"cpu_s": time.process_time() - cpu}
"""


@ROOT_ONLY
def test_a_cpu_cap_holds_the_instance_to_its_share(start_nimbus, tmp_path):
    app = tmp_path / "cpu"
    app.mkdir()
    (app / "app.yaml").write_text(CPU_APP)
    (app / "h.py").write_text(SPIN)
    n = start_nimbus(app)
    capped = n.http.get("/capped").json()["cpu_s"]
    free = n.http.get("/free").json()["cpu_s"]
    assert capped < 0.45, capped  # 0.2 of a core over one second, with a wide margin
    assert free > capped  # the cap, not the machine, held it back


def test_links_out_of_etc_bring_their_folder(tmp_path, monkeypatch):
    import nimbus.worker.containment as containment

    target = tmp_path / "run" / "resolve"
    target.mkdir(parents=True)
    (target / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(target / "stub-resolv.conf")
    monkeypatch.setattr(containment, "LINKED_ETC", (str(link),))
    assert str(target) in platform_paths(tmp_path / "state")


NPROC_PROBE = """\
import os, subprocess, sys
from nimbus.runtime import sandbox
sandbox.limit_tasks(4)
sandbox.drop_privileges(265_000, 265_000, os.getppid())
started, kids = 0, []
try:
    for _ in range(20):
        kids.append(subprocess.Popen(["/bin/sleep", "2"]))
        started += 1
except OSError:
    pass
for k in kids:
    k.kill()
    k.wait()
print(started)
"""


@ROOT_ONLY
def test_without_a_pids_cgroup_the_functions_uid_is_bounded():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", NPROC_PROBE], capture_output=True, text=True,
                         timeout=30, check=True)
    assert int(out.stdout) < 4, out  # itself + fewer than 4 more
