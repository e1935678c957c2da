"""The frames between gateways and workers (TCP), shared by both ends.

A frame is the instance protocol's 5-byte header, ``!IB`` (payload length,
kind), then its payload. A connection starts with a handshake in which each
side proves it holds the region token without sending it:

    HELLO    worker -> gateway  ["nimbus-frames/1", worker_id, nonce_w (hex)]
    AUTH     gateway -> worker  nonce_g (32 bytes) + HMAC(token, gateway context)
    WELCOME  worker -> gateway  HMAC(token, worker context)

The contexts name the protocol, the side, the worker's id and both nonces
(:func:`gateway_proof`, :func:`worker_proof`), so a proof is good for one
connection, one direction and one worker only. Nothing else is accepted
before the handshake, and handshake frames are tiny (``HANDSHAKE_MAX``).
Then, in both directions at once, on one persistent connection:

    INVOKE   gateway -> worker  [call_id, function, version, rid, timeout_s(, traceparent)]
                                "\\n" event
    RESULT   worker -> gateway  call_id "\\n" result
    ERROR    worker -> gateway  call_id "\\n" [kind, message, detail]
    LOG      gateway -> worker  [function, version, rid, stream, text]
    STATE    worker -> gateway  {"fn@version": ready instances}
    PING     gateway -> worker  (empty)       PONG  worker -> gateway  (empty)

The event and the result are JSON texts carried as they are: the worker
hands the event on to its instance without parsing it. ``timeout_s`` is a
duration, never a wall-clock time. Call ids are the gateway's, per
connection; answers come in any order.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from typing import Any

from nimbus.errors import (
    ClosedError,
    DeployError,
    HandlerError,
    InstanceDiedError,
    InvocationTimeoutError,
    NimbusError,
    ThrottledError,
    UnavailableError,
)
from nimbus.manifest.model import DEFAULT_PAYLOAD_LIMIT_BYTES

HEADER = struct.Struct("!IB")
HEADER_SIZE = HEADER.size
VERSION = "nimbus-frames/1"
NONCE_BYTES = 32
PROOF_BYTES = 32
HANDSHAKE_MAX = 512
# An event carries its body base64-encoded (4/3) with headers and context
# around it; a result is bounded the same way. Past this, a frame is refused.
MAX_FRAME = 2 * DEFAULT_PAYLOAD_LIMIT_BYTES + (1 << 20)

HELLO = 1
AUTH = 2
WELCOME = 3
INVOKE = 4
RESULT = 5
ERROR = 6
LOG = 7
STATE = 8
PING = 9
PONG = 10

# Error kinds in ERROR frames. The "not run" ones promise the call was never
# handed to an instance, so the gateway may send it to another worker
# whatever its method.
NOT_RUN = frozenset({"absent", "closed", "overloaded", "unavailable", "throttled"})

WORKER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RemoteDeployError(DeployError):
    """An instance failed to start on the worker (its handler failed to
    import); ``error`` is the Lambda-shaped body the client gets."""

    def __init__(self, message: str, error: dict[str, Any] | None) -> None:
        super().__init__(message)
        if error is not None:
            self.error = error


class FrameError(Exception):
    """The peer sent something that is not our protocol."""


def pack(kind: int, *parts: bytes) -> list[bytes]:
    """A frame as pieces for ``writelines`` / one join: no copy of ``parts``."""
    return [HEADER.pack(sum(map(len, parts)), kind), *parts]


def split(buf: bytearray, limit: int) -> list[tuple[int, bytes]]:
    """Take every whole frame off the front of ``buf``. Raises FrameError
    when a frame announces more than ``limit`` bytes."""
    frames = []
    pos = 0
    end = len(buf)
    unpack = HEADER.unpack_from
    while end - pos >= HEADER_SIZE:
        size, kind = unpack(buf, pos)
        if size > limit:
            raise FrameError(f"a frame of {size} bytes (kind {kind}) is over the limit "
                             f"of {limit}")
        stop = pos + HEADER_SIZE + size
        if stop > end:
            break
        frames.append((kind, bytes(buf[pos + HEADER_SIZE:stop])))
        pos = stop
    if pos:
        del buf[:pos]
    return frames


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"\x00".join(parts), hashlib.sha256).digest()


def gateway_proof(token: bytes, worker_id: str, nonce_w: bytes, nonce_g: bytes) -> bytes:
    """What a gateway sends to prove it holds the token."""
    return _mac(token, VERSION.encode(), b"gateway", worker_id.encode(), nonce_w, nonce_g)


def worker_proof(token: bytes, worker_id: str, nonce_w: bytes, nonce_g: bytes) -> bytes:
    """What a worker sends back to prove it holds the token too."""
    return _mac(token, VERSION.encode(), b"worker", worker_id.encode(), nonce_w, nonce_g)


def check_proof(expected: bytes, got: bytes) -> bool:
    return len(got) == len(expected) and hmac.compare_digest(expected, got)


# -- errors across the wire ----------------------------------------------------

def error_fields(exc: BaseException) -> tuple[str, str, Any]:
    """``exc`` (raised by a pool on the worker) as an ERROR frame's
    (kind, message, detail)."""
    message = str(exc)
    if isinstance(exc, HandlerError):
        return "handler", message, exc.error
    if isinstance(exc, InvocationTimeoutError):
        return "timeout", message, None
    if isinstance(exc, ThrottledError):
        return "throttled", message, exc.retry_after_s
    if isinstance(exc, InstanceDiedError):
        return "died", message, None
    if isinstance(exc, DeployError):
        return "deploy", message, getattr(exc, "error", None)
    if isinstance(exc, ClosedError):
        return "closed", message, None
    if isinstance(exc, UnavailableError):
        return "unavailable", message, None
    return "failed", message, type(exc).__name__


def error_from(kind: str, message: str, detail: Any) -> NimbusError:
    """An ERROR frame's fields as the exception the gateway raises."""
    if kind == "handler" and isinstance(detail, dict):
        return HandlerError(detail)
    if kind == "timeout":
        return InvocationTimeoutError(message)
    if kind in ("throttled", "overloaded"):
        return ThrottledError(message, retry_after_s=detail if isinstance(detail, int) else 1)
    if kind == "died":
        return InstanceDiedError(message)
    if kind == "deploy":
        return RemoteDeployError(message, detail if isinstance(detail, dict) else None)
    if kind in ("closed", "absent"):
        # not run: no worker serves that version (any more), as with a
        # retired pool; the event dispatcher gives such work back uncounted
        return ClosedError(message)
    if kind == "unavailable":
        return UnavailableError(message)
    return NimbusError(message or "the worker failed the invocation")


def target_key(function: str, version: int) -> str:
    """How a target is named in STATE frames and the registry: ``fn@version``."""
    return f"{function}@{version}"
