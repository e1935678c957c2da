"""What the event tests share to talk to a running ``nimbus up``: waiting
with a deadline, the control API client, invocation records."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

WAIT_S = 20.0
FINAL = ("succeeded", "failed", "dead")


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """``check()``'s first truthy answer; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def control(n: Any) -> httpx.Client:
    return httpx.Client(base_url=n.control_url, timeout=30.0,
                        headers={"authorization": f"Bearer {n.token}"})


def record(ctl: httpx.Client, iid: str) -> dict[str, Any]:
    r = ctl.get(f"/v1/invocations/{iid}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def settled(ctl: httpx.Client, iid: str, status: str = "succeeded") -> dict[str, Any]:
    """The record once it is ``status``; fails at once if it ends otherwise."""
    def check() -> dict[str, Any] | None:
        rec = record(ctl, iid)
        if rec["status"] in FINAL and rec["status"] != status:
            raise AssertionError(f"{iid} ended {rec['status']}, not {status}: {rec}")
        return rec if rec["status"] == status else None
    return wait_for(f"{iid} to be {status}", check)  # type: ignore[no-any-return]
