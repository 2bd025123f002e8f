"""The agent's durable state, in SQLite (WAL). Every write happens inside a journal batch
(agent/io/journal.py): one transaction per batch, made durable by one fsync of the WAL.

Tables:

- ``commands``: one row per verified command, keyed by ``jti``. Its existence is the replay
  cache: a ``jti`` can be claimed once. Rows are kept until the command has expired (plus the
  clock-skew allowance) *and* its final status has been acknowledged by the control plane.
- ``outbox``: frames for the control plane (``status``, ``delivery_rejected``, ``anchor``) not
  acknowledged yet, by ``seq`` (``meta.next_seq`` numbers them; never reused).
- ``keysets``: the key sets accepted, with the root that signed each.
- ``audit_pending``: the audit lines of each batch, kept until the audit file is on disk past
  them: the file is written ahead, without waiting for the disk, so after a power loss the
  store can give back what the file lost (agent/io/journal.py).
- ``meta``: ``schema_version``, ``next_seq``, ``purged_until`` (the replay cache's horizon) and
  ``audit_head`` (the last audit record committed: ``seq`` and ``hash``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.core.audit_chain import ChainHead
from agent.core.errors import StateError
from agent.core.lifecycle import FINAL_STATES, CommandRow, CommandState, Known
from agent.core.session import OutboxEntry
from agent.core.trust import StoredKeySet
from agent.io import sqlite_db

SCHEMA_VERSION: Final = 2
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
    updated_at   REAL NOT NULL,
    acted        INTEGER NOT NULL DEFAULT 0
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
    seq        INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    jti        TEXT,
    state      TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_pending (
    seq  INTEGER PRIMARY KEY,
    line BLOB NOT NULL
);
"""

_FINAL: Final = tuple(sorted(state.value for state in FINAL_STATES))


def _row(row: sqlite3.Row) -> CommandRow:
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
        state=CommandState(row["state"]),
        reason=row["reason"],
        detail=row["detail"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        approved_by=row["approved_by"],
        received_at=row["received_at"],
        updated_at=row["updated_at"],
        acted=bool(row["acted"]),
    )


@dataclass(frozen=True)
class Purged:
    commands: int
    horizon: float


class Store:
    """The state database. One owner: the agent's event loop (the journal's syncer thread only
    flushes the WAL file and checkpoints through a connection of its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._in_tx = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite_db.connect(path, durable_commits=False)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state database {path}: {exc}") from exc
        try:
            self._migrate()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"cannot open state database {path}: {exc}") from exc
            raise

    def _migrate(self) -> None:
        found = self._meta_raw("schema_version") if self._has_table("meta") else None
        if found is not None and int(found) == 1:
            self._from_v1()
        elif found is not None and int(found) != SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema {found}, expected {SCHEMA_VERSION}"
            )
        self._db.executescript(_SCHEMA)
        if found is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )

    def _from_v1(self) -> None:
        """Version 1 (before the journal): no ``acted``, an AUTOINCREMENT outbox, no pending
        audit lines and no committed head (the file's head is taken as committed once)."""
        with self._tx() as db:
            db.execute("ALTER TABLE commands ADD COLUMN acted INTEGER NOT NULL DEFAULT 0")
            # Running commands of version 1 may have acted: the safe reading after a restart.
            db.execute("UPDATE commands SET acted = 1 WHERE state = 'running'")
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            db.execute("ALTER TABLE outbox RENAME TO outbox_v1")
            db.execute(
                """CREATE TABLE outbox (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                       body TEXT NOT NULL, jti TEXT, state TEXT, created_at REAL NOT NULL)"""
            )
            db.execute("INSERT INTO outbox SELECT * FROM outbox_v1")
            db.execute("DROP TABLE outbox_v1")
            self.set_meta("next_seq", str((row[0] if row is not None else 0) + 1))
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _has_table(self, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._in_tx:
            raise StateError("a transaction is already open")
        self._in_tx = True
        try:
            with sqlite_db.transaction(self._db) as db:
                yield db
        except sqlite3.Error as exc:
            raise StateError(f"state database error: {exc}") from exc
        finally:
            self._in_tx = False

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One batch's transaction: committed (not yet durable) when the block ends."""
        with self._tx():
            yield

    def close(self) -> None:
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it (at a clean stop)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise StateError(f"state database checkpoint failed: {exc}") from exc

    # -- meta --------------------------------------------------------------------------------

    def _meta_raw(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StateError(f"state database error: {exc}") from exc

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """A write: only inside a batch's transaction (autocommit would commit it alone)."""
        if not self._in_tx:
            raise StateError("a write outside a journal batch")
        return self._execute(sql, args)

    def set_meta(self, key: str, value: str) -> None:
        self._write(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def horizon(self) -> float:
        """Every command that expired at or before this time may have been forgotten."""
        value = self._meta_raw("purged_until")
        return float(value) if value is not None else 0.0

    def next_seq(self) -> int:
        value = self._meta_raw("next_seq")
        return int(value) if value is not None else 1

    def audit_head(self) -> ChainHead | None:
        """The last audit record committed, or None before the first batch of this schema."""
        value = self._meta_raw("audit_head")
        if value is None:
            return None
        seq, digest = value.split(":", 1)
        return ChainHead(int(seq), digest)

    def set_audit_head(self, head: ChainHead) -> None:
        self.set_meta("audit_head", f"{head.seq}:{head.hash}")

    # -- commands ------------------------------------------------------------------------------

    def save(self, row: CommandRow) -> None:
        self._write(
            """INSERT INTO commands (jti, ref, iss, kid, type, params, iat, exp, token_sha256,
                                     state, reason, detail, result, approved_by, received_at,
                                     updated_at, acted)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (jti) DO UPDATE SET state = excluded.state,
                   reason = excluded.reason, detail = excluded.detail,
                   result = excluded.result, approved_by = excluded.approved_by,
                   updated_at = excluded.updated_at, acted = excluded.acted""",
            (
                row.jti,
                row.ref,
                row.iss,
                row.kid,
                row.type,
                json.dumps(dict(row.params)),
                row.iat,
                row.exp,
                row.token_sha256,
                row.state.value,
                row.reason,
                row.detail,
                json.dumps(row.result) if row.result is not None else None,
                row.approved_by,
                row.received_at,
                row.updated_at,
                int(row.acted),
            ),
        )

    def get(self, jti: str) -> CommandRow | None:
        row = self._execute("SELECT * FROM commands WHERE jti = ?", (jti,)).fetchone()
        return _row(row) if row is not None else None

    def known(self, *, jti: str | None, ref: str) -> Known:
        """What a delivery needs judged against (sees this batch's own writes)."""
        by_jti = self.get(jti) if jti is not None else None
        row = self._execute("SELECT * FROM commands WHERE ref = ? LIMIT 1", (ref,)).fetchone()
        return Known(
            by_jti=by_jti, by_ref=_row(row) if row is not None else None, horizon=self.horizon()
        )

    def unfinished(self) -> list[CommandRow]:
        """Commands not in a final state, oldest first."""
        marks = ",".join("?" * len(_FINAL))
        rows = self._execute(
            f"SELECT * FROM commands WHERE state NOT IN ({marks}) ORDER BY received_at, jti",  # noqa: S608
            _FINAL,
        ).fetchall()
        return [_row(row) for row in rows]

    def recent(self, limit: int = 20) -> list[CommandRow]:
        rows = self._execute(
            "SELECT * FROM commands ORDER BY updated_at DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_row(row) for row in rows]

    def purge(self, *, now: float) -> Purged:
        """Forget final commands that expired more than :data:`PURGE_MARGIN` ago and whose final
        status was acknowledged, and raise the replay-cache horizon to the newest ``exp``
        forgotten: a token expiring at or before it is refused whatever the clock says."""
        marks = ",".join("?" * len(_FINAL))
        condition = f"""exp + ? < ? AND state IN ({marks})
                     AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.jti = commands.jti)"""  # noqa: S608  # placeholders only
        args = (PURGE_MARGIN, now, *_FINAL)
        newest = self._execute(f"SELECT MAX(exp) FROM commands WHERE {condition}", args).fetchone()[  # noqa: S608
            0
        ]
        if newest is None:
            return Purged(0, self.horizon())
        cursor = self._write(f"DELETE FROM commands WHERE {condition}", args)  # noqa: S608
        horizon = max(self.horizon(), float(newest))
        self.set_meta("purged_until", repr(horizon))
        return Purged(cursor.rowcount, horizon)

    # -- outbox --------------------------------------------------------------------------------

    def add_outbox(self, entry: OutboxEntry, *, now: float) -> None:
        """Keep a frame (call :meth:`set_next_seq` before the batch commits)."""
        self._write(
            """INSERT INTO outbox (seq, kind, body, jti, state, created_at)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (entry.seq, entry.kind, json.dumps(dict(entry.body)), entry.jti, entry.state, now),
        )

    def set_next_seq(self, seq: int) -> None:
        """The next outbox number (stored with the frames that used the previous ones, so a
        number is never given twice, also across restarts)."""
        self.set_meta("next_seq", str(seq))

    def delete_outbox(self, seq: int) -> None:
        self._write("DELETE FROM outbox WHERE seq = ?", (seq,))

    def outbox(self) -> list[OutboxEntry]:
        rows = self._execute(
            "SELECT seq, kind, body, jti, state FROM outbox ORDER BY seq"
        ).fetchall()
        return [
            OutboxEntry(
                seq=row["seq"],
                kind=row["kind"],
                body=json.loads(row["body"]),
                jti=row["jti"],
                state=row["state"],
            )
            for row in rows
        ]

    # -- audit lines not yet durable in the file ----------------------------------------------

    def add_pending(self, lines: list[tuple[int, bytes]]) -> None:
        """A batch's audit lines, kept until the audit file has them on disk."""
        if not self._in_tx:
            raise StateError("a write outside a journal batch")
        try:
            self._db.executemany("INSERT INTO audit_pending (seq, line) VALUES (?, ?)", lines)
        except sqlite3.Error as exc:
            raise StateError(f"state database error: {exc}") from exc

    def drop_pending(self, upto: int) -> None:
        self._write("DELETE FROM audit_pending WHERE seq <= ?", (upto,))

    def pending_after(self, seq: int) -> list[tuple[int, bytes]]:
        rows = self._execute(
            "SELECT seq, line FROM audit_pending WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()
        return [(int(row["seq"]), bytes(row["line"])) for row in rows]

    # -- key sets --------------------------------------------------------------------------------

    def save_keyset(self, *, version: int, token: str, signer: str, now: float) -> None:
        self._write(
            "INSERT INTO keysets (version, token, signer, accepted_at) VALUES (?, ?, ?, ?)",
            (version, token, signer, now),
        )

    def keyset_signers(self) -> list[str]:
        """The roots (JWKs, JSON) that signed the key sets accepted so far."""
        rows = self._execute("SELECT DISTINCT signer FROM keysets").fetchall()
        return [str(row["signer"]) for row in rows]

    def discard_keysets(self) -> None:
        self._write("DELETE FROM keysets")

    def latest_keyset(self) -> StoredKeySet | None:
        row = self._execute(
            "SELECT token, signer FROM keysets ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return StoredKeySet(row["token"], row["signer"]) if row is not None else None
