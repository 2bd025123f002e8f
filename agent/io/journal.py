"""The durable write path: state changes and audit records, group-committed.

A *batch* is everything the agent decided in one turn of its runner (agent/io/runner.py): the
audit records, the command rows, the outbox frames. It becomes one SQLite transaction, which
also holds the batch's audit lines (``audit_pending``) and the new chain head; the audit lines
are appended to the audit file just before the commit, so readers see them at once. Nothing
waits for the disk there: the commit reaches the operating system only (SQLite
``synchronous=NORMAL``), and a *syncer thread* makes it durable with one ``fdatasync`` of the
WAL file, for every batch committed since its last one. That is the group commit: however many
commands became ready in a turn, and however many turns committed while the previous sync ran,
one sync covers them. Only then does the runner act on the batch: start the driver, send the
statuses, answer the operator.

The guarantee: an action's audit record, and a result, are on disk before the action starts or
the result leaves. The fsyncs left on a command's critical path are exactly the WAL syncs of
the batches that (1) accepted it and made it RUNNING (often the same batch, when it could start
at once), and (2) recorded its outcome: the first must be durable before the driver acts (or a
crash could leave an action with no record of it), the second before the result is sent (or the
control plane could hear of an outcome the agent then forgets). The audit file's own sync
happens after, off the critical path: the store keeps the lines until the file has them on disk.

After a crash the store is the truth: records the file holds past the store's committed head
were written ahead of a commit that never happened (nothing they describe was done) and are cut
off, with an ``audit_tail_repaired`` record saying so; records the store holds past the file's
end (a power failure before the file's sync) are written back. So the audit log and what the
control plane is told always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from agent.core.audit_chain import ChainHead, ChainVerifier, make_record
from agent.core.errors import AuditError, AuditIntegrityError, StateError
from agent.io import failpoints
from agent.io.audit_file import AuditFile, utc_timestamp
from agent.io.store import Store
from agent.io.wal_sync import WalSyncer

Listener = Callable[[str, Mapping[str, object]], None]


class Batch:
    """One batch being built: its records (appended to the chain as they are made) and the
    store, open in the batch's transaction."""

    def __init__(self, journal: Journal, commit: int) -> None:
        self._journal = journal
        self.commit = commit
        self.store = journal.store
        self.lines: list[tuple[int, bytes]] = []
        self.records: list[tuple[str, Mapping[str, object]]] = []
        self._ts: str | None = None

    def record(self, event: str, /, **fields: object) -> ChainHead:
        """Append one record to the chain (written with the batch; the records of one batch
        are made in one instant and carry its time)."""
        journal = self._journal
        if self._ts is None:
            self._ts = utc_timestamp(journal.now())
        line, head = make_record(journal.head, event, fields, ts=self._ts)
        journal.head = head
        self.lines.append((head.seq, line))
        self.records.append((event, fields))
        return head


class Journal:
    """Owns the state store and the audit file, and how they reach the disk together."""

    def __init__(
        self, store: Store, audit: AuditFile, *, now: Callable[[], datetime] | None = None
    ) -> None:
        self.store = store
        self.audit = audit
        self.now = now or (lambda: datetime.now(UTC))
        self.head = ChainHead()
        """The last record made (committed, or in the batch being built)."""
        self.committed = 0
        """The id of the last committed batch (counted from 1 in this run)."""
        self.durable = 0
        """The id of the last batch known to be on disk."""
        self._batch: Batch | None = None
        self._unsynced: deque[tuple[int, list[tuple[str, Mapping[str, object]]]]] = deque()
        self._file_synced = 0
        self._dropped = 0
        self._listeners: list[Listener] = []
        self._on_durable: list[Callable[[int], None]] = []
        self._on_failure: list[Callable[[BaseException], None]] = []
        self._failure: str | None = None
        self._changed = asyncio.Event()
        self._syncer: WalSyncer | None = None
        self.repaired: dict[str, int] = {}
        """What :meth:`open` had to repair (for the ``audit_tail_repaired`` record)."""

    # -- opening: make the file and the store agree ---------------------------------------

    def open(self) -> None:
        """Open the file, reconcile it with the store's committed head, start the syncer. Call
        from the event loop that will use the journal."""
        file_head = self.audit.open()
        if self.audit.torn_bytes:
            self.repaired["discarded_bytes"] = self.audit.torn_bytes
        committed = self.store.audit_head()
        if committed is None:  # a store that never committed a head: the file is the truth
            self.head = file_head
        elif file_head.seq > committed.seq:
            head, removed = self.audit.cut_after(committed.seq)
            if head != committed:
                raise AuditIntegrityError(
                    head.seq, f"the audit log and the state store disagree at seq {head.seq}"
                )
            self.repaired["discarded_records"] = removed
            self.head = head
        else:
            self.head = self._restore(file_head, committed)
        self._syncer = WalSyncer(
            self.store.path,
            asyncio.get_running_loop(),
            durable=self._advance,
            failed=self._latch,
            follow_up=self.audit.sync,
            name="journal-syncer",
        )
        self._syncer.start()

    def _restore(self, file_head: ChainHead, committed: ChainHead) -> ChainHead:
        """Write back the committed records the file lost (a power failure before its sync)."""
        missing = self.store.pending_after(file_head.seq)
        verifier = ChainVerifier(start=file_head)
        for _seq, line in missing:
            verifier.feed(line)
        head = verifier.summary.head
        if head != committed:
            raise AuditIntegrityError(
                head.seq,
                f"the audit log ends at seq {file_head.seq} and the state store cannot give "
                f"back the records up to its committed head (seq {committed.seq})",
            )
        if missing:
            self.audit.write(b"".join(line for _seq, line in missing))
            self.audit.sync()
            self.repaired["restored_records"] = len(missing)
        return head

    # -- batches ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """A batch: one transaction. Nested use joins the open batch. On any failure the
        transaction is rolled back, the file cut back, and the journal *latches*: every later
        batch raises AuditError (nothing may happen unrecorded; the agent stops)."""
        if self._failure is not None:
            raise AuditError(f"the journal failed earlier: {self._failure}")
        if self._batch is not None:
            yield self._batch
            return
        head = self.head
        batch = self._batch = Batch(self, self.committed + 1)
        written = False
        try:
            with self.store.transaction():
                yield batch
                if batch.lines:
                    self.store.add_pending(batch.lines)
                    self.store.set_audit_head(self.head)
                if self._file_synced > self._dropped:
                    self.store.drop_pending(self._file_synced)
                    self._dropped = self._file_synced
                if batch.lines:
                    self.audit.write(b"".join(line for _seq, line in batch.lines))
                    written = True
                    failpoints.reach_batch("written", batch.records)
        except BaseException as exc:
            self.head = head
            if written:
                with contextlib.suppress(AuditError, OSError):
                    self.audit.cut_after(head.seq)
            if isinstance(exc, AuditError | StateError | sqlite3.Error | OSError):
                self._latch(exc)
            raise
        finally:
            self._batch = None
        self.committed = batch.commit
        failpoints.reach_batch("committed", batch.records)
        if batch.records:
            self._unsynced.append((batch.commit, batch.records))
        assert self._syncer is not None  # noqa: S101  # open() started it
        self._syncer.request(batch.commit, self.head.seq)

    def record(self, event: str, /, **fields: object) -> ChainHead:
        """One record in a batch of its own (or in the batch being built)."""
        with self.batch() as batch:
            return batch.record(event, **fields)

    async def wait_durable(self, commit: int) -> None:
        """Until batch ``commit`` is on disk; AuditError if the journal failed."""
        while self.durable < commit:
            if self._failure is not None:
                raise AuditError(f"the journal failed: {self._failure}")
            self._changed.clear()
            await self._changed.wait()

    async def settle(self) -> None:
        """Until everything committed so far is on disk."""
        await self.wait_durable(self.committed)

    # -- notifications (called in the event loop by the syncer) ----------------------------

    def _advance(self, commit: int, file_seq: int | None) -> None:
        if commit > self.durable:
            self.durable = commit
            while self._unsynced and self._unsynced[0][0] <= commit:
                _, records = self._unsynced.popleft()
                for event, fields in records:
                    for listener in self._listeners:
                        listener(event, fields)
            for callback in self._on_durable:
                callback(commit)
        if file_seq is not None:
            self._file_synced = max(self._file_synced, file_seq)
        self._changed.set()

    def _latch(self, exc: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = str(exc) or type(exc).__name__
        self._changed.set()
        for callback in self._on_failure:
            callback(exc)

    # -- subscribers -------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, fields)`` for each record once it is durable, in order."""
        self._listeners.append(listener)

    def on_durable(self, callback: Callable[[int], None]) -> None:
        self._on_durable.append(callback)

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback`` once if the journal latches into its failed state."""
        self._on_failure.append(callback)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Sync what is committed, stop the syncer, checkpoint, close (at a clean stop; also
        after a failure, best effort)."""
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        try:
            if self._failure is None:
                self.audit.sync()
                with self.store.transaction():
                    self.store.drop_pending(self.head.seq)
                self.store.checkpoint()
        finally:
            self.store.close()
            self.audit.close()
