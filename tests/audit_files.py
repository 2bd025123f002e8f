"""Audit log files for tests that only need one on disk (the CLI's verify, anchors): records
chained with the agent's own sans-I/O code (agent/core/audit_chain.py), appended to a file."""

from __future__ import annotations

from pathlib import Path

from agent.core.audit_chain import ChainHead, make_record
from agent.io.audit_file import utc_timestamp


class LogWriter:
    """Appends chained records to ``path`` (continuing the chain already there)."""

    def __init__(self, path: Path, head: ChainHead | None = None) -> None:
        self.path = path
        self.head = head or ChainHead()

    def append(self, event: str, /, **fields: object) -> ChainHead:
        line, self.head = make_record(self.head, event, fields, ts=utc_timestamp())
        with self.path.open("ab") as handle:
            handle.write(line)
        return self.head
