"""``byoc-agent audit show`` / ``audit tail``: the audit log for people (a table) and programs
(JSON lines), filtered by jti, event and time, verified as it is read, with every break marked
where it is (and reading carried on), and followed as the agent writes (``-f``).

Logs are built with the chain's own :func:`agent.core.audit_chain.make_record` (the bytes the
agent writes), then damaged the ways the threat model lists: a record edited, one deleted, a
line that is not a record.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.cli import main as agent_cli
from agent.core.audit_chain import ChainHead, make_record
from agent.core.audit_view import AuditFilter, ChainWalk, Entry, parse_moment, table_row
from tests.conftest import scaled
from tests.processes import REPO

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
JTI = "4756bd2c1543474cadd0b63542934285"


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def records(head: ChainHead | None = None, start: int = 0, count: int = 8) -> list[bytes]:
    """A short, plausible log: a connection, then one command's life."""
    events: list[tuple[str, dict[str, object]]] = [
        ("agent_started", {"agent_id": "agent-1", "version": "0.1.0"}),
        ("connection_up", {"url": "wss://cp.example.com/v1/agent", "tls_version": "TLSv1.3"}),
        ("command_received", {"jti": JTI, "ref": JTI, "command_type": "scale"}),
        ("policy_decision", {"jti": JTI, "verdict": "allow", "reason": "scale is within"}),
        ("execution_started", {"jti": JTI, "params": {"replicas": 3}}),
        ("execution_finished", {"jti": JTI, "outcome": "succeeded", "reason": None}),
        ("result_delivered", {"jti": JTI, "state": "succeeded"}),
        ("command_received", {"jti": "other", "ref": "other", "command_type": "upgrade"}),
    ]
    lines = []
    head = head or ChainHead()
    for index in range(start, start + count):
        event, fields = events[index % len(events)]
        line, head = make_record(head, event, fields, ts=ts(index * 60))
        lines.append(line)
    return lines


def walk(lines: list[bytes]) -> tuple[ChainWalk, list[Entry]]:
    chain = ChainWalk()
    return chain, [chain.feed(line) for line in lines]


def test_an_intact_log_verifies_line_by_line() -> None:
    chain, entries = walk(records())
    assert chain.intact
    assert chain.records == 8
    assert chain.head.seq == 8
    assert [e.broken for e in entries] == [None] * 8


def test_every_break_is_marked_where_it_is_and_reading_goes_on() -> None:
    lines = records()
    edited = lines[2].replace(b'"scale"', b'"upgrade"')  # the hash no longer matches
    damaged = [lines[0], lines[1], edited, lines[3], lines[5], lines[6], b"not json\n", lines[7]]
    chain, entries = walk(damaged)
    assert [(e.line, e.broken) for e in chain.breaks] == [
        (3, "record seq=3 does not match its hash (edited)"),
        (5, "expected seq 5, found 6 (a record was deleted, inserted or reordered)"),
        (7, "not a JSON record"),
    ]
    assert entries[2].record is not None  # an edited record is still shown, marked
    assert entries[6].record is None
    assert [e.broken is None for e in entries] == [
        True,
        True,
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    assert chain.records == 7  # every record, broken or not; the garbage line is none


def test_a_torn_last_line_is_a_break() -> None:
    lines = records(count=3)
    chain, _ = walk([*lines[:2], lines[2][:-10]])
    assert [(e.line, e.broken) for e in chain.breaks] == [(3, "truncated record (no end of line)")]


def test_filters() -> None:
    _, entries = walk(records())

    def kept(wanted: AuditFilter) -> list[int]:
        return [int(str(e.record["seq"])) for e in entries if e.record and wanted.matches(e)]

    assert kept(AuditFilter(jti=JTI)) == [3, 4, 5, 6, 7]
    assert kept(AuditFilter(events=frozenset({"command_received"}))) == [3, 8]
    assert kept(AuditFilter(since=T0 + timedelta(minutes=5))) == [6, 7, 8]
    assert kept(AuditFilter(until=T0 + timedelta(minutes=1))) == [1, 2]
    both = AuditFilter(jti=JTI, events=frozenset({"result_delivered", "agent_started"}))
    assert kept(both) == [7]
    assert AuditFilter(jti=JTI).matches(Entry(9, None, "not a JSON record"))  # always shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23T10:00:00Z", T0),
        ("2026-11-23T11:00:00+01:00", T0),
        ("2026-11-23 10:00", T0),
        ("2026-11-23", T0 - timedelta(hours=10)),
        ("90s", T0 - timedelta(seconds=90)),
        ("15m", T0 - timedelta(minutes=15)),
        ("2h", T0 - timedelta(hours=2)),
        ("1.5d", T0 - timedelta(hours=36)),
    ],
)
def test_times_absolute_or_back_from_now(text: str, expected: datetime) -> None:
    assert parse_moment(text, now=T0) == expected


def test_a_time_that_is_neither_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"neither a time .* nor a duration back from now"):
        parse_moment("yesterday", now=T0)


def test_a_table_row_is_one_readable_line() -> None:
    _, entries = walk(records())
    row = table_row(entries[5])
    assert row == (
        f"     6  2026-11-23 10:05:00.000  execution_finished          {JTI}  outcome=succeeded"
    )
    assert len(table_row(entries[3], width=60)) == 60
    assert table_row(entries[3], width=60).endswith("…")


# -- the command ------------------------------------------------------------------------------


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(records()))
    return path


def test_show_a_commands_records(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_cli(["audit", "show", str(log), "--jti", JTI, "--event", "command_received"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEQ", "TIME", "(UTC)", "EVENT", "JTI", "DETAILS"]
    assert out[1].split()[:4] == ["3", "2026-11-23", "10:02:00.000", "command_received"]
    assert len(out) == 3
    assert out[2].startswith("-- 8 records read, 1 shown; chain verified, seq 1..8, head ")


def test_show_marks_a_break_and_fails(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = log.read_bytes().splitlines(keepends=True)
    del lines[4]
    log.write_bytes(b"".join(lines))
    assert agent_cli(["audit", "show", str(log), "--event", "execution_finished"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (
        "!! chain broken at line 5: expected seq 5, found 6 (a record was deleted, inserted "
        "or reordered)"
    )
    assert out[2].split()[:4] == ["6", "2026-11-23", "10:05:00.000", "execution_finished"]
    assert out[-1] == "-- 7 records read, 1 shown; chain BROKEN at 1 place(s): line 5"


def test_json_lines_are_the_records_unchanged(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = log.read_bytes().splitlines(keepends=True)
    lines.insert(1, b'{"seq": 2}\n')  # not a record: marked, then nothing to show for it
    log.write_bytes(b"".join(lines))
    assert agent_cli(["audit", "show", str(log), "--json", "--since", "2026-11-23T10:05Z"]) == 1
    captured = capsys.readouterr()
    shown = [json.loads(line) for line in captured.out.splitlines()]
    assert shown[0] == {
        "audit_chain_break": {"line": 2, "seq": None, "reason": "missing or mistyped member 'ts'"}
    }
    assert [r["seq"] for r in shown[1:]] == [6, 7, 8]
    assert shown[1:] == [json.loads(line) for line in lines[6:]]
    assert "the chain breaks at 1 place(s)" in captured.err


def test_tail_defaults_to_the_last_records_of_the_configured_log(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\naudit_log = "{log}"\n[control_plane]\nurl = "wss://cp.example.com/v1/agent"\n'
        'ca_bundle = "ca.pem"\nclient_cert = "a.pem"\nclient_key = "a.key"\n'
        '[commands]\ntrusted_keys = ["k.pub"]\nissuers = ["cp"]\n'
    )
    assert agent_cli(["audit", "tail", "--config", str(config), "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:-1]] == ["7", "8"]
    assert agent_cli(["audit", "verify", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"{log}: OK, 8 records")


async def test_follow_shows_records_as_they_are_written(log: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "audit",
        "show",
        "-f",
        "--event",
        "command_received",
        str(log),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    output = process.stdout
    assert output is not None
    before = b"".join(records())  # what the fixture wrote
    try:

        async def line() -> str:
            return (await asyncio.wait_for(output.readline(), scaled(30))).decode()

        assert (await line()).split()[0] == "SEQ"
        assert (await line()).split()[0] == "3"
        assert (await line()).split()[0] == "8"
        head = ChainHead(8, json.loads(before.splitlines()[-1])["hash"])
        more = records(head, start=8, count=3)
        with log.open("ab") as out:  # the agent appends: a record in two writes, then two more
            out.write(more[0][:20])
            out.flush()
            out.write(more[0][20:] + more[1] + more[2])
        assert (await line()).split()[0] == "11"  # seq 11 is the next command_received
        process.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = await asyncio.wait_for(process.communicate(), scaled(30))
        assert rest.decode().splitlines() == [
            f"-- 11 records read, 3 shown; chain verified, seq 1..11, head "
            f"{json.loads(more[2])['hash'][:16]}…"
        ]
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
