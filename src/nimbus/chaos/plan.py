"""What a chaos run does and when: pure, tested without sleeping.

The options are parsed here (durations, the event list, loopback-only URLs)
and the events are spread over the run so each has time to be detected and
recovered from before the next one starts.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from nimbus.errors import UserInputError

EVENT_KINDS = ("instance", "worker", "gateway", "leader", "region")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, what: str = "--duration") -> float:
    """``120s``, ``2m``, ``500ms``, ``1.5h`` or plain seconds, as seconds (> 0)."""
    m = _DURATION.match(text)
    if m is None:
        raise UserInputError(f"{what}: expected a duration such as 120s, 2m or 500ms, "
                             f"got {text!r}")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds <= 0:
        raise UserInputError(f"{what}: must be more than 0, got {text!r}")
    return seconds


def parse_events(text: str) -> tuple[str, ...]:
    """``instance,worker,region`` -> the kinds, in the order of a run
    (instance, worker, gateway, leader, region), each once."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UserInputError(f"--events: name at least one of {', '.join(EVENT_KINDS)}")
    for n in names:
        if n not in EVENT_KINDS:
            raise UserInputError(f"--events: unknown event {n!r}; expected some of "
                                 f"{', '.join(EVENT_KINDS)}")
    return tuple(k for k in EVENT_KINDS if k in names)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 (or ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(url: str, what: str) -> str:
    """``url`` without a trailing slash, or an error naming ``what``: chaos
    kills processes and floods with requests, so it only ever touches this
    machine's loopback addresses."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise UserInputError(f"{what}: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise UserInputError(f"{what}: expected an http:// URL, got {url!r}")
    if not is_loopback_host(host):
        raise UserInputError(f"{what}: {url} is not on this machine's loopback "
                             "(127.0.0.0/8 or localhost); nimbus chaos refuses to kill "
                             "processes or send load anywhere else")
    return url.rstrip("/")


@dataclass(frozen=True)
class PlannedEvent:
    at_s: float       # seconds after the load starts
    kind: str         # one of EVENT_KINDS


def schedule(kinds: tuple[str, ...], duration_s: float) -> list[PlannedEvent]:
    """The events spaced evenly over the run: with n events, the i-th (from 0)
    at duration x (i + 1) / (n + 2), so the load runs undisturbed for a
    while first and the last event (the whole region, slowest to come back)
    keeps the most time to recover before the load stops."""
    n = len(kinds)
    return [PlannedEvent(round(duration_s * (i + 1) / (n + 2), 3), k)
            for i, k in enumerate(kinds)]


def request_times(rate: float, duration_s: float) -> int:
    """How many requests an open-loop run at ``rate`` per second sends."""
    return max(1, int(rate * duration_s))


def default_concurrency(rate: float, timeout_s: float) -> int:
    """Requests in flight at most when not given: what ``rate`` puts in
    flight within one deadline, from 16 to 1000."""
    return max(16, min(1000, math.ceil(rate * timeout_s)))
