"""Attack handlers against nimbus's containment, written from the outside.

Each test deploys (or reuses) handlers that try one escape described for
contained functions -- read the token, the store, another app's code or the
state folder; signal nimbus, the zygote, the process group, every process;
fork and memory bombs; children that outlive a timeout or nimbus itself; a
shared /tmp; the platform's environment; root or writable code; hostile
requirements files -- and asserts that the attack fails for the attacker
while nimbus and an innocent function in another app keep serving with no
errors (a background loop of requests to it runs during every attack).

Most tests share one platform whose state folder and second app live
outside /tmp (under /var/tmp when it exists), so that a private /tmp alone
does not hide them from the attacker. The platform is restarted if an
attack took it down, so one failure does not hide the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import httpx
import pytest

from tests.conftest import Nimbus, alive

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="full containment (uid per function, cgroups) needs root"),
]

MB = 1024 * 1024
UID_RANGE = range(200000, 265536)  # the documented default --uid-range
SECRET_ENV_NAME = "NIMBUS_SECRET_TEST"

OTHER_MANIFEST = """\
name: other
functions:
  victim:
    handler: victim.handler
    min_instances: 2   # a fixed pair of instances, so any that goes was killed
    max_instances: 2
    env: {{OTHER_SECRET: {env_secret}}}
    http: [{{method: GET, path: /victim}}]
"""

OTHER_CODE = '''\
import os, time

CODE_MARKER = "{code_marker}"

def handler(event, context):
    time.sleep(0.03)
    return {{"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "pid": os.getpid()}}
'''

ATTACK_MANIFEST = """\
name: attack
functions:
  peek:
    handler: h.peek
    timeout_s: 10
    max_instances: 1
    env: {{TOKEN_PATH: "{token}", STATE_DIR: "{state}", OTHER_SRC: "{other}"}}
    http: [{{method: POST, path: /peek}}]
  sig:
    handler: h.sig
    timeout_s: 10
    max_instances: 1
    http: [{{method: POST, path: /sig}}]
  forkbomb:
    handler: h.forkbomb
    timeout_s: 2
    max_processes: 16
    max_instances: 1
    http: [{{method: POST, path: /forkbomb}}]
  membomb:
    handler: h.membomb
    memory_mb: 64
    timeout_s: 15
    max_instances: 1
    http: [{{method: POST, path: /membomb}}]
  orphan:
    handler: h.orphan
    timeout_s: 3
    max_instances: 1
    http: [{{method: POST, path: /orphan}}]
  tmpa:
    handler: h.tmpop
    max_instances: 1
    http: [{{method: POST, path: /tmpa}}]
  tmpb:
    handler: h.tmpop
    max_instances: 1
    http: [{{method: POST, path: /tmpb}}]
  envdump:
    handler: h.envdump
    max_instances: 1
    env: {{GREETING: hi}}
    http: [{{method: GET, path: /envdump}}]
  ident1:
    handler: h.ident
    max_instances: 1
    http: [{{method: POST, path: /ident1}}]
  ident2:
    handler: h.ident
    max_instances: 1
    http: [{{method: POST, path: /ident2}}]
"""

ATTACK_CODE = r'''
import json, os, signal, subprocess, sys, tempfile, time, uuid

_ID = None


def _instance():
    global _ID
    if _ID is None:
        _ID = uuid.uuid4().hex
    return _ID


def _body(event):
    raw = event.get("body") or "{}"
    if event.get("isBase64Encoded"):
        import base64
        raw = base64.b64decode(raw).decode()
    return json.loads(raw)


def _err(e):
    return f"{type(e).__name__}: {e}"


def _try(fn):
    try:
        return {"ok": True, "value": fn()}
    except BaseException as e:
        return {"ok": False, "error": _err(e)}


def _read(path):
    with open(path, "rb") as f:
        return f.read(1 << 16).decode("latin-1")


def _search(markers, roots, max_files=3000, budget_s=2.0):
    """Look for any marker in the files under roots (bounded)."""
    hits, scanned, end = [], 0, time.monotonic() + budget_s
    needles = [m.encode() for m in markers]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            if dirpath.startswith(("/proc/self", "/proc/thread-self")):
                dirnames[:] = []
                continue
            for name in filenames:
                if scanned >= max_files or time.monotonic() > end:
                    return {"hits": hits, "scanned": scanned}
                path = os.path.join(dirpath, name)
                try:
                    if os.path.islink(path) or os.path.getsize(path) > (1 << 20):
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                scanned += 1
                for m, n in zip(markers, needles):
                    if n in data:
                        hits.append(f"{path}: {m}")
    return {"hits": hits, "scanned": scanned}


def peek(event, context):
    b = _body(event)
    state, token = os.environ["STATE_DIR"], os.environ["TOKEN_PATH"]
    other = os.environ["OTHER_SRC"]
    ppid = os.getppid()
    out = {
        "token": _try(lambda: _read(token)),
        "store": _try(lambda: _read(os.path.join(state, "store.db"))),
        "queue": _try(lambda: _read(os.path.join(state, "queue.db"))),
        "list_state": _try(lambda: os.listdir(state)),
        "list_other_src": _try(lambda: os.listdir(other)),
        "other_code": _try(lambda: _read(os.path.join(other, "victim.py"))),
        "proc1_root_token": _try(lambda: _read("/proc/1/root" + token)),
        "ppid_root_token": _try(lambda: _read(f"/proc/{ppid}/root" + token)),
        "proc1_cwd": _try(lambda: os.listdir("/proc/1/cwd")),
        "ppid_cwd": _try(lambda: os.listdir(f"/proc/{ppid}/cwd")),
        "proc1_environ": _try(lambda: _read("/proc/1/environ")),
        "ppid_environ": _try(lambda: _read(f"/proc/{ppid}/environ")),
        "relative_token": _try(lambda: _read("../../token")),
    }
    roots = [state, other, "/var/tmp", "/var/nimbus", "/proc/1/root" + state,
             f"/proc/{ppid}/root" + state, "/proc/1/cwd", f"/proc/{ppid}/cwd",
             "/tmp", "/var"]
    out["search"] = _search(b["markers"], roots)
    return out


def sig(event, context):
    b = _body(event)
    op = b["op"]
    me = os.getpid()
    if op == "ping":
        return {"instance": _instance(), "pid": me, "ppid": os.getppid(), "uid": os.getuid()}
    if op == "ppid":
        r = _try(lambda: os.kill(os.getppid(), signal.SIGKILL))
    elif op == "ppgrp":
        r = _try(lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL))
    elif op == "pids":
        r = {str(p): _try(lambda p=p: os.kill(p, signal.SIGKILL)) for p in b["pids"]}
    elif op == "killpg0":
        r = _try(lambda: os.killpg(0, signal.SIGTERM))
        time.sleep(1)
    elif op == "killall":
        r = _try(lambda: os.kill(-1, signal.SIGKILL))
        time.sleep(0.5)
    elif op == "scan":
        r = {}
        for p in range(1, 400):
            if p != me:
                res = _try(lambda p=p: os.kill(p, signal.SIGKILL))
                if res["ok"] or "Permission" in res.get("error", ""):
                    r[str(p)] = res
    else:
        raise ValueError(op)
    return {"op": op, "result": r, "pid": me, "instance": _instance()}


HOG = (
    "import os, sys, time\n"
    "i, mb, hold, w = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])\n"
    "held = []\n"
    "try:\n"
    "    for step in range(mb // 10):\n"
    "        held.append(b'\\x01' * (10 * 1024 * 1024))\n"
    "        os.write(w, b'%d %d\\n' % (i, (step + 1) * 10))\n"
    "    os.write(w, b'%d done\\n' % i)\n"
    "    time.sleep(hold)\n"
    "except MemoryError:\n"
    "    os.write(w, b'%d memerr\\n' % i)\n"
)


def _exec_child(code, *args):
    """In a forked child: become a python running code with a marker in its argv."""
    try:
        os.execv(sys.executable, [sys.executable, "-c", code, *args])
    finally:
        os._exit(127)


def forkbomb(event, context):
    b = _body(event)
    if b.get("op") == "hang":
        time.sleep(30)
    marker = b["marker"]
    forked, err = 0, None
    for _ in range(int(b.get("limit", 2000))):
        try:
            pid = os.fork()
        except OSError as e:
            err = _err(e)
            break
        if pid == 0:
            # a small process whose argv[0] is the marker the test looks for
            try:
                os.execv("/bin/sleep", [marker, "20"])
            finally:
                os._exit(127)
        forked += 1
    return {"forked": forked, "error": err}


def membomb(event, context):
    b = _body(event)
    marker, kids, mb = b["marker"], int(b.get("kids", 6)), int(b.get("mb", 100))
    r, w = os.pipe()
    os.set_inheritable(w, True)
    pids, err = [], None
    for i in range(kids):
        try:
            pid = os.fork()
        except OSError as e:
            err = _err(e)
            break
        if pid == 0:
            os.close(r)
            _exec_child(HOG, marker, str(i), str(mb), str(b.get("hold", 3)), str(w))
        pids.append(pid)
    os.close(w)
    log = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        log += chunk
    statuses = []
    for pid in pids:
        _, st = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))
    return {"log": log.decode(), "statuses": statuses, "fork_error": err}


CPU_LOOP = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"
DOUBLE_FORK = ("import os, time\nif os.fork():\n    os._exit(0)\nos.setsid()\n"
               "time.sleep(60)\n")


def _spawn(code, marker):
    return subprocess.Popen([sys.executable, "-c", code, marker], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def orphan(event, context):
    b = _body(event)
    _spawn(CPU_LOOP, b["marker"] + "-cpu")
    _spawn(DOUBLE_FORK, b["marker"] + "-daemon")
    if b.get("wait", True):
        time.sleep(30)
    return {"spawned": True}


def tmpop(event, context):
    b = _body(event)
    op = b["op"]
    out = {"instance": _instance(), "tmpdir": os.environ.get("TMPDIR"),
           "gettempdir": tempfile.gettempdir()}
    if op == "write":
        with open(os.path.join("/tmp", b["name"]), "w") as f:
            f.write(b["data"])
        tmpdir = os.environ["TMPDIR"]
        with tempfile.NamedTemporaryFile(dir=tmpdir) as f:
            f.write(b"x" * 4096)
            f.flush()
            out["tmpdir_writable"] = os.path.getsize(f.name) == 4096
    elif op == "read":
        out["read"] = _try(lambda: _read(os.path.join("/tmp", b["name"])))
        out["read_tmpdir"] = _try(lambda: _read(os.path.join(os.environ["TMPDIR"], b["name"])))
        out["listing"] = sorted(os.listdir("/tmp"))
    elif op == "die":
        os._exit(3)
    return out


def envdump(event, context):
    return {"env": dict(os.environ), "ppid": os.getppid()}


def _status_fields():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return fields


def ident(event, context):
    b = _body(event)
    if b.get("op") == "die":
        os._exit(3)
    root = os.environ["LAMBDA_TASK_ROOT"]
    st = _status_fields()
    code = os.path.join(root, "h.py")
    return {
        "instance": _instance(),
        "resuid": list(os.getresuid()),
        "resgid": list(os.getresgid()),
        "groups": os.getgroups(),
        "no_new_privs": st.get("NoNewPrivs"),
        "cap_eff": st.get("CapEff"),
        "task_root": root,
        "create": _try(lambda: open(os.path.join(root, "new.py"), "w").close()),
        "append": _try(lambda: open(code, "a").close()),
        "mkdir": _try(lambda: os.mkdir(os.path.join(root, "newdir"))),
        "chmod": _try(lambda: os.chmod(code, 0o777)),
        "unlink": _try(lambda: os.unlink(code)),
        "rename": _try(lambda: os.rename(code, os.path.join(root, "moved.py"))),
        "code_still_there": os.path.exists(code),
    }
'''


# --- helpers ---------------------------------------------------------------

def procs_with_cmdline(marker: str) -> list[int]:
    """Live host processes whose argv contains marker."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in data and alive(int(entry)):
            found.append(int(entry))
    return found


def private_kb(pid: int) -> int:
    """Private resident plus swapped memory of a process, in KiB."""
    total = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Private_Clean", "Private_Dirty", "Swap"):
            total += int(rest.split()[0])
    return total


def files_named(root: Path, name: str) -> list[str]:
    """Files called name anywhere under root (folders may vanish meanwhile)."""
    return [os.path.join(d, name) for d, _, files in os.walk(root) if name in files]


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def kill_leftovers(pids: list[int]) -> None:
    """Clean up what a failed containment left running (our tests started it)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Platform:
    """The shared platform, its paths and the secrets the attacker looks for."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.other = base / "other"
        self.attack = base / "attack"
        self.code_marker = "codemark-" + uuid.uuid4().hex
        self.env_secret = "envsecret-" + uuid.uuid4().hex
        self.leak_value = "leak-" + uuid.uuid4().hex
        self.other.mkdir()
        (self.other / "app.yaml").write_text(OTHER_MANIFEST.format(env_secret=self.env_secret))
        (self.other / "victim.py").write_text(OTHER_CODE.format(code_marker=self.code_marker))
        self.attack.mkdir()
        (self.attack / "app.yaml").write_text(ATTACK_MANIFEST.format(
            token=self.state / "token", state=self.state, other=self.other))
        (self.attack / "h.py").write_text(ATTACK_CODE)
        self.host_env: dict[str, str] = {}
        self.n: Nimbus | None = None
        self.starts = 0

    def start(self) -> Nimbus:
        """Start nimbus with a secret in its own environment, deploy both apps."""
        old = os.environ.get(SECRET_ENV_NAME)
        os.environ[SECRET_ENV_NAME] = self.leak_value
        try:
            self.host_env = dict(os.environ)
            self.starts += 1
            n = Nimbus(self.other, self.state, self.base / f"nimbus-{self.starts}.out")
        finally:
            if old is None:
                os.environ.pop(SECRET_ENV_NAME, None)
            else:
                os.environ[SECRET_ENV_NAME] = old
        self.n = n
        out = n.cli("deploy", str(self.attack))
        assert out.returncode == 0, out.stdout + out.stderr
        return n

    def ensure(self) -> Nimbus:
        if self.n is None or self.n.proc.poll() is not None:
            if self.n is not None:
                self.n.stop()
            self.start()
        assert self.n is not None
        return self.n

    @property
    def token(self) -> str:
        assert self.n is not None
        return self.n.token

    def control(self, path: str) -> httpx.Response:
        assert self.n is not None
        return httpx.get(self.n.control_url + path,
                         headers={"authorization": f"Bearer {self.n.token}"}, timeout=30)

    def status(self) -> dict:
        r = self.control("/v1/status")
        assert r.status_code == 200, r.text
        return r.json()

    def platform_pids(self) -> dict[str, list[int]]:
        """nimbus's pid, its zygotes' and the victim's instances' (host pids)."""
        st = self.status()
        zygotes = [z["pid"] for z in st.get("zygotes", []) if isinstance(z.get("pid"), int)]
        victims = []
        for f in st.get("functions", []):
            if f.get("name") == "victim":
                victims += [i["pid"] for i in f.get("instances", []) if isinstance(
                    i.get("pid"), int)]
        return {"nimbus": [st["pid"]], "zygotes": zygotes, "victim": victims}

    def post(self, path: str, body: dict, timeout: float = 30) -> httpx.Response:
        assert self.n is not None and self.n.http is not None
        return self.n.http.post(path, content=json.dumps(body),
                                headers={"content-type": "application/json"},
                                timeout=timeout)


class VictimLoad:
    """Requests to the innocent function in a loop, from two clients."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url = url
        self.results: list[object] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    res: object = client.get("/victim").status_code
                except httpx.HTTPError as e:
                    res = f"{type(e).__name__}: {e}"
                with self._lock:
                    self.results.append(res)

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        # the load is really running before the attack starts
        wait_until(lambda: len(self.results) >= 2, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        # a few more requests after the attack, then stop
        target = len(self.results) + 4
        wait_until(lambda: len(self.results) >= target, 10)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=35)

    def assert_all_served(self) -> None:
        bad = [r for r in self.results if r != 200]
        assert len(self.results) >= 6, f"the victim load barely ran: {self.results}"
        assert not bad, (f"{len(bad)} of {len(self.results)} requests to another app's "
                         f"function failed during the attack: {bad[:10]}")


def assert_platform_serving(p: Platform, before: dict[str, list[int]]) -> None:
    """nimbus, its zygotes and the victim's instances all survived; both ports answer."""
    n = p.n
    assert n is not None
    assert n.proc.poll() is None, f"nimbus up exited {n.proc.returncode}:\n{n.output()[-3000:]}"
    health = httpx.get(n.url + "/_nimbus/health", timeout=10)
    assert health.status_code == 200
    st = p.status()
    assert st["pid"] == before["nimbus"][0]
    dead = {kind: [pid for pid in pids if not alive(pid)] for kind, pids in before.items()}
    assert not any(dead.values()), f"platform processes killed by the attack: {dead}"
    assert p.n.http is not None
    assert p.n.http.get("/victim").status_code == 200


# --- fixtures --------------------------------------------------------------

@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    if Path("/var/tmp").is_dir():
        base = Path(tempfile.mkdtemp(prefix="nimbus-contain-", dir="/var/tmp"))
    else:
        base = tmp_path_factory.mktemp("contain")
    p = Platform(base)
    try:
        p.start()
        yield p
    finally:
        if p.n is not None:
            p.n.stop(signal.SIGKILL if p.n.proc.poll() is None else signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def plat(platform: Platform) -> Platform:
    platform.ensure()
    return platform


@pytest.fixture
def attacker_is_unprivileged(plat: Platform) -> None:
    """Go on only once the attacker is seen running as an unprivileged uid.

    The signal and bomb attacks would hit the whole host if a handler ran as
    root (kill(-1, SIGKILL) as root kills every process on the machine), so
    they are not even tried then: the test fails instead.
    """
    r = plat.post("/sig", {"op": "ping"})
    assert r.status_code == 200, r.text
    uid = r.json()["uid"]
    if uid == 0 or uid == os.geteuid():
        pytest.fail(f"handlers run as uid {uid}, nimbus's own: containment is not in force; "
                    "not running an attack that would reach the host's processes")


# --- reading what is not the function's ------------------------------------

def test_a_handler_cannot_read_the_token_store_state_folder_or_other_code(plat):
    before = plat.platform_pids()
    with VictimLoad(plat.n.url) as load:
        r = plat.post("/peek", {"markers": [plat.code_marker, plat.env_secret]})
    assert r.status_code == 200, r.text
    out = r.json()
    load.assert_all_served()
    # the token's contents, the other function's env secret and code never reach the attacker
    assert plat.token not in r.text
    assert plat.env_secret not in json.dumps({k: v for k, v in out.items() if k != "search"})
    for key in ("token", "store", "queue", "list_state", "list_other_src", "other_code",
                "proc1_root_token", "ppid_root_token", "relative_token"):
        assert out[key]["ok"] is False, f"the handler could {key}: {str(out[key])[:300]}"
    for key in ("proc1_environ", "ppid_environ"):
        assert plat.leak_value not in json.dumps(out[key]), key
        assert plat.token not in json.dumps(out[key]), key
    search = out["search"]
    assert search["scanned"] > 0  # the search really ran over readable files
    assert search["hits"] == [], f"another app's code or env readable: {search['hits'][:10]}"
    assert_platform_serving(plat, before)


# --- signals ---------------------------------------------------------------

def _attacker_recovers(plat: Platform) -> None:
    """The attacking function itself is served again (a new instance if it died)."""
    r = plat.post("/sig", {"op": "ping"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("op", ["ppid", "ppgrp", "killpg0", "killall", "scan"])
@pytest.mark.usefixtures("attacker_is_unprivileged")
def test_a_handler_cannot_signal_the_platform_or_other_functions(plat, op):
    before = plat.platform_pids()
    assert before["zygotes"], "status lists no zygote pids"
    with VictimLoad(plat.n.url) as load:
        r = plat.post("/sig", {"op": op})
    load.assert_all_served()
    assert_platform_serving(plat, before)
    _attacker_recovers(plat)
    if r.status_code == 200:
        out = r.json()
        if op == "ppgrp":
            # its parent's process group is the platform's: out of its reach
            assert out["result"]["ok"] is False, out
    else:
        # only its own instance may fail (killpg(0) / kill(-1) may take it down)
        assert r.status_code in (502, 500, 504), r.text


@pytest.mark.usefixtures("attacker_is_unprivileged")
def test_a_handler_cannot_signal_host_pids_of_nimbus_zygotes_or_other_instances(plat):
    before = plat.platform_pids()
    targets = [pid for pids in before.values() for pid in pids]
    assert len(targets) >= 3, before  # nimbus, at least one zygote, the victim's instance
    with VictimLoad(plat.n.url) as load:
        r = plat.post("/sig", {"op": "pids", "pids": targets})
    load.assert_all_served()
    assert_platform_serving(plat, before)
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    signalled = {pid: v for pid, v in res.items() if v["ok"] and int(pid) > 300}
    assert not signalled, f"the handler could signal host pids: {signalled}"


# --- exhausting resources --------------------------------------------------

@pytest.mark.usefixtures("attacker_is_unprivileged")
def test_a_fork_bomb_is_bounded_by_max_processes_and_dies_with_its_instance(plat):
    before = plat.platform_pids()
    marker = "fb" + uuid.uuid4().hex[:10]
    seen: list[int] = []
    with VictimLoad(plat.n.url) as load:
        r = plat.post("/forkbomb", {"marker": marker, "limit": 2000})
        assert r.status_code == 200, r.text
        out = r.json()
        wait_until(lambda: len(procs_with_cmdline(marker)) >= out["forked"], 5)
        seen = procs_with_cmdline(marker)
        # the host itself can still start processes
        assert os.spawnv(os.P_WAIT, "/bin/true", ["true"]) == 0
        # end the instance (a timeout); what it forked must go with it
        hang = plat.post("/forkbomb", {"op": "hang"})
        gone = wait_until(lambda: not procs_with_cmdline(marker), 8)
    kill_leftovers(procs_with_cmdline(marker))
    load.assert_all_served()
    assert_platform_serving(plat, before)
    assert 0 < out["forked"] < 16, out  # max_processes: 16 counts the instance too
    assert out["error"] and ("BlockingIOError" in out["error"]
                             or "Resource" in out["error"]), out
    assert 0 < len(seen) < 16, f"{len(seen)} fork-bomb children on the host"
    assert hang.status_code != 200, hang.text
    assert gone, "fork-bomb children outlived their instance's timeout"


@pytest.mark.usefixtures("attacker_is_unprivileged")
def test_a_memory_bomb_through_children_stays_within_memory_mb(plat):
    before = plat.platform_pids()
    marker = "mb" + uuid.uuid4().hex[:10]
    peak_kb = 0
    peak_procs = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_kb, peak_procs
        while not done.is_set():
            pids = procs_with_cmdline(marker)
            peak_procs = max(peak_procs, len(pids))
            peak_kb = max(peak_kb, sum(private_kb(pid) for pid in pids))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    with VictimLoad(plat.n.url) as load:
        sampler.start()
        try:
            r = plat.post("/membomb", {"marker": marker, "kids": 6, "mb": 100, "hold": 3})
        finally:
            wait_until(lambda: not procs_with_cmdline(marker), 8)
            done.set()
            sampler.join(timeout=10)
    kill_leftovers(procs_with_cmdline(marker))
    load.assert_all_served()
    assert_platform_serving(plat, before)
    assert peak_procs > 0, f"no bomb child was ever seen: {r.status_code} {r.text[:500]}"
    # memory_mb (64) plus the runtime's 32 MiB, with a wide margin: far from 6 x 100 MB
    assert peak_kb < 160 * 1024, (f"children of a memory_mb: 64 instance held "
                                  f"{peak_kb // 1024} MB together")
    if r.status_code == 200:
        done_children = r.json()["log"].count("done")
        assert done_children <= 1, r.text


@pytest.mark.usefixtures("attacker_is_unprivileged")
def test_a_child_started_by_a_handler_dies_with_its_timed_out_instance(plat):
    before = plat.platform_pids()
    marker = "orph-" + uuid.uuid4().hex
    result: dict[str, httpx.Response] = {}
    with VictimLoad(plat.n.url) as load:
        t = threading.Thread(target=lambda: result.setdefault(
            "r", plat.post("/orphan", {"marker": marker})), daemon=True)
        t.start()
        both_seen = wait_until(lambda: len(procs_with_cmdline(marker)) >= 2, 10)
        t.join(timeout=30)
        gone = wait_until(lambda: not procs_with_cmdline(marker), 6)
    left = procs_with_cmdline(marker)
    kill_leftovers(left)
    load.assert_all_served()
    assert_platform_serving(plat, before)
    assert both_seen, "the handler's children never started"
    assert result["r"].status_code == 504, result["r"].text
    assert gone, f"children outlived the timed-out instance: {left}"


# --- /tmp, environment, identity -------------------------------------------

def test_each_instance_has_its_own_tmp(plat):
    name = "x-" + uuid.uuid4().hex
    data = "secret-" + uuid.uuid4().hex
    w = plat.post("/tmpa", {"op": "write", "name": name, "data": data})
    assert w.status_code == 200, w.text
    wa = w.json()
    assert wa["tmpdir"] and wa["tmpdir_writable"] is True
    assert wa["gettempdir"] == wa["tmpdir"]
    same = plat.post("/tmpa", {"op": "read", "name": name}).json()
    assert same["instance"] == wa["instance"]
    assert same["read"] == {"ok": True, "value": data}  # it really wrote there
    other = plat.post("/tmpb", {"op": "read", "name": name}).json()
    assert other["read"]["ok"] is False and other["read_tmpdir"]["ok"] is False, other
    assert name not in other["listing"]
    assert not (Path("/tmp") / name).exists(), "the instance's /tmp is the host's"
    assert not (Path("/var/tmp") / name).exists()
    # a new instance of the same function after the old one went
    died = plat.post("/tmpa", {"op": "die"})
    assert died.status_code == 502, died.text
    # emptied when the instance went: nothing of it is left in nimbus's state folder
    assert wait_until(lambda: not files_named(plat.state, name), 5), \
        f"{name} from a dead instance's /tmp is still in the state folder"
    fresh = plat.post("/tmpa", {"op": "read", "name": name})
    assert fresh.status_code == 200, fresh.text
    fresh_out = fresh.json()
    assert fresh_out["instance"] != wa["instance"]
    assert fresh_out["read"]["ok"] is False and name not in fresh_out["listing"], fresh_out


def test_the_environment_is_lambdas_and_the_functions_only(plat):
    r = plat.n.http.get("/envdump")
    assert r.status_code == 200, r.text
    env = r.json()["env"]
    assert SECRET_ENV_NAME not in env
    assert plat.leak_value not in r.text
    assert plat.env_secret not in r.text  # another function's env
    allowed = {"PATH", "LANG", "TZ", "HOME", "TMPDIR"}
    leaked = sorted(k for k, v in plat.host_env.items()
                    if k not in allowed and env.get(k) == v)
    assert not leaked, f"inherited from the platform's environment: {leaked}"
    assert env.get("AWS_LAMBDA_FUNCTION_NAME") == "envdump"
    assert env.get("_HANDLER") == "h.envdump"
    assert env.get("LAMBDA_TASK_ROOT")
    for key in ("TZ", "PATH", "LANG"):
        assert env.get(key), f"{key} missing from the handler's environment"
    assert env.get("GREETING") == "hi"


def test_functions_run_as_distinct_unprivileged_uids_with_read_only_code(plat):
    a = plat.post("/ident1", {}).json()
    b = plat.post("/ident2", {}).json()
    victim = plat.n.http.get("/victim").json()
    uids = [a["resuid"][0], b["resuid"][0], victim["uid"]]
    assert len(set(uids)) == 3, f"functions share a uid: {uids}"
    for ident in (a, b):
        ruid, euid, suid = ident["resuid"]
        rgid, egid, sgid = ident["resgid"]
        assert ruid == euid == suid and ruid != 0, ident["resuid"]
        assert rgid == egid == sgid and rgid != 0, ident["resgid"]
        assert ruid in UID_RANGE, ruid
        assert set(ident["groups"]) <= {rgid}, f"supplementary groups: {ident['groups']}"
        assert ident["no_new_privs"] == "1"
        assert int(ident["cap_eff"], 16) == 0, f"capabilities: {ident['cap_eff']}"
        for op in ("create", "append", "mkdir", "chmod", "unlink", "rename"):
            assert ident[op]["ok"] is False, f"code folder writable ({op}): {ident[op]}"
        assert ident["code_still_there"] is True
    assert victim["uid"] != 0 and victim["uid"] in UID_RANGE
    # stable per function: a new instance gets the same uid
    assert plat.post("/ident1", {"op": "die"}).status_code == 502
    again = plat.post("/ident1", {}).json()
    assert again["instance"] != a["instance"]
    assert again["resuid"] == a["resuid"]


def test_status_and_startup_show_the_containment_in_force(plat):
    out = plat.n.cli("status")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "contain" in ln.lower()]
    assert lines, f"nimbus status does not show the containment:\n{out.stdout}"
    shown = " ".join(lines).lower()
    assert "uid" in shown and "cgroup" in shown, lines
    assert "rlimits only" not in shown
    startup = plat.n.output().split("serving at", 1)[0]
    said = [ln for ln in startup.splitlines() if "containment" in ln.lower()]
    assert len(said) == 1, f"nimbus up should say its containment once at start: {said}"
    assert "uid" in said[0].lower()


# --- hostile requirements --------------------------------------------------

BACKEND = '''\
import os, signal
TOKEN = {token!r}
OUT = {out!r}
try:
    data = open(TOKEN).read()
except Exception as e:
    data = "unreadable " + type(e).__name__
for path in (OUT, os.path.join(os.path.dirname(TOKEN), "pwned-by-pip")):
    try:
        with open(path, "w") as f:
            f.write(data)
    except Exception:
        pass
try:
    os.kill({nimbus_pid}, signal.SIGKILL)
except Exception:
    pass
raise RuntimeError("backend read: " + data)
'''

PYPROJECT = """\
[build-system]
requires = []
build-backend = "evilbackend"
backend-path = ["."]

[project]
name = "evilpkg"
version = "1.0"
"""


def _evil_package(where: Path, token: Path, out: Path, nimbus_pid: int) -> Path:
    """A local package whose in-tree build backend reads the token, writes outside
    the app and SIGKILLs nimbus when pip imports it."""
    where.mkdir(parents=True)
    (where / "pyproject.toml").write_text(PYPROJECT)
    (where / "evilbackend.py").write_text(
        BACKEND.format(token=str(token), out=str(out), nimbus_pid=nimbus_pid))
    return where


def test_hostile_requirements_fail_the_deploy_without_leaking_files(plat):
    before = plat.platform_pids()
    token_path = plat.state / "token"
    shadow = Path("/etc/shadow")
    shadow_line = ""
    if shadow.exists():
        first = shadow.read_text().splitlines()[:1]
        shadow_line = first[0] if first else ""
    base = plat.base / "req"
    base.mkdir(exist_ok=True)
    outside = _evil_package(base / "outside_pkg", token_path, base / "pwned-outside",
                            plat.n.proc.pid)
    cases = {
        "rel1": "-r ../token\n",
        "rel2": "-r ../../token\n",
        "rel3": "-r ../../../token\n",
        "relstate": "-r ../../state/token\n",  # from the app's source folder
        "abs": f"-r {token_path}\n",
        "shadow": "-r /etc/shadow\n",
        "outside": f"{outside}\n",
        "inapp": "./evilpkg\n",
    }
    failures = []
    with VictimLoad(plat.n.url) as load:
        for i, (case, req) in enumerate(cases.items()):
            app = base / f"req{i}"
            app.mkdir()
            (app / "app.yaml").write_text(
                f"name: req{i}\nfunctions:\n  r{i}:\n    handler: h.r\n"
                f"    requirements: requirements.txt\n"
                f"    http: [{{method: GET, path: /r{i}}}]\n")
            (app / "h.py").write_text("def r(event, context):\n    return 'installed'\n")
            (app / "requirements.txt").write_text(req)
            if case == "inapp":
                _evil_package(app / "evilpkg", token_path, base / "pwned-inapp",
                              plat.n.proc.pid)
            log_before = len(plat.n.output_bytes())
            out = plat.n.cli("deploy", str(app))
            text = out.stdout + out.stderr
            platform_log = plat.n.output_bytes()[log_before:].decode(errors="replace")
            problems = []
            if out.returncode == 0:
                problems.append("deploy succeeded")
            if "Traceback" in text and case != "inapp":
                problems.append("traceback")
            if not out.stderr.strip():
                problems.append("no error message")
            if plat.token in text:
                problems.append("token in the deploy's output")
            if plat.token in platform_log:
                problems.append("token in nimbus's log")
            if shadow_line and (shadow_line in text or shadow_line in platform_log):
                problems.append("/etc/shadow in the output")
            if problems:
                failures.append(f"{case} ({req.strip()}): {problems}: {text.strip()[-400:]}")
    load.assert_all_served()
    assert_platform_serving(plat, before)
    assert not failures, "\n".join(failures)
    # a build backend outside the app never ran; the one inside could not write outside
    assert not (base / "pwned-outside").exists()
    assert not (base / "pwned-inapp").exists()
    assert not (plat.state / "pwned-by-pip").exists()


# --- nimbus killed --------------------------------------------------------

def test_a_detached_child_does_not_outlive_nimbus_sigkilled(start_nimbus, tmp_path):
    app = tmp_path / "detach"
    app.mkdir()
    (app / "app.yaml").write_text(
        "name: detach\nfunctions:\n  orphan:\n    handler: h.orphan\n"
        "    http: [{method: POST, path: /orphan}]\n")
    (app / "h.py").write_text(ATTACK_CODE)
    n = start_nimbus(app)
    marker = "detach-" + uuid.uuid4().hex
    r = n.http.post("/orphan", content=json.dumps({"marker": marker, "wait": False}))
    assert r.status_code == 200, r.text
    try:
        assert wait_until(lambda: len(procs_with_cmdline(marker)) >= 2, 10), \
            "the handler's children never started"
        n.proc.kill()
        n.proc.wait(timeout=10)
        gone = wait_until(lambda: not procs_with_cmdline(marker), 6)
        left = procs_with_cmdline(marker)
    finally:
        kill_leftovers(procs_with_cmdline(marker))
    assert gone, f"a handler's children outlived nimbus's SIGKILL: {left}"
