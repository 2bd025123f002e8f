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

from agent.cli import main as agent_cli
from agent.core.audit_chain import ChainHead, make_record, verify_lines
from agent.core.canonical import canonicalize
from agent.core.errors import AuditIntegrityError
from agent.core.frames import Status
from agent.core.receipts import ReceiptInvalid, ReceiptSigner, result_sha256, verify_receipt
from agent.io.audit_file import verify_file
from agent.io.receipt_keys import signer_from_files
from certs.pki import PKIPaths
from control_plane_stub.cli import main as stub_cli
from control_plane_stub.client import StubClient
from control_plane_stub.hub import Hub, HubSettings
from control_plane_stub.server import StubServer
from control_plane_stub.store import StubStore
from tests.audit_files import LogWriter
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
    der = cert.public_bytes(Encoding.DER)
    store.remember_certificate("agent-1", hashlib.sha256(der).hexdigest(), der)
    hub = Hub(store, HubSettings(), structlog.get_logger())
    own = signer_from_files("agent-1", pki.agent_cert("agent-1"), pki.agent_key("agent-1"))
    other = signer_from_files("agent-1", pki.agent_cert("agent-2"), pki.agent_key("agent-2"))
    result = {"replicas": 2}

    def status(signer: ReceiptSigner, state: str = "succeeded") -> Status:
        receipt = signer.sign(jti="j", ref="r", state=state, reason=None, result=result, at=1.0)
        return Status(
            seq=1, ref="r", jti="j", state="succeeded", at=1.0, result=result, receipt=receipt
        )

    assert hub._check_receipt("agent-1", status(own)) == "valid"
    assert hub._check_receipt("agent-1", status(own, state="failed")) == "mismatch: state"
    assert hub._check_receipt("agent-1", status(other)).startswith("unverified")
    # another agent's certificate, known to the stub, does not speak for agent-1
    foreign = x509.load_pem_x509_certificate(pki.agent_cert("agent-2").read_bytes())
    foreign_der = foreign.public_bytes(Encoding.DER)
    store.remember_certificate("agent-2", hashlib.sha256(foreign_der).hexdigest(), foreign_der)
    assert hub._check_receipt("agent-2", status(other)) == "mismatch: iss"  # signed, as agent-1
    assert hub._check_receipt("agent-1", status(other)).startswith("unverified")
    with pytest.raises(ReceiptInvalid, match="another certificate"):
        verify_receipt(status(other).receipt or "", cert)
    store.close()


def test_a_receipt_for_another_time_is_a_mismatch(tmp_path: Path, pki: PKIPaths) -> None:
    """/tmp/review3/receipt_at.py: a receipt signed for one report (``at`` 1000.0) was
    accepted as ``valid`` for another status with the same outcome but another time."""
    store = StubStore(tmp_path / "stub.db")
    cert = x509.load_pem_x509_certificate(pki.agent_cert("agent-1").read_bytes())
    der = cert.public_bytes(Encoding.DER)
    store.remember_certificate("agent-1", hashlib.sha256(der).hexdigest(), der)
    hub = Hub(store, HubSettings(), structlog.get_logger())
    own = signer_from_files("agent-1", pki.agent_cert("agent-1"), pki.agent_key("agent-1"))
    result = {"replicas": 3}
    receipt = own.sign(jti="j", ref="r", state="succeeded", reason=None, result=result, at=1000.0)

    def status(at: float) -> Status:
        return Status(
            seq=1, ref="r", jti="j", state="succeeded", at=at, result=result, receipt=receipt
        )

    assert hub._check_receipt("agent-1", status(1000.0)) == "valid"
    assert hub._check_receipt("agent-1", status(1_999_999_999.0)) == "mismatch: at"
    store.close()


def test_a_receipt_is_kept_only_with_the_report_held_for_the_command(
    tmp_path: Path, pki: PKIPaths
) -> None:
    """A receipt that came with a status the store did not take (another final state after
    the first, a resend that differs from it) would speak for a report that is not stored."""
    store = StubStore(tmp_path / "stub.db")
    store.add_command(
        ref="r",
        agent_id="agent-1",
        token="t",
        origin="signed",
        jti="j",
        command_type="scale",
        params={"replicas": 3},
    )
    own = signer_from_files("agent-1", pki.agent_cert("agent-1"), pki.agent_key("agent-1"))

    def status(state: str, result: dict[str, object], *, signed: bool = True) -> Status:
        receipt = own.sign(jti="j", ref="r", state=state, reason=None, result=result, at=5.0)
        return Status(
            seq=1,
            ref="r",
            jti="j",
            state=state,
            at=5.0,
            result=result,
            receipt=receipt if signed else None,
        )

    # The final report arrives without a receipt (the agent's key was unusable at that time).
    assert store.apply_status("agent-1", status("succeeded", {"replicas": 3}, signed=False))
    # Out of order: another final state, which the store does not apply.
    failed = status("failed", {})
    store.apply_status("agent-1", failed)
    assert store.get("r").state == "succeeded"
    assert store.record_receipt("agent-1", failed, "valid") is False
    # A resend that differs from the report held: ignored, and so is its receipt.
    other = status("succeeded", {"replicas": 99})
    assert store.apply_status("agent-1", other) is False
    assert store.record_receipt("agent-1", other, "valid") is False
    assert store.receipt("r") is None
    # Another agent cannot attach a receipt to this command either.
    same = status("succeeded", {"replicas": 3})
    assert store.record_receipt("agent-2", same, "valid") is False
    # A resend identical to the report held brings the receipt that speaks for it.
    assert store.apply_status("agent-1", same) is False  # a duplicate for the history
    assert store.record_receipt("agent-1", same, "valid") is True
    held = store.receipt("r")
    assert held is not None
    assert held["token"] == same.receipt
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
    assert store.record_anchor("agent-1", 10, "a" * 64, time.time()) is None
    assert store.record_anchor("agent-1", 10, "a" * 64, time.time()) is None  # resent
    assert store.record_anchor("agent-1", 10, "b" * 64, time.time()) == "hash_differs"
    assert store.record_anchor("agent-1", 10, "b" * 64, time.time()) == "hash_differs"
    assert [a["conflict"] for a in store.anchors("agent-1")] == [True, False]
    store.close()


def test_the_stub_flags_an_anchor_below_one_it_holds(tmp_path: Path) -> None:
    """The head only moves forward: a lower seq means the log was cut (and has grown again)."""
    store = StubStore(tmp_path / "stub.db")
    assert store.record_anchor("agent-1", 10, "a" * 64, time.time()) is None
    assert store.record_anchor("agent-1", 20, "b" * 64, time.time()) is None
    assert store.record_anchor("agent-1", 10, "a" * 64, time.time()) is None  # resent: fine
    assert store.record_anchor("agent-1", 15, "c" * 64, time.time()) == "head_moved_back"
    assert store.record_anchor("agent-1", 30, "d" * 64, time.time()) is None
    assert store.record_anchor("agent-2", 5, "e" * 64, time.time()) is None  # per agent
    assert [(a["audit_seq"], a["conflict_reason"]) for a in store.anchors("agent-1")] == [
        (30, None),
        (20, None),
        (15, "head_moved_back"),
        (10, None),
    ]
    store.close()


def grown_log(tmp_path: Path, store: StubStore, *, cut_to: int, regrow: int, every: int) -> Path:
    """/tmp/review3/anchor_rewrite.py: 100 records anchored every 10 (record 91 is
    ``execution_started``), then the file is cut back to ``cut_to`` records on the host, the
    agent restarts (trusting the last line) and keeps working and anchoring every ``every``."""
    path = tmp_path / "audit.log"
    log = LogWriter(path)

    def anchor() -> None:
        store.record_anchor("agent-1", log.head.seq, log.head.hash, time.time())

    for n in range(100):
        log.append("execution_started" if n == 90 else "tick", n=n)
        if n % 10 == 9:
            anchor()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:cut_to]))
    log = LogWriter(path, verify_file(path).summary.head)  # the agent trusts the last line
    assert log.head.seq == cut_to
    for n in range(regrow):
        log.append("tick", n=1000 + n)
        if n % every == every - 1:
            anchor()
    return path


def all_anchors(store: StubStore) -> dict[int, str]:
    anchors = store.anchors("agent-1", limit=10_000)
    return {int(str(a["audit_seq"])): str(a["audit_hash"]) for a in anchors}


def test_a_log_cut_and_grown_again_fails_against_all_the_anchors(tmp_path: Path) -> None:
    store = StubStore(tmp_path / "stub.db")
    path = grown_log(tmp_path, store, cut_to=80, regrow=45, every=7)
    flagged = [a["audit_seq"] for a in store.anchors("agent-1") if a["conflict"]]
    assert flagged == [94, 87]  # the first anchors of the new chain: below seq 100
    latest = store.anchors("agent-1")[0]
    assert (latest["audit_seq"], latest["conflict"]) == (122, False)
    # The latest anchor alone is a point of the new chain: it cannot tell...
    summary = verify_file(path, {122: str(latest["audit_hash"])}).summary
    assert summary.events.get("execution_started", 0) == 0  # record 91 is gone, unnoticed
    # ...all of them can: seq 90 and 100 were anchored with the old chain's hashes.
    with pytest.raises(AuditIntegrityError, match="differs from the anchor"):
        verify_file(path, all_anchors(store))
    store.close()


def test_a_log_regrown_past_every_anchor_before_the_next_one_fails_against_all(
    tmp_path: Path,
) -> None:
    """Cut to 95 and grown by 30 records before the next anchor (seq 125): no anchor arrives
    out of order, so the stub flags nothing; the anchor for seq 100 still catches it."""
    store = StubStore(tmp_path / "stub.db")
    path = grown_log(tmp_path, store, cut_to=95, regrow=30, every=30)
    assert not [a for a in store.anchors("agent-1") if a["conflict"]]
    with pytest.raises(AuditIntegrityError, match="seq=100 differs from the anchor"):
        verify_file(path, all_anchors(store))
    store.close()


def test_the_anchors_list_pages_through_every_anchor(tmp_path: Path) -> None:
    store = StubStore(tmp_path / "stub.db")
    for seq in range(1, 251):
        assert store.record_anchor("agent-1", seq, f"{seq:064x}", time.time()) is None
    seen: list[object] = []
    before = None
    while True:
        page = store.anchors("agent-1", 100, before=before)
        seen.extend(a["audit_seq"] for a in page)
        if len(page) < 100:
            break
        before = str(page[-1]["cursor"])
    assert seen == list(range(250, 0, -1))
    store.close()


async def test_cp_stub_anchor_all_feeds_audit_verify_anchors_file(
    stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole path an operator takes: every anchor through the API (more than one page),
    one SEQ:HASH a line, into ``audit verify --anchors-file``."""
    path = tmp_path / "audit.log"
    log = LogWriter(path)
    for n in range(1200):
        log.append("tick", n=n)
        stub.store.record_anchor("agent-1", log.head.seq, log.head.hash, time.time())
        if n == 0:
            first = log.head.hash
    api = ["--api", f"http://127.0.0.1:{stub.api_port}"]
    assert await asyncio.to_thread(stub_cli, ["anchor", *api, "agent-1"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"1200:{log.head.hash}"]
    assert await asyncio.to_thread(stub_cli, ["anchor", *api, "agent-1", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1200
    assert (lines[0], lines[-1]) == (f"1:{first}", f"1200:{log.head.hash}")
    anchors = tmp_path / "anchors.txt"
    anchors.write_text("# from cp-stub anchor agent-1 --all\n" + "\n".join(lines) + "\n")
    assert agent_cli(["audit", "verify", str(path), "--anchors-file", str(anchors)]) == 0
    assert "anchors: 1200 checked" in capsys.readouterr().out

    # A stub that saw the head move back says so, and the listing shows both hashes for 600.
    stub.store.record_anchor("agent-1", 600, "f" * 64, time.time())
    assert await asyncio.to_thread(stub_cli, ["anchor", *api, "agent-1", "--all"]) == 1
    captured = capsys.readouterr()
    assert "CONFLICT: seq 600 was reported with another hash" in captured.err
    anchors.write_text(captured.out)
    assert agent_cli(["audit", "verify", str(path), "--anchors-file", str(anchors)]) == 1
    assert "the anchors disagree: seq 600 has two hashes" in capsys.readouterr().err


def test_audit_verify_takes_repeated_anchors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.log"
    log = LogWriter(path)
    heads = []
    for n in range(3):
        log.append("tick", n=n)
        heads.append(f"{log.head.seq}:{log.head.hash}")
    assert (
        agent_cli(["audit", "verify", str(path), "--anchor", heads[0], "--anchor", heads[2]]) == 0
    )
    assert "anchors: 2 checked" in capsys.readouterr().out
    wrong = f"2:{'0' * 64}"
    assert agent_cli(["audit", "verify", str(path), "--anchor", heads[0], "--anchor", wrong]) == 1
