"""The agent's durable state, in SQLite (WAL, ``synchronous=FULL``).

Tables:

- ``commands``: one row per verified command, keyed by ``jti``. Its existence is the replay
  cache: a ``jti`` can be claimed once. Rows are kept until the command has expired (plus the
  clock-skew allowance) *and* its final status has been acknowledged by the control plane.
- ``outbox``: frames for the control plane (``status``, ``delivery_rejected``) that have not been
  acknowledged yet, numbered by ``seq``. They survive restarts and are resent on every connection.

Every state change of a command and the status frame that reports it are written in one
transaction, so the control plane can never miss a state the agent recorded.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.core.errors import StateError
from agent.core.frames import FINAL_STATES, Anchor, DeliveryRejected, Frame, Status
from agent.core.verifier import VerifiedToken
from agent.io import sqlite_db

SCHEMA_VERSION: Final = 1
PURGE_MARGIN: Final = 600.0
"""Seconds a command is remembered past its ``exp``: the largest clock skew the agent may be
configured to allow, so that no setting makes a forgotten token acceptable again."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    jti          TEXT PRIMARY KEY,
    ref          TEXT NOT NULL,
    iss          TEXT NOT NULL,
    kid          TEXT NOT NULL,
    type         TEXT NOT NULL,
    params       TEXT NOT NULL,
    iat          REAL NOT NULL,
    exp          REAL NOT NULL,
    token_sha256 TEXT NOT NULL,
    state        TEXT NOT NULL,
    reason       TEXT,
    detail       TEXT,
    result       TEXT,
    approved_by  TEXT,
    received_at  REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state, received_at);
CREATE INDEX IF NOT EXISTS commands_by_ref ON commands (ref);
CREATE TABLE IF NOT EXISTS keysets (
    version     INTEGER PRIMARY KEY,
    token       TEXT NOT NULL,
    signer      TEXT NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    jti        TEXT,
    state      TEXT,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class CommandRow:
    jti: str
    ref: str
    iss: str
    kid: str
    type: str
    params: Mapping[str, Any]
    iat: float
    exp: float
    token_sha256: str
    state: str
    reason: str | None
    detail: str | None
    result: Mapping[str, Any] | None
    approved_by: str | None
    received_at: float
    updated_at: float

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict[str, object]:
        return {
            "jti": self.jti,
            "ref": self.ref,
            "iss": self.iss,
            "kid": self.kid,
            "type": self.type,
            "params": dict(self.params),
            "exp": self.exp,
            "state": self.state,
            "reason": self.reason,
            "detail": self.detail,
            "approved_by": self.approved_by,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    kind: str
    body: Mapping[str, Any]
    jti: str | None
    state: str | None

    def frame(self) -> Frame:
        if self.kind == Status.type:
            return Status(seq=self.seq, **self.body)
        if self.kind == Anchor.type:
            return Anchor(seq=self.seq, **self.body)
        return DeliveryRejected(seq=self.seq, **self.body)


def _row_to_command(row: sqlite3.Row) -> CommandRow:
    return CommandRow(
        jti=row["jti"],
        ref=row["ref"],
        iss=row["iss"],
        kid=row["kid"],
        type=row["type"],
        params=json.loads(row["params"]),
        iat=row["iat"],
        exp=row["exp"],
        token_sha256=row["token_sha256"],
        state=row["state"],
        reason=row["reason"],
        detail=row["detail"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        approved_by=row["approved_by"],
        received_at=row["received_at"],
        updated_at=row["updated_at"],
    )


class AgentState:
    """A connection to the state database. One owner: the agent's event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite_db.connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state database {path}: {exc}") from exc
        try:
            self._migrate()
            row = self._db.execute("SELECT value FROM meta WHERE key = 'purged_until'").fetchone()
            self._purged_until = float(row["value"]) if row is not None else 0.0
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"cannot open state database {path}: {exc}") from exc
            raise

    def _migrate(self) -> None:
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
        elif int(row["value"]) != SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema {row['value']}, expected {SCHEMA_VERSION}"
            )

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        try:
            with sqlite_db.transaction(self._db, durable=durable) as db:
                yield db
        except sqlite3.Error as exc:
            raise StateError(f"state database error: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    # -- commands -------------------------------------------------------------------------

    def claim(
        self,
        token: VerifiedToken,
        *,
        ref: str,
        now: float,
    ) -> CommandRow | None:
        """Record a verified command as ``received`` and queue its status.

        Returns ``None`` when the ``jti`` was claimed before: a replay.
        """
        with self._tx() as db:
            cursor = db.execute(
                """INSERT INTO commands (jti, ref, iss, kid, type, params, iat, exp, token_sha256,
                                         state, received_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', ?, ?)
                   ON CONFLICT (jti) DO NOTHING""",
                (
                    token.jti,
                    ref,
                    token.iss,
                    token.kid,
                    token.command_type,
                    json.dumps(token.params),
                    token.iat,
                    token.exp,
                    token.token_sha256,
                    now,
                    now,
                ),
            )
            if cursor.rowcount == 0:
                return None
            self._enqueue_status(db, jti=token.jti, ref=ref, state="received", at=now)
            row = db.execute("SELECT * FROM commands WHERE jti = ?", (token.jti,)).fetchone()
        return _row_to_command(row)

    def transition(
        self,
        jti: str,
        state: str,
        *,
        now: float,
        reason: str | None = None,
        detail: str | None = None,
        result: Mapping[str, Any] | None = None,
        approved_by: str | None = None,
        receipt: str | None = None,
    ) -> CommandRow:
        """Move a command to ``state`` and queue the status frame, atomically."""
        with self._tx() as db:
            current = db.execute("SELECT * FROM commands WHERE jti = ?", (jti,)).fetchone()
            if current is None:
                raise StateError(f"unknown command {jti!r}")
            if current["state"] in FINAL_STATES:
                raise StateError(f"command {jti!r} is already {current['state']}")
            db.execute(
                """UPDATE commands SET state = ?, reason = ?, detail = ?, result = ?,
                       approved_by = COALESCE(?, approved_by), updated_at = ?
                   WHERE jti = ?""",
                (
                    state,
                    reason,
                    detail,
                    json.dumps(result) if result is not None else None,
                    approved_by,
                    now,
                    jti,
                ),
            )
            self._enqueue_status(
                db,
                jti=jti,
                ref=current["ref"],
                state=state,
                at=now,
                reason=reason,
                detail=detail,
                result=result,
                receipt=receipt,
            )
            row = db.execute("SELECT * FROM commands WHERE jti = ?", (jti,)).fetchone()
        return _row_to_command(row)

    def mark_approved(self, jti: str, operator: str, *, now: float) -> None:
        """Record an approval. The state stays ``pending_approval`` until execution starts, so
        an approval survives a restart without a status the protocol does not define."""
        with self._tx() as db:
            db.execute(
                """UPDATE commands SET approved_by = ?, updated_at = ?
                   WHERE jti = ? AND state = 'pending_approval'""",
                (operator, now, jti),
            )

    def by_ref(self, ref: str) -> CommandRow | None:
        """The command accepted under delivery ``ref``, if any."""
        row = self._db.execute("SELECT * FROM commands WHERE ref = ? LIMIT 1", (ref,)).fetchone()
        return _row_to_command(row) if row is not None else None

    def get(self, jti: str) -> CommandRow | None:
        row = self._db.execute("SELECT * FROM commands WHERE jti = ?", (jti,)).fetchone()
        return _row_to_command(row) if row is not None else None

    def in_states(self, *states: str) -> list[CommandRow]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT * FROM commands WHERE state IN ({marks}) ORDER BY received_at, jti",  # noqa: S608
            states,
        ).fetchall()
        return [_row_to_command(row) for row in rows]

    def recent(self, limit: int = 20) -> list[CommandRow]:
        rows = self._db.execute(
            "SELECT * FROM commands ORDER BY updated_at DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_row_to_command(row) for row in rows]

    def purge(self, *, now: float) -> int:
        """Forget final commands that expired more than :data:`PURGE_MARGIN` ago and whose final
        status was acknowledged, and raise the replay-cache horizon to the newest ``exp``
        forgotten: a token expiring at or before it is refused whatever the clock says."""
        final = sorted(FINAL_STATES)
        placeholders = ",".join("?" * len(final))
        condition = f"""exp + ? < ? AND state IN ({placeholders})
                     AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.jti = commands.jti)"""  # noqa: S608  # placeholders only
        args = (PURGE_MARGIN, now, *final)
        with self._tx() as db:
            newest = db.execute(
                f"SELECT MAX(exp) FROM commands WHERE {condition}",  # noqa: S608
                args,
            ).fetchone()[0]
            if newest is None:
                return 0
            cursor = db.execute(f"DELETE FROM commands WHERE {condition}", args)  # noqa: S608
            db.execute(
                """INSERT INTO meta (key, value) VALUES ('purged_until', ?)
                   ON CONFLICT (key) DO UPDATE
                   SET value = MAX(CAST(value AS REAL), excluded.value)""",
                (newest,),
            )
        self._purged_until = max(self._purged_until, float(newest))
        return cursor.rowcount

    def purged_until(self) -> float:
        """Every command that expired at or before this time may have been forgotten."""
        return self._purged_until

    # -- key sets -------------------------------------------------------------------------

    def store_keyset(self, *, version: int, token: str, signer: str, now: float) -> None:
        """Keep an accepted key set with the root that signed it (a JWK, JSON)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO keysets (version, token, signer, accepted_at) VALUES (?, ?, ?, ?)",
                (version, token, signer, now),
            )

    def keyset_signers(self) -> list[str]:
        """The roots (JWKs, JSON) that signed the key sets accepted so far."""
        rows = self._db.execute("SELECT DISTINCT signer FROM keysets").fetchall()
        return [str(row["signer"]) for row in rows]

    def discard_keysets(self) -> None:
        """Forget every accepted key set, and so the version floor they set (the configured root
        was replaced: version numbers belonged to the old one)."""
        with self._tx() as db:
            db.execute("DELETE FROM keysets")

    def latest_keyset(self) -> tuple[str, str] | None:
        """The token and signer of the highest version accepted, if any."""
        row = self._db.execute(
            "SELECT token, signer FROM keysets ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return (row["token"], row["signer"]) if row is not None else None

    # -- outbox ---------------------------------------------------------------------------

    @staticmethod
    def _enqueue_status(db: sqlite3.Connection, **body: Any) -> None:
        body = {key: value for key, value in body.items() if value is not None}
        db.execute(
            "INSERT INTO outbox (kind, body, jti, state, created_at) VALUES (?, ?, ?, ?, ?)",
            (Status.type, json.dumps(body), body["jti"], body["state"], body["at"]),
        )

    def reject_delivery(
        self, *, ref: str, reason: str, detail: str, jti: str | None, now: float
    ) -> None:
        """Queue a ``delivery_rejected`` frame for a delivery that never became a command."""
        body: dict[str, Any] = {"ref": ref, "reason": reason, "detail": detail, "at": now}
        if jti is not None:
            body["jti"] = jti
        with self._tx() as db:
            db.execute(
                "INSERT INTO outbox (kind, body, jti, state, created_at) VALUES (?, ?, NULL, ?, ?)",
                (DeliveryRejected.type, json.dumps(body), "rejected", now),
            )

    def queue_anchor(self, *, audit_seq: int, audit_hash: str, now: float) -> None:
        """Queue the audit chain head for the control plane. Only the newest anchor matters, so
        it replaces any anchor still waiting (the outbox never holds more than one)."""
        body = {"audit_seq": audit_seq, "audit_hash": audit_hash, "at": now}
        # Not durable: after a power loss the next anchor (the head moved) takes its place.
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM outbox WHERE kind = ?", (Anchor.type,))
            db.execute(
                """INSERT INTO outbox (kind, body, jti, state, created_at)
                   VALUES (?, ?, NULL, NULL, ?)""",
                (Anchor.type, json.dumps(body), now),
            )

    def outbox_after(self, seq: int, limit: int = 256) -> list[OutboxRow]:
        rows = self._db.execute(
            "SELECT seq, kind, body, jti, state FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [
            OutboxRow(row["seq"], row["kind"], json.loads(row["body"]), row["jti"], row["state"])
            for row in rows
        ]

    def ack(self, seq: int) -> OutboxRow | None:
        """Drop an acknowledged frame. Returns it, or ``None`` if it was already gone.

        Not durable: if a power loss undoes it, the frame is sent again and the control plane
        deduplicates it (docs/PROTOCOL.md §6.3)."""
        with self._tx(durable=False) as db:
            row = db.execute(
                "SELECT seq, kind, body, jti, state FROM outbox WHERE seq = ?", (seq,)
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        return OutboxRow(row["seq"], row["kind"], json.loads(row["body"]), row["jti"], row["state"])

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def unsent_results(self) -> int:
        """Unacknowledged frames that report on deliveries and commands (anchors excluded: they
        are best effort, and a control plane that ignores them must not hold up a stop)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE kind != ?", (Anchor.type,)
        ).fetchone()
        return int(row[0])
