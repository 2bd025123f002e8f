"""docs/PROTOCOL.md must keep the promises the code makes: every frame type, state, close code,
limit and every code the implementation can send is documented there.

The codes are collected from the source itself (not from a list kept here), so a new rejection
code that is not documented fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.core import frames
from agent.core.frames import MAX_TOKEN_CHARS
from agent.core.session import CloseCode, HeartbeatSettings
from agent.core.verifier import COMMAND_TYP

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()

CODE_PATTERNS = (
    r'CommandRejected\(\s*"([a-z_]+)"',
    r'DriverError\(\s*"([a-z_]+)"',
    r'code="([a-z_]+)"',
    r'^\s+code = "([a-z_]+)"',
    r'reason="([a-z_]+)"',
    r'_finish_rejected\(\s*\w+,\s*"([a-z_]+)"',
)


def codes_in(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        text = path.read_text()
        for pattern in CODE_PATTERNS:
            found.update(re.findall(pattern, text, flags=re.MULTILINE))
    return found


def test_every_code_the_agent_sends_is_documented() -> None:
    # every module that can put a code on the wire (the vpc check reports to a person only)
    sources = [
        path for path in sorted((ROOT / "agent").rglob("*.py")) if "vpc" not in path.parts
    ] + [ROOT / "control_plane_stub" / "hub.py"]
    codes = codes_in(sources) - {
        "tls_rejected",  # an audit-record reason, documented in §9
        "network",  # the tunnel's failure classes that stay local (`status`'s
        "settings_unusable",  # last_failure_reason): never sent, never audited
    }
    assert len(codes) > 30  # the collection itself works
    missing = sorted(code for code in codes if f"`{code}`" not in DOC)
    assert missing == []


AUDIT_CALL = re.compile(r'(?:\baudit|\.record|\.write|_record|TrustRecord)\(\s*"([a-z_]+)"')
"""An audit record made with a literal event name: by the core (``fx.audit``, ``TrustRecord``),
the runner and journal (``batch.record``, ``runner.write``), drivers and the updater
(``ctx.audit``, ``await audit``), the policy file (``self._record``)."""


def test_every_audit_event_the_agent_writes_is_documented() -> None:
    """§9 lists the audit log's events: a reader of the log must find each one there."""
    events = {
        name
        for path in sorted((ROOT / "agent").rglob("*.py"))
        if "vpc" not in path.parts
        for name in AUDIT_CALL.findall(path.read_text())
    }
    assert {"command_received", "journal_entry", "keyset_accepted"} <= events  # it reads them
    assert sorted(event for event in events if f"`{event}`" not in DOC) == []


def test_frames_states_close_codes_and_limits_are_documented() -> None:
    for frame_type in sorted(frames.TO_AGENT | frames.TO_CONTROL_PLANE):
        assert f"`{frame_type}`" in DOC
    for state in frames.COMMAND_STATES:
        assert f"`{state}`" in DOC
    for name, value in vars(CloseCode).items():
        if name.isupper():
            assert f"| {value} |" in DOC, name
    assert f"{frames.MAX_FRAME_TO_AGENT:,} bytes" in DOC
    assert f"{frames.MAX_FRAME_TO_CONTROL_PLANE:,} bytes" in DOC
    assert f"{MAX_TOKEN_CHARS:,}" in DOC
    assert f"**{frames.MAX_JSON_DEPTH}** levels" in DOC
    assert f'"{COMMAND_TYP}"' in DOC
    defaults = HeartbeatSettings()
    assert f"**{defaults.interval:.0f} s**" in DOC
    assert f"**{defaults.timeout:.0f} s**" in DOC


def test_every_test_the_threat_model_cites_exists() -> None:
    """docs/THREAT_MODEL.md names the tests that show each mechanism working: they must exist."""
    doc = (ROOT / "docs" / "THREAT_MODEL.md").read_text()
    cited = set(re.findall(r"`(test_[a-z0-9_]+\.py)(?:::(test_[a-z0-9_]+))?`", doc))
    assert len(cited) > 20
    missing = []
    for file, name in sorted(cited):
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif name and not re.search(rf"^(async )?def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert missing == []
