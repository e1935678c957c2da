"""``nimbus dns`` against two real regions (``nimbus up`` on 127.0.0.2 and
127.0.0.3), asked with dnspython over UDP and TCP: the app's name follows
the first healthy region, moves within a second of that region's death and
comes back only after the hysteresis."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import httpx
import pytest

from tests.edgeworld import ask_dns, stop_process
from tests.multiregion import RegionProc, regions, write_app, write_cluster_file

pytestmark = pytest.mark.e2e

ZONE = "example.internal"
RISE_S = 2.0
APP = """\
name: shop
runtime: python3.11
regions: {names: [eu, us], policy: failover}
functions:
  hello:
    handler: hello.hello
    http: [{method: GET, path: /hello}]
"""
CODE = """\
import os
def hello(event, context):
    return {"statusCode": 200, "body": os.environ["AWS_REGION"]}
"""


class DnsProc:
    """A running ``nimbus dns`` and a way to ask it."""

    def __init__(self, cluster: Path, log: Path, *extra: str) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nimbus", "dns", "--cluster", str(cluster), "--zone", ZONE,
             "--host", "127.0.0.1", "--port", "0", *extra],
            stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            found = re.search(rb"at udp\+tcp 127\.0\.0\.1:(\d+)", log.read_bytes())
            if found:
                self.port = int(found.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nimbus dns did not start:\n{log.read_text()}")
            time.sleep(0.05)

    def ask(self, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
        return ask_dns(self.port, name, rdtype, tcp=tcp)

    def addresses(self, name: str, tcp: bool = False) -> list[str]:
        reply = self.ask(name, tcp=tcp)
        return sorted(rd.address for rrset in reply.answer for rd in rrset)

    def stop(self) -> None:
        stop_process(self.proc, self._out, 10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[RegionProc],
                                                                      DnsProc]]:
    root = tmp_path_factory.mktemp("dns")
    app = write_app(root / "shop", APP, "hello", CODE)
    with regions(root, app) as started:
        cluster = write_cluster_file(root, started)
        server = DnsProc(cluster.path, root / "dns.out", "--rise", str(RISE_S))
        try:
            yield started, server
        finally:
            server.stop()


def test_the_app_name_is_the_first_regions_gateway_over_udp_and_tcp(
        world: tuple[list[RegionProc], DnsProc]) -> None:
    _regions, server = world
    for tcp in (False, True):
        reply = server.ask(f"shop.{ZONE}", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
        assert [rd.address for rd in reply.answer[0]] == ["127.0.0.2"]
        assert reply.answer[0].ttl == 5


def test_soa_ns_nodata_nxdomain_refused(world: tuple[list[RegionProc], DnsProc]) -> None:
    _regions, server = world
    for tcp in (False, True):
        soa = server.ask(ZONE, "SOA", tcp=tcp)
        assert soa.answer[0].rdtype == dns.rdatatype.SOA and soa.flags & dns.flags.AA
        ns = server.ask(ZONE, "NS", tcp=tcp)
        assert [str(r.target) for r in ns.answer[0]] == [f"ns.{ZONE}."]
        nodata = server.ask(f"shop.{ZONE}", "AAAA", tcp=tcp)
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA
        missing = server.ask(f"nosuchapp.{ZONE}", tcp=tcp)
        assert missing.rcode() == dns.rcode.NXDOMAIN
        assert missing.authority[0].rdtype == dns.rdatatype.SOA
        assert server.ask("example.com", tcp=tcp).rcode() == dns.rcode.REFUSED


def test_garbage_does_not_stop_it(world: tuple[list[RegionProc], DnsProc]) -> None:
    _regions, server = world
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for junk in (b"", b"\x00", b"\xff" * 12, b"\x12\x34\x01\x00\x00\x01" + b"\xc0" * 40):
            udp.sendto(junk, ("127.0.0.1", server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as tcp:
        header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        tcp.sendall(struct.pack("!H", 40) + header + b"\xc0" * 28)   # a name that loops
        size = struct.unpack("!H", tcp.recv(2))[0]
        reply = dns.message.from_wire(tcp.recv(size))
        assert reply.rcode() == dns.rcode.FORMERR
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as tcp:
        tcp.sendall(b"\x00")                                    # half a length, then gone
    # several queries on one TCP connection, sent at once
    queries = [dns.message.make_query(f"shop.{ZONE}", "A"), dns.message.make_query(ZONE, "SOA")]
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as tcp:
        tcp.sendall(b"".join(struct.pack("!H", len(w)) + w for w in
                             (q.to_wire() for q in queries)))
        stream = tcp.makefile("rb")
        for query in queries:
            size = struct.unpack("!H", stream.read(2))[0]
            assert query.is_response(dns.message.from_wire(stream.read(size)))
    assert server.addresses(f"shop.{ZONE}") == ["127.0.0.2"]
    assert server.proc.poll() is None


def test_answers_move_within_a_second_of_a_region_death_and_return_after_rise(
        world: tuple[list[RegionProc], DnsProc]) -> None:
    started, server = world
    eu = started[0]
    name = f"shop.{ZONE}"
    eu.kill()
    dead_at = time.monotonic()
    deadline = dead_at + 10
    while server.addresses(name) != ["127.0.0.3"]:
        assert time.monotonic() < deadline, "the answer never moved to us"
        time.sleep(0.02)
    moved_s = time.monotonic() - dead_at
    assert moved_s < 1.0, f"the answer moved {moved_s:.2f} s after the region died"
    assert server.addresses(name, tcp=True) == ["127.0.0.3"]

    # Start eu again (in the background: its start waits for its deploy)
    # and note when its gateway first answers its health check.
    starter = threading.Thread(target=eu.start)
    starter.start()
    first_ok: float | None = None
    deadline = time.monotonic() + RISE_S + 60
    try:
        while True:
            assert time.monotonic() < deadline, "the answer never came back to eu"
            if first_ok is None and _healthy(eu.gateway_url):
                first_ok = time.monotonic()
            if server.addresses(name) == ["127.0.0.2"]:
                back = time.monotonic()
                break
            time.sleep(0.03)
    finally:
        starter.join(60)
    assert first_ok is not None, "the name came back before eu's gateway answered"
    # The name comes back only once eu has been healthy for the rise time
    # (its first good probe is at most one poll of ours before first_ok).
    assert back - first_ok >= RISE_S - 0.3, f"eu came back {back - first_ok:.2f} s after health"
    print(f"dns: moved {moved_s:.3f} s after death; back {back - first_ok:.3f} s after health")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/_nimbus/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    cluster = tmp_path / "nimbus.cluster.yaml"
    cluster.write_text("regions:\n  eu:\n    control: http://127.0.0.2:1\n"
                       "    token_env: NIMBUS_TEST_DNS_TOKEN\n    gateways: [http://127.0.0.2:2]\n")
    for args, needle in ((["--zone", "a..b"], "--zone"),
                         (["--zone", ZONE], "nimbus.cluster.yaml")):
        done = subprocess.run([sys.executable, "-m", "nimbus", "dns", "--cluster", str(cluster),
                               "--port", "0", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("nimbus: error:") and needle in done.stderr
        assert "Traceback" not in done.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "nimbus", "dns", "--cluster", str(cluster),
                               "--zone", ZONE, "--port", port], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "NIMBUS_TEST_DNS_TOKEN": "t" * 40})
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"nimbus: error: cannot listen on 127.0.0.1:{port}: "
                                   "Address already in use"), done.stderr
