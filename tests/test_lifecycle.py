"""Connection and process lifecycle: results survive a lost control plane, half-open
connections are detected, shutdown finishes or reports in-flight work.

Stub and agent run in this event loop with real mutual TLS on loopback; the agent uses the
in-memory RecordingDriver so that a command can be held in ``running`` deterministically.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.io.audit_file import verify_file
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, scaled, stub_config
from tests.fakes import RecordingDriver
from tests.tcp_proxy import TcpProxy


async def test_result_made_while_disconnected_is_delivered_after_reconnect(
    tmp_path: Path, pki: PKIPaths, start_agent: AgentStarter
) -> None:
    db = tmp_path / "stub.db"
    first = StubServer(stub_config(pki, db))
    await first.start()
    port = first.agent_port
    driver = RecordingDriver(hold=asyncio.Event())
    running = await start_agent(port=port, driver=driver)
    async with StubClient(f"http://127.0.0.1:{first.api_port}") as api:
        sent = await api.send("agent-1", "scale", {"replicas": 3})
        await api.command(sent["ref"], wait_for="running", wait_seconds=scaled(10))
    await first.close()  # the control plane goes away mid-command
    await running.audit.wait_for("connection_down")

    assert driver.hold is not None
    driver.hold.set()  # the command finishes while nobody is listening
    await running.audit.wait_for("execution_finished", outcome="succeeded")
    assert len(running.agent.parts.outbox) >= 1  # kept on disk, unsent

    second = StubServer(stub_config(pki, db, agent_port=port))  # same database, same port
    await second.start()
    try:
        async with StubClient(f"http://127.0.0.1:{second.api_port}") as api:
            final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(15))
        assert final["command"]["state"] == "succeeded"
        assert final["command"]["result"]["replicas"] == 3
        states = [event["state"] for event in final["history"]]
        assert states == ["received", "running", "succeeded"]  # each exactly once
        await running.audit.wait_for("result_delivered", state="succeeded")
        assert driver.executed(sent["jti"]) == 1
    finally:
        await running.stop()
        await second.close()
    assert verify_file(running.paths.audit_log).summary.records > 0


async def test_half_open_connection_is_detected_and_replaced(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    proxy = TcpProxy("127.0.0.1", stub.agent_port)
    await proxy.start()
    try:
        running = await start_agent(
            port=proxy.port,
            driver=RecordingDriver(),
            heartbeat_interval=0.3,
            heartbeat_timeout=1.5,
        )
        proxy.freeze()  # no FIN, no RST: the peer just goes silent
        down = await running.audit.wait_for("connection_down", within=20)
        assert "nothing received" in str(down["reason"])
        await running.audit.wait_for("connection_up", count=2, within=20)
        assert proxy.connections == 2
        sent = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
        final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
        assert final["command"]["state"] == "succeeded"
    finally:
        await proxy.close()


async def test_cut_connection_reconnects_without_losing_or_repeating_work(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    proxy = TcpProxy("127.0.0.1", stub.agent_port)
    await proxy.start()
    driver = RecordingDriver(hold=asyncio.Event())
    try:
        running = await start_agent(port=proxy.port, driver=driver)
        sent = await api.send("agent-1", "upgrade", {"version": "2.0.0"})
        await api.command(sent["ref"], wait_for="running", wait_seconds=scaled(10))
        proxy.cut()  # RST both ways, mid-command
        await running.audit.wait_for("connection_down")
        assert driver.hold is not None
        driver.hold.set()
        final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(20))
        assert final["command"]["state"] == "succeeded"
        assert driver.executed(sent["jti"]) == 1
        # It came through a second connection (whose record may land just after the result).
        await running.audit.wait_for("connection_up", count=2)
    finally:
        await proxy.close()


async def test_graceful_stop_finishes_running_work_and_refuses_new(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver(hold=asyncio.Event())
    running = await start_agent(port=stub.agent_port, driver=driver)
    sent = await api.send("agent-1", "scale", {"replicas": 2})
    await api.command(sent["ref"], wait_for="running", wait_seconds=scaled(10))

    running.agent.request_stop("SIGTERM")
    await running.audit.wait_for("agent_stopping")
    late = await api.send("agent-1", "scale", {"replicas": 3})
    await running.audit.wait_for("command_verification", reason="shutting_down")
    await running.audit.wait_for("result_delivered", state="delivery_rejected")
    refused = await api.command(late["ref"])
    # "Not now": the stub keeps the command to deliver it again once the agent is back.
    assert refused["command"]["state"] == "sent"
    assert [(e["state"], e["reason"]) for e in refused["history"]] == [
        ("delivery_rejected", "shutting_down")
    ]

    assert driver.hold is not None
    driver.hold.set()
    await asyncio.wait_for(running.task, scaled(30))
    final = await api.command(sent["ref"])
    assert final["command"]["state"] == "succeeded"  # finished and delivered before exit
    assert driver.calls == [("scale", 2, sent["jti"])]
    assert driver.closed
    # Back up: the refused command is delivered again and runs.
    second = RecordingDriver()
    await start_agent(port=stub.agent_port, driver=second)
    again = await api.command(late["ref"], wait_for="final", wait_seconds=scaled(10))
    assert again["command"]["state"] == "succeeded"
    assert second.executed(late["jti"]) == 1
    last = running.audit.records[-1]
    assert last[0] == "agent_stopped"
    assert last[1]["unsent_frames"] == 0


async def test_stop_after_grace_period_reports_interrupted(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver(hold=asyncio.Event())  # never released
    running = await start_agent(port=stub.agent_port, driver=driver, shutdown_grace=0.2)
    sent = await api.send("agent-1", "upgrade", {"version": "2.0.0"})
    await api.command(sent["ref"], wait_for="running", wait_seconds=scaled(10))
    await running.stop()
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "interrupted"
    assert final["command"]["reason"] == "agent_stopped"
    assert running.audit.count("execution_interrupted") == 1


async def test_queued_command_resumes_after_restart_and_runs_once(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """A command accepted but still waiting for its turn when the agent stops never ran: it is
    resumed on the next start (and runs exactly once)."""
    driver = RecordingDriver(hold=asyncio.Event())
    first = await start_agent(port=stub.agent_port, driver=driver, shutdown_grace=0.1)
    running_cmd = await api.send("agent-1", "scale", {"replicas": 2})
    await api.command(running_cmd["ref"], wait_for="running", wait_seconds=scaled(10))
    queued = await api.send("agent-1", "upgrade", {"version": "2.0.0"})  # waits behind it
    await api.command(queued["ref"], wait_for="received", wait_seconds=scaled(10))
    await first.stop()
    assert driver.executed(queued["jti"]) == 0

    second_driver = RecordingDriver()
    second = await start_agent(port=stub.agent_port, driver=second_driver)
    final = await api.command(queued["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "succeeded"
    assert second_driver.executed(queued["jti"]) == 1
    interrupted = await api.command(running_cmd["ref"])
    assert interrupted["command"]["state"] == "interrupted"
    assert second.audit.count("command_resumed") == 1
