"""Dashboard sessions: the control token once, then a cookie.

The login form posts the control token; when it matches, the answer sets
``nimbus_session`` to a random session id (never the token, nor anything
derived from it that would outlive a logout): HttpOnly (no script reads
it), SameSite=Strict (no other site's page sends it), Path=/ (the page
calls the control API's ``/v1`` routes with it), ``Secure`` when the page
was served over https. Sessions live in the control process's memory, at
most ``MAX_SESSIONS`` of them, each for ``SESSION_S``; a restart logs
everyone out.

Against cross-site request forgery beyond SameSite: every call that is
authenticated by the cookie rather than a bearer token and is not a plain
page or data read must carry the header ``x-nimbus-csrf: 1``. A form or a
link from another site cannot set a custom header, and a script on another
origin that tries is stopped by the browser's CORS preflight (the control
API answers no CORS).
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict

COOKIE = "nimbus_session"
CSRF_HEADER = "x-nimbus-csrf"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 256


class Sessions:
    def __init__(self, token: str, session_s: float = SESSION_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._token = token.strip().encode()
        self.session_s = session_s
        self.max_sessions = max_sessions
        self._live: OrderedDict[str, float] = OrderedDict()  # id -> expiry, oldest first

    def token_ok(self, given: str) -> bool:
        """The control token, compared in constant time; empty never matches."""
        if not self._token or not given:
            return False
        try:
            raw = given.strip().encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(raw, self._token)

    def open(self, now: float) -> str:
        """A new session id, valid until ``now + session_s``; the oldest
        session goes when there are ``max_sessions``."""
        self._expire(now)
        while len(self._live) >= self.max_sessions:
            self._live.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        self._live[sid] = now + self.session_s
        return sid

    def valid(self, sid: str | None, now: float) -> bool:
        if not sid:
            return False
        expiry = self._live.get(sid)
        if expiry is None:
            return False
        if expiry <= now:
            del self._live[sid]
            return False
        return True

    def close(self, sid: str | None) -> None:
        if sid:
            self._live.pop(sid, None)

    def _expire(self, now: float) -> None:
        for sid in [s for s, e in self._live.items() if e <= now]:
            del self._live[sid]

    def __len__(self) -> int:
        return len(self._live)


def cookie_header(sid: str, secure: bool, max_age_s: float) -> str:
    """The ``set-cookie`` value of a session (an empty ``sid`` and max age 0
    clears it)."""
    parts = [f"{COOKIE}={sid}", "Path=/", "HttpOnly", "SameSite=Strict",
             f"Max-Age={int(max_age_s)}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
