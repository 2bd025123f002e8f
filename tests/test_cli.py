"""The command-line entry points, called in-process through their ``main`` functions."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.cli import main as agent_cli
from agent.core.verifier import COMMAND_TYP, jwk_thumbprint
from byoc_demo.layout import REFERENCE_POLICY
from certs.pki import PKIPaths
from control_plane_stub.cli import main as stub_cli
from tests.audit_files import LogWriter


def make_log(path: Path, records: int = 5) -> None:
    log = LogWriter(path)
    for n in range(records):
        log.append("test_event", n=n)


def test_audit_verify_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path)
    assert agent_cli(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK, 5 records, seq 1..5" in out
    assert "test_event=5" in out


@pytest.mark.parametrize(
    ("tamper", "line", "why"),
    [
        ("edit", 3, "edited"),
        ("delete", 3, "deleted, inserted or reordered"),
        ("insert", 3, "deleted, inserted or reordered"),
        ("swap", 2, "deleted, inserted or reordered"),
    ],
)
def test_audit_verify_names_the_first_bad_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str, line: int, why: str
) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    if tamper == "edit":
        lines[2] = lines[2].replace(b'"n":2', b'"n":7')
    elif tamper == "delete":
        del lines[2]
    elif tamper == "insert":
        lines.insert(2, lines[1])
    else:
        lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    assert agent_cli(["audit", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED at line {line}:" in err
    assert why in err


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "policy.toml"
    good.write_text(REFERENCE_POLICY)
    assert agent_cli(["policy", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["scale"]["replicas"] == [1, 6]
    bad = tmp_path / "bad.toml"
    bad.write_text(REFERENCE_POLICY.replace("max_replicas", "max_replcas"))
    assert agent_cli(["policy", "check", str(bad)]) == 2
    assert "max_replcas" in capsys.readouterr().err


def test_policy_check_refuses_a_numeric_host_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``2852039166`` resolves to 169.254.169.254: it is not a host name (PROTOCOL §13.1)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\n[open_stream]\ntargets = ["2852039166:80"]\nmax_duration = 60\n'
    )
    assert agent_cli(["policy", "check", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "2852039166" in err
    assert "dotted-decimal" in err


def test_keys_kid_is_the_rfc7638_thumbprint(
    pki: PKIPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_cli(["keys", "kid", str(pki.signing_pub)]) == 0
    key = load_pem_public_key(pki.signing_pub.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    assert capsys.readouterr().out.strip() == jwk_thumbprint(key)


def test_missing_config_is_a_clear_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_cli(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read configuration" in capsys.readouterr().err


def test_cp_stub_sign_makes_a_standard_jws(
    pki: PKIPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["sign", "--key", str(pki.signing_key), "--param", "replicas=3", "agent-1", "scale"]
    assert stub_cli(args) == 0
    token = capsys.readouterr().out.strip()
    public = load_pem_public_key(pki.signing_pub.read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    claims = jwt.decode(token, public, algorithms=["EdDSA"], audience="agent-1")
    assert claims["cmd"] == {"type": "scale", "params": {"replicas": 3}}
    assert jwt.get_unverified_header(token)["typ"] == COMMAND_TYP


def test_cp_stub_refuses_a_non_loopback_api(
    pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = stub_cli(
        ["serve", "--pki", str(pki.root), "--api", "0.0.0.0:8080", "--db", str(tmp_path / "x")]
    )
    assert code == 2
    assert "loopback" in capsys.readouterr().err


def test_status_of_a_disconnected_agent_says_why_what_to_do_and_when_it_tries_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the on-call engineer reads (issue 13): the last error, its cause in words, the fix,
    and the next attempt. The status is the agent's answer over its control socket."""
    status = {
        "agent_id": "agent-1",
        "version": "0.1.0",
        "control_plane": "wss://cp.example:443/v1/agent",
        "connected": False,
        "connection": None,
        "last_error": "ConnectionRefusedError: [Errno 111] Connect call failed",
        "diagnosis": {
            "code": "connection_refused",
            "cause": "nothing accepts connections at cp.example:443",
            "action": "check the port in control_plane.url",
        },
        "next_attempt_at": 1_800_000_042.0,
        "time": 1_800_000_000.0,
        "client_certificate_expires": "2027-01-01T00:00:00Z",
        "pending_approvals": 0,
        "running_commands": 0,
        "queued_commands": 0,
        "unsent_frames": 0,
        "last_command": None,
        "audit_head": {"seq": 7, "hash": "ab" * 32},
        "workload": {"kind": "journal"},
    }
    monkeypatch.setattr("agent.cli._control", lambda _args, payload: {"ok": True, "status": status})
    assert agent_cli(["status", "--socket", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "control plane: DISCONNECTED wss://cp.example:443/v1/agent" in out
    assert "  last error: ConnectionRefusedError" in out
    assert "  cause:      nothing accepts connections at cp.example:443\n" in out
    assert "  what to do: check the port in control_plane.url\n" in out
    assert "  next try:   in 42s (" in out
    assert "SIGHUP tries at once" in out
