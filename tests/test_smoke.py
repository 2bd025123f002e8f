"""First end-to-end smoke: stub and agent in one event loop, real mutual TLS on loopback."""

from __future__ import annotations

from agent.io.audit_file import verify_file
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, scaled
from tests.fakes import RecordingDriver


async def test_scale_round_trip(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver()
    running = await start_agent(port=stub.agent_port, driver=driver)
    sent = await api.send("agent-1", "scale", {"replicas": 3})
    answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    assert answer["command"]["state"] == "succeeded", answer
    assert driver.replicas == 3
    states = [event["state"] for event in answer["history"]]
    assert states == ["received", "running", "succeeded"]
    await running.stop()
    summary = verify_file(running.paths.audit_log).summary
    assert summary.events["execution_started"] == 1
    print(running.paths.audit_log.read_text())
