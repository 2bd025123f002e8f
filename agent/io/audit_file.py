"""The audit log file: append-only JSON Lines, hash-chained, each record fsync'd before the action
it describes is taken (the caller awaits nothing between ``append`` returning and acting).

The chain itself is built by :mod:`agent.core.audit_chain`; this module owns the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from agent.core.audit_chain import ChainHead, ChainVerifier, make_record, parse_line, record_hash
from agent.core.errors import AuditError, AuditIntegrityError

_TAIL_CHUNK: Final = 64 * 1024


def utc_timestamp(moment: datetime | None = None) -> str:
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The last line of the file (with its newline, if any) and the offset where it starts."""
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


class AuditLog:
    """An open audit log. Not thread-safe: one writer (the agent's event loop) owns it."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.path = path
        self._clock = clock or (lambda: datetime.now(UTC))
        self._fd: int | None = None
        self._head = ChainHead()
        self._listeners: list[Callable[[str, Mapping[str, object]], None]] = []
        self._on_failure: list[Callable[[OSError], None]] = []
        self._failure: str | None = None

    def add_listener(self, listener: Callable[[str, Mapping[str, object]], None]) -> None:
        """Call ``listener(event, fields)`` after each record is durably written."""
        self._listeners.append(listener)

    @property
    def head(self) -> ChainHead:
        return self._head

    def open(self) -> None:
        """Open (or create) the log and find the chain head. Repairs a torn final line."""
        if self._fd is not None:
            raise AuditError(f"audit log {self.path} is already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        self._fd = fd
        try:
            self._recover_head(fd)
        except BaseException:
            self.close()
            raise

    def _recover_head(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        line, offset = _last_line(fd, size)
        if not line.endswith(b"\n"):
            # A crash interrupted a write: the record was never complete, so the action it
            # described was never taken. Cut it off and say so in the chain.
            os.ftruncate(fd, offset)
            os.fsync(fd)
            torn = line
            self._head = self._read_head(fd, offset)
            self.append("audit_tail_repaired", discarded_bytes=len(torn))
            return
        self._head = self._head_from_line(line)

    def _read_head(self, fd: int, size: int) -> ChainHead:
        if size == 0:
            return ChainHead()
        line, _ = _last_line(fd, size)
        return self._head_from_line(line)

    def _head_from_line(self, line: bytes) -> ChainHead:
        record = parse_line(line.rstrip(b"\n"), 0)
        try:
            valid = record_hash(record) == record["hash"]
        except ValueError:
            valid = False
        if not valid:
            raise AuditIntegrityError(0, f"the last record of {self.path} does not match its hash")
        return ChainHead(int(str(record["seq"])), str(record["hash"]))

    def append(self, event: str, /, **fields: object) -> ChainHead:
        """Write one record and fsync it. Returns the new head.

        A write or fsync that fails cuts the file back to where the record began and *latches*
        the log: every later append raises :class:`AuditError`. Nothing may happen without an
        audit record, so the agent stops (``on_failure``) rather than carry on unaudited; the
        chain on disk stays valid for the next start.
        """
        if self._fd is None:
            raise AuditError("audit log is not open")
        if self._failure is not None:
            raise AuditError(f"audit log {self.path} failed earlier: {self._failure}")
        line, head = make_record(self._head, event, fields, ts=utc_timestamp(self._clock()))
        fd = self._fd
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        except OSError as exc:
            self._latch(fd, start, exc)
            raise AuditError(f"cannot write audit log {self.path}: {exc}") from exc
        self._head = head
        for listener in self._listeners:
            listener(event, fields)
        return head

    def _latch(self, fd: int, start: int, exc: OSError) -> None:
        self._failure = str(exc)
        try:  # best effort: leave no partial record behind (open() repairs it otherwise)
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            pass
        for callback in self._on_failure:
            callback(exc)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def on_failure(self, callback: Callable[[OSError], None]) -> None:
        """Call ``callback`` once if the log latches into its failed state."""
        self._on_failure.append(callback)

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
