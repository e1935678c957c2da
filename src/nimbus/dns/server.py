"""The DNS server: one UDP and one TCP socket on the same port, asyncio.

Every message goes through `nimbus.dns.zone.respond`, which never raises;
TCP connections are bounded in number and idle time, so a client that
opens connections and sends nothing cannot hold the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from nimbus.dns.zone import Lookup, Zone, respond
from nimbus.edge.health import HealthConfig
from nimbus.errors import NimbusError
from nimbus.multiregion.clusterfile import ClusterFile

log = logging.getLogger("nimbus.dns")

TCP_IDLE_S = 10.0          # an open TCP connection with no complete message this long is closed
TCP_MAX_CONNECTIONS = 256  # past it, new connections are closed at once
BIND_TRIES = 20            # port 0: UDP picks, TCP must get the same port


class NotReady(Exception):
    """Raised by a lookup before the server knows enough to answer: the
    zone answers SERVFAIL."""


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, answer: Callable[[bytes, bool], bytes | None]) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.answer(data, True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for a client that went away: nothing to do


class DnsServer:
    """Answers `zone` on `host:port` (UDP and TCP) from `lookup`."""

    def __init__(self, zone: Zone, lookup: Lookup, host: str = "127.0.0.1",
                 port: int = 53) -> None:
        self.zone = zone
        self.lookup = lookup
        self.host = host
        self.port = port
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()
        self.queries = 0

    def answer(self, data: bytes, udp: bool) -> bytes | None:
        self.queries += 1
        return respond(data, self.zone, self.lookup, udp=udp)

    async def start(self) -> int:
        """Bind both sockets; returns the port."""
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for _ in range(BIND_TRIES if self.port == 0 else 1):
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self.answer), local_addr=(self.host, self.port), family=family)
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self.tcp = await asyncio.start_server(self._serve_tcp, self.host, port,
                                                      reuse_address=True)
            except OSError as exc:      # the port is taken for TCP: try another
                transport.close()
                last = exc
                continue
            self.udp = transport
            self.port = port
            return port
        assert last is not None
        raise last

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        self.connections.add(writer)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(size)
                reply = self.answer(data, False)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.connections.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
            for writer in list(self.connections):
                writer.close()
            await self.tcp.wait_closed()


async def serve(cluster: ClusterFile, addresses: dict[str, tuple[str, ...]], zone_name: str,
                host: str, port: int, ttl: int, ns_name: str, config: HealthConfig,
                stop: asyncio.Event) -> None:
    """``nimbus dns``: probe every gateway, follow every region's apps, and
    answer until ``stop`` is set."""
    from nimbus.dns.answers import RegionAnswers
    from nimbus.dns.apps import AppDirectory
    from nimbus.edge.health import HealthBook
    from nimbus.edge.prober import Prober

    book = HealthBook(cluster, config, time.monotonic())
    apps = AppDirectory(cluster)
    answers = RegionAnswers(cluster, book, apps, addresses, random.Random())
    try:
        ns_addresses: tuple[str, ...] = ()
        if not ipaddress.ip_address(host).is_unspecified:
            ns_addresses = (host,)
    except ValueError:
        ns_addresses = ()
    zone = Zone(zone_name, ttl=ttl, ns_name=ns_name, ns_addresses=ns_addresses,
                serial=int(time.time()) & 0xFFFFFFFF)
    warming = True

    def lookup(app: str) -> list[str] | None:
        if warming:     # SERVFAIL (resolvers try again), never a cached NXDOMAIN
            raise NotReady("the first probes and app listings are not in yet")
        return answers.lookup(app)

    server = DnsServer(zone, lookup, host, port)
    try:
        bound = await server.start()
    except OSError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc   # uvloop wraps it
        raise NimbusError(f"cannot listen on {host}:{port}: {cause.strerror or cause}") from None
    tasks = [asyncio.create_task(Prober(cluster, book, config).run()),
             asyncio.create_task(apps.run())]
    try:
        # Answer names once the first listing of apps and the first probe of
        # every gateway are in (each bounded by its timeout).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(apps.ready.wait(), 3.0)
        deadline = time.monotonic() + config.timeout_s + config.interval_s
        while time.monotonic() < deadline and any(
                not g.up and not g.fails for g in book.gateways.values()):
            await asyncio.sleep(0.02)
        warming = False
        print(f"nimbus dns: serving {zone.name} at udp+tcp {host}:{bound} "
              f"(ttl {ttl} s, regions {', '.join(cluster.names)})", flush=True)
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.aclose()
