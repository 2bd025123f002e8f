"""Hash-chained audit records, and their verification. Sans-I/O: bytes in, bytes out.

Record format (one JSON object per line, docs/PROTOCOL.md §9)::

    {"event":"command_received","hash":"…","jti":"…","prev":"…","seq":7,"ts":"2026-11-23T10:00:00.123456Z",…}

- ``seq``   1 for the first record of a log, then +1 for each record;
- ``ts``    UTC time of the event, RFC 3339 with microseconds and a ``Z``;
- ``event`` what happened; the other members describe it;
- ``prev``  the ``hash`` of the previous record (64 zeros for the first);
- ``hash``  SHA-256, lowercase hex, of the record's canonical form *without* ``hash``.

Canonical form: JSON with keys sorted, no insignificant whitespace, ASCII only (``\\uXXXX``
escapes), UTF-8 bytes. Values are strings, integers, booleans, null, arrays and objects: floats are
refused so that every language serialises a record to the same bytes. A line is the canonical form
of the whole record (with ``hash``) followed by ``\\n``.

Verification recomputes every record's ``hash`` (an edited record fails on itself), checks each
``prev`` against the previous record's ``hash`` and each ``seq`` against its position (a deleted,
inserted or reordered record fails at the first record out of place).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from agent.core.errors import AuditError, AuditIntegrityError

GENESIS: Final = "0" * 64
RESERVED: Final = frozenset({"seq", "ts", "event", "prev", "hash"})


@dataclass(frozen=True)
class ChainHead:
    """Where the chain ends: the last record's ``seq`` and ``hash`` (0 and GENESIS when empty)."""

    seq: int = 0
    hash: str = GENESIS


_PLAIN: Final = frozenset({str, int, bool, type(None)})
"""Types of a value that needs no further look (most fields: checked without a call)."""


def _check_values(value: object, path: str) -> None:
    if isinstance(value, float):
        raise AuditError(f"audit field {path} is a float; use an integer or a string")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"audit field {path} has a non-string key")
            if type(item) not in _PLAIN:
                _check_values(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if type(item) not in _PLAIN:
                _check_values(item, f"{path}[{index}]")
    elif not (value is None or isinstance(value, str | int | bool)):
        raise AuditError(f"audit field {path} has unsupported type {type(value).__name__}")


def canonical(record: Mapping[str, object]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def record_hash(record: Mapping[str, object]) -> str:
    """SHA-256 of the canonical form of ``record`` without its ``hash`` member."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def make_record(
    head: ChainHead, event: str, fields: Mapping[str, object], *, ts: str
) -> tuple[bytes, ChainHead]:
    """Build the line that follows ``head``. Returns the line (with ``\\n``) and the new head."""
    clash = RESERVED.intersection(fields)
    if clash:
        raise AuditError(f"audit fields may not use reserved names {sorted(clash)}")
    _check_values(fields if isinstance(fields, dict) else dict(fields), "record")
    record: dict[str, object] = {
        **fields,
        "seq": head.seq + 1,
        "ts": ts,
        "event": event,
        "prev": head.hash,
    }
    digest = record_hash(record)
    record["hash"] = digest
    return canonical(record) + b"\n", ChainHead(head.seq + 1, digest)


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not allowed in an audit record")


def parse_line(line: bytes, line_no: int) -> dict[str, object]:
    """Parse one line of a log and check that it is a record; raise naming the line."""
    try:
        record = json.loads(line, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AuditIntegrityError(line_no, "not a JSON record") from exc
    if not isinstance(record, dict):
        raise AuditIntegrityError(line_no, "not a JSON object")
    for key, kind in (("seq", int), ("ts", str), ("event", str), ("prev", str), ("hash", str)):
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise AuditIntegrityError(line_no, f"missing or mistyped member {key!r}")
    return record


@dataclass
class AuditSummary:
    records: int = 0
    head: ChainHead = field(default_factory=ChainHead)
    first_ts: str | None = None
    last_ts: str | None = None
    events: Counter[str] = field(default_factory=Counter)


class ChainVerifier:
    """Feed it the lines of a log in order; it raises at the first bad record.

    ``anchors`` are chain heads kept elsewhere (by the control plane): ``{seq: hash}``. A record
    with an anchored ``seq`` must have that hash (else the log was rewritten from there on), and
    :meth:`finish` checks that the log reaches every anchor (else records were cut off the end).
    """

    def __init__(
        self, start: ChainHead | None = None, anchors: Mapping[int, str] | None = None
    ) -> None:
        self.summary = AuditSummary(head=start or ChainHead())
        self._line = 0
        self._anchors = dict(anchors or {})

    def feed(self, line: bytes) -> None:
        self._line += 1
        if not line.endswith(b"\n"):
            raise AuditIntegrityError(self._line, "truncated record (no end of line)")
        record = parse_line(line[:-1], self._line)
        head = self.summary.head
        try:
            digest = record_hash(record)
        except ValueError as exc:  # e.g. 1e400: valid JSON, but never written by an agent
            raise AuditIntegrityError(self._line, f"record holds an invalid value: {exc}") from exc
        try:
            _check_values(record, "record")
        except AuditError as exc:  # agents never write floats; one here was put there by hand
            raise AuditIntegrityError(self._line, str(exc)) from exc
        if digest != record["hash"]:
            raise AuditIntegrityError(
                self._line, f"record seq={record['seq']} does not match its hash (edited)"
            )
        if record["seq"] != head.seq + 1:
            raise AuditIntegrityError(
                self._line,
                f"expected seq {head.seq + 1}, found {record['seq']} "
                "(a record was deleted, inserted or reordered)",
            )
        if record["prev"] != head.hash:
            raise AuditIntegrityError(
                self._line,
                f"record seq={record['seq']} does not chain to the record before it "
                "(a record was deleted, inserted or reordered)",
            )
        if canonical(record) + b"\n" != line:
            raise AuditIntegrityError(self._line, "record is not in canonical form (edited)")
        anchored = self._anchors.get(int(str(record["seq"])))
        if anchored is not None and anchored != record["hash"]:
            raise AuditIntegrityError(
                self._line,
                f"record seq={record['seq']} differs from the anchor the control plane holds "
                "(the log was rewritten from here on)",
            )
        summary = self.summary
        summary.records += 1
        summary.head = ChainHead(int(str(record["seq"])), str(record["hash"]))
        summary.first_ts = summary.first_ts or str(record["ts"])
        summary.last_ts = str(record["ts"])
        summary.events[str(record["event"])] += 1

    def finish(self) -> AuditSummary:
        """Call after the last line: every anchor must have been reached."""
        beyond = [seq for seq in self._anchors if seq > self.summary.head.seq]
        if beyond:
            raise AuditIntegrityError(
                self._line + 1,
                f"the log ends at seq {self.summary.head.seq} but the control plane holds an "
                f"anchor for seq {max(beyond)} (records were removed from the end)",
            )
        return self.summary


def verify_lines(
    lines: Iterable[bytes],
    start: ChainHead | None = None,
    anchors: Mapping[int, str] | None = None,
) -> AuditSummary:
    verifier = ChainVerifier(start, anchors)
    for line in lines:
        verifier.feed(line)
    return verifier.finish()
