"""What chaos picks to kill from a region's status, and how it would bring
it back, against stand-in processes (nothing is killed here)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from nimbus.chaos.procs import looks_like_nimbus
from nimbus.chaos.targets import Skip, plan_instance, plan_node, plan_region


@pytest.fixture
def nimbus_like() -> Iterator[list[int]]:
    """Three idle processes whose command lines name nimbus."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               "nimbus", f"--state-dir=/tmp/x{i}", "--port", "0"])
             for i in range(3)]
    deadline = time.monotonic() + 10
    while not all(looks_like_nimbus(p.pid) for p in procs):  # exec may not be done
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def up_status(pid: int, instances: list[dict[str, int]]) -> dict[str, object]:
    return {"region": "eu", "pid": pid, "gateway_url": "http://127.0.0.2:8080",
            "control_url": "http://127.0.0.2:8081", "state_dir": "/tmp/eu-state",
            "functions": [{"name": "hello", "instances": instances},
                          {"name": "other", "instances": [{"pid": 99999999}]}]}


def test_a_nimbus_up_region_is_one_tree_restarted_on_its_ports(
        nimbus_like: list[int]) -> None:
    root = nimbus_like[0]
    kill = plan_region("eu", up_status(root, []))
    assert kill.roots == [root] and str(root) in kill.target
    ((cmd, log),) = kill.restart
    assert cmd.option("--port") == "8080" and cmd.option("--control-port") == "8081"
    assert str(log) == "/tmp/eu-state/restarted.log"
    for role in ("worker", "gateway", "leader"):
        with pytest.raises(Skip, match=f"no separate {role}"):
            plan_node("eu", up_status(root, []), role)


def test_the_busiest_instance_of_the_app_is_picked(nimbus_like: list[int]) -> None:
    a, b = nimbus_like[1], nimbus_like[2]
    status = up_status(nimbus_like[0], [{"pid": a, "outstanding": 0},
                                        {"pid": b, "outstanding": 3}])
    kill = plan_instance("eu", status, {"hello"})
    assert kill.roots == [b] and kill.restart == []  # the platform replaces it
    with pytest.raises(Skip, match="no instance of the app"):
        plan_instance("eu", status, {"missing"})


def test_a_pid_that_is_not_nimbus_is_never_picked() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as p:
        try:
            with pytest.raises(Skip, match="not a nimbus process"):
                plan_region("eu", up_status(p.pid, []))
            with pytest.raises(Skip, match="not a nimbus process"):
                plan_region("eu", up_status(1, []))
        finally:
            p.kill()


def cluster_status(pids: list[int]) -> dict[str, object]:
    return {"mode": "region", "region": "eu", "leader": "c2", "nodes": [
        {"role": "controller", "id": "c1", "pid": pids[0], "url": "http://127.0.0.2:9001"},
        {"role": "controller", "id": "c2", "pid": pids[1], "url": "http://127.0.0.2:9002"},
        {"role": "worker", "id": "w1", "pid": pids[2], "ready": {"hello@1": 2}},
        {"role": "gateway", "id": "g1", "pid": pids[0], "url": "http://127.0.0.2:8080"},
    ]}


def test_cluster_roles_come_back_on_their_ports(nimbus_like: list[int]) -> None:
    status = cluster_status(nimbus_like)
    leader = plan_node("eu", status, "leader")
    assert leader.roots == [nimbus_like[1]] and "c2" in leader.target
    ((cmd, log),) = leader.restart
    assert cmd.option("--control-port") == "9002" and str(log) == "/tmp/x1/process.log"
    gateway = plan_node("eu", status, "gateway")
    assert gateway.restart[0][0].option("--port") == "8080"
    worker = plan_node("eu", status, "worker")
    assert worker.roots == [nimbus_like[2]] and worker.restart[0][0].option("--port") == "0"
    whole = plan_region("eu", status)
    assert set(whole.roots) == set(nimbus_like)
    assert len(whole.restart) == 4 and "NATS" in " ".join(whole.notes)
    with pytest.raises(Skip, match="no leader"):
        plan_node("eu", {**status, "leader": None}, "leader")
