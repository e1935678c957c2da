"""How the CLI finds and talks to a running nimbus's control API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from nimbus.errors import NimbusError

CONNECT_TIMEOUT_S = 5.0


class CLIError(NimbusError):
    """A failure the CLI reports in one line (exit 1)."""


@dataclass(frozen=True, slots=True)
class Connection:
    url: str
    token: str
    others: tuple[str, ...] = ()  # a region's other controllers, tried in turn


def find_connection(url: str | None, token: str | None, state_dirs: list[Path]) -> Connection:
    """--url/--token, then NIMBUS_URL/NIMBUS_TOKEN, then the first state
    folder (``--state-dir``, ``$NIMBUS_STATE_DIR``, ``./.nimbus``, the app's
    ``.nimbus``) that a running ``nimbus up`` wrote its address into."""
    url = url or os.environ.get("NIMBUS_URL")
    token = token or os.environ.get("NIMBUS_TOKEN")
    if url and token:
        return Connection(url.rstrip("/"), token)
    env_dir = os.environ.get("NIMBUS_STATE_DIR")
    candidates = [*state_dirs, *([Path(env_dir)] if env_dir else []), Path(".nimbus")]
    for d in candidates:
        info, tok = d / "control.json", d / "token"
        if info.exists() and tok.exists():
            data = orjson.loads(info.read_bytes())
            if not token and not (token := tok.read_text().strip()):
                raise CLIError(f"the token file {tok} is empty; restart nimbus up to get a "
                               "new one, or pass --token")
            if url:
                return Connection(url, token)
            others = tuple(u for u in data.get("control_urls", []) if u != data["control_url"])
            return Connection(data["control_url"], token, others)
    looked = ", ".join(str(d) for d in candidates)
    raise CLIError(f"no running nimbus found (looked in {looked}); start one with "
                   "`nimbus up`, or pass --state-dir, or --url and --token")


class Client:
    def __init__(self, conn: Connection, timeout_s: float = 60.0) -> None:
        self.conn = conn
        self._urls = [conn.url, *conn.others]
        self.http = httpx.Client(
            base_url=conn.url,
            headers={"authorization": f"Bearer {conn.token}"},
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        )

    def _next_controller(self) -> bool:
        """A region's next controller, after one that could not be reached
        (the request never got there, so asking the next one is safe)."""
        if len(self._urls) < 2:
            return False
        self._urls.pop(0)
        self.conn = Connection(self._urls[0], self.conn.token, tuple(self._urls[1:]))
        self.http.base_url = httpx.URL(self._urls[0])
        return True

    def _check(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                body = r.json()
                msg = body.get("errorMessage") or body
            except ValueError:
                msg = r.text
            raise CLIError(f"{msg} (HTTP {r.status_code})")

    def request(self, method: str, path: str, **kw: Any) -> Any:
        while True:
            try:
                r = self.http.request(method, path, **kw)
                break
            except httpx.ConnectError as exc:
                if not self._next_controller():
                    raise CLIError(f"cannot reach nimbus at {self.conn.url}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise CLIError(f"cannot reach nimbus at {self.conn.url}: {exc}") from exc
        if path.endswith("/invoke") and r.headers.get("content-type", "").startswith(
                "application/json"):
            return r.status_code, r.json()
        self._check(r)
        try:
            return r.json()
        except ValueError:
            raise CLIError(f"unexpected answer from {self.conn.url}{path}: "
                           f"{r.text[:200]!r} (HTTP {r.status_code})") from None

    def stream_lines(self, method: str, path: str, **kw: Any) -> Iterator[dict[str, Any]]:
        while True:
            started = False
            try:
                with self.http.stream(method, path, **kw) as r:
                    started = True
                    if r.status_code >= 400:
                        r.read()
                        self._check(r)
                    for line in r.iter_lines():
                        if line:
                            yield orjson.loads(line)
                return
            except httpx.ConnectError as exc:
                if started or not self._next_controller():
                    raise CLIError(f"cannot reach nimbus at {self.conn.url}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise CLIError(f"cannot reach nimbus at {self.conn.url}: {exc}") from exc
