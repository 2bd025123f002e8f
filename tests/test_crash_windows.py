"""A kill at each window of a command's durable path, and what the control plane is told after.

The agent (``byoc-agent run``, journal driver) is a real process that kills itself with SIGKILL
at an exact point (agent/io/failpoints.py, ``BYOC_AGENT_FAILPOINT``), then is started again.
For each window the command ends in the state the audit log can vouch for:

- killed before its acceptance was committed: it never happened (its records, written ahead,
  are cut at the next start); the control plane delivers it again and it runs once;
- killed after acceptance (committed, or even durable) but before the driver acted: it never
  acted, so it is started again, once (``command_resumed``, ``never_acted``), not reported
  ``interrupted``;
- killed after the driver acted but before the outcome was committed: ``interrupted``, the
  only honest answer (the audit log has the action, not its end);
- killed after the outcome was durable: reported with that outcome.

Every case also passes the whole-stream invariants of the crash test (tests/processes.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.io.audit_file import verify_file
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import scaled, stub_config
from tests.processes import (
    ChildProcess,
    agent_process,
    check_invariants,
    read_journal,
    write_journal_agent,
)


@dataclass(frozen=True)
class Window:
    point: str
    state: str
    """The final state the control plane is told."""
    starts: int
    """``start`` lines in the driver's journal: how often the work was really done."""
    evidence: str
    """The audit record that explains the outcome."""


WINDOWS = [
    Window("accepted_written", "succeeded", 1, "audit_tail_repaired"),
    Window("accepted_committed", "succeeded", 1, "command_resumed"),
    Window("before_execute", "succeeded", 1, "command_resumed"),
    Window("driver_returned", "interrupted", 1, "command_interrupted"),
    Window("finish_written", "interrupted", 1, "audit_tail_repaired"),
    Window("finish_committed", "succeeded", 1, "execution_finished"),
]


@pytest.fixture
async def stub(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[StubServer]:
    server = StubServer(stub_config(pki, tmp_path / "stub.db"))
    await server.start()
    yield server
    await server.close()


@pytest.mark.parametrize("window", WINDOWS, ids=[w.point for w in WINDOWS])
async def test_a_kill_in_each_window_is_reported_as_the_audit_log_says(
    window: Window,
    stub: StubServer,
    pki: PKIPaths,
    tmp_path: Path,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = write_journal_agent(
        tmp_path / "agent", pki=pki, port=stub.agent_port, run_dir=short_tmp, delay=0.0
    )
    agent: ChildProcess = agent_process(files.config, log=tmp_path / "agent.log")
    monkeypatch.setenv("BYOC_AGENT_FAILPOINT", window.point)
    agent.start()
    try:
        async with StubClient(f"http://127.0.0.1:{stub.api_port}", timeout=scaled(30)) as api:
            sent = await api.send("agent-1", "scale", {"replicas": 2})
            status = await agent.wait(scaled(30))
            assert status == -9, f"the agent was not killed at {window.point}: {agent.tail()}"
            monkeypatch.delenv("BYOC_AGENT_FAILPOINT")
            agent.start()
            answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(30))
            assert answer["command"]["state"] == window.state, agent.tail()
            assert await agent.stop() == 0
            report = await check_invariants(
                api,
                {sent["ref"]: sent["jti"]},
                journal=files.journal,
                audit_log=files.audit_log,
                agent_db=files.state_dir / "agent.db",
            )
    finally:
        agent.ensure_dead()
    assert read_journal(files.journal).starts[sent["jti"]] == window.starts
    events = [event for event in verify_file(files.audit_log).summary.events]
    assert window.evidence in events
    if window.state == "interrupted":
        assert report.final_states == {"interrupted": 1}
