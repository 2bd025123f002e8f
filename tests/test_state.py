"""The state store (agent.io.store): what it keeps and gives back, the replay cache's horizon,
the outbox's numbering, key sets, and the migration from the first schema.

The rules about commands (which state follows which) are the lifecycle's, tested without any
I/O in tests/test_lifecycle_core.py; this file is about SQLite holding them.
"""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.core.audit_chain import ChainHead
from agent.core.errors import StateError
from agent.core.lifecycle import FINAL_STATES, CommandRow, CommandState
from agent.core.session import OutboxEntry
from agent.io.store import PURGE_MARGIN, SCHEMA_VERSION, Store

NOW = 1_700_000_000.0


def row(jti: str = "j-1", *, ref: str | None = None, **changes: Any) -> CommandRow:
    base = CommandRow(
        jti=jti,
        ref=ref or f"d-{jti}",
        iss="byoc-control-plane",
        kid="kid-1",
        type="scale",
        params={"replicas": 3},
        iat=NOW,
        exp=NOW + 300,
        token_sha256="ab" * 32,
        state=CommandState.RECEIVED,
        received_at=NOW,
        updated_at=NOW,
    )
    return replace(base, **changes)


def status(seq: int, jti: str, state: str) -> OutboxEntry:
    return OutboxEntry(
        seq=seq,
        kind="status",
        body={"ref": f"d-{jti}", "jti": jti, "state": state, "at": NOW},
        jti=jti,
        state=state,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agent.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    opened = Store(db_path)
    yield opened
    opened.close()


def saved(store: Store, *rows: CommandRow) -> None:
    with store.transaction():
        for item in rows:
            store.save(item)


# -- the file -------------------------------------------------------------------------------------


def test_file_mode_0600(store: Store, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


def test_schema_version_recorded(store: Store, db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    value = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    raw.close()
    assert value == (str(SCHEMA_VERSION),)


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(StateError, match="schema 9"):
        Store(db_path)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open state database"):
        Store(path)


def test_a_write_outside_a_transaction_is_refused(store: Store) -> None:
    """Every write belongs to a journal batch (one transaction): SQLite's autocommit would
    commit it on its own, so the store refuses writes outside one."""
    with pytest.raises(StateError, match="outside a journal batch"):
        store.save(row())
    assert store.get("j-1") is None
    with store.transaction():
        store.save(row())
    assert store.get("j-1") == row()


# -- commands ---------------------------------------------------------------------------------


def test_a_row_round_trips_with_every_field(store: Store) -> None:
    full = row(
        state=CommandState.FAILED,
        reason="unhealthy",
        detail="replica 2 did not become healthy",
        result={"rolled_back": True, "version": "1.0.0", "ratio": 0.5},
        approved_by="alice",
        acted=True,
        updated_at=NOW + 9,
    )
    saved(store, full)
    assert store.get("j-1") == full
    assert json.dumps(full.to_json())


def test_saving_again_updates_the_mutable_fields(store: Store) -> None:
    saved(store, row())
    saved(store, row(state=CommandState.RUNNING, acted=True, updated_at=NOW + 1))
    got = store.get("j-1")
    assert got is not None
    assert (got.state, got.acted, got.updated_at) == (CommandState.RUNNING, True, NOW + 1)


def test_known_finds_a_token_by_jti_and_by_ref(store: Store) -> None:
    saved(store, row("j-1", ref="r-1"))
    known = store.known(jti="j-1", ref="r-2")
    assert known.by_jti == row("j-1", ref="r-1")
    assert known.by_ref is None
    known = store.known(jti="other", ref="r-1")
    assert (known.by_jti, known.by_ref) == (None, row("j-1", ref="r-1"))
    assert store.known(jti=None, ref="nope").horizon == 0.0


def test_known_sees_the_open_batchs_own_writes(store: Store) -> None:
    with store.transaction():
        store.save(row("j-1"))
        assert store.known(jti="j-1", ref="x").by_jti is not None


def test_a_rolled_back_batch_leaves_nothing(store: Store) -> None:
    def failing_batch() -> None:
        with store.transaction():
            store.save(row("j-1"))
            raise RuntimeError("the batch failed")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert store.get("j-1") is None


def test_unfinished_oldest_first(store: Store) -> None:
    saved(
        store,
        row("j-b", received_at=NOW + 1),
        row("j-a", received_at=NOW + 2, state=CommandState.PENDING_APPROVAL),
        row("j-c", received_at=NOW, state=CommandState.RUNNING),
        row("j-d", state=CommandState.SUCCEEDED, updated_at=NOW + 5),
    )
    assert [r.jti for r in store.unfinished()] == ["j-c", "j-b", "j-a"]
    assert store.recent(1) == [row("j-d", state=CommandState.SUCCEEDED, updated_at=NOW + 5)]


# -- the outbox ---------------------------------------------------------------------------------


def test_outbox_entries_survive_a_reopen_in_order(db_path: Path) -> None:
    store = Store(db_path)
    with store.transaction():
        store.add_outbox(status(7, "j-1", "received"), now=NOW)
        store.add_outbox(status(8, "j-1", "running"), now=NOW)
        store.set_next_seq(9)
    store.close()
    reopened = Store(db_path)
    try:
        assert [e.seq for e in reopened.outbox()] == [7, 8]
        assert reopened.outbox()[1] == status(8, "j-1", "running")
        assert reopened.next_seq() == 9
    finally:
        reopened.close()


def test_a_seq_is_never_reused_even_once_acknowledged(db_path: Path) -> None:
    store = Store(db_path)
    with store.transaction():
        store.add_outbox(status(1, "j-1", "received"), now=NOW)
        store.add_outbox(status(2, "j-1", "succeeded"), now=NOW)
        store.set_next_seq(3)
    with store.transaction():
        store.delete_outbox(1)
        store.delete_outbox(2)
    store.close()
    reopened = Store(db_path)
    try:
        assert reopened.outbox() == []
        assert reopened.next_seq() == 3
    finally:
        reopened.close()


# -- the replay cache's horizon ----------------------------------------------------------------


def test_purge(store: Store) -> None:
    later = NOW + 10_000
    saved(
        store,
        # Removed: final, expired beyond the largest skew, its final status acknowledged.
        row("gone", state=CommandState.SUCCEEDED),
        # Kept: not final, although expired.
        row("running", state=CommandState.RUNNING),
        # Kept: final, but not expired yet (exp + margin >= later).
        row("fresh", state=CommandState.REJECTED, exp=later - PURGE_MARGIN),
        # Kept: final and expired, but its final status is still in the outbox.
        row("unacked", state=CommandState.FAILED),
    )
    with store.transaction():
        store.add_outbox(status(1, "unacked", "failed"), now=NOW)
    with store.transaction():
        purged = store.purge(now=later)
    assert purged.commands == 1
    assert store.get("gone") is None
    for jti in ("running", "fresh", "unacked"):
        assert store.get(jti) is not None, jti
    with store.transaction():
        assert store.purge(now=later).commands == 0
    with store.transaction():  # one second later `fresh` is expired beyond the margin too
        assert store.purge(now=later + 1).commands == 1


def test_purge_raises_the_replay_horizon_durably(db_path: Path) -> None:
    """A token that expired before the newest forgotten one is refused however the clock
    moves later: its jti may have been used and forgotten."""
    store = Store(db_path)
    assert store.horizon() == 0.0
    saved(store, row("old", state=CommandState.SUCCEEDED))
    with store.transaction():
        assert store.purge(now=NOW + 300 + PURGE_MARGIN + 1).horizon == NOW + 300
    store.close()
    reopened = Store(db_path)
    assert reopened.horizon() == NOW + 300
    assert reopened.known(jti="anything", ref="x").horizon == NOW + 300
    reopened.close()


def test_purge_of_every_final_state(store: Store) -> None:
    saved(store, *(row(final.value, state=final) for final in FINAL_STATES))
    with store.transaction():
        assert store.purge(now=NOW + 10_000).commands == len(FINAL_STATES)
    assert store.recent() == []


# -- audit lines and the committed head ---------------------------------------------------------


def test_pending_audit_lines_and_the_head(store: Store) -> None:
    assert store.audit_head() is None
    with store.transaction():
        store.add_pending([(1, b"one\n"), (2, b"two\n")])
        store.set_audit_head(ChainHead(2, "f" * 64))
    assert store.pending_after(0) == [(1, b"one\n"), (2, b"two\n")]
    assert store.audit_head() == ChainHead(2, "f" * 64)
    with store.transaction():
        store.drop_pending(1)
    assert store.pending_after(0) == [(2, b"two\n")]


# -- key sets -------------------------------------------------------------------------------


def test_key_sets(store: Store) -> None:
    assert store.latest_keyset() is None
    with store.transaction():
        store.save_keyset(version=1, token="t1", signer='{"root": 1}', now=NOW)
        store.save_keyset(version=2, token="t2", signer='{"root": 2}', now=NOW)
    latest = store.latest_keyset()
    assert latest is not None
    assert (latest.token, latest.signer) == ("t2", '{"root": 2}')
    assert sorted(store.keyset_signers()) == ['{"root": 1}', '{"root": 2}']
    with store.transaction():
        store.discard_keysets()
    assert store.latest_keyset() is None


# -- migration ------------------------------------------------------------------------------

_V1: str = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE commands (
    jti TEXT PRIMARY KEY, ref TEXT NOT NULL, iss TEXT NOT NULL, kid TEXT NOT NULL,
    type TEXT NOT NULL, params TEXT NOT NULL, iat REAL NOT NULL, exp REAL NOT NULL,
    token_sha256 TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, detail TEXT, result TEXT,
    approved_by TEXT, received_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE keysets (version INTEGER PRIMARY KEY, token TEXT NOT NULL, signer TEXT NOT NULL,
    accepted_at REAL NOT NULL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    body TEXT NOT NULL, jti TEXT, state TEXT, created_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_version_1_store_is_migrated(db_path: Path) -> None:
    """A store written before the journal: its commands, outbox and numbering carry over; a
    command it left running is taken to have acted (it may have: nothing said otherwise)."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    raw.executescript(_V1)
    for jti, state in (("j-run", "running"), ("j-new", "received")):
        raw.execute(
            "INSERT INTO commands VALUES (?, ?, 'iss', 'kid', 'scale', '{}', 0, 1, 'h', ?,"
            " NULL, NULL, NULL, NULL, 0, 0)",
            (jti, f"r-{jti}", state),
        )
    for _ in range(5):
        raw.execute(
            "INSERT INTO outbox (kind, body, jti, state, created_at) VALUES "
            '(\'status\', \'{"ref": "r", "jti": "j-run", "state": "running", '
            "\"at\": 0}', 'j-run', 'running', 0)"
        )
    raw.execute("DELETE FROM outbox WHERE seq < 5")
    raw.commit()
    raw.close()
    store = Store(db_path)
    try:
        running, received = store.get("j-run"), store.get("j-new")
        assert running is not None
        assert received is not None
        assert (running.acted, received.acted) == (True, False)
        assert [e.seq for e in store.outbox()] == [5]
        assert store.next_seq() == 6  # the old AUTOINCREMENT counter, not the highest row
        assert store.audit_head() is None  # the file's head is taken as committed once
    finally:
        store.close()
    assert Store(db_path).next_seq() == 6  # migrated once, reopened as version 2
