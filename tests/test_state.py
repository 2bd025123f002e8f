"""Tests of the durable state store (agent.io.store): replay cache, transitions, outbox."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.errors import StateError
from agent.core.frames import (
    FINAL_STATES,
    MAX_FRAME_TO_CONTROL_PLANE,
    TO_CONTROL_PLANE,
    DeliveryRejected,
    Status,
    decode,
    encode,
)
from agent.core.verifier import VerifiedToken
from agent.io.store import PURGE_MARGIN, AgentState, CommandRow, OutboxRow

NOW = 1_700_000_000.0


def token(jti: str = "j-1", *, exp: float = NOW + 300, iat: float = NOW) -> VerifiedToken:
    return VerifiedToken(
        jti=jti,
        iss="byoc-control-plane",
        aud="agent-1",
        kid="kid-1",
        iat=iat,
        nbf=iat,
        exp=exp,
        command_type="scale",
        params={"replicas": 3},
        token_sha256="ab" * 32,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agent.db"


@pytest.fixture
def state(db_path: Path) -> Iterator[AgentState]:
    store = AgentState(db_path)
    yield store
    store.close()


def claim(
    store: AgentState, jti: str = "j-1", *, ref: str = "d-1", now: float = NOW, **kw: Any
) -> CommandRow | None:
    return store.claim(token(jti, **kw), ref=ref, now=now)


def round_trip(row: OutboxRow) -> Status | DeliveryRejected:
    frame = row.frame()
    assert isinstance(frame, Status | DeliveryRejected)
    decoded = decode(encode(frame), accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE)
    assert decoded == frame
    assert isinstance(decoded, Status | DeliveryRejected)
    return decoded


# -- file -----------------------------------------------------------------------------------------


def test_file_mode_0600(state: AgentState, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


def test_schema_version_recorded(state: AgentState, db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        value = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    raw.close()
    assert value == ("1",)


def test_wrong_schema_version_refused(db_path: Path) -> None:
    AgentState(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(StateError, match="schema 2"):
        AgentState(db_path)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open state database"):
        AgentState(path)


# -- claim ----------------------------------------------------------------------------------------


def test_claim_returns_row_and_queues_received(state: AgentState) -> None:
    row = claim(state)
    assert row == CommandRow(
        jti="j-1",
        ref="d-1",
        iss="byoc-control-plane",
        kid="kid-1",
        type="scale",
        params={"replicas": 3},
        iat=NOW,
        exp=NOW + 300,
        token_sha256="ab" * 32,
        state="received",
        reason=None,
        detail=None,
        result=None,
        approved_by=None,
        received_at=NOW,
        updated_at=NOW,
    )
    assert not row.final
    outbox = state.outbox_after(0)
    assert len(outbox) == 1
    assert outbox[0].kind == "status"
    assert outbox[0].jti == "j-1"
    assert outbox[0].state == "received"
    assert outbox[0].body == {"jti": "j-1", "ref": "d-1", "state": "received", "at": NOW}
    assert round_trip(outbox[0]) == Status(
        seq=outbox[0].seq, ref="d-1", jti="j-1", state="received", at=NOW
    )


def test_second_claim_is_a_replay(state: AgentState) -> None:
    assert claim(state) is not None
    assert claim(state, ref="d-2", now=NOW + 5) is None
    assert state.outbox_size() == 1
    row = state.get("j-1")
    assert row is not None
    assert row.ref == "d-1"
    assert row.received_at == NOW


def test_replay_cache_survives_reopen(db_path: Path) -> None:
    first = AgentState(db_path)
    assert claim(first) is not None
    first.close()
    second = AgentState(db_path)
    try:
        assert claim(second, ref="d-2") is None
        assert claim(second, "j-2") is not None
        assert second.outbox_size() == 2
    finally:
        second.close()


def test_replay_after_final_state(state: AgentState) -> None:
    claim(state)
    state.transition("j-1", "succeeded", now=NOW + 1)
    assert claim(state, now=NOW + 2) is None


def test_get_unknown(state: AgentState) -> None:
    assert state.get("nope") is None


# -- transitions ----------------------------------------------------------------------------------


def test_transition_updates_row_and_queues_status(state: AgentState) -> None:
    claim(state)
    running = state.transition("j-1", "running", now=NOW + 1)
    assert running.state == "running"
    assert running.updated_at == NOW + 1
    assert running.received_at == NOW
    done = state.transition(
        "j-1",
        "succeeded",
        now=NOW + 2,
        detail="scaled to 3",
        result={"replicas": 3, "previous_replicas": 1},
    )
    assert done.state == "succeeded"
    assert done.final
    assert done.result == {"replicas": 3, "previous_replicas": 1}
    assert done.detail == "scaled to 3"
    assert state.get("j-1") == done

    outbox = state.outbox_after(0)
    assert [row.state for row in outbox] == ["received", "running", "succeeded"]
    last = round_trip(outbox[-1])
    assert last == Status(
        seq=outbox[-1].seq,
        ref="d-1",
        jti="j-1",
        state="succeeded",
        at=NOW + 2,
        detail="scaled to 3",
        result={"replicas": 3, "previous_replicas": 1},
    )


def test_failed_transition_with_reason(state: AgentState) -> None:
    claim(state)
    row = state.transition(
        "j-1", "failed", now=NOW + 1, reason="unhealthy_rolled_back", detail="rolled back"
    )
    assert (row.state, row.reason, row.detail) == ("failed", "unhealthy_rolled_back", "rolled back")
    status = round_trip(state.outbox_after(0)[-1])
    assert isinstance(status, Status)
    assert status.reason == "unhealthy_rolled_back"


def test_transition_and_status_are_one_transaction(state: AgentState, db_path: Path) -> None:
    claim(state)
    # Make queueing the `running` status fail after the row was updated: the whole transition
    # must be rolled back, so the agent never records a state the control plane cannot learn.
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute(
            """CREATE TRIGGER fail_running BEFORE INSERT ON outbox WHEN NEW.state = 'running'
               BEGIN SELECT RAISE(ABORT, 'injected failure'); END"""
        )
    finally:
        other.close()
    with pytest.raises(StateError, match="injected failure"):
        state.transition("j-1", "running", now=NOW + 1)
    row = state.get("j-1")
    assert row is not None
    assert row.state == "received"
    assert row.updated_at == NOW
    assert [r.state for r in state.outbox_after(0)] == ["received"]
    # Other transitions still work on the same connection afterwards.
    assert state.transition("j-1", "failed", now=NOW + 2).state == "failed"


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
def test_transition_from_final_state_refused(state: AgentState, final: str) -> None:
    claim(state)
    state.transition("j-1", final, now=NOW + 1)
    size = state.outbox_size()
    with pytest.raises(StateError, match=f"already {final}"):
        state.transition("j-1", "running", now=NOW + 2)
    assert state.outbox_size() == size
    row = state.get("j-1")
    assert row is not None
    assert row.state == final
    assert row.updated_at == NOW + 1


def test_transition_of_unknown_command(state: AgentState) -> None:
    with pytest.raises(StateError, match="unknown command"):
        state.transition("ghost", "running", now=NOW)
    assert state.outbox_size() == 0


def test_mark_approved(state: AgentState) -> None:
    claim(state)
    state.transition("j-1", "pending_approval", now=NOW + 1)
    size = state.outbox_size()
    state.mark_approved("j-1", "alice", now=NOW + 2)
    row = state.get("j-1")
    assert row is not None
    assert (row.state, row.approved_by, row.updated_at) == ("pending_approval", "alice", NOW + 2)
    assert state.outbox_size() == size  # no status the protocol does not define
    running = state.transition("j-1", "running", now=NOW + 3)
    assert running.approved_by == "alice"  # kept through later transitions


def test_mark_approved_only_when_pending(state: AgentState) -> None:
    claim(state)
    state.mark_approved("j-1", "mallory", now=NOW + 2)
    row = state.get("j-1")
    assert row is not None
    assert row.approved_by is None
    assert row.updated_at == NOW


def test_approved_by_on_transition(state: AgentState) -> None:
    claim(state)
    row = state.transition("j-1", "running", now=NOW + 1, approved_by="bob")
    assert row.approved_by == "bob"
    assert row.to_json()["approved_by"] == "bob"


def test_in_states_and_recent(state: AgentState) -> None:
    claim(state, "j-a", now=NOW + 2)
    claim(state, "j-b", now=NOW + 1)
    claim(state, "j-c", now=NOW + 3)
    state.transition("j-c", "running", now=NOW + 4)
    assert [r.jti for r in state.in_states("received")] == ["j-b", "j-a"]
    assert [r.jti for r in state.in_states("received", "running")] == ["j-b", "j-a", "j-c"]
    assert state.in_states("failed") == []
    assert [r.jti for r in state.recent()] == ["j-c", "j-a", "j-b"]
    assert [r.jti for r in state.recent(limit=1)] == ["j-c"]


# -- outbox ---------------------------------------------------------------------------------------


def test_outbox_after_ordering_and_limits(state: AgentState) -> None:
    for index in range(10):
        claim(state, f"j-{index}", now=NOW + index)
    rows = state.outbox_after(0)
    seqs = [row.seq for row in rows]
    assert len(seqs) == 10
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 10
    assert [row.jti for row in rows] == [f"j-{i}" for i in range(10)]
    assert [row.seq for row in state.outbox_after(0, limit=3)] == seqs[:3]
    assert [row.seq for row in state.outbox_after(seqs[4])] == seqs[5:]
    assert [row.seq for row in state.outbox_after(seqs[4], limit=2)] == seqs[5:7]
    assert state.outbox_after(seqs[-1]) == []
    assert len(state.outbox_after(0, limit=256)) == 10


def test_reject_delivery(state: AgentState) -> None:
    state.reject_delivery(
        ref="d-9", reason="bad_signature", detail="signature verification failed", jti=None, now=NOW
    )
    state.reject_delivery(ref="d-10", reason="expired", detail="late", jti="j-10", now=NOW + 1)
    first, second = state.outbox_after(0)
    assert first.kind == "delivery_rejected"
    assert first.jti is None
    assert first.state == "rejected"
    assert round_trip(first) == DeliveryRejected(
        seq=first.seq,
        ref="d-9",
        reason="bad_signature",
        detail="signature verification failed",
        at=NOW,
    )
    assert round_trip(second) == DeliveryRejected(
        seq=second.seq, ref="d-10", reason="expired", detail="late", at=NOW + 1, jti="j-10"
    )
    # A rejected delivery never becomes a command, so the jti is not burnt.
    assert state.get("j-10") is None
    assert claim(state, "j-10") is not None


def test_ack_removes_and_returns_row(state: AgentState) -> None:
    claim(state)
    state.transition("j-1", "running", now=NOW + 1)
    first, second = state.outbox_after(0)
    acked = state.ack(first.seq)
    assert acked == first
    assert state.outbox_after(0) == [second]
    assert state.ack(first.seq) is None
    assert state.ack(999_999) is None
    assert state.outbox_size() == 1


def test_seq_never_reused(db_path: Path) -> None:
    store = AgentState(db_path)
    claim(store, "j-1")
    claim(store, "j-2")
    highest = max(row.seq for row in store.outbox_after(0))
    for row in store.outbox_after(0):
        store.ack(row.seq)
    assert store.outbox_size() == 0
    store.close()

    reopened = AgentState(db_path)
    try:
        claim(reopened, "j-3")
        (row,) = reopened.outbox_after(0)
        assert row.seq == highest + 1
        reopened.ack(row.seq)
        reopened.reject_delivery(ref="d", reason="expired", detail="x", jti=None, now=NOW)
        (rejected,) = reopened.outbox_after(0)
        assert rejected.seq == highest + 2
    finally:
        reopened.close()


def test_outbox_survives_reopen(db_path: Path) -> None:
    store = AgentState(db_path)
    claim(store)
    store.transition("j-1", "failed", now=NOW + 1, reason="driver_error", detail="boom")
    before = store.outbox_after(0)
    store.close()
    reopened = AgentState(db_path)
    try:
        assert reopened.outbox_after(0) == before
    finally:
        reopened.close()


# -- purge ----------------------------------------------------------------------------------------


def _ack_all(store: AgentState, jti: str) -> None:
    for row in store.outbox_after(0):
        if row.jti == jti:
            store.ack(row.seq)


def test_purge(state: AgentState) -> None:
    skew = PURGE_MARGIN  # rows are kept for the largest skew any configuration may allow
    later = NOW + 10_000
    # Removed: final, expired (beyond the skew) and fully acknowledged.
    claim(state, "gone", exp=NOW + 300)
    state.transition("gone", "succeeded", now=NOW + 1)
    _ack_all(state, "gone")
    # Kept: not final (running), although expired and acknowledged.
    claim(state, "running", exp=NOW + 300)
    state.transition("running", "running", now=NOW + 1)
    _ack_all(state, "running")
    # Kept: final and acknowledged, but not expired yet (exp + skew >= later).
    claim(state, "fresh", exp=later - skew)
    state.transition("fresh", "rejected", now=NOW + 1, reason="policy_denied")
    _ack_all(state, "fresh")
    # Kept: final and expired, but its final status was not acknowledged.
    claim(state, "unacked", exp=NOW + 300)
    state.transition("unacked", "failed", now=NOW + 1)
    # Kept: final and expired, only its earlier status was acknowledged.
    claim(state, "partly", exp=NOW + 300)
    first = state.outbox_after(0)
    state.ack(next(row.seq for row in first if row.jti == "partly"))
    state.transition("partly", "interrupted", now=NOW + 1)

    assert state.purge(now=later) == 1
    assert state.get("gone") is None
    for jti in ("running", "fresh", "unacked", "partly"):
        assert state.get(jti) is not None, jti
    # Purging again removes nothing; a purged jti is claimable only once it is forgotten.
    assert state.purge(now=later) == 0
    # One second later `fresh` has expired beyond the skew as well.
    assert state.purge(now=later + 1) == 1
    assert state.get("fresh") is None


def test_purge_raises_the_replay_horizon_durably(db_path: Path) -> None:
    """A token that expired before the newest forgotten one is refused however the clock
    moves later: its jti may have been used and forgotten."""
    store = AgentState(db_path)
    assert store.purged_until() == 0.0
    claim(store, "old", exp=NOW + 300)
    store.transition("old", "succeeded", now=NOW + 1)
    _ack_all(store, "old")
    assert store.purge(now=NOW + 300 + PURGE_MARGIN + 1) == 1
    assert store.purged_until() == NOW + 300
    store.close()
    reopened = AgentState(db_path)
    assert reopened.purged_until() == NOW + 300  # survives a restart
    reopened.close()


def test_purge_of_every_final_state(state: AgentState) -> None:
    for final in sorted(FINAL_STATES):
        claim(state, final)
        state.transition(final, final, now=NOW + 1)
        _ack_all(state, final)
    assert state.purge(now=NOW + 10_000) == len(FINAL_STATES)
    assert state.recent() == []


def test_command_row_to_json(state: AgentState) -> None:
    row = claim(state)
    assert row is not None
    body = row.to_json()
    assert body["jti"] == "j-1"
    assert body["params"] == {"replicas": 3}
    assert body["state"] == "received"
    json.dumps(body)
