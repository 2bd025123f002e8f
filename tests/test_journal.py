"""The journal (agent/io/journal.py): audit records and state in one durable write, group
commit by one WAL sync, and what a crash can leave behind, repaired at the next open.

Real SQLite files and real audit files in a temporary directory; the syncer is the real thread.
Where a test needs to hold the disk still (to see what is durable when), it gates the syncer's
``fdatasync`` with an event: the sync itself still happens, later.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.core.errors import AuditError, AuditIntegrityError
from agent.io.audit_file import AuditFile, verify_file
from agent.io.journal import Journal
from agent.io.store import Store
from tests.conftest import scaled


class StepClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def make(tmp_path: Path) -> Journal:
    return Journal(
        Store(tmp_path / "state" / "agent.db"),
        AuditFile(tmp_path / "audit" / "audit.jsonl"),
        now=StepClock(),
    )


def abandon(journal: Journal) -> None:
    """What a killed process leaves: no final sync, no clean-up, the files as they are."""
    syncer = journal._syncer
    assert syncer is not None
    syncer.stop()
    journal.store.close()
    journal.audit.close()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    opened = make(tmp_path)
    opened.open()
    yield opened
    if opened._syncer is not None:  # not abandoned by the test
        opened.close()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every WAL sync until the test sets the event (counting them)."""
    opened = threading.Event()
    calls: list[int] = []
    real = os.fdatasync

    def held(fd: int) -> None:
        calls.append(fd)
        opened.wait(timeout=30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    opened.calls = calls  # type: ignore[attr-defined]
    yield opened
    opened.set()


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_records_chain_and_become_durable(journal: Journal, tmp_path: Path) -> None:
    seen: list[str] = []
    journal.add_listener(lambda event, _fields: seen.append(event))
    first = journal.record("agent_started", version="0.1.0")
    with journal.batch() as batch:
        second = batch.record("command_received", jti="j-1")
        third = batch.record("command_verification", jti="j-1", result="verified")
    assert (first.seq, second.seq, third.seq) == (1, 2, 3)
    await journal.settle()
    assert journal.durable == journal.committed == 2  # two batches
    assert seen == ["agent_started", "command_received", "command_verification"]
    path = tmp_path / "audit" / "audit.jsonl"
    records = lines_of(path)
    # the records of one batch carry its time: the clock is read once per batch
    assert [r["ts"] for r in records] == [
        "2026-11-23T10:00:01.123456Z",
        "2026-11-23T10:00:02.123456Z",
        "2026-11-23T10:00:02.123456Z",
    ]
    assert verify_file(path).summary.head == third
    assert journal.store.audit_head() == third


@pytest.mark.parametrize("umask", [0, 0o077])
async def test_file_modes(tmp_path: Path, umask: int) -> None:
    """The audit log is group-readable (operators read it) even under systemd's UMask=0077;
    the state database stays private whatever the umask."""
    previous = os.umask(umask)
    try:
        opened = make(tmp_path)
        opened.open()
        opened.close()
    finally:
        os.umask(previous)
    path = tmp_path / "audit" / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "state" / "agent.db").stat().st_mode) == 0o600
    if umask == 0:  # (its directory is systemd's LogsDirectory= there, made 0750 by systemd)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


async def test_a_reopened_journal_continues_the_chain(tmp_path: Path) -> None:
    opened = make(tmp_path)
    opened.open()
    opened.record("a")
    head = opened.record("b", n=1)
    opened.close()
    reopened = make(tmp_path)
    reopened.open()
    assert reopened.head == head
    assert reopened.repaired == {}
    third = reopened.record("c")
    reopened.close()
    assert third.seq == 3
    assert verify_file(tmp_path / "audit" / "audit.jsonl").summary.head == third


async def test_group_commit_one_sync_for_many_batches(
    journal: Journal, gate: threading.Event
) -> None:
    """100 batches committed while a sync is held are made durable by one more sync."""
    journal.record("first")
    await asyncio.to_thread(lambda: None)  # let the syncer reach the (held) first sync
    for n in range(100):
        journal.record("more", n=n)
    assert journal.durable == 0  # nothing may be acted on yet
    gate.set()
    async with asyncio.timeout(scaled(10)):
        await journal.settle()
    assert journal.durable == 101
    syncer = journal._syncer
    assert syncer is not None
    wal_syncs = gate.calls.count(syncer.wal_fd)  # type: ignore[attr-defined]
    assert wal_syncs <= 2  # the held one (batch 1), then one for the 100 others


async def test_listeners_hear_of_a_record_only_once_it_is_durable(
    journal: Journal, gate: threading.Event
) -> None:
    heard: list[str] = []
    journal.add_listener(lambda event, _fields: heard.append(event))
    commit = journal.committed + 1
    journal.record("execution_started", jti="j-1")
    waiting = asyncio.create_task(journal.wait_durable(commit))
    await asyncio.sleep(0)  # the waiter runs and blocks: it is an event, not a timer
    assert heard == []
    assert not waiting.done()
    gate.set()
    async with asyncio.timeout(scaled(10)):
        await waiting
    assert heard == ["execution_started"]


async def test_a_torn_last_line_is_cut_at_open(tmp_path: Path) -> None:
    opened = make(tmp_path)
    opened.open()
    head = opened.record("a")
    opened.close()
    path = tmp_path / "audit" / "audit.jsonl"
    with path.open("ab") as handle:
        handle.write(b'{"event":"b","ha')
    reopened = make(tmp_path)
    reopened.open()
    assert reopened.head == head
    assert reopened.repaired == {"discarded_bytes": len(b'{"event":"b","ha')}
    reopened.close()
    assert verify_file(path).summary.head == head


async def test_records_written_ahead_of_a_commit_that_never_happened_are_cut(
    tmp_path: Path,
) -> None:
    """The file gets a batch's lines just before its commit: a crash in between leaves lines
    the store never committed. Nothing they describe was done; they are cut at the next open."""
    opened = make(tmp_path)
    opened.open()
    head = opened.record("committed")
    await opened.settle()
    path = tmp_path / "audit" / "audit.jsonl"
    committed_bytes = path.read_bytes()
    with opened.batch() as batch:
        batch.record("never_committed", n=1)
        batch.record("never_committed", n=2)
    abandon(opened)
    # The store as it was before that batch: as if the process died between the batch's file
    # write and its COMMIT.
    store = Store(tmp_path / "state" / "agent.db")
    with store.transaction():
        store.set_audit_head(head)
    store.close()
    assert path.read_bytes() != committed_bytes
    reopened = make(tmp_path)
    reopened.open()
    assert reopened.head == head
    assert reopened.repaired == {"discarded_records": 2}
    reopened.close()
    assert path.read_bytes() == committed_bytes


async def test_records_the_file_lost_are_written_back_from_the_store(tmp_path: Path) -> None:
    """A power failure after the WAL sync but before the audit file's: the store kept the
    batch's lines, and the next open writes them back."""
    opened = make(tmp_path)
    opened.open()
    opened.record("a")
    await opened.settle()
    opened.record("b")  # the next batch drops what the file already has on disk
    await opened.settle()
    with opened.batch() as batch:
        batch.record("c")
        last = batch.record("d")
    await opened.settle()
    abandon(opened)
    path = tmp_path / "audit" / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]))  # the page cache lost "c" and "d"
    reopened = make(tmp_path)
    reopened.open()
    assert reopened.head == last
    assert reopened.repaired == {"restored_records": 2}
    reopened.close()
    assert [r["event"] for r in lines_of(path)] == ["a", "b", "c", "d"]
    assert verify_file(path).summary.head == last


async def test_an_edited_last_record_is_refused_at_open(tmp_path: Path) -> None:
    opened = make(tmp_path)
    opened.open()
    opened.record("a", n=1)
    opened.close()
    path = tmp_path / "audit" / "audit.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"n":1', b'"n":2'))
    with pytest.raises(AuditIntegrityError):
        make(tmp_path).open()


async def test_a_failed_write_latches_and_rolls_back(journal: Journal) -> None:
    failures: list[BaseException] = []
    journal.on_failure(failures.append)
    head = journal.record("a")
    await journal.settle()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, journal.audit.fd)  # a real ENOSPC on the next write
    finally:
        os.close(full)

    def write_a_batch() -> None:
        with journal.batch() as batch:
            batch.record("b")
            journal.store.set_meta("marker", "rolled back?")

    with pytest.raises(AuditError):
        write_a_batch()
    assert journal.failed
    assert len(failures) == 1
    assert journal.head == head
    assert journal.store.audit_head() == head
    assert journal.store._meta_raw("marker") is None  # rolled back
    with pytest.raises(AuditError, match="failed earlier"):
        journal.record("c")


async def test_bad_fields_are_refused_without_writing(journal: Journal, tmp_path: Path) -> None:
    head = journal.record("a")
    with pytest.raises(AuditError):
        journal.record("b", ratio=0.5)
    with pytest.raises(AuditError):
        journal.record("b", prev="forged")
    assert journal.head == head
    journal.close()
    assert verify_file(tmp_path / "audit" / "audit.jsonl").summary.head == head


async def test_a_long_record_is_read_back_at_open(tmp_path: Path) -> None:
    opened = make(tmp_path)
    opened.open()
    opened.record("big", blob="x" * 200_000)
    head = opened.record("big", blob="y" * 150_000)
    opened.close()
    reopened = make(tmp_path)
    reopened.open()
    assert reopened.head == head
    reopened.close()
