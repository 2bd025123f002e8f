"""Reading an audit log as a person does (``byoc-agent audit show``): every line checked
against the hash chain as it is read, a break marked where it is and reading carried on after
it, records filtered by jti, event and time, shown as a table or as JSON lines. Sans-I/O: lines
and times in, entries and text out (the file and the clock are the caller's).

Verification is :class:`agent.core.audit_chain.ChainVerifier`'s, record by record. Where it
fails, :class:`ChainWalk` says why, then goes on from the record found there (when it is a
record at all), so that each later break is found too, not just the first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from agent.core.audit_chain import ChainHead, ChainVerifier, parse_line
from agent.core.errors import AuditIntegrityError

_FIRST: Final = (
    "ref",
    "command_type",
    "type",
    "params",
    "outcome",
    "state",
    "verdict",
    "reason",
    "detail",
    "by",
    "note",
)
"""Details shown first, in this order: what a person reads a record for."""
_LAST: Final = (
    "alg",
    "kid",
    "iss",
    "exp",
    "token_sha256",
    "policy_sha256",
    "peer_cert_sha256",
    "cipher",
)
"""Details shown last (a narrow terminal cuts them first): hashes and identifiers."""
_HIDDEN: Final = frozenset({"seq", "ts", "event", "prev", "hash"})
_RELATIVE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Entry:
    """One line of the log, as read."""

    line: int
    """1-based line number in the file."""
    record: Mapping[str, object] | None
    """The record (None: the line is not a record at all)."""
    broken: str | None = None
    """Why the chain breaks at this line; None when the line verified."""


class ChainWalk:
    """Feed it the log's lines in order (each with its newline); it returns each as an
    :class:`Entry`, verified against the chain, and never stops at a break."""

    def __init__(self) -> None:
        self._verifier = ChainVerifier()
        self.line = 0
        self.breaks: list[Entry] = []
        self.records = 0
        self.head = ChainHead()

    def feed(self, line: bytes) -> Entry:
        self.line += 1
        try:
            self._verifier.feed(line)
        except AuditIntegrityError as exc:
            record = _record_or_none(line, self.line)
            entry = Entry(self.line, record, exc.reason)
            self.breaks.append(entry)
            if record is not None:  # carry on from this record, to find later breaks too
                self.records += 1
                self.head = ChainHead(int(str(record["seq"])), str(record["hash"]))
            self._verifier = ChainVerifier(self.head)
            return entry
        self.records += 1
        self.head = self._verifier.summary.head
        return Entry(self.line, parse_line(line.rstrip(b"\n"), self.line))

    @property
    def intact(self) -> bool:
        return not self.breaks


def _record_or_none(line: bytes, number: int) -> Mapping[str, object] | None:
    try:
        return parse_line(line.rstrip(b"\n"), number)
    except AuditIntegrityError:
        return None


def record_time(record: Mapping[str, object]) -> datetime | None:
    """The record's ``ts`` as an aware UTC datetime (None if it is not a valid time)."""
    try:
        moment = datetime.fromisoformat(str(record.get("ts", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_moment(text: str, *, now: datetime) -> datetime:
    """``--since`` / ``--until``: an ISO 8601 time (UTC when it has no offset; a date alone is
    its midnight) or a duration back from ``now``: ``90s``, ``15m``, ``2h``, ``1d``. Raises
    ``ValueError`` with a sentence a person can act on."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNITS[relative.group(2)])
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-23T10:00:00Z, 2026-11-23) nor a duration "
            "back from now (90s, 15m, 2h, 1d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class AuditFilter:
    """Which records to show. A record matches when it names ``jti`` (as its ``jti`` or
    ``ref``), is one of ``events``, and was written in ``[since, until]``; an unset criterion
    matches everything. A line that is not a record is shown whatever the filter says."""

    jti: str | None = None
    events: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: Entry) -> bool:
        record = entry.record
        if record is None:
            return True
        if self.jti is not None and self.jti not in (record.get("jti"), record.get("ref")):
            return False
        if self.events and record.get("event") not in self.events:
            return False
        if self.since is not None or self.until is not None:
            moment = record_time(record)
            if moment is None:
                return True  # an unreadable time is shown rather than hidden
            if self.since is not None and moment < self.since:
                return False
            if self.until is not None and moment > self.until:
                return False
        return True


# -- rendering ---------------------------------------------------------------------------------

TABLE_HEADER: Final = f"{'SEQ':>6}  {'TIME (UTC)':<23}  {'EVENT':<26}  {'JTI':<32}  DETAILS"


def _value(value: object) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and len(value) <= 80 else json.dumps(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def details(record: Mapping[str, object]) -> str:
    """The record's other members as ``key=value``, the most telling first; members that say
    nothing (null, a ``ref`` equal to the ``jti``) are left out of the table (not of JSON)."""
    placed = {*_FIRST, *_LAST, *_HIDDEN, "jti"}
    keys = [key for key in _FIRST if key in record]
    keys += sorted(key for key in record if key not in placed)
    keys += [key for key in _LAST if key in record]
    keys = [
        key
        for key in keys
        if record[key] is not None and not (key == "ref" and record[key] == record.get("jti"))
    ]
    return " ".join(f"{key}={_value(record[key])}" for key in keys)


def table_row(entry: Entry, *, width: int = 0) -> str:
    """One line of the table (cut to ``width`` characters if it is not 0)."""
    record = entry.record
    if record is None:
        row = f"{'?':>6}  {'':<23}  {'(not a record)':<26}  {'':<32}  line {entry.line}"
    else:
        moment = record_time(record)
        shown = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment else str(record["ts"])
        jti = str(record.get("jti") or "")
        row = (
            f"{record['seq']!s:>6}  {shown:<23}  {record['event']!s:<26}  {jti:<32}  "
            f"{details(record)}"
        ).rstrip()
    if width and len(row) > width:
        row = row[: max(width - 1, 0)] + "…"
    return row


def break_line(entry: Entry) -> str:
    """The mark put right before a line where the chain breaks."""
    return f"!! chain broken at line {entry.line}: {entry.broken}"


def break_json(entry: Entry) -> dict[str, object]:
    """The same mark as a JSON line (records themselves are printed unchanged)."""
    seq = entry.record.get("seq") if entry.record is not None else None
    return {"audit_chain_break": {"line": entry.line, "seq": seq, "reason": entry.broken}}


def summary_line(walk: ChainWalk, shown: int) -> str:
    """The last line of a table: how much was read and shown, and whether the chain holds."""
    read = f"{walk.records} records read, {shown} shown"
    if walk.intact:
        if walk.records == 0:
            return f"-- {read}"
        return f"-- {read}; chain verified, seq 1..{walk.head.seq}, head {walk.head.hash[:16]}…"
    lines = ", ".join(str(entry.line) for entry in walk.breaks[:10])
    more = ", …" if len(walk.breaks) > 10 else ""
    return f"-- {read}; chain BROKEN at {len(walk.breaks)} place(s): line {lines}{more}"


def render_json(record: Mapping[str, object]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


__all__ = [
    "TABLE_HEADER",
    "AuditFilter",
    "ChainWalk",
    "Entry",
    "break_json",
    "break_line",
    "details",
    "parse_moment",
    "record_time",
    "render_json",
    "summary_line",
    "table_row",
]
