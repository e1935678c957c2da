"""open_backend: store URLs checked with errors that name the bad part, and
the SQLite backend opening the files ``nimbus up`` keeps in its state folder."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nimbus.errors import UserInputError
from nimbus.store.files import FileBlobs
from nimbus.store.registry import StoreURL, open_backend, parse_store_url
from nimbus.store.sqlite import SQLiteStore
from nimbus.store.sqlite_queue import SQLiteQueue

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_good_urls_parse() -> None:
    assert parse_store_url(None) == StoreURL("sqlite")
    assert parse_store_url("") == StoreURL("sqlite")
    assert parse_store_url("sqlite://") == StoreURL("sqlite")
    assert parse_store_url("sqlite:///var/lib/nimbus") == StoreURL("sqlite",
                                                                    Path("/var/lib/nimbus"))
    assert parse_store_url("nats://h1:4222,h2:4223,10.0.0.3:5000").servers == (
        "nats://h1:4222", "nats://h2:4223", "nats://10.0.0.3:5000")
    assert parse_store_url("nats://nats.internal").servers == ("nats://nats.internal:4222",)
    assert parse_store_url("nats://a:1,nats://b:2/").servers == ("nats://a:1", "nats://b:2")
    assert parse_store_url("nats://[::1]:4222").servers == ("nats://[::1]:4222",)


@pytest.mark.parametrize(("url", "names"), [
    ("redis://h:1", "unknown scheme 'redis'"),
    ("h1:4222", "expected sqlite:///folder or nats://"),
    ("sqlite://relative/dir", "must be absolute"),
    ("sqlite:///x?mode=ro", "no query"),
    ("nats://nimbus:secret@h1:4222", "credentials do not go in the store URL"),
    ("nats://h1:4222,,h3:4222", "server 2 is empty"),
    ("nats://h1:4222,h2:port", "server 2 ('h2:port'): the port must be a number"),
    ("nats://h1:", "the port must be a number"),
    ("nats://h1:99999", "from 1 to 65535"),
    ("nats://h1:0", "from 1 to 65535"),
    ("nats://bad_host!:4222", "'bad_host!' is not a host name"),
    ("nats://h1:4222/path", "nothing after it"),
])
def test_bad_urls_name_what_is_wrong(url: str, names: str) -> None:
    with pytest.raises(UserInputError) as info:
        parse_store_url(url)
    assert names in str(info.value)
    assert "secret" not in str(info.value), "a password must never be echoed"


def test_nats_needs_a_token_and_a_good_region() -> None:
    with pytest.raises(UserInputError, match="region token"):
        run(open_backend("nats://127.0.0.1:4222", region="eu", token=None))
    with pytest.raises(UserInputError, match="region name"):
        run(open_backend("nats://127.0.0.1:4222", region="eu.west", token="t" * 32))


def test_sqlite_backend_is_the_state_folder(tmp_path: Path) -> None:
    async def body() -> None:
        b = await open_backend(None, region="local", token=None, state_dir=tmp_path)
        try:
            assert b.nc is None
            assert isinstance(b.store, SQLiteStore) and b.store.path == tmp_path / "store.db"
            assert isinstance(b.blobs, FileBlobs) and b.blobs.root == tmp_path / "blobs"
            assert isinstance(b.queue, SQLiteQueue)
            await b.store.put("apps/a", b"1")
            digest = await b.blobs.put(b"bundle")
        finally:
            await b.aclose()
        await b.aclose()  # idempotent
        b = await open_backend(f"sqlite://{tmp_path}", region="ignored", token=None)
        try:
            assert (await b.store.get("apps/a")).value == b"1"  # type: ignore[union-attr]
            assert await b.blobs.get(digest) == b"bundle"
        finally:
            await b.aclose()
        assert (tmp_path / "queue.db").exists()
    run(body())


def test_sqlite_backend_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="state folder"):
        run(open_backend(None, region="local", token=None))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        run(open_backend(f"sqlite://{tmp_path / 'file'}", region="local", token=None))
