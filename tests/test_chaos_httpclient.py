"""The load client of ``nimbus chaos`` against a real socket server."""

from __future__ import annotations

import asyncio

import pytest

from nimbus.chaos.httpclient import Client, ResponseError

OK = (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-nimbus-region: eu\r\n\r\nhello")


async def serve(per_connection: int, seen: list[bytes]) -> asyncio.Server:
    """Answers ``per_connection`` requests on a connection, then drops it
    at the next request without a byte: the stale kept-alive connection."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head)
                if served == per_connection:
                    writer.transport.abort()
                    return
                writer.write(OK)
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def stop(client: Client, server: asyncio.Server) -> None:
    client.close()
    await asyncio.sleep(0.05)  # the server's side sees the end and closes
    server.close()
    await server.wait_closed()


def test_answers_keep_alive_and_headers() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server = await serve(100, seen)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}")
        for _ in range(3):
            a = await client.request("GET", "/x", {"idempotency-key": "k1"})
            assert (a.status, a.body, a.headers["x-nimbus-region"]) == (200, b"hello", "eu")
        assert len(client.idle) == 1  # one connection, reused
        assert seen[0].startswith(b"GET /x HTTP/1.1\r\nhost: 127.0.0.1:")
        assert b"idempotency-key: k1\r\n" in seen[0]
        await stop(client, server)

    asyncio.run(main())


def test_a_stale_connection_is_retried_once_for_get_only() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server = await serve(1, seen)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}")
        assert (await client.request("GET", "/a")).status == 200
        # the server drops the kept-alive connection at the next request:
        # sent again on a new one
        assert (await client.request("GET", "/b")).status == 200
        assert [h.split(b" ")[1] for h in seen] == [b"/a", b"/b", b"/b"]
        with pytest.raises(ResponseError) as info:
            await client.request("POST", "/c")  # not idempotent: never twice
        assert info.value.cause == "reset"
        await stop(client, server)

    asyncio.run(main())


def test_connection_refused_is_a_connect_failure() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(ResponseError) as info:
            await Client(f"http://127.0.0.1:{port}").request("GET", "/")
        assert info.value.cause == "connect"

    asyncio.run(main())
