"""Enrollment, renewal and revocation of agent certificates (the stub's agent CA at work).

- An operator makes a one-time bootstrap token for an agent id (``cp-stub enroll-token``). Only
  its SHA-256 is stored; it works once, until it expires (default 15 minutes).
- ``byoc-agent enroll`` sends the token and a CSR (its key made on the host, never sent) to
  ``POST /v1/enroll`` on the stub's enrollment listener (HTTPS, server-authenticated only: the
  agent has no certificate yet). The answer is a short-lived client certificate (default 24 h)
  for the token's agent id, whatever the CSR's subject says, and the CA bundle to trust.
- Over the tunnel, an agent renews before expiry (``renew`` frame with a new CSR; docs/
  PROTOCOL.md §14); the identity is the tunnel's, again never the CSR's.
- Revoked certificates (``cp-stub revoke AGENT``: every certificate issued to it) are refused
  when they connect, before the WebSocket upgrade (HTTP 403), and a live session using one is
  closed. Expired certificates are refused by TLS itself.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from cryptography import x509

from agent.io import sqlite_db
from certs.issuing import CSRRejected, certificate_pem, issue_from_csr, parse_csr
from certs.pki import PKIPaths
from control_plane_stub.errors import BadRequest, StubError

TOKEN_TTL: Final = 900
CERT_LIFETIME: Final = timedelta(hours=24)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS enroll_tokens (
    sha256     TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at    REAL
);
CREATE TABLE IF NOT EXISTS issued_certs (
    serial     TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL,
    not_after  REAL NOT NULL,
    issued_at  REAL NOT NULL,
    via        TEXT NOT NULL,
    revoked_at REAL
);
"""


class EnrollmentRefused(BadRequest):
    """A token or CSR that cannot be used (the message is safe to show the requester)."""


@dataclass(frozen=True)
class Issued:
    agent_id: str
    certificate: str
    ca_bundle: str
    not_after: float


class CertificateAuthority:
    def __init__(
        self, pki: PKIPaths, db_path: Path, *, lifetime: timedelta = CERT_LIFETIME
    ) -> None:
        self._pki = pki
        self.lifetime = lifetime
        try:
            self._db = sqlite_db.connect(db_path)
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StubError(f"cannot open {db_path}: {exc}") from exc
        self._tx = partial(sqlite_db.transaction, self._db)

    def close(self) -> None:
        self._db.close()

    def make_token(self, agent_id: str, *, ttl: int = TOKEN_TTL, now: float) -> str:
        token = secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute(
                """INSERT INTO enroll_tokens (sha256, agent_id, created_at, expires_at)
                   VALUES (?, ?, ?, ?)""",
                (_digest(token), agent_id, now, now + ttl),
            )
        return token

    def enroll(self, token: str, csr_pem: str, *, now: float) -> Issued:
        """Spend ``token`` (once) and issue a certificate for its agent on the CSR's key."""
        try:
            csr = parse_csr(csr_pem)
        except CSRRejected as exc:
            raise EnrollmentRefused(str(exc)) from exc
        with self._tx() as db:
            row = db.execute(
                "SELECT agent_id, expires_at, used_at FROM enroll_tokens WHERE sha256 = ?",
                (_digest(token),),
            ).fetchone()
            if row is None:
                raise EnrollmentRefused("unknown enrollment token")
            if row["used_at"] is not None:
                raise EnrollmentRefused("this enrollment token was used already")
            if now >= row["expires_at"]:
                raise EnrollmentRefused("this enrollment token has expired")
            db.execute(
                "UPDATE enroll_tokens SET used_at = ? WHERE sha256 = ?", (now, _digest(token))
            )
        return self._issue(str(row["agent_id"]), csr, via="enrollment", now=now)

    def renew(self, agent_id: str, csr_pem: str, *, now: float) -> Issued:
        """A new certificate for an agent authenticated by its current one (the tunnel)."""
        try:
            csr = parse_csr(csr_pem)
        except CSRRejected as exc:
            raise EnrollmentRefused(str(exc)) from exc
        return self._issue(agent_id, csr, via="renewal", now=now)

    def _issue(
        self, agent_id: str, csr: x509.CertificateSigningRequest, *, via: str, now: float
    ) -> Issued:
        cert = issue_from_csr(
            self._pki,
            agent_id,
            csr,
            valid_for=self.lifetime,
            now=datetime.fromtimestamp(now, UTC),
        )
        not_after = cert.not_valid_after_utc.timestamp()
        with self._tx() as db:
            db.execute(
                """INSERT INTO issued_certs (serial, agent_id, not_after, issued_at, via)
                   VALUES (?, ?, ?, ?, ?)""",
                (format(cert.serial_number, "x"), agent_id, not_after, now, via),
            )
        return Issued(
            agent_id=agent_id,
            certificate=certificate_pem(cert),
            ca_bundle=self._pki.server_ca_cert.read_text(),
            not_after=not_after,
        )

    def revoke(self, agent_id: str, *, now: float) -> int:
        """Revoke every certificate issued to ``agent_id``; returns how many."""
        with self._tx() as db:
            return int(
                db.execute(
                    """UPDATE issued_certs SET revoked_at = ?
                       WHERE agent_id = ? AND revoked_at IS NULL""",
                    (now, agent_id),
                ).rowcount
            )

    def is_revoked(self, serial: int) -> bool:
        row = self._db.execute(
            "SELECT revoked_at FROM issued_certs WHERE serial = ?", (format(serial, "x"),)
        ).fetchone()
        return row is not None and row["revoked_at"] is not None

    def issued(self, agent_id: str) -> list[dict[str, object]]:
        rows = self._db.execute(
            "SELECT * FROM issued_certs WHERE agent_id = ? ORDER BY issued_at", (agent_id,)
        ).fetchall()
        return [dict(row) for row in rows]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def enrollment_app(
    ca: CertificateAuthority, log: structlog.typing.FilteringBoundLogger
) -> web.Application:
    """``POST /v1/enroll`` ``{"token", "csr"}`` -> ``{"agent_id", "certificate", "ca_bundle",
    "not_after"}``; a refused token or CSR -> 403 ``{"error", "message"}``."""

    async def enroll(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) else None
        csr = body.get("csr") if isinstance(body, dict) else None
        if not isinstance(token, str) or not isinstance(csr, str) or len(token) > 256:
            return web.json_response(
                {"error": "bad_request", "message": 'send {"token": ..., "csr": PEM}'},
                status=400,
            )
        try:
            issued = ca.enroll(token, csr, now=time.time())
        except EnrollmentRefused as exc:
            log.warning("enrollment_refused", reason=str(exc), peer=request.remote)
            return web.json_response({"error": "refused", "message": str(exc)}, status=403)
        log.info("agent_enrolled", agent_id=issued.agent_id, peer=request.remote)
        return web.json_response(
            {
                "agent_id": issued.agent_id,
                "certificate": issued.certificate,
                "ca_bundle": issued.ca_bundle,
                "not_after": issued.not_after,
            }
        )

    app = web.Application(client_max_size=64 * 1024)
    app.add_routes([web.post("/v1/enroll", enroll)])
    return app
