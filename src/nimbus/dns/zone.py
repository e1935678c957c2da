"""The zone's answers, as a pure function of a query and a lookup.

`respond(wire, zone, lookup, transport)` turns one DNS message into its
reply (or None: nothing to send). It never raises for anything a client can
send: a message that does not parse gets FORMERR when its header can be read,
and is dropped otherwise. The network and the regions' health live elsewhere
(`nimbus.dns.server`, `nimbus.dns.answers`); here is only the DNS.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, CLASS, EDNS0, NS, OPCODE, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

# A lookup answers an app's addresses now (IPv4 and IPv6 literals, mixed), or
# None when no region knows the app.
Lookup = Callable[[str], "list[str] | None"]

UDP_PLAIN = 512          # a UDP answer without EDNS fits in this
CLASS_ANY = 255          # the query class "*" (dnslib has no name for it)
UDP_EDNS_MAX = 1232      # what we offer and honour with EDNS (the DNS flag day's size)
SOA_REFRESH = 60
SOA_RETRY = 30
SOA_EXPIRE = 3600


@dataclass(frozen=True)
class Zone:
    """The zone this server is authoritative for."""

    name: str                      # "example.internal", lowercase, no trailing dot
    ttl: int = 5                   # answers, and the negative-caching time (SOA minimum)
    ns_name: str = ""              # the zone's name server; default "ns.<zone>"
    ns_addresses: tuple[str, ...] = ()   # its addresses, answered when ns_name is in the zone
    serial: int = 1
    labels: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = normalize_zone(self.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "labels", tuple(p.encode() for p in name.split(".")))
        if not self.ns_name:
            object.__setattr__(self, "ns_name", f"ns.{name}")
        object.__setattr__(self, "ns_name", self.ns_name.rstrip(".").lower())


def normalize_zone(text: str) -> str:
    """`Example.Internal.` -> `example.internal`; ValueError naming what is wrong."""
    name = text.strip().rstrip(".").lower()
    if not name:
        raise ValueError("the zone is empty")
    for label in name.split("."):
        if not label or len(label) > 63:
            raise ValueError(f"{text!r} is not a domain name (empty or too long label)")
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            raise ValueError(f"{text!r} is not a domain name (label {label!r})")
    if len(name) > 253:
        raise ValueError(f"{text!r} is longer than 253 characters")
    return name


def respond(wire: bytes, zone: Zone, lookup: Lookup, *, udp: bool) -> bytes | None:
    """The reply to one DNS message, or None to send nothing."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack("!HH", wire[:4])
    if flags & 0x8000:          # a response: never answer one (no reflection loops)
        return None
    try:
        request = DNSRecord.parse(wire)
    except Exception:  # noqa: BLE001 - dnslib raises many kinds for hostile bytes
        return _bare(ident, flags, RCODE.FORMERR)
    try:
        reply = _answer(request, zone, lookup)
    except Exception:  # noqa: BLE001 - a lookup that cannot answer (or a bug): SERVFAIL
        reply = DNSRecord(DNSHeader(id=ident, qr=1, opcode=request.header.opcode,
                                    rd=request.header.rd, rcode=RCODE.SERVFAIL))
        for question in request.questions[:1]:
            reply.add_question(question)
    return _pack(reply, request, udp)


def _bare(ident: int, flags: int, rcode: int) -> bytes:
    """A header-only reply: for messages that cannot be read."""
    opcode = (flags >> 11) & 0xF
    rd = (flags >> 8) & 1
    header = DNSHeader(id=ident, qr=1, opcode=opcode, rd=rd, rcode=rcode)
    return bytes(DNSRecord(header).pack())


def _answer(request: Any, zone: Zone, lookup: Lookup) -> Any:
    header = request.header
    reply = DNSRecord(DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, ra=0))
    if header.opcode != OPCODE.QUERY:
        reply.header.rcode = RCODE.NOTIMP
        return reply
    if len(request.questions) != 1:
        reply.header.rcode = RCODE.FORMERR
        return reply
    question = request.questions[0]
    reply.add_question(question)
    if question.qclass not in (CLASS.IN, CLASS_ANY):
        reply.header.rcode = RCODE.REFUSED
        return reply
    labels = tuple(bytes(p).lower() for p in question.qname.label)
    n = len(zone.labels)
    if labels[-n:] != zone.labels or len(labels) < n:
        reply.header.rcode = RCODE.REFUSED      # not ours, and we do not recurse
        return reply
    reply.header.aa = 1
    qtype = question.qtype
    qname = question.qname
    inner = labels[: len(labels) - n]
    if not inner:                               # the apex: SOA and NS
        if qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(_soa(zone))
        if qtype in (QTYPE.NS, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.NS, ttl=zone.ttl, rdata=NS(zone.ns_name + ".")))
            _glue(reply, zone, reply.add_ar)
        if not reply.rr:
            reply.add_auth(_soa(zone))
        return reply
    name = b".".join(inner).decode("ascii", errors="replace").lower()
    if f"{name}.{zone.name}" == zone.ns_name and zone.ns_addresses:
        addresses: list[str] | None = list(zone.ns_addresses)
    elif len(inner) == 1:
        addresses = lookup(name)
    else:
        addresses = None
    if addresses is None:
        reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(_soa(zone))
        return reply
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if ip.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.A, ttl=zone.ttl, rdata=A(address)))
        elif ip.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.AAAA, ttl=zone.ttl, rdata=AAAA(address)))
    if not reply.rr:                            # the name exists, not with this type
        reply.add_auth(_soa(zone))
    return reply


def _soa(zone: Zone) -> Any:
    times = (zone.serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, zone.ttl)
    return RR(zone.name + ".", QTYPE.SOA, ttl=zone.ttl,
              rdata=SOA(zone.ns_name + ".", f"hostmaster.{zone.name}.", times))


def _glue(reply: Any, zone: Zone, add: Callable[..., None]) -> None:
    if not zone.ns_name.endswith("." + zone.name):
        return
    for address in zone.ns_addresses:
        kind = QTYPE.A if ipaddress.ip_address(address).version == 4 else QTYPE.AAAA
        rdata = A(address) if kind == QTYPE.A else AAAA(address)
        add(RR(zone.ns_name + ".", kind, ttl=zone.ttl, rdata=rdata))


def _pack(reply: Any, request: Any, udp: bool) -> bytes:
    edns = next((r for r in request.ar if r.rtype == QTYPE.OPT), None)
    limit = UDP_PLAIN
    if edns is not None:
        limit = max(UDP_PLAIN, min(int(edns.rclass), UDP_EDNS_MAX))
        reply.add_ar(EDNS0(udp_len=UDP_EDNS_MAX))
    data = bytes(reply.pack())
    if udp and len(data) > limit:
        # Too big for this datagram: the question alone with TC set; the
        # client asks again over TCP.
        header = reply.header
        short = DNSRecord(DNSHeader(id=header.id, qr=1, aa=header.aa, tc=1, rd=header.rd,
                                    rcode=header.rcode, opcode=header.opcode))
        for question in reply.questions:
            short.add_question(question)
        data = bytes(short.pack())
    return data
