"""Audit anchors (the control plane keeps the agent's chain head) and receipts (the agent signs
what it reports), end to end with real TLS, the real stub and the real CLIs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.audit_chain import ChainHead, make_record, verify_lines
from agent.canonical import canonicalize
from agent.cli import main as agent_cli
from agent.errors import AuditIntegrityError
from agent.frames import Status
from agent.receipts import ReceiptInvalid, ReceiptSigner, result_sha256, verify_receipt
from certs.pki import PKIPaths
from control_plane_stub.cli import main as stub_cli
from control_plane_stub.client import StubClient
from control_plane_stub.hub import Hub, HubSettings
from control_plane_stub.server import StubServer
from control_plane_stub.store import StubStore
from tests.conftest import AgentStarter, scaled
from tests.fakes import RecordingDriver


async def run_one(api: StubClient, command_type: str = "scale") -> dict[str, object]:
    params: dict[str, object] = (
        {"replicas": 2} if command_type == "scale" else {"targets": ["workload"]}
    )
    sent = await api.send("agent-1", command_type, params)
    answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    assert answer["command"]["state"] == "succeeded"
    return answer


# -- receipts -------------------------------------------------------------------------------


async def test_a_final_status_carries_a_receipt_the_stub_verifies(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, pki: PKIPaths
) -> None:
    await start_agent(port=stub.agent_port, driver=RecordingDriver())
    answer = await run_one(api, "collect_metrics")
    receipt = answer["receipt"]
    assert isinstance(receipt, dict)
    assert receipt["status"] == "valid"
    # Anyone holding the agent's certificate can check it, independently of the stub.
    cert = x509.load_pem_x509_certificate(pki.agent_cert("agent-1").read_bytes())
    claims = verify_receipt(str(receipt["token"]), cert)
    command = answer["command"]
    assert isinstance(command, dict)
    assert (claims["iss"], claims["jti"], claims["ref"], claims["state"]) == (
        "agent-1",
        command["jti"],
        command["ref"],
        "succeeded",
    )
    assert claims["result_sha256"] == hashlib.sha256(canonicalize(command["result"])).hexdigest()


def test_a_receipt_from_another_key_or_for_another_report_is_not_valid(
    tmp_path: Path, pki: PKIPaths
) -> None:
    store = StubStore(tmp_path / "stub.db")
    cert = x509.load_pem_x509_certificate(pki.agent_cert("agent-1").read_bytes())
    store.remember_certificate("agent-1", "sha", cert.public_bytes(Encoding.DER))
    hub = Hub(store, HubSettings(), structlog.get_logger())
    own = ReceiptSigner.from_files("agent-1", pki.agent_cert("agent-1"), pki.agent_key("agent-1"))
    other = ReceiptSigner.from_files("agent-1", pki.agent_cert("agent-2"), pki.agent_key("agent-2"))
    result = {"replicas": 2}

    def status(signer: ReceiptSigner, state: str = "succeeded") -> Status:
        receipt = signer.sign(jti="j", ref="r", state=state, reason=None, result=result, at=1.0)
        return Status(
            seq=1, ref="r", jti="j", state="succeeded", at=1.0, result=result, receipt=receipt
        )

    assert hub._check_receipt("agent-1", status(own)) == "valid"
    assert hub._check_receipt("agent-1", status(own, state="failed")) == "mismatch: state"
    assert hub._check_receipt("agent-1", status(other)).startswith("unverified")
    with pytest.raises(ReceiptInvalid, match="another certificate"):
        verify_receipt(status(other).receipt or "", cert)
    store.close()


def test_result_hash_is_over_the_canonical_form() -> None:
    assert (
        result_sha256({"b": 1.0, "a": [1e21, 0.1]})
        == hashlib.sha256(b'{"a":[1e+21,0.1],"b":1}').hexdigest()
    )
    assert result_sha256(None) == hashlib.sha256(b"null").hexdigest()


# -- anchors --------------------------------------------------------------------------------


async def test_the_stub_keeps_the_audit_head_and_verify_checks_the_log_against_it(
    stub: StubServer,
    api: StubClient,
    start_agent: AgentStarter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    await run_one(api)
    async with asyncio.timeout(scaled(10)), stub.hub.changed:  # the anchor has arrived
        await stub.hub.changed.wait_for(lambda: bool(stub.store.anchors("agent-1")))
    code = await asyncio.to_thread(
        stub_cli, ["anchor", "--api", f"http://127.0.0.1:{stub.api_port}", "agent-1"]
    )
    assert code == 0
    anchor = capsys.readouterr().out.strip().splitlines()[-1]
    seq, digest = anchor.split(":")
    records = [json.loads(line) for line in running.paths.audit_log.read_text().splitlines()]
    assert records[int(seq) - 1]["hash"] == digest  # the stub holds a real point of the chain
    await running.stop()

    log = running.paths.audit_log
    assert agent_cli(["audit", "verify", str(log), "--anchor", anchor]) == 0
    assert "anchors: 1 checked" in capsys.readouterr().out

    # Cut records off the end, back before the anchor: plain verification cannot tell...
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[: int(seq) - 1]))
    assert agent_cli(["audit", "verify", str(log)]) == 0
    capsys.readouterr()
    # ...the anchor can.
    assert agent_cli(["audit", "verify", str(log), "--anchor", anchor]) == 1
    assert "records were removed from the end" in capsys.readouterr().err


def test_a_consistently_rewritten_log_passes_alone_but_not_against_an_anchor() -> None:
    head = ChainHead()
    lines = []
    for n in range(6):
        line, head = make_record(head, "approval_granted", {"by": "alice", "n": n}, ts="t")
        lines.append(line)
    anchor = {4: json.loads(lines[3])["hash"]}

    # Someone who can write the file changes record 2 and recomputes every later hash.
    forged, head = [lines[0]], ChainHead(1, json.loads(lines[0])["hash"])
    for n in range(1, 6):
        line, head = make_record(
            head, "approval_granted", {"by": "mallory" if n == 1 else "alice", "n": n}, ts="t"
        )
        forged.append(line)
    assert verify_lines(forged).records == 6  # the chain alone is consistent
    with pytest.raises(AuditIntegrityError) as error:
        verify_lines(forged, anchors=anchor)
    assert error.value.line == 4
    assert "differs from the anchor" in error.value.reason


def test_the_stub_flags_two_hashes_for_one_sequence_number(tmp_path: Path) -> None:
    store = StubStore(tmp_path / "stub.db")
    assert store.record_anchor("agent-1", 10, "a" * 64, time.time()) is True
    assert store.record_anchor("agent-1", 10, "a" * 64, time.time()) is True  # resent
    assert store.record_anchor("agent-1", 10, "b" * 64, time.time()) is False
    assert [a["conflict"] for a in store.anchors("agent-1")] == [True, False]
    store.close()
