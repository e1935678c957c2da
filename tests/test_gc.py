"""Garbage collection of deployed code: old versions' code folders, blobs and venvs
go, the newest ``keep_versions`` of each function and the live ones stay."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest

from nimbus.control import gc
from nimbus.control.bundle import make_bundle
from nimbus.control.deploy import DEFAULT_KEEP_VERSIONS, DeployConfig
from nimbus.store.registry import open_blobs, open_store

HEX = "0123456789abcdef"


def digest(n: int) -> str:
    return (HEX[n % 16] * 64)[:63] + HEX[n // 16 % 16]


# -- the collection itself, over a real store ----------------------------------------


def test_collect_keeps_the_newest_and_live_versions_and_removes_the_rest(tmp_path):
    async def run() -> tuple[gc.Collected, list[str]]:
        store = await open_store("sqlite", tmp_path / "store.db")
        blobs = await open_blobs(tmp_path / "blobs")
        try:
            for n in range(1, 9):  # versions 1..8 of f, each its own code and venv
                rec = {"version": n, "digest": digest(n), "requirements_hash": f"venv{n}"}
                await store.create(f"functions/f/versions/{n:08d}", orjson.dumps(rec))
            live = {"version": 2, "digest": digest(2), "requirements_hash": "venv2"}
            await store.create("apps/a", orjson.dumps({"name": "a", "functions": {"f": live}}))
            for n in range(1, 9):
                (tmp_path / "code" / digest(n)).mkdir(parents=True)
                (tmp_path / "venvs" / f"venv{n}").mkdir(parents=True)
                path = tmp_path / "blobs" / "sha256" / digest(n)[:2] / digest(n)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"zip")
            (tmp_path / "code" / f"{digest(20)}.tmp123").mkdir()  # a crashed unpack
            (tmp_path / "code" / digest(21)).mkdir()  # a deploy under way
            (tmp_path / "venvs" / "venv99.building").mkdir()  # a crashed build
            done = await gc.collect(tmp_path, store, blobs, keep_versions=3,
                                    in_use=gc.Keep({digest(21)}))
            left = [e.key for e in await store.list("functions/")]
            return done, left
        finally:
            await store.aclose()
            await blobs.aclose()

    done, left = asyncio.run(run())
    kept = {2, 6, 7, 8}  # live (a rollback to 2) and the newest three
    assert left == [f"functions/f/versions/{n:08d}" for n in sorted(kept)]
    assert sorted(done.versions) == [f"functions/f/versions/{n:08d}" for n in (1, 3, 4, 5)]
    assert {p.name for p in (tmp_path / "code").iterdir()} == {
        digest(n) for n in kept} | {digest(21)}
    assert {p.name for p in (tmp_path / "venvs").iterdir()} == {f"venv{n}" for n in kept}
    blob_names = {p.name for p in (tmp_path / "blobs" / "sha256").rglob("*") if p.is_file()}
    assert blob_names == {digest(n) for n in kept}


def test_collect_can_leave_venvs_alone(tmp_path):
    async def run() -> None:
        store = await open_store("sqlite", tmp_path / "store.db")
        blobs = await open_blobs(tmp_path / "blobs")
        try:
            (tmp_path / "venvs" / "abc.building").mkdir(parents=True)
            (tmp_path / "code" / digest(1)).mkdir(parents=True)
            done = await gc.collect(tmp_path, store, blobs, keep_versions=1, in_use=gc.Keep(),
                                    sweep_venvs=False)
            assert done.code == [digest(1)] and done.venvs == []
        finally:
            await store.aclose()
            await blobs.aclose()

    asyncio.run(run())
    assert (tmp_path / "venvs" / "abc.building").is_dir()


@pytest.mark.parametrize("bad", [0, -1, True, "5"])
def test_keep_versions_is_checked(bad):
    with pytest.raises(ValueError, match="keep_versions"):
        DeployConfig(keep_versions=bad)


# -- with a real nimbus up ---------------------------------------------------------------

APP = "functions:\n  hello:\n    handler: hello.handler\n    http: [{method: GET, path: /hi}]\n"


def write_version(app: Path, n: int, *, broken: bool = False) -> bytes:
    app.mkdir(exist_ok=True)
    (app / "app.yaml").write_text(APP)
    body = "raise RuntimeError('broken at import')\n" if broken else ""
    (app / "hello.py").write_text(
        f"{body}def handler(event, context):\n    return {{'statusCode': 200, 'body': 'v{n}'}}\n")
    return make_bundle(app)


def deploy(n, bundle: bytes) -> dict:
    with httpx.Client(base_url=n.control_url, timeout=60.0,
                      headers={"authorization": f"Bearer {n.token}"}) as c:
        r = c.post("/v1/deploy", content=bundle, params={"name": "gcapp"})
        assert r.status_code == 200, r.text
        return orjson.loads(r.text.strip().splitlines()[-1])


def wait_for(check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def blob_names(state: Path) -> set[str]:
    return {p.name for p in (state / "blobs" / "sha256").rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_old_versions_and_failed_deploys_are_collected_and_the_kept_ones_serve(
        start_nimbus, tmp_path):
    state = tmp_path / "state"
    junk_code = state / "code" / (digest(7) + ".tmp4242")  # leftovers of a crashed run
    junk_venv = state / "venvs" / "0123abcd.building"
    junk_code.mkdir(parents=True)
    junk_venv.mkdir(parents=True)
    app = tmp_path / "gcapp"
    n = start_nimbus(None, state=state)
    assert wait_for(lambda: not junk_code.exists() and not junk_venv.exists()), (
        "leftovers of an earlier run are collected at start")

    digests = []
    total = DEFAULT_KEEP_VERSIONS + 3
    for i in range(1, total + 1):
        out = deploy(n, write_version(app, i))
        assert "result" in out, out
        digests.append(out["result"]["digest"])
        assert n.http.get("/hi").text == f"v{i}"
    failed = deploy(n, write_version(app, 99, broken=True))
    assert "broken at import" in failed["error"]["errorMessage"]

    kept = set(digests[-DEFAULT_KEEP_VERSIONS:])
    assert wait_for(lambda: names(state / "code") == kept), names(state / "code")
    assert wait_for(lambda: blob_names(state) == kept), blob_names(state)
    for d in kept:  # intact, not half-deleted
        assert (state / "code" / d / "hello.py").is_file()
    # the live version still serves, and a redeploy of a kept one needs no new upload of code
    assert n.http.get("/hi").text == f"v{total}"
    again = deploy(n, write_version(app, total - 1))
    assert again["result"]["digest"] == digests[-2]
    assert n.http.get("/hi").text == f"v{total - 1}"
