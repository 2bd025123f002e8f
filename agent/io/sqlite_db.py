"""SQLite the way this project uses it: WAL, rows by name, explicit ``BEGIN IMMEDIATE``
transactions; commits durable on return (``synchronous=FULL``) unless the caller syncs the WAL
itself (``durable_commits=False``: agent/io/journal.py).

Shared by the agent's state store and the stub control plane's store."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(path: Path, *, mode: int = 0o600, durable_commits: bool = True) -> sqlite3.Connection:
    """Open (creating with ``mode`` if needed) a database in autocommit mode.

    ``durable_commits``: each commit waits for the disk (``synchronous=FULL``). Without it a
    commit only reaches the operating system (``synchronous=NORMAL``: it survives the process
    being killed, not a power loss) and automatic checkpoints are off: the caller makes commits
    durable itself by syncing the WAL file, and checkpoints when it suits it
    (agent/io/journal.py).

    Raises ``sqlite3.Error`` or ``OSError``; callers translate them into their own errors."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, mode))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durable_commits else 'NORMAL'}")
        if not durable_commits:
            db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def transaction(db: sqlite3.Connection, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the body raises.

    ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``; in WAL mode
    the commit survives the process being killed, but a power loss may undo it). Only for
    changes whose loss is harmless by design, e.g. dropping an acknowledged frame from the
    outbox (it would be sent again and the receiver deduplicates)."""
    if not durable:
        db.execute("PRAGMA synchronous=NORMAL")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        if not durable:
            db.execute("PRAGMA synchronous=FULL")
