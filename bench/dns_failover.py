"""``nimbus dns`` measured against two real regions (``nimbus up`` on
127.0.0.2 and 127.0.0.3, an app with ``failover`` from eu to us).

    python bench/dns_failover.py [--queries 5000] [--kills 5]

1. Query cost: one client asking the app's A record over UDP, one query at
   a time: queries per second and latency p50/p99 (the lookup runs the
   edge's health and policy for every query, nothing is cached).
2. Failover: per trial, SIGKILL every process of eu and time until the
   answer is us (polled every 10 ms), then start eu again and time until
   the answer is eu (its rise time, 1 s here, included). Prints each trial
   and p50/max.

Traffic goes to 127.0.0.0/8 only; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.multiregion import regions, write_cluster_file  # noqa: E402

ZONE = "example.internal"
RISE_S = 1.0
APP = """\
name: shop
runtime: python3.11
regions: {names: [eu, us], policy: failover}
functions:
  hello:
    handler: hello.hello
    http: [{method: GET, path: /hello}]
"""
CODE = "def hello(event, context):\n    return {'statusCode': 200, 'body': 'hi'}\n"


def ask(sock: socket.socket, port: int, wire: bytes) -> list[str]:
    sock.sendto(wire, ("127.0.0.1", port))
    reply = dns.message.from_wire(sock.recv(4096))
    return sorted(rd.address for rrset in reply.answer for rd in rrset)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nimbus-bench-dns-") as tmp:
        root = Path(tmp)
        app = root / "shop"
        app.mkdir()
        (app / "app.yaml").write_text(APP)
        (app / "hello.py").write_text(CODE)
        with regions(root, app) as (eu, us):
            cluster = write_cluster_file(root, [eu, us])
            log = root / "dns.out"
            with open(log, "wb") as out:
                server = subprocess.Popen(
                    [sys.executable, "-m", "nimbus", "dns", "--cluster", str(cluster.path),
                     "--zone", ZONE, "--port", "0", "--rise", str(RISE_S)],
                    stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 30
                while not (found := re.search(rb"udp\+tcp 127\.0\.0\.1:(\d+)",
                                              log.read_bytes())):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"nimbus dns did not start:\n{log.read_text()}")
                    time.sleep(0.05)
                port = int(found.group(1))
                wire = dns.message.make_query(f"shop.{ZONE}", "A").to_wire()
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(2)
                    took = []
                    start = time.perf_counter()
                    for _ in range(args.queries):
                        t0 = time.perf_counter()
                        ask(sock, port, wire)
                        took.append(time.perf_counter() - t0)
                    elapsed = time.perf_counter() - start
                    print(f"queries: {args.queries} in {elapsed:.2f} s = "
                          f"{args.queries / elapsed:,.0f}/s; latency p50 "
                          f"{pct(took, 0.5) * 1e3:.3f} ms, p99 {pct(took, 0.99) * 1e3:.3f} ms")
                    moved: list[float] = []
                    back: list[float] = []
                    for trial in range(args.kills):
                        eu.kill()
                        t0 = time.monotonic()
                        while ask(sock, port, wire) != ["127.0.0.3"]:
                            time.sleep(0.01)
                        moved.append(time.monotonic() - t0)
                        eu.start()
                        t1 = time.monotonic()
                        while ask(sock, port, wire) != ["127.0.0.2"]:
                            time.sleep(0.01)
                        back.append(time.monotonic() - t1)
                        print(f"kill {trial + 1}: answer moved after {moved[-1]:.3f} s; "
                              f"back {back[-1]:.3f} s after eu was serving again")
                    if moved:
                        print(f"moved: p50 {statistics.median(moved):.3f} s, max "
                              f"{max(moved):.3f} s; back (rise {RISE_S:g} s): p50 "
                              f"{statistics.median(back):.3f} s")
            finally:
                server.terminate()
                server.wait(10)


if __name__ == "__main__":
    main()
