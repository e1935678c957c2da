"""``nimbus logs --cluster``: every region's lines, each labelled with its
region, read once (merged in time order) and followed live. Two
``nimbus up --region`` regions for the module."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.multiregion import RegionProc, regions, write_app, write_cluster_file
from tests.region import wait_until

MANIFEST = """\
name: talk
functions:
  talk:
    handler: h.talk
    http: [{method: GET, path: /talk}]
"""

CODE = """\
import logging, os
logging.getLogger().setLevel(logging.INFO)

def talk(event, context):
    logging.warning("from %s", os.environ["AWS_REGION"])
    print("chatter")
    return {"statusCode": 200, "body": context.aws_request_id}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[RegionProc], Path]]:
    root = tmp_path_factory.mktemp("logsfollow")
    app = write_app(root / "app", MANIFEST, "h", CODE)
    with regions(root, app) as started:
        cluster = write_cluster_file(root / "cluster", started)
        yield started, cluster.path


def nimbus(*args: str) -> list[str]:
    return [sys.executable, "-m", "nimbus.cli.main", *args]


def test_logs_of_every_region_labelled_and_merged(world: tuple[list[RegionProc], Path]
                                                  ) -> None:
    started, cluster = world
    rids = {r.name: r.get("/talk").text for r in started}
    out = wait_until(lambda: (lambda p: p if p.stdout.count("\n") == 4 else None)(
        subprocess.run(nimbus("logs", "talk", "--cluster", str(cluster), "--json"),
                       capture_output=True, text=True, timeout=60)), 20, "four lines")
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
