"""The seam between where function logs are written and where they are read.

Workers write through a :class:`LogSink`; the control API's logs endpoint
reads through a :class:`LogSource`. ``nimbus up`` uses the file pair
(:class:`nimbus.observe.logs.LogSink` and :class:`FileLogSource`, JSON-lines
files under ``<state>/logs``); a region on NATS uses the JetStream pair
(:mod:`nimbus.observe.natslogs`), so ``nimbus logs FN -f`` sees the lines of
every worker whichever controller serves it.

A record is ``{"ts": epoch_s, "rid": request_id | null, "stream": "stdout" |
"stderr" | "platform", "text": one line}``, plus ``"level"`` (``DEBUG``
... ``CRITICAL``) when the line has one (a logger's record, a platform
event; plain ``print`` output has none) and ``"fields"`` (a dict) for a
JSON-format logger line; the NATS implementation adds ``"worker"`` (the
node id that wrote it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol, runtime_checkable

from nimbus.observe.logs import LogReader
from nimbus.observe.logs import LogSink as FileLogSink

Record = dict[str, Any]
Match = Callable[[Record], bool]  # which records a reader wants
FOLLOW_POLL_S = 0.2


@runtime_checkable
class LogSink(Protocol):
    """Where a worker writes its instances' output. ``write`` is on the
    request path: it must never block (a memory append, never I/O)."""

    def write(self, function: str, rid: str | None, stream: str, text: str,
              level: str | None = None, fields: dict[str, Any] | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class LogSource(Protocol):
    """Where the logs endpoint reads one function's records."""

    async def read(self, function: str, *, tail: int | None = None,
                   request_id: str | None = None,
                   follow: bool = False,
                   match: Match | None = None) -> AsyncGenerator[list[Record], None]:
        """Batches of records, oldest first: all of them or the last ``tail``
        (of ``request_id`` only, if given, and only those ``match`` keeps:
        the tail counts kept records); then, with ``follow``, those
        written after, as they come, until the caller stops iterating
        (``aclose``). History and following meet exactly: nothing twice,
        nothing lost. Awaiting this fixes where the history ends (and
        raises if the logs cannot be read at all); iterating reads."""
        ...

    async def has_logs(self, function: str) -> bool:
        """Whether the function has any record (deployed now or not)."""
        ...


@runtime_checkable
class TraceSource(Protocol):
    """Where ``GET /v1/traces/{id}`` finds spans when they are not this
    process's own (a region's stream)."""

    async def find(self, request_id: str) -> list[dict[str, Any]]:
        """Every span of the traces ``request_id``'s spans belong to, by start."""
        ...


class FileLogSource:
    """The JSON-lines files of one process's :class:`FileLogSink` (``nimbus up``)."""

    def __init__(self, sink: FileLogSink, poll_s: float = FOLLOW_POLL_S) -> None:
        self.sink = sink
        self.poll_s = poll_s

    async def read(self, function: str, *, tail: int | None = None,
                   request_id: str | None = None,
                   follow: bool = False,
                   match: Match | None = None) -> AsyncGenerator[list[Record], None]:
        self.sink.flush()
        # Disk reads run in a thread: a log of any size never stalls the loop.
        reader = await asyncio.to_thread(LogReader, self.sink.path(function),
                                         request_id=request_id, match=match)
        return self._batches(reader, tail, follow)

    async def has_logs(self, function: str) -> bool:
        self.sink.flush()
        path = self.sink.path(function)
        return await asyncio.to_thread(
            lambda: path.exists() or path.with_name(path.name + ".1").exists())

    async def _batches(self, reader: LogReader, tail: int | None,
                       follow: bool) -> AsyncGenerator[list[Record], None]:
        try:
            batches = reader.history(tail)
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                if batch:
                    yield batch
            while follow:
                batch = await asyncio.to_thread(reader.more)
                if batch:
                    yield batch
                else:
                    await asyncio.sleep(self.poll_s)
        finally:
            reader.close()
