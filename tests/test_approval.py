"""Local approval: commands the policy marks as risky wait for a person on the host.

The real control socket (a Unix socket, SO_PEERCRED) and the real ``byoc-agent`` CLI entry point
are used; the CLI runs in a worker thread because it blocks while the agent runs in this loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main as agent_cli
from agent.io.audit_file import verify_file
from agent.io.control_socket import request
from byoc_demo.layout import REFERENCE_POLICY
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver


def audit_records(running: RunningAgent, event: str) -> list[dict[str, Any]]:
    lines = running.paths.audit_log.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


async def cli(*args: str) -> int:
    return await asyncio.to_thread(agent_cli, list(args))


async def pending_scale(api: StubClient, replicas: int = 5, ttl: int = 300) -> dict[str, Any]:
    sent = await api.send("agent-1", "scale", {"replicas": replicas}, ttl=ttl)
    answer = await api.command(sent["ref"], wait_for="pending_approval", wait_seconds=scaled(10))
    assert answer["command"]["state"] == "pending_approval", answer
    return dict(answer["command"])


async def test_approve_runs_the_command_and_audits_who(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = RecordingDriver()
    running = await start_agent(port=stub.agent_port, driver=driver)
    socket = str(running.paths.control_socket)
    command = await pending_scale(api)
    assert driver.calls == []

    assert await cli("pending", "--socket", socket) == 0
    assert command["jti"] in capsys.readouterr().out

    assert await cli("approve", command["jti"], "--socket", socket, "--note", "OPS-42") == 0
    assert f"approved {command['jti']}" in capsys.readouterr().out
    final = await api.command(command["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "succeeded"
    assert [c[0:2] for c in driver.calls] == [("scale", 5)]
    assert [e["state"] for e in final["history"]] == [
        "received",
        "pending_approval",
        "running",
        "succeeded",
    ]

    (granted,) = audit_records(running, "approval_granted")
    assert granted["jti"] == command["jti"]
    assert granted["by"] == pwd.getpwuid(os.getuid()).pw_name
    assert granted["uid"] == os.getuid()
    assert granted["pid"] == os.getpid()  # the kernel's word (SO_PEERCRED), not the client's
    assert granted["via"] == f"unix:{socket}"
    assert granted["note"] == "OPS-42"
    decision = audit_records(running, "policy_decision")[-1]
    assert (decision["verdict"], decision["rule"]) == ("require_approval", "scale.approval_above")
    # the approval record comes before the execution it allowed
    started = audit_records(running, "execution_started")[0]
    assert granted["seq"] < started["seq"]


async def test_deny_rejects_without_running(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver()
    running = await start_agent(port=stub.agent_port, driver=driver)
    command = await pending_scale(api)
    socket = str(running.paths.control_socket)
    assert await cli("deny", command["jti"], "--socket", socket, "--note", "not today") == 0
    final = await api.command(command["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "rejected"
    assert final["command"]["reason"] == "denied_by_operator"
    assert "not today" in final["command"]["detail"]
    assert driver.calls == []
    (denied,) = audit_records(running, "approval_denied")
    assert denied["jti"] == command["jti"]
    # A decided command cannot be decided again.
    assert await cli("approve", command["jti"], "--socket", socket) == 1


async def test_unknown_jti_is_an_error(
    stub: StubServer, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    assert await cli("approve", "no-such-jti", "--socket", str(running.paths.control_socket)) == 1
    assert "unknown_command" in capsys.readouterr().err


async def test_pending_command_expires_with_its_token(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver()
    running = await start_agent(port=stub.agent_port, driver=driver, clock_skew=0.0)
    command = await pending_scale(api, ttl=2)
    final = await api.command(command["ref"], wait_for="final", wait_seconds=scaled(15))
    assert final["command"]["state"] == "rejected"
    assert final["command"]["reason"] == "approval_expired"
    assert driver.calls == []
    assert audit_records(running, "approval_expired")[0]["jti"] == command["jti"]
    assert await cli("approve", command["jti"], "--socket", str(running.paths.control_socket)) == 1


async def test_pending_approval_survives_a_restart(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    first = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    command = await pending_scale(api)
    await first.stop()

    driver = RecordingDriver()
    second = await start_agent(port=stub.agent_port, driver=driver)  # same name: same state
    socket = str(second.paths.control_socket)
    pending = await asyncio.to_thread(request, Path(socket), {"op": "pending"})
    assert [c["jti"] for c in pending["commands"]] == [command["jti"]]
    assert await cli("approve", command["jti"], "--socket", socket) == 0
    final = await api.command(command["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "succeeded"
    assert driver.executed(command["jti"]) == 1
    await second.stop()
    assert verify_file(second.paths.audit_log).summary.events["command_resumed"] == 1


async def test_status_over_the_control_socket(
    stub: StubServer, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    assert await cli("status", "--json", "--socket", str(running.paths.control_socket)) == 0
    out = capsys.readouterr().out
    # skip log lines the agent printed meanwhile, before or after the CLI's JSON
    status, _ = json.JSONDecoder().raw_decode(out, out.index("{\n"))
    assert status["agent_id"] == "agent-1"
    assert status["connected"] is True
    assert status["connection"]["tls_version"] == "TLSv1.3"
    assert status["audit_head"]["seq"] >= 3
    assert status["workload"] == {"kind": "recording", "replicas": 1, "version": "1.0.0"}


async def test_the_agents_own_user_cannot_approve_by_default(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its workload may run as the agent's user: without an [approvals] section naming it, that
    user's approval is refused (and audited) and the command stays pending."""
    driver = RecordingDriver()
    policy = REFERENCE_POLICY[: REFERENCE_POLICY.index("[approvals]")]
    running = await start_agent(port=stub.agent_port, driver=driver, policy=policy)
    command = await pending_scale(api)
    socket = str(running.paths.control_socket)  # the test runs as the agent's own user
    assert await cli("approve", command["jti"], "--socket", socket) == 1
    assert "not_authorized" in capsys.readouterr().err
    (refused,) = audit_records(running, "approval_refused")
    assert refused["jti"] == command["jti"]
    assert refused["uid"] == os.getuid()
    assert "agent's own user" in refused["reason"]
    assert audit_records(running, "approval_granted") == []
    assert (await api.command(command["ref"]))["command"]["state"] == "pending_approval"
    assert driver.calls == []


async def test_only_listed_approvers_may_approve(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver()
    policy = REFERENCE_POLICY.replace('users = ["root"]', 'users = ["alice"]').replace(
        'groups = ["byoc-operators"]', 'groups = ["no-such-group-here"]'
    )
    running = await start_agent(port=stub.agent_port, driver=driver, policy=policy)
    command = await pending_scale(api)
    socket = str(running.paths.control_socket)
    assert await cli("deny", command["jti"], "--socket", socket) == 1
    (refused,) = audit_records(running, "approval_refused")
    assert refused["action"] == "deny"
    assert "not listed" in refused["reason"]
