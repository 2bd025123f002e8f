"""The audit log file: append-only JSON Lines, hash-chained (the chain is built by
:mod:`agent.core.audit_chain`; this module owns the file).

Lines are appended as their batch commits (agent/io/journal.py): readers (``tail -f``,
``byoc-agent audit``) see them at once, and the file is synced to disk off the critical path,
because the state store holds each batch's lines until then. At open, what a crash left after
the last *committed* record is cut off (those records were never committed, so nothing they
describe was done), and what the file lost in a power failure is written back from the store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from agent.core.audit_chain import ChainHead, ChainVerifier, parse_line, record_hash
from agent.core.errors import AuditError, AuditIntegrityError

_TAIL_CHUNK: Final = 64 * 1024


def utc_timestamp(moment: datetime | None = None) -> str:
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The last line of the first ``size`` bytes (with its newline, if any) and its offset."""
    end = size
    buffer = b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        buffer = chunk + buffer
        # Look for the newline that ends the line before the last one.
        search_to = len(buffer) - 1 if buffer.endswith(b"\n") else len(buffer)
        cut = buffer.rfind(b"\n", 0, search_to)
        if cut >= 0:
            return buffer[cut + 1 :], size - len(buffer) + cut + 1
        end = start
    return buffer, 0


class AuditFile:
    """The open audit log file. One writer: the agent's event loop; :meth:`sync` may run in
    another thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.torn_bytes = 0
        """Bytes of an incomplete last line cut off at open (a crash in the middle of a write)."""

    def open(self) -> ChainHead:
        """Open (or create) the file, cut off a torn last line, and return the chain's head."""
        if self._fd is not None:
            raise AuditError(f"audit log {self.path} is already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        self._fd = fd
        try:
            size = os.fstat(fd).st_size
            line, offset = _last_line(fd, size) if size else (b"", 0)
            if size and not line.endswith(b"\n"):
                os.ftruncate(fd, offset)
                self.torn_bytes = len(line)
            return self._head_before(os.fstat(fd).st_size)
        except OSError as exc:
            self.close()
            raise AuditError(f"cannot read audit log {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise AuditError("audit log is not open")
        return self._fd

    def _head_before(self, size: int) -> ChainHead:
        if size == 0:
            return ChainHead()
        line, _ = _last_line(self.fd, size)
        return self._head_of(line)

    def _head_of(self, line: bytes) -> ChainHead:
        record = parse_line(line.rstrip(b"\n"), 0)
        try:
            valid = record_hash(record) == record["hash"]
        except ValueError:
            valid = False
        if not valid:
            raise AuditIntegrityError(0, f"the last record of {self.path} does not match its hash")
        return ChainHead(int(str(record["seq"])), str(record["hash"]))

    def cut_after(self, seq: int) -> tuple[ChainHead, int]:
        """Remove every record after ``seq`` (they were written ahead of a commit that never
        happened); return the new head and how many records went."""
        fd = self.fd
        size = os.fstat(fd).st_size
        removed = 0
        while size:
            line, offset = _last_line(fd, size)
            head = self._head_of(line)
            if head.seq <= seq:
                break
            size, removed = offset, removed + 1
        os.ftruncate(fd, size)
        os.fsync(fd)
        return self._head_before(size), removed

    def write(self, lines: bytes) -> None:
        """Append complete lines (not yet synced). A failed or short write cuts the file back
        to where it was and raises AuditError."""
        fd = self.fd
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, lines)
            if written != len(lines):
                raise OSError(f"short write ({written} of {len(lines)} bytes)")
        except OSError as exc:
            # Best effort: leave no partial record behind (open() cuts it otherwise).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise AuditError(f"cannot write audit log {self.path}: {exc}") from exc

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise AuditError(f"cannot sync audit log {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def iter_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def verify_file(path: Path, anchors: Mapping[int, str] | None = None) -> ChainVerifier:
    """Verify a whole log file (against ``anchors``, ``{seq: hash}``, if given); raises
    :class:`AuditIntegrityError` at the first bad record."""
    verifier = ChainVerifier(anchors=anchors)
    try:
        for line in iter_lines(path):
            verifier.feed(line)
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc}") from exc
    verifier.finish()
    return verifier
