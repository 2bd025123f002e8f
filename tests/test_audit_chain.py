"""Tests of the hash-chained audit records (agent.core.audit_chain) and the log file (audit_log)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.core.audit_chain import (
    GENESIS,
    RESERVED,
    ChainHead,
    ChainVerifier,
    canonical,
    make_record,
    record_hash,
    verify_lines,
)
from agent.core.errors import AuditError, AuditIntegrityError
from agent.io.audit_file import utc_timestamp, verify_file
from tests.audit_files import LogWriter

TS = "2026-11-23T10:00:00.123456Z"


def build_chain(count: int) -> tuple[list[bytes], list[ChainHead]]:
    lines: list[bytes] = []
    heads: list[ChainHead] = []
    head = ChainHead()
    for index in range(count):
        line, head = make_record(head, "command_received", {"jti": f"j-{index}", "n": index}, ts=TS)
        lines.append(line)
        heads.append(head)
    return lines, heads


def integrity_error(lines: list[bytes]) -> AuditIntegrityError:
    with pytest.raises(AuditIntegrityError) as info:
        verify_lines(lines)
    return info.value


def reseal(record: dict[str, object]) -> bytes:
    """A record with a correct own hash, in canonical form (what a careful forger writes)."""
    record = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = record_hash(record)
    return canonical(record) + b"\n"


# -- records --------------------------------------------------------------------------------------


def test_first_record() -> None:
    line, head = make_record(ChainHead(), "agent_started", {"version": "0.1.0"}, ts=TS)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    record = json.loads(line)
    assert record["seq"] == 1
    assert record["prev"] == GENESIS == "0" * 64
    assert record["event"] == "agent_started"
    assert record["ts"] == TS
    assert record["version"] == "0.1.0"
    body = {k: v for k, v in record.items() if k != "hash"}
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()
    assert record["hash"] == expected
    assert head == ChainHead(1, expected)


def test_records_chain() -> None:
    lines, heads = build_chain(3)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[1]["prev"] == records[0]["hash"] == heads[0].hash
    assert records[2]["prev"] == records[1]["hash"]
    assert heads[-1] == ChainHead(3, records[2]["hash"])


def test_canonical_form_sorted_compact_ascii() -> None:
    line, _ = make_record(
        ChainHead(), "note", {"zeta": "é☃", "alpha": [1, {"b": 2, "a": None}]}, ts=TS
    )
    text = line.decode("ascii")
    assert " " not in text
    assert "\\u00e9\\u2603" in text
    keys = list(json.loads(line))
    assert keys == sorted(keys)
    assert '"alpha":[1,{"a":null,"b":2}]' in text
    assert canonical({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'


def test_record_hash_ignores_hash_member() -> None:
    body = {"seq": 1, "event": "x"}
    assert record_hash(body) == record_hash({**body, "hash": "anything"})
    assert record_hash(body) == hashlib.sha256(b'{"event":"x","seq":1}').hexdigest()


@pytest.mark.parametrize(
    "fields",
    [
        {"ratio": 0.5},
        {"nested": {"ratio": 1.0}},
        {"items": [1, 2.5]},
        {"nan": float("nan")},
    ],
)
def test_floats_refused(fields: dict[str, object]) -> None:
    with pytest.raises(AuditError, match="float"):
        make_record(ChainHead(), "x", fields, ts=TS)


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object(), datetime(2026, 1, 1, tzinfo=UTC)])
def test_unsupported_types_refused(value: object) -> None:
    with pytest.raises(AuditError, match="unsupported type"):
        make_record(ChainHead(), "x", {"v": value}, ts=TS)


def test_non_string_key_refused() -> None:
    with pytest.raises(AuditError, match="non-string key"):
        make_record(ChainHead(), "x", {"v": {1: "a"}}, ts=TS)


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_names_refused(name: str) -> None:
    with pytest.raises(AuditError, match="reserved") as info:
        make_record(ChainHead(), "x", {name: "forged"}, ts=TS)
    assert not isinstance(info.value, AuditIntegrityError)


def test_allowed_value_types() -> None:
    line, _ = make_record(
        ChainHead(),
        "x",
        {"s": "a", "i": -(2**70), "b": True, "n": None, "l": [1, "a"], "t": ("x",), "d": {}},
        ts=TS,
    )
    assert verify_lines([line]).records == 1


# -- verification ---------------------------------------------------------------------------------


def test_verify_valid_chain() -> None:
    lines, heads = build_chain(5)
    summary = verify_lines(lines)
    assert summary.records == 5
    assert summary.head == heads[-1]
    assert summary.first_ts == summary.last_ts == TS
    assert summary.events == {"command_received": 5}


def test_verify_empty() -> None:
    summary = verify_lines([])
    assert summary.records == 0
    assert summary.head == ChainHead(0, GENESIS)


def test_verify_continues_from_a_start_head() -> None:
    lines, heads = build_chain(5)
    summary = verify_lines(lines[2:], start=heads[1])
    assert summary.records == 3
    assert summary.head == heads[-1]
    with pytest.raises(AuditIntegrityError) as info:
        verify_lines(lines[2:])
    assert info.value.line == 1


@pytest.mark.parametrize("target", [1, 3, 5])
def test_edited_value_reported_on_its_own_line(target: int) -> None:
    lines, _ = build_chain(5)
    index = target - 1
    lines[index] = lines[index].replace(f'"n":{index}'.encode(), f'"n":{index + 100}'.encode())
    error = integrity_error(lines)
    assert error.line == target
    assert "edited" in error.reason


def test_edited_event_name_reported_on_its_own_line() -> None:
    lines, _ = build_chain(4)
    lines[2] = lines[2].replace(b"command_received", b"command_rejected")
    assert integrity_error(lines).line == 3


def test_edited_and_resealed_record_breaks_the_next_line() -> None:
    lines, _ = build_chain(4)
    record = json.loads(lines[1])
    record["n"] = 999
    lines[1] = reseal(record)
    error = integrity_error(lines)
    assert error.line == 3
    assert "does not chain" in error.reason


def test_deleted_middle_record() -> None:
    lines, _ = build_chain(5)
    del lines[2]
    error = integrity_error(lines)
    assert error.line == 3
    assert "expected seq 3, found 4" in error.reason


def test_deleted_first_record() -> None:
    lines, _ = build_chain(5)
    del lines[0]
    error = integrity_error(lines)
    assert error.line == 1
    assert "expected seq 1, found 2" in error.reason


def test_deleted_last_record_is_not_detectable_without_a_head() -> None:
    lines, heads = build_chain(5)
    # Verification alone cannot see truncation at a record boundary: the head is what tells.
    assert verify_lines(lines[:-1]).head == heads[-2]
    assert verify_lines(lines[:-1]).head != heads[-1]


def test_inserted_record_with_wrong_seq_reported_on_its_line() -> None:
    lines, _ = build_chain(5)
    forged = reseal({"seq": 9, "ts": TS, "event": "forged", "prev": GENESIS})
    lines.insert(2, forged)
    error = integrity_error(lines)
    assert error.line == 3
    assert "expected seq 3, found 9" in error.reason


def test_inserted_record_chained_to_its_predecessor() -> None:
    lines, heads = build_chain(5)
    # A well-formed record with a correct own hash that even chains to record 2 and has the
    # seq of its position: the first record out of place is the original record 3 after it.
    forged, _ = make_record(heads[1], "forged", {"jti": "evil"}, ts=TS)
    lines.insert(2, forged)
    error = integrity_error(lines)
    assert error.line == 4
    assert "expected seq 4, found 3" in error.reason


def test_inserted_record_duplicating_seq_but_wrong_prev() -> None:
    lines, _ = build_chain(5)
    forged = reseal({"seq": 3, "ts": TS, "event": "forged", "prev": GENESIS})
    lines.insert(2, forged)
    error = integrity_error(lines)
    assert error.line == 3
    assert "does not chain" in error.reason


def test_swapped_records() -> None:
    lines, _ = build_chain(5)
    lines[1], lines[2] = lines[2], lines[1]
    error = integrity_error(lines)
    assert error.line == 2
    assert "expected seq 2, found 3" in error.reason


def test_duplicated_record() -> None:
    lines, _ = build_chain(4)
    lines.insert(2, lines[1])
    assert integrity_error(lines).line == 3


def test_truncated_last_line() -> None:
    lines, _ = build_chain(4)
    lines[-1] = lines[-1][:-1]
    error = integrity_error(lines)
    assert error.line == 4
    assert "truncated" in error.reason


def test_half_written_last_line() -> None:
    lines, _ = build_chain(4)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    assert integrity_error(lines).line == 4


@pytest.mark.parametrize(
    "mutate",
    [
        lambda line: line.replace(b'","', b'", "', 1),
        lambda line: line.replace(b":", b": ", 1),
        lambda line: b" " + line,
        lambda line: line[:-1] + b" \n",
        lambda line: line[:-1] + b"\r\n",
        lambda line: line.replace(b'"event"', b'"\\u0065vent"'),
    ],
    ids=["space-after-comma", "space-after-colon", "leading", "trailing", "crlf", "escape"],
)
def test_non_canonical_form(mutate: Callable[[bytes], bytes]) -> None:
    lines, _ = build_chain(3)
    lines[1] = mutate(lines[1])
    error = integrity_error(lines)
    assert error.line == 2
    assert "canonical" in error.reason


def test_reordered_keys_are_not_canonical() -> None:
    lines, _ = build_chain(3)
    record = json.loads(lines[1])
    reordered = json.dumps(dict(reversed(list(record.items()))), separators=(",", ":"))
    lines[1] = reordered.encode() + b"\n"
    error = integrity_error(lines)
    assert error.line == 2
    assert "canonical" in error.reason


@pytest.mark.parametrize(
    "garbage",
    [b"\n", b"not json\n", b"[]\n", b"\xff\xfe\n", b'{"seq":true}\n', b'{"seq":2}\n'],
)
def test_garbage_line(garbage: bytes) -> None:
    lines, _ = build_chain(3)
    lines.insert(1, garbage)
    assert integrity_error(lines).line == 2


@pytest.mark.parametrize("member", ["seq", "ts", "event", "prev", "hash"])
def test_missing_member(member: str) -> None:
    lines, _ = build_chain(2)
    record = json.loads(lines[1])
    del record[member]
    lines[1] = canonical(record) + b"\n"
    error = integrity_error(lines)
    assert error.line == 2
    assert repr(member) in error.reason


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"1e400"])
def test_non_finite_number_reported_as_integrity_error(literal: bytes) -> None:
    lines, _ = build_chain(3)
    lines[1] = lines[1].replace(b'"n":1', b'"n":' + literal)
    assert literal in lines[1]
    error = integrity_error(lines)
    assert error.line == 2


def test_deeply_nested_line_reported_as_integrity_error() -> None:
    lines, _ = build_chain(2)
    lines.insert(1, b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert integrity_error(lines).line == 2


def test_chain_verifier_incremental() -> None:
    lines, heads = build_chain(3)
    verifier = ChainVerifier()
    for line, head in zip(lines, heads, strict=True):
        verifier.feed(line)
        assert verifier.summary.head == head
    with pytest.raises(AuditIntegrityError) as info:
        verifier.feed(lines[0])
    assert info.value.line == 4


# -- the log file ---------------------------------------------------------------------------------


def test_verify_file_reports_edited_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = LogWriter(path)
    for index in range(4):
        log.append("e", n=index)
    path.write_bytes(path.read_bytes().replace(b'"n":2', b'"n":7'))
    with pytest.raises(AuditIntegrityError) as info:
        verify_file(path)
    assert info.value.line == 3


def test_verify_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read"):
        verify_file(tmp_path / "missing.jsonl")


def test_utc_timestamp() -> None:
    moment = datetime(2026, 11, 23, 11, 0, 0, 5, tzinfo=UTC)
    assert utc_timestamp(moment) == "2026-11-23T11:00:00.000005Z"
    plus_two = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert utc_timestamp(plus_two) == "2026-11-23T10:00:00.000000Z"


def test_a_float_in_a_rehashed_record_is_an_integrity_error() -> None:
    """Agents never write floats; a record holding one was edited, even if re-hashed."""
    lines, _ = build_chain(2)
    record = json.loads(lines[1])
    record["n"] = 1.5
    del record["hash"]
    record["hash"] = record_hash(record)
    lines[1] = canonical(record) + b"\n"
    error = integrity_error(lines)
    assert error.line == 2
    assert "float" in error.reason
