"""The stub control plane's own rules: what it records for whom, and who may use its API."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from agent.core.frames import DeliveryRejected, Status
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from control_plane_stub.store import StubStore
from tests.conftest import AgentStarter, scaled
from tests.fakes import RecordingDriver


@pytest.fixture
def store(tmp_path: Path) -> StubStore:
    store = StubStore(tmp_path / "stub.db")
    store.add_command(
        ref="r1",
        agent_id="agent-1",
        token="t",
        origin="signed",
        jti="j1",
        command_type="scale",
        params={"replicas": 1},
    )
    return store


def status(state: str, *, seq: int = 1, jti: str = "j1", ref: str = "r1") -> Status:
    return Status(seq=seq, ref=ref, jti=jti, state=state, at=time.time())


def test_an_agent_cannot_report_on_another_agents_command(store: StubStore) -> None:
    assert store.apply_status("agent-2", status("succeeded")) is False
    assert store.history("r1") == []
    assert store.get("r1").state == "queued"


def test_a_report_about_another_token_under_the_ref_is_ignored(store: StubStore) -> None:
    assert store.apply_status("agent-1", status("succeeded", jti="other")) is False
    assert store.get("r1").state == "queued"


def test_reports_are_applied_once_and_only_forward(store: StubStore) -> None:
    assert store.apply_status("agent-1", status("received", seq=1)) is True
    assert store.apply_status("agent-1", status("running", seq=2)) is True
    assert store.apply_status("agent-1", status("running", seq=2)) is False  # resent
    assert store.apply_status("agent-1", status("received", seq=1)) is False
    assert store.get("r1").state == "running"
    assert store.apply_status("agent-1", status("succeeded", seq=3)) is True
    assert [e["state"] for e in store.history("r1")] == ["received", "running", "succeeded"]


@pytest.mark.parametrize("reason", ["busy", "shutting_down", "duplicate_delivery"])
def test_a_refusal_that_means_not_now_keeps_the_command_deliverable(
    store: StubStore, reason: str
) -> None:
    store.mark_sent("r1")
    frame = DeliveryRejected(seq=1, ref="r1", reason=reason, detail="later", at=time.time())
    store.apply_delivery_rejected("agent-1", frame)
    assert store.get("r1").state == "sent"
    assert [r.ref for r in store.undelivered("agent-1")] == ["r1"]  # delivered again


def test_a_final_refusal_rejects_only_a_command_not_yet_accepted(store: StubStore) -> None:
    frame = DeliveryRejected(seq=5, ref="r1", reason="replayed", detail="x", at=time.time())
    store.apply_status("agent-1", status("received", seq=4))
    store.apply_delivery_rejected("agent-1", frame)
    assert store.get("r1").state == "received"  # the accepted command is not undone
    other = store.add_command(
        ref="r2",
        agent_id="agent-1",
        token="t",
        origin="relayed",
        jti=None,
        command_type=None,
        params=None,
    )
    store.apply_delivery_rejected(
        "agent-1", DeliveryRejected(seq=6, ref=other.ref, reason="expired", detail="x", at=1.0)
    )
    assert store.get("r2").state == "rejected"


async def test_the_operator_api_keeps_browsers_out(stub: StubServer) -> None:
    base = f"http://127.0.0.1:{stub.api_port}"
    body = '{"type": "scale", "params": {"replicas": 2}}'
    async with httpx.AsyncClient(base_url=base) as http:
        # A cross-site form/fetch "simple request" cannot set application/json.
        plain = await http.post(
            "/v1/agents/agent-1/commands", content=body, headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415
        # DNS rebinding: the browser would send the attacker's host name.
        rebound = await http.get("/v1/agents", headers={"host": f"evil.example:{stub.api_port}"})
        assert rebound.status_code == 403
        good = await http.post(
            "/v1/agents/agent-1/commands",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert good.status_code == 201
        assert (
            await http.get("/v1/agents", headers={"host": f"localhost:{stub.api_port}"})
        ).status_code == 200
    assert len(stub.store.commands()) == 1  # only the legitimate request made a command


async def test_a_report_the_store_cannot_take_is_resent_and_the_writer_goes_on(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails to store (here: the first status, once) is not acknowledged; its
    agent is disconnected, comes back and resends it, and the store writer keeps working."""
    await start_agent(port=stub.agent_port, driver=RecordingDriver())
    real = stub.store.apply_status
    failures: list[str] = []

    def apply_status(agent_id: str, frame: Status) -> bool:
        if not failures:
            failures.append(frame.state)
            raise sqlite3.OperationalError("disk I/O error")
        return real(agent_id, frame)

    monkeypatch.setattr(stub.store, "apply_status", apply_status)
    sent = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(30))
    assert answer["command"]["state"] == "succeeded"
    assert failures  # the failure happened, and the command still got through
    again = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    answer = await api.command(again["ref"], wait_for="final", wait_seconds=scaled(30))
    assert answer["command"]["state"] == "succeeded"
