"""The framed protocol between a worker and its instances.

A frame is a 5-byte header, ``!IB`` (payload length, kind), then an orjson
payload. The instance side reads with blocking sockets (one invocation at a
time is the common case and needs no event loop); the worker side parses in
an asyncio protocol (:class:`nimbus.worker.instance.InstanceProtocol`).

Kinds and payloads::

    READY       instance -> worker   {"pid": int}                 handler imported
    INIT_ERROR  instance -> worker   Lambda error body            import failed; exits
    INVOKE      worker -> instance   [request_id, timeout_s, event]   timeout: a duration
    RESULT      instance -> worker   [request_id, result]
    ERROR       instance -> worker   [request_id, Lambda error body]
    LOG         instance -> worker   [request_id, stream, text]   stdout/stderr

The invocation's deadline travels as a duration in seconds, never as a
wall-clock time: the instance counts it down on its own monotonic clock
from the moment the frame arrives, so a clock step (NTP) or another
machine's clock never shortens or stretches a handler's time.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!IB")
HEADER_SIZE = HEADER.size
MAX_FRAME = 64 * 1024 * 1024  # larger than any payload limit; guards against garbage

READY = 1
INIT_ERROR = 2
INVOKE = 3
RESULT = 4
ERROR = 5
LOG = 6

_pack = HEADER.pack


def frame(kind: int, payload: bytes) -> bytes:
    return _pack(len(payload), kind) + payload
