"""Who may use the console: the holder of the stub's console token.

The token is made when the stub starts (256 random bits), shown once (printed, or written to a
0600 file) and never logged. A person signs in with it once; the browser then holds a session
cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over TLS) and every form carries that
session's CSRF token. A script sends the token itself as ``Authorization: Bearer TOKEN``
(a header no other site's page can make a browser send).

No I/O and no clock here: the time is an argument.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

SESSION_COOKIE: Final = "cp_console"
SESSION_LIFETIME: Final = 12 * 3600.0
MAX_SESSIONS: Final = 32
"""Sessions held at once; signing in beyond that ends the oldest."""
TOKEN_BYTES: Final = 32


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    expires: float


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class ConsoleAuth:
    def __init__(self, token: str) -> None:
        if len(token) < 32:
            raise ValueError("a console token must be at least 32 characters")
        self._token = token
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    @classmethod
    def generate(cls) -> ConsoleAuth:
        return cls(secrets.token_urlsafe(TOKEN_BYTES))

    @property
    def token(self) -> str:
        """For showing once at start. Never log it."""
        return self._token

    def __repr__(self) -> str:  # keep the token out of any repr that ends up in a log
        return f"ConsoleAuth(sessions={len(self._sessions)})"

    def token_matches(self, presented: str | None) -> bool:
        return presented is not None and _same(presented, self._token)

    def bearer_matches(self, authorization: str | None) -> bool:
        """An ``Authorization`` header carrying the token."""
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def sign_in(self, presented: str | None, now: float) -> Session | None:
        """A new session if ``presented`` is the token, else None."""
        if not self.token_matches(presented):
            return None
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(
            id=secrets.token_urlsafe(TOKEN_BYTES),
            csrf=secrets.token_urlsafe(TOKEN_BYTES),
            expires=now + SESSION_LIFETIME,
        )
        self._sessions[session.id] = session
        return session

    def session(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[session_id]
            return None
        return session

    def sign_out(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    @staticmethod
    def csrf_matches(session: Session, presented: str | None) -> bool:
        return presented is not None and _same(presented, session.csrf)

    def _expire(self, now: float) -> None:
        for session_id in [s.id for s in self._sessions.values() if s.expires <= now]:
            del self._sessions[session_id]
