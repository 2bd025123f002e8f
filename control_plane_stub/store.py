"""The stub's SQLite store: agents, commands (one row per delivery ``ref``) and status history.

Status reports are applied idempotently: each (agent, ref, state, reason) is recorded once, so an
agent that resends after a reconnect changes nothing (the dedupe the protocol relies on; an agent
accepts a ``jti`` under exactly one ``ref``, so this is deduplication by ``jti``). A command's
state only moves forward, and an agent can only report on commands addressed to it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from agent.core.frames import FINAL_STATES, DeliveryRejected, Status
from agent.io import sqlite_db
from agent.io.wal_sync import WalSyncer
from control_plane_stub.errors import (
    BadRequest,
    IdempotencyKeyTaken,
    StubError,
    UnknownCommand,
)

RANK: Final = {
    "queued": 0,
    "sent": 1,
    "received": 2,
    "pending_approval": 3,
    "running": 4,
    **dict.fromkeys(FINAL_STATES, 5),
}

TRANSIENT_REFUSALS: Final = ("busy", "rate_limited", "shutting_down")
"""Refusals that say "not now": the command is delivered again on the next connection."""

_HASH_DIFFERS: Final = 1
_HEAD_MOVED_BACK: Final = 2
_ANCHOR_CONFLICTS: Final = {_HASH_DIFFERS: "hash_differs", _HEAD_MOVED_BACK: "head_moved_back"}
"""``anchors.conflict``: 0 (none) or one of these."""


_IN_CHUNK: Final = 500
"""Values bound in one ``IN (...)`` (SQLite allows 32,766 variables; keep statements small)."""


def _chunks(values: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield list(values[start : start + _IN_CHUNK])


def _anchor_cursor(cursor: str) -> tuple[int, int]:
    seq, sep, row_id = cursor.partition(".")
    if not (sep and seq.isdigit() and row_id.isdigit() and len(cursor) <= 40):
        raise BadRequest(f"not an anchor cursor: {cursor[:40]!r}")
    return int(seq), int(row_id)


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id        TEXT PRIMARY KEY,
    first_seen      REAL NOT NULL,
    last_seen       REAL NOT NULL,
    connected       INTEGER NOT NULL DEFAULT 0,
    connected_since REAL,
    cert_sha256     TEXT,
    peer            TEXT,
    agent_version   TEXT,
    capabilities    TEXT,
    last_disconnect TEXT
);
CREATE TABLE IF NOT EXISTS commands (
    ref        TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL,
    jti        TEXT,
    type       TEXT,
    params     TEXT,
    token      TEXT NOT NULL,
    origin     TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT,
    detail     TEXT,
    result     TEXT,
    created_at REAL NOT NULL,
    sent_at    REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_by_agent ON commands (agent_id, state, created_at);
CREATE INDEX IF NOT EXISTS commands_by_update ON commands (updated_at);
CREATE TABLE IF NOT EXISTS receipts (
    ref         TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    token       TEXT NOT NULL,
    status      TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_certs (
    sha256     TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL,
    der        BLOB NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keysets (
    agent_id      TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    token         TEXT NOT NULL,
    offered_at    REAL NOT NULL,
    agent_version INTEGER,
    last_result   TEXT
);
CREATE TABLE IF NOT EXISTS anchors (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id    TEXT NOT NULL,
    audit_seq   INTEGER NOT NULL,
    audit_hash  TEXT NOT NULL,
    at          REAL NOT NULL,
    recorded_at REAL NOT NULL,
    conflict    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (agent_id, audit_seq, audit_hash)
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    agent_id    TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    ref         TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (agent_id, key)
);
CREATE TABLE IF NOT EXISTS status_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id    TEXT NOT NULL,
    ref         TEXT NOT NULL,
    jti         TEXT,
    state       TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    detail      TEXT,
    at          REAL NOT NULL,
    recorded_at REAL NOT NULL,
    UNIQUE (agent_id, ref, state, reason)
);
"""


@dataclass(frozen=True)
class CommandRecord:
    ref: str
    agent_id: str
    jti: str | None
    type: str | None
    params: Mapping[str, Any] | None
    token: str
    origin: str
    state: str
    reason: str | None
    detail: str | None
    result: Mapping[str, Any] | None
    created_at: float
    sent_at: float | None
    updated_at: float

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self, *, with_token: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "ref": self.ref,
            "agent_id": self.agent_id,
            "jti": self.jti,
            "type": self.type,
            "params": self.params,
            "origin": self.origin,
            "state": self.state,
            "reason": self.reason,
            "detail": self.detail,
            "result": self.result,
            "created_at": self.created_at,
            "sent_at": self.sent_at,
            "updated_at": self.updated_at,
        }
        if with_token:
            out["token"] = self.token
        return out


def _record(row: sqlite3.Row) -> CommandRecord:
    return CommandRecord(
        ref=row["ref"],
        agent_id=row["agent_id"],
        jti=row["jti"],
        type=row["type"],
        params=json.loads(row["params"]) if row["params"] else None,
        token=row["token"],
        origin=row["origin"],
        state=row["state"],
        reason=row["reason"],
        detail=row["detail"],
        result=json.loads(row["result"]) if row["result"] else None,
        created_at=row["created_at"],
        sent_at=row["sent_at"],
        updated_at=row["updated_at"],
    )


class StubStore:
    """The stub's database. With ``group_commit`` (the server), a commit only reaches the
    operating system and :meth:`start_group_commit`'s syncer thread makes every commit since
    its last sync durable with one fsync of the WAL (agent/io/wal_sync.py): callers that must
    not act before their write is on disk (acknowledging a status, answering 201 for a new
    command) wait for it with :meth:`wait_durable` or :meth:`after`. Without it (tests, tools),
    every commit is durable when it returns."""

    def __init__(self, path: Path, *, group_commit: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._group = group_commit
        try:
            self._db = sqlite_db.connect(path, durable_commits=not group_commit)
            self._db.executescript(_SCHEMA)
            # A restart means no agent is connected until it dials in again.
            self._db.execute("UPDATE agents SET connected = 0, connected_since = NULL")
        except (OSError, sqlite3.Error) as exc:
            raise StubError(f"cannot open stub database {path}: {exc}") from exc
        self._known_certs: dict[str, tuple[str, x509.Certificate]] = {}
        """Certificates known to be stored, parsed (sha256 -> agent id, certificate): a
        reconnection writes nothing for them, and receipts are checked without a query."""
        self._in_batch = False
        self.committed = 0
        self.durable = 0
        self._syncer: WalSyncer | None = None
        self._changed: asyncio.Event | None = None
        self._after: deque[tuple[int, Callable[[], None]]] = deque()
        self._failure: BaseException | None = None

    # -- commits ----------------------------------------------------------------------------

    def start_group_commit(self) -> None:
        """Start the syncer (in the event loop that will use the store)."""
        if not self._group or self._syncer is not None:
            return
        self._changed = asyncio.Event()
        self._syncer = WalSyncer(
            self.path,
            asyncio.get_running_loop(),
            durable=self._advance,
            failed=self._failed,
            name="stub-syncer",
        )
        self._syncer.start()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, or a part of the batch being built."""
        if self._in_batch:
            yield self._db
            return
        with sqlite_db.transaction(self._db, durable=durable or self._group) as db:
            yield db
        self._committed()

    @contextmanager
    def batch(self) -> Iterator[int]:
        """Many writes in one transaction; yields the commit number to wait for."""
        if self._in_batch:
            yield self.committed + 1
            return
        self._in_batch = True
        try:
            with sqlite_db.transaction(self._db, durable=True) as _db:
                yield self.committed + 1
        finally:
            self._in_batch = False
        self._committed()

    def _committed(self) -> None:
        self.committed += 1
        if self._syncer is not None:
            self._syncer.request(self.committed)
        else:
            self._advance(self.committed, None)

    def _advance(self, commit: int, _mark: int | None) -> None:
        if commit <= self.durable:
            return
        self.durable = commit
        while self._after and self._after[0][0] <= commit:
            _, action = self._after.popleft()
            action()
        if self._changed is not None:
            self._changed.set()

    def _failed(self, exc: BaseException) -> None:
        self._failure = exc
        if self._changed is not None:
            self._changed.set()

    def after(self, commit: int, action: Callable[[], None]) -> None:
        """Run ``action`` once commit ``commit`` is durable (now, if it is)."""
        if commit <= self.durable:
            action()
        else:
            self._after.append((commit, action))

    async def wait_durable(self, commit: int | None = None) -> None:
        """Until commit ``commit`` (default: the last one) is on disk."""
        target = self.committed if commit is None else commit
        while self.durable < target:
            if self._failure is not None:
                raise StubError(f"the stub's database cannot be synced: {self._failure}")
            assert self._changed is not None  # noqa: S101  # only when not durable at once
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        self._db.close()

    # -- agents ---------------------------------------------------------------------------

    def agent_connected(
        self,
        agent_id: str,
        *,
        cert_sha256: str,
        peer: str,
        agent_version: str,
        capabilities: Mapping[str, object],
    ) -> None:
        now = time.time()
        # The registry is informational (who is connected, seen when): a power cut that undoes
        # this costs nothing, so the commit does not wait for the disk. A fleet reconnecting
        # at once would otherwise queue thousands of fsyncs in the event loop.
        with self._tx(durable=False) as db:
            db.execute(
                """INSERT INTO agents (agent_id, first_seen, last_seen, connected, connected_since,
                                       cert_sha256, peer, agent_version, capabilities)
                   VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)
                   ON CONFLICT (agent_id) DO UPDATE SET
                       last_seen = excluded.last_seen, connected = 1,
                       connected_since = excluded.connected_since,
                       cert_sha256 = excluded.cert_sha256, peer = excluded.peer,
                       agent_version = excluded.agent_version,
                       capabilities = excluded.capabilities""",
                (
                    agent_id,
                    now,
                    now,
                    now,
                    cert_sha256,
                    peer,
                    agent_version,
                    json.dumps(capabilities),
                ),
            )

    def remember_certificate(self, agent_id: str, sha256: str, der: bytes) -> None:
        """Keep every certificate an agent used: receipts name theirs (x5t#S256)."""
        if sha256 in self._known_certs:
            return
        with self._tx() as db:
            db.execute(
                """INSERT INTO agent_certs (sha256, agent_id, der, first_seen) VALUES (?, ?, ?, ?)
               ON CONFLICT (sha256) DO NOTHING""",
                (sha256, agent_id, der, time.time()),
            )
        self._known_certs[sha256] = (agent_id, x509.load_der_x509_certificate(der))

    def agent_certificate(self, agent_id: str, sha256: str) -> x509.Certificate | None:
        """A certificate ``agent_id`` used, by its SHA-256 (hex), parsed; None if it is not
        one of that agent's."""
        known = self._known_certs.get(sha256)
        if known is None:
            row = self._db.execute(
                "SELECT agent_id, der FROM agent_certs WHERE sha256 = ?", (sha256,)
            ).fetchone()
            if row is None:
                return None
            known = (row["agent_id"], x509.load_der_x509_certificate(bytes(row["der"])))
            self._known_certs[sha256] = known
        owner, certificate = known
        return certificate if owner == agent_id else None

    def certificate(self, sha256: str) -> bytes | None:
        """The DER of a certificate an agent used (``agents.cert_sha256`` names its latest)."""
        row = self._db.execute("SELECT der FROM agent_certs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else bytes(row["der"])

    def record_receipt(self, agent_id: str, frame: Status, verdict: str) -> bool:
        """Keep the receipt a final status came with, if that status is the report held for
        the command: same ``jti``, ``state``, ``reason`` and ``result``. A receipt that came with
        a status :meth:`apply_status` did not take (another final state arriving after the
        first, a resend that differs from what is held, another agent's) is not kept, so a
        receipt always speaks for what is stored. A resend identical to the held report is
        (that keeps a receipt whose first delivery was lost to a crash). The first receipt
        kept stays. Returns whether this one was kept."""
        assert frame.receipt is not None  # noqa: S101  # the caller checks
        with self._tx() as db:
            row = db.execute(
                "SELECT state, jti, reason, result FROM commands WHERE ref = ? AND agent_id = ?",
                (frame.ref, agent_id),
            ).fetchone()
            if row is None:
                return False
            held = json.loads(row["result"]) if row["result"] is not None else None
            same = (row["state"], row["jti"], row["reason"]) == (
                frame.state,
                frame.jti,
                frame.reason,
            ) and (frame.result is None or held == json.loads(json.dumps(frame.result)))
            if not same:
                return False
            return bool(
                db.execute(
                    """INSERT INTO receipts (ref, agent_id, token, status, recorded_at)
                       VALUES (?, ?, ?, ?, ?) ON CONFLICT (ref) DO NOTHING""",
                    (frame.ref, agent_id, frame.receipt, verdict, time.time()),
                ).rowcount
            )

    def receipt(self, ref: str) -> dict[str, object] | None:
        row = self._db.execute("SELECT * FROM receipts WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            return None
        return {"token": row["token"], "status": row["status"], "recorded_at": row["recorded_at"]}

    def receipts(self, refs: Sequence[str]) -> dict[str, dict[str, object]]:
        """:meth:`receipt` for many commands at once (those without a receipt are absent)."""
        found: dict[str, dict[str, object]] = {}
        for chunk in _chunks(refs):
            marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
            rows = self._db.execute(
                f"SELECT * FROM receipts WHERE ref IN ({marks})",  # noqa: S608
                chunk,
            ).fetchall()
            for row in rows:
                found[row["ref"]] = {
                    "token": row["token"],
                    "status": row["status"],
                    "recorded_at": row["recorded_at"],
                }
        return found

    def offer_keyset(self, agent_id: str, version: int, token: str) -> None:
        """The key set to give this agent (replacing any earlier offer)."""
        with self._tx() as db:
            db.execute(
                """INSERT INTO keysets (agent_id, version, token, offered_at) VALUES (?, ?, ?, ?)
               ON CONFLICT (agent_id) DO UPDATE SET version = excluded.version,
                   token = excluded.token, offered_at = excluded.offered_at,
                   last_result = NULL""",
                (agent_id, version, token, time.time()),
            )

    def keyset(self, agent_id: str) -> dict[str, object] | None:
        row = self._db.execute("SELECT * FROM keysets WHERE agent_id = ?", (agent_id,)).fetchone()
        if row is None:
            return None
        return {
            "version": row["version"],
            "token": row["token"],
            "agent_version": row["agent_version"],
            "last_result": json.loads(row["last_result"]) if row["last_result"] else None,
        }

    def keyset_answered(self, agent_id: str, result: Mapping[str, object]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE keysets SET agent_version = ?, last_result = ? WHERE agent_id = ?",
                (result.get("version"), json.dumps(dict(result)), agent_id),
            )

    def record_anchor(
        self, agent_id: str, audit_seq: int, audit_hash: str, at: float
    ) -> str | None:
        """Keep an audit chain head the agent reported. Returns None when it is consistent with
        the anchors already held, else why not (the anchor is kept, flagged):

        - ``hash_differs``: another hash is held for that sequence number: the agent's log was
          rewritten;
        - ``head_moved_back``: a higher sequence number is held already. An agent's head only
          moves forward (it sends one anchor at a time, in order), so its log was cut and has
          grown again since.

        Neither check proves the log intact: a log cut and regrown past every anchor held is
        caught only by verifying it against all the anchors (``cp-stub anchor AGENT --all``).
        """
        with self._tx() as db:
            held = db.execute(
                "SELECT audit_hash, conflict FROM anchors WHERE agent_id = ? AND audit_seq = ?",
                (agent_id, audit_seq),
            ).fetchall()
            same = [row for row in held if row["audit_hash"] == audit_hash]
            if same:  # resent (after a reconnect, or a restart with an unmoved head)
                return _ANCHOR_CONFLICTS.get(same[0]["conflict"])
            conflict = 0
            if held:
                conflict = _HASH_DIFFERS
            else:
                (top,) = db.execute(
                    "SELECT MAX(audit_seq) FROM anchors WHERE agent_id = ?", (agent_id,)
                ).fetchone()
                if top is not None and top > audit_seq:
                    conflict = _HEAD_MOVED_BACK
            db.execute(
                """INSERT INTO anchors (agent_id, audit_seq, audit_hash, at, recorded_at, conflict)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (agent_id, audit_seq, audit_hash, at, time.time(), conflict),
            )
        return _ANCHOR_CONFLICTS.get(conflict)

    def anchors(
        self, agent_id: str, limit: int = 100, *, before: str | None = None
    ) -> list[dict[str, object]]:
        """Anchors held for an agent, highest sequence number first (for one number, the latest
        received first), at most ``limit``. ``before``: the ``cursor`` of the last anchor of the
        previous page, to page through them all."""
        after_seq, after_id = _anchor_cursor(before) if before is not None else (None, None)
        rows = self._db.execute(
            """SELECT * FROM anchors WHERE agent_id = ?
                   AND (? IS NULL OR audit_seq < ? OR (audit_seq = ? AND id < ?))
               ORDER BY audit_seq DESC, id DESC LIMIT ?""",
            (agent_id, after_seq, after_seq, after_seq, after_id, limit),
        ).fetchall()
        return [
            {
                "audit_seq": row["audit_seq"],
                "audit_hash": row["audit_hash"],
                "at": row["at"],
                "recorded_at": row["recorded_at"],
                "conflict": bool(row["conflict"]),
                "conflict_reason": _ANCHOR_CONFLICTS.get(row["conflict"]),
                "cursor": f"{row['audit_seq']}.{row['id']}",
            }
            for row in rows
        ]

    def clock_samples(self, agent_id: str, *, since: float, limit: int = 20) -> list[float]:
        """``at - recorded_at`` (the agent's clock when it wrote a report, minus this stub's
        when it stored it) for the latest reports received since ``since``: status reports and
        anchors, at most ``limit`` of each. Each is the clock offset minus that report's delay
        on the way, so the largest is the best estimate (:func:`overview.clock_offset`)."""
        rows = self._db.execute(
            """SELECT d FROM (SELECT at - recorded_at AS d FROM status_events
                               WHERE agent_id = ? AND recorded_at >= ?
                               ORDER BY id DESC LIMIT ?)
               UNION ALL
               SELECT d FROM (SELECT at - recorded_at AS d FROM anchors
                               WHERE agent_id = ? AND recorded_at >= ?
                               ORDER BY id DESC LIMIT ?)""",
            (agent_id, since, limit, agent_id, since, limit),
        ).fetchall()
        return [float(row["d"]) for row in rows]

    def anchor_heads(self) -> dict[str, int]:
        """The highest audit sequence number held for each agent."""
        rows = self._db.execute(
            "SELECT agent_id, MAX(audit_seq) AS head FROM anchors GROUP BY agent_id"
        ).fetchall()
        return {row["agent_id"]: int(row["head"]) for row in rows}

    def agent_disconnected(self, agent_id: str, reason: str) -> None:
        with self._tx(durable=False) as db:  # informational, as agent_connected
            db.execute(
                """UPDATE agents SET connected = 0, connected_since = NULL, last_seen = ?,
                       last_disconnect = ? WHERE agent_id = ?""",
                (time.time(), reason[:200], agent_id),
            )

    def agents(self) -> list[dict[str, object]]:
        rows = self._db.execute("SELECT * FROM agents ORDER BY agent_id").fetchall()
        return [
            {
                "agent_id": row["agent_id"],
                "connected": bool(row["connected"]),
                "connected_since": row["connected_since"],
                "first_seen": row["first_seen"],
                "last_seen": row["last_seen"],
                "cert_sha256": row["cert_sha256"],
                "peer": row["peer"],
                "agent_version": row["agent_version"],
                "capabilities": json.loads(row["capabilities"]) if row["capabilities"] else None,
                "last_disconnect": row["last_disconnect"],
            }
            for row in rows
        ]

    # -- commands -------------------------------------------------------------------------

    def add_command(
        self,
        *,
        ref: str,
        agent_id: str,
        token: str,
        origin: str,
        jti: str | None,
        command_type: str | None,
        params: Mapping[str, object] | None,
        idempotency: tuple[str, str] | None = None,
    ) -> CommandRecord:
        """Store a command, queued. ``idempotency``: the operator's ``(Idempotency-Key,
        request fingerprint)``, claimed in the same transaction: if a command holds the key
        already, nothing is stored and :class:`IdempotencyKeyTaken` names it."""
        now = time.time()
        with self._tx() as db:
            if idempotency is not None:
                key, fingerprint = idempotency
                claimed = db.execute(
                    """INSERT INTO idempotency_keys (agent_id, key, fingerprint, ref, created_at)
                       VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                    (agent_id, key, fingerprint, ref, now),
                ).rowcount
                if not claimed:
                    held = db.execute(
                        """SELECT ref, fingerprint FROM idempotency_keys
                           WHERE agent_id = ? AND key = ?""",
                        (agent_id, key),
                    ).fetchone()
                    raise IdempotencyKeyTaken(str(held["ref"]), str(held["fingerprint"]))
            db.execute(
                """INSERT INTO commands (ref, agent_id, jti, type, params, token, origin, state,
                                         created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)""",
                (
                    ref,
                    agent_id,
                    jti,
                    command_type,
                    json.dumps(params) if params is not None else None,
                    token,
                    origin,
                    now,
                    now,
                ),
            )
        return self.get(ref)

    def get(self, ref: str) -> CommandRecord:
        row = self._db.execute("SELECT * FROM commands WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            raise UnknownCommand(f"no command {ref!r}")
        return _record(row)

    def commands(
        self,
        *,
        agent_id: str | None = None,
        final_only: bool = False,
        limit: int = 50,
        command_type: str | None = None,
        state: str | None = None,
    ) -> list[CommandRecord]:
        query = "SELECT * FROM commands WHERE 1=1"
        args: list[object] = []
        if agent_id is not None:
            query += " AND agent_id = ?"
            args.append(agent_id)
        if command_type is not None:
            query += " AND type = ?"
            args.append(command_type)
        if state is not None:
            query += " AND state = ?"
            args.append(state)
        if final_only:
            query += f" AND state IN ({','.join('?' * len(FINAL_STATES))})"
            args.extend(sorted(FINAL_STATES))
        query += " ORDER BY created_at DESC, ref LIMIT ?"
        args.append(limit)
        return [_record(row) for row in self._db.execute(query, args).fetchall()]

    def recently_updated(
        self, agent_id: str | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        """The commands whose state changed last, newest change first."""
        rows = self._db.execute(
            """SELECT * FROM commands WHERE (? IS NULL OR agent_id = ?)
               ORDER BY updated_at DESC, ref LIMIT ?""",
            (agent_id, agent_id, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def change_mark(self) -> tuple[object, ...]:
        """Something that differs after any change an operator watches: a command stored or
        moved, a status report, an anchor, an agent connecting or leaving. Cheap (indexes and
        row ids), so that a watcher can test it on every notification."""
        row = self._db.execute(
            """SELECT (SELECT MAX(updated_at) FROM commands),
                      (SELECT MAX(id) FROM status_events),
                      (SELECT MAX(id) FROM anchors),
                      (SELECT MAX(last_seen) FROM agents),
                      (SELECT COUNT(*) FROM agents WHERE connected = 1)"""
        ).fetchone()
        return tuple(row)

    def undelivered(self, agent_id: str) -> list[CommandRecord]:
        """Commands the agent has not confirmed: queued, or sent without a status back."""
        rows = self._db.execute(
            """SELECT * FROM commands WHERE agent_id = ? AND state IN ('queued', 'sent')
               ORDER BY created_at, ref""",
            (agent_id,),
        ).fetchall()
        return [_record(row) for row in rows]

    def mark_sent(self, ref: str) -> None:
        now = time.time()
        with self._tx(durable=False) as db:  # a delivery lost to a crash is delivered again
            db.execute(
                """UPDATE commands SET state = 'sent', sent_at = ?, updated_at = ?
                   WHERE ref = ? AND state = 'queued'""",
                (now, now, ref),
            )

    def history(self, ref: str) -> list[dict[str, object]]:
        return self.histories([ref]).get(ref, [])

    def histories(self, refs: Sequence[str]) -> dict[str, list[dict[str, object]]]:
        """The status history of each command (in the order received; ``recorded_at`` is this
        stub's clock, ``at`` the agent's)."""
        found: dict[str, list[dict[str, object]]] = {}
        for chunk in _chunks(refs):
            marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
            rows = self._db.execute(
                f"""SELECT e.* FROM status_events e
                   JOIN commands c ON c.ref = e.ref AND c.agent_id = e.agent_id
                   WHERE e.ref IN ({marks}) ORDER BY e.id""",  # noqa: S608
                chunk,
            ).fetchall()
            for row in rows:
                found.setdefault(row["ref"], []).append(
                    {
                        "state": row["state"],
                        "seq": row["seq"],
                        "reason": row["reason"] or None,
                        "detail": row["detail"],
                        "at": row["at"],
                        "recorded_at": row["recorded_at"],
                    }
                )
        return found

    # -- status reports -------------------------------------------------------------------

    def apply_status(self, agent_id: str, frame: Status) -> bool:
        """Record a status report. Returns True if it changed anything (False: a duplicate)."""
        return self._apply(
            agent_id,
            ref=frame.ref,
            jti=frame.jti,
            event_state=frame.state,
            next_state=frame.state,
            seq=frame.seq,
            reason=frame.reason,
            detail=frame.detail,
            at=frame.at,
            result=frame.result,
        )

    def apply_delivery_rejected(self, agent_id: str, frame: DeliveryRejected) -> bool:
        """Record a refused delivery. Only a final refusal rejects the command, and only if the
        agent has not accepted it under this ref already; a transient one (``busy``,
        ``shutting_down``) leaves it to be delivered again on the next connection."""
        if frame.reason in ("duplicate_delivery", *TRANSIENT_REFUSALS):
            next_state = None
        else:
            next_state = "rejected"
        return self._apply(
            agent_id,
            ref=frame.ref,
            jti=None,
            event_state="delivery_rejected",
            next_state=next_state,
            seq=frame.seq,
            reason=frame.reason,
            detail=frame.detail,
            at=frame.at,
            result=None,
        )

    def _apply(
        self,
        agent_id: str,
        *,
        ref: str,
        jti: str | None,
        event_state: str,
        next_state: str | None,
        seq: int,
        reason: str | None,
        detail: str | None,
        at: float,
        result: Mapping[str, Any] | None,
    ) -> bool:
        """Record one report in the history (once) and move the command forward if it says so.

        Only reports about a command this stub addressed to *this* agent are kept: an agent can
        neither write into another agent's history nor invent commands."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT state, jti FROM commands WHERE ref = ? AND agent_id = ?", (ref, agent_id)
            ).fetchone()
            if row is None:
                return False
            if jti is not None and row["jti"] is not None and row["jti"] != jti:
                return False  # a report about another token under this ref
            inserted = db.execute(
                """INSERT INTO status_events (agent_id, ref, jti, state, seq, reason, detail, at,
                                              recorded_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (agent_id, ref, state, reason) DO NOTHING""",
                (agent_id, ref, jti, event_state, seq, reason or "", detail, at, now),
            ).rowcount
            if not inserted or next_state is None:
                return bool(inserted)
            # States only move forward; a refused delivery cannot undo an accepted command.
            limit = RANK["received"] if event_state == "delivery_rejected" else RANK[next_state]
            if RANK.get(row["state"], 0) >= limit:
                return True
            db.execute(
                """UPDATE commands SET state = ?, reason = ?, detail = ?,
                       result = COALESCE(?, result), jti = COALESCE(jti, ?), updated_at = ?
                   WHERE ref = ? AND agent_id = ?""",
                (
                    next_state,
                    reason,
                    detail,
                    json.dumps(result) if result is not None else None,
                    jti,
                    now,
                    ref,
                    agent_id,
                ),
            )
        return True
