"""The DNS server's answers as pure functions: the zone's replies to every
kind of question (read back with dnspython), hostile bytes, and which
region a name points to by policy and health (a real HealthBook fed by
hand, no sleeping)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
from hypothesis import given, settings
from hypothesis import strategies as st

from nimbus.dns.answers import RegionAnswers
from nimbus.dns.apps import AppDirectory, merge
from nimbus.dns.zone import Zone, normalize_zone, respond
from nimbus.edge.health import HealthBook, HealthConfig
from nimbus.multiregion.clusterfile import ClusterFile, RegionEntry

ZONE = Zone("Example.Internal.", ttl=5, ns_addresses=("127.0.0.53",), serial=7)
APPS = {"shop": ["127.0.0.2", "::2"], "v4only": ["127.0.0.3"]}


def lookup(name: str) -> list[str] | None:
    return APPS.get(name)


def ask(name: str, rdtype: str, *, udp: bool = True, edns: int = -1,
        zone: Zone = ZONE) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=edns)
    wire = respond(query.to_wire(), zone, lookup, udp=udp)
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id and reply.flags & dns.flags.QR
    return reply


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in reply.answer for rd in rrset)


def test_zone_names_are_checked_and_normalized() -> None:
    assert normalize_zone("Example.Internal.") == "example.internal"
    assert ZONE.ns_name == "ns.example.internal"
    for bad in ("", ".", "a..b", "a b.c", "x" * 64 + ".c"):
        try:
            normalize_zone(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_a_and_aaaa_of_an_app_are_authoritative_with_the_ttl() -> None:
    reply = ask("shop.example.internal", "A")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert addresses(reply) == ["127.0.0.2"]
    assert reply.answer[0].ttl == 5
    assert addresses(ask("SHOP.example.INTERNAL", "AAAA")) == ["::2"]
    both = ask("shop.example.internal", "ANY")
    assert addresses(both) == ["127.0.0.2", "::2"]


def test_a_name_without_the_asked_type_is_nodata_with_the_soa() -> None:
    reply = ask("v4only.example.internal", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert not reply.answer
    assert [r.rdtype for r in reply.authority] == [dns.rdatatype.SOA]
    assert ask("shop.example.internal", "MX").answer == []


def test_unknown_names_in_the_zone_are_nxdomain_with_the_soa() -> None:
    for name in ("nope.example.internal", "a.shop.example.internal"):
        reply = ask(name, "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.AA
        soa = reply.authority[0]
        assert soa.rdtype == dns.rdatatype.SOA and soa[0].minimum == 5


def test_the_apex_has_soa_and_ns_with_glue() -> None:
    soa = ask("example.internal", "SOA")
    assert soa.answer[0][0].serial == 7
    assert str(soa.answer[0][0].mname) == "ns.example.internal."
    ns = ask("example.internal", "NS")
    assert [str(r.target) for r in ns.answer[0]] == ["ns.example.internal."]
    assert sorted(rd.address for rrset in ns.additional for rd in rrset) == ["127.0.0.53"]
    assert addresses(ask("ns.example.internal", "A")) == ["127.0.0.53"]
    apex_a = ask("example.internal", "A")
    assert apex_a.rcode() == dns.rcode.NOERROR and not apex_a.answer and apex_a.authority


def test_names_outside_the_zone_are_refused() -> None:
    for name in ("example.com", "internal", "shop.example.internal.evil"):
        reply = ask(name, "A")
        assert reply.rcode() == dns.rcode.REFUSED and not reply.flags & dns.flags.AA
        assert not reply.answer


def test_edns_is_answered_with_edns() -> None:
    reply = ask("shop.example.internal", "A", edns=0)
    assert reply.edns == 0 and reply.payload == 1232


def test_a_big_answer_over_udp_is_truncated_and_whole_over_tcp() -> None:
    many = [f"10.0.{i // 250}.{i % 250}" for i in range(100)]

    def big(name: str) -> list[str] | None:
        return many

    query = dns.message.make_query("shop.example.internal", "A")
    short = dns.message.from_wire(respond(query.to_wire(), ZONE, big, udp=True) or b"")
    assert short.flags & dns.flags.TC and not short.answer
    whole = dns.message.from_wire(respond(query.to_wire(), ZONE, big, udp=False) or b"")
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 100


def test_other_opcodes_and_classes() -> None:
    query = dns.message.make_query("shop.example.internal", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    reply = dns.message.from_wire(respond(query.to_wire(), ZONE, lookup, udp=True) or b"")
    assert reply.rcode() == dns.rcode.NOTIMP
    chaos = dns.message.make_query("shop.example.internal", "TXT", rdclass="CH")
    reply = dns.message.from_wire(respond(chaos.to_wire(), ZONE, lookup, udp=True) or b"")
    assert reply.rcode() == dns.rcode.REFUSED


def test_malformed_messages_get_formerr_or_nothing() -> None:
    good = dns.message.make_query("shop.example.internal", "A").to_wire()
    assert respond(b"", ZONE, lookup, udp=True) is None
    assert respond(good[:5], ZONE, lookup, udp=True) is None
    formerr = respond(good[:-3], ZONE, lookup, udp=True)
    assert formerr is not None
    assert dns.message.from_wire(formerr).rcode() == dns.rcode.FORMERR
    # a response is never answered (no loops between two servers)
    flags = struct.unpack("!H", good[2:4])[0] | 0x8000
    assert respond(good[:2] + struct.pack("!H", flags) + good[4:], ZONE, lookup,
                   udp=True) is None
    # two questions
    two = bytearray(good)
    two[4:6] = struct.pack("!H", 2)
    two += good[12:]
    reply = respond(bytes(two), ZONE, lookup, udp=True)
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR


def test_a_lookup_that_fails_is_servfail_not_a_crash() -> None:
    def broken(name: str) -> list[str] | None:
        raise RuntimeError("boom")

    query = dns.message.make_query("shop.example.internal", "A")
    wire = respond(query.to_wire(), ZONE, broken, udp=True)
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.rcode() == dns.rcode.SERVFAIL and query.is_response(reply)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_never_raise(data: bytes) -> None:
    reply = respond(data, ZONE, lookup, udp=True)
    assert reply is None or len(reply) >= 12


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 60), st.binary(min_size=1, max_size=8))
def test_mutated_queries_never_raise(at: int, junk: bytes) -> None:
    good = dns.message.make_query("shop.example.internal", "A", use_edns=0).to_wire()
    bad = good[:at] + junk + good[at + len(junk):]
    for udp in (True, False):
        reply = respond(bad, ZONE, lookup, udp=udp)
        assert reply is None or len(reply) >= 12


# ---------------------------------------------------------------- regions

def _cluster() -> ClusterFile:
    def entry(name: str, *hosts: str) -> RegionEntry:
        return RegionEntry(name, f"http://{hosts[0]}:8081", "t",
                           tuple(f"http://{h}:8080" for h in hosts))
    return ClusterFile(Path("c.yaml"), {"eu": entry("eu", "127.0.0.2", "127.0.0.4"),
                                        "us": entry("us", "127.0.0.3")})


def _answers(regions: dict[str, object] | None, hosts: tuple[str, ...] = ("eu", "us"),
             ) -> tuple[RegionAnswers, HealthBook, list[float]]:
    cluster = _cluster()
    clock = [100.0]
    book = HealthBook(cluster, HealthConfig(rise_s=3.0), clock[0])
    apps = AppDirectory(cluster)
    for region in hosts:
        apps.update(region, [{"name": "shop", "version": 1, "regions": regions}])
    addresses = {url: (url.split("//")[1].split(":")[0],)
                 for r in cluster.regions.values() for url in r.gateways}
    answers = RegionAnswers(cluster, book, apps, addresses, random.Random(1),
                            clock=lambda: clock[0])
    for url in addresses:
        book.probe_ok(url, 0.001, clock[0])
    return answers, book, clock


def test_failover_answers_the_first_healthy_region_and_fails_back_after_rise() -> None:
    answers, book, clock = _answers({"names": ["eu", "us"], "policy": "failover"})
    assert answers.lookup("shop") == ["127.0.0.2", "127.0.0.4"]
    assert answers.lookup("other") is None
    book.probe_failed("http://127.0.0.2:8080", "refused", clock[0])
    book.probe_failed("http://127.0.0.2:8080", "refused", clock[0])
    assert answers.lookup("shop") == ["127.0.0.4"]          # its other gateway only
    book.passive_failure("http://127.0.0.4:8080", "refused", clock[0])
    assert answers.lookup("shop") == ["127.0.0.3"]          # the next region
    for url in ("http://127.0.0.2:8080", "http://127.0.0.4:8080"):
        book.probe_ok(url, 0.001, clock[0])
    assert answers.lookup("shop") == ["127.0.0.3"]          # not before the rise time
    clock[0] += 3.0
    book.probe_ok("http://127.0.0.2:8080", 0.001, clock[0])
    assert answers.lookup("shop") == ["127.0.0.2"]
    book.passive_failure("http://127.0.0.3:8080", "refused", clock[0])
    book.passive_failure("http://127.0.0.2:8080", "refused", clock[0])
    # nothing healthy: the first region anyway, every gateway of it
    assert answers.lookup("shop") == ["127.0.0.2", "127.0.0.4"]


def test_a_region_that_does_not_host_the_app_is_not_answered() -> None:
    answers, _book, _clock = _answers(None, hosts=("us",))
    assert answers.lookup("shop") == ["127.0.0.3"]


def test_weighted_answers_follow_the_weights() -> None:
    answers, _book, _clock = _answers({"names": ["eu", "us"], "policy": "weighted",
                                       "weights": {"eu": 80, "us": 20}})
    picks = [answers.region_for("shop") for _ in range(2000)]
    assert 0.75 < picks.count("eu") / 2000 < 0.85


def test_latency_answers_the_fastest_region() -> None:
    answers, book, clock = _answers({"names": ["eu", "us"], "policy": "latency"})
    for _ in range(10):
        for url in ("http://127.0.0.2:8080", "http://127.0.0.4:8080"):
            book.probe_ok(url, 0.030, clock[0])
        book.probe_ok("http://127.0.0.3:8080", 0.002, clock[0])
    assert answers.region_for("shop") == "us"


def test_merge_takes_the_newest_versions_routing() -> None:
    old = {"name": "shop", "version": 1, "regions": {"names": ["eu", "us"],
                                                    "policy": "failover", "weights": {}}}
    new = {"name": "shop", "version": 2, "regions": {"names": ["us", "eu"],
                                                    "policy": "failover", "weights": {}}}
    apps = merge(("eu", "us"), {"eu": {"shop": old}, "us": {"shop": new}})
    info = apps["shop"]
    assert info.version == 2 and info.regions is not None and info.regions.names == ("us", "eu")
    assert info.hosted_by == {"eu", "us"}
    bad = merge(("eu",), {"eu": {"shop": {"name": "shop", "regions": {"policy": "x"}}}})
    assert bad["shop"].regions is None and bad["shop"].version == 0
