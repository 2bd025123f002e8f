"""Group commit for SQLite: commits that only reach the operating system
(``synchronous=NORMAL``, agent/io/sqlite_db.py) made durable by one ``fdatasync`` of the WAL
file, in a thread, for every commit since the last sync. Shared by the agent's journal and the
stub control plane's store.

A caller numbers its commits (1, 2, ...) and :meth:`WalSyncer.request` each one with an optional
*mark* (the journal's: the audit seq its file holds once that commit is written). The thread
syncs the WAL, reports ``durable(commit, None)`` to the event loop, then runs ``follow_up`` (the
journal syncs its audit file there, off the critical path) and reports ``durable(commit, mark)``
again. Now and then it copies the WAL into the database (a checkpoint) through a connection of
its own, so that the WAL does not grow without bound.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

CHECKPOINT_BYTES: Final = 4 * 1024 * 1024
"""The WAL is copied into the database once it is this large."""


class WalSyncer(threading.Thread):
    def __init__(
        self,
        database: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        durable: Callable[[int, int | None], None],
        failed: Callable[[BaseException], None],
        follow_up: Callable[[], None] | None = None,
        name: str = "wal-syncer",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._database = database
        self._loop = loop
        self._durable = durable
        self._failed = failed
        self._follow_up = follow_up
        self._wal = os.open(database.with_name(database.name + "-wal"), os.O_RDONLY | os.O_CLOEXEC)
        self._cond = threading.Condition()
        self._target = 0
        self._target_mark = 0
        self._done = 0
        self._stopping = False

    @property
    def wal_fd(self) -> int:
        return self._wal

    def request(self, commit: int, mark: int = 0) -> None:
        with self._cond:
            self._target = max(self._target, commit)
            self._target_mark = max(self._target_mark, mark)
            self._cond.notify()

    def stop(self) -> None:
        """Sync what was requested, then stop (blocking: call at a clean stop)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join()
        os.close(self._wal)

    def run(self) -> None:
        checkpointer: sqlite3.Connection | None = None
        try:
            while True:
                with self._cond:
                    while self._target <= self._done and not self._stopping:
                        self._cond.wait()
                    if self._target <= self._done:
                        return
                    target, mark = self._target, self._target_mark
                os.fdatasync(self._wal)
                self._done = target
                self._loop.call_soon_threadsafe(self._durable, target, None)
                if self._follow_up is not None:
                    self._follow_up()
                    self._loop.call_soon_threadsafe(self._durable, target, mark)
                if os.fstat(self._wal).st_size > CHECKPOINT_BYTES:
                    if checkpointer is None:
                        checkpointer = sqlite3.connect(self._database, isolation_level=None)
                        checkpointer.execute("PRAGMA synchronous=NORMAL")
                    checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except (OSError, sqlite3.Error, Exception) as exc:  # any failure: durability is lost
            self._loop.call_soon_threadsafe(self._failed, exc)
        finally:
            if checkpointer is not None:
                checkpointer.close()
