"""The ``cp-stub`` operator commands against a running stub and agent (real TLS, real HTTP).

The CLI runs its own event loop, so it is called in a worker thread while the stub and the agent
run in this one.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from control_plane_stub.cli import EXIT_NOT_SUCCEEDED
from control_plane_stub.cli import main as stub_cli
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter
from tests.fakes import RecordingDriver


async def cp_stub(stub: StubServer, *args: str) -> int:
    return await asyncio.to_thread(
        stub_cli, [*args[:1], "--api", f"http://127.0.0.1:{stub.api_port}", *args[1:]]
    )


async def test_operator_commands(
    stub: StubServer, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = RecordingDriver()
    await start_agent(port=stub.agent_port, driver=driver)

    assert await cp_stub(stub, "agents") == 0
    assert "agent-1" in capsys.readouterr().out

    assert (
        await cp_stub(stub, "send", "--json", "--wait", "agent-1", "scale", "--replicas", "3") == 0
    )
    out = capsys.readouterr().out
    answer, _ = json.JSONDecoder().raw_decode(out, out.index('{\n  "command"'))
    scaled = answer["command"]
    assert scaled["state"] == "succeeded"
    assert driver.replicas == 3

    assert await cp_stub(stub, "send", "--wait", "agent-1", "upgrade", "--version", "2.0.0") == 0
    assert "-> succeeded" in capsys.readouterr().out
    assert await cp_stub(stub, "send", "--wait", "agent-1", "collect-metrics") == 0
    assert "1 samples" in capsys.readouterr().out

    # Outside the policy: the command ends, but not in success.
    code = await cp_stub(stub, "send", "--wait", "agent-1", "scale", "--replicas", "10")
    assert code == EXIT_NOT_SUCCEEDED
    assert "policy_denied" in capsys.readouterr().out

    # Relay a token signed elsewhere: here, the token of the first command again (a replay).
    assert await cp_stub(stub, "show", "--token", scaled["ref"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.count(".") == 2
    assert await cp_stub(stub, "send-signed", "--wait", "agent-1", token) == EXIT_NOT_SUCCEEDED
    assert "replayed" in capsys.readouterr().out

    assert await cp_stub(stub, "show", scaled["ref"]) == 0
    history = capsys.readouterr().out
    lines = history.splitlines()
    assert "  receipt: valid (signed by the agent's certificate key)" in lines
    states = [line.split()[0] for line in lines if line.startswith("  ") and "receipt" not in line]
    assert states == ["received", "running", "succeeded"]

    assert await cp_stub(stub, "results", "--agent", "agent-1") == 0
    results = capsys.readouterr().out
    assert results.count("agent-1") == 5
    assert driver.executed(scaled["jti"]) == 1


async def test_unreachable_api_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(stub_cli, ["agents", "--api", "http://127.0.0.1:9"])
    assert code == 1
    assert "unreachable" in capsys.readouterr().err
