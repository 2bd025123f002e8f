"""The agent as a real process (``byoc-agent run``) with the real ``process`` driver: signals,
crashes, and what it exposes to the network."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from agent.io.audit_file import verify_file
from byoc_demo.layout import BROKEN_VERSION, DemoPaths, write_agent_files
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import scaled


class AgentProcess:
    def __init__(self, paths: DemoPaths, log: Path) -> None:
        self.paths = paths
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.paths.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    async def wait(self) -> int:
        assert self.popen is not None
        return await asyncio.to_thread(self.popen.wait, scaled(60))

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)


def workload_processes(port_range: tuple[int, int]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "byoc_demo.workload" not in cmdline or "--port" not in cmdline:
            continue
        port = int(cmdline[cmdline.index("--port") + 1])
        if port_range[0] <= port <= port_range[1]:
            found.append(proc)
    return found


@pytest.fixture
def agent_files(
    tmp_path: Path, pki: PKIPaths, stub: StubServer, short_tmp: Path, port_range: tuple[int, int]
) -> Iterator[DemoPaths]:
    paths = write_agent_files(
        tmp_path / "agent",
        pki=pki.root,
        control_plane_port=stub.agent_port,
        run_dir=short_tmp,
        port_range=port_range,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    yield paths
    for proc in workload_processes(port_range):  # never leave replicas behind
        proc.kill()


@pytest.fixture
async def agent_process(agent_files: DemoPaths, tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = AgentProcess(agent_files, tmp_path / "agent.log")
    yield process
    if process.popen is not None and process.popen.poll() is None:
        process.popen.kill()
        await process.wait()


async def test_sigkill_mid_upgrade_is_reported_interrupted_and_never_rerun(
    agent_process: AgentProcess, api: StubClient, port_range: tuple[int, int]
) -> None:
    agent_process.start()
    await api.agent("agent-1", wait_connected=scaled(30))
    scaled_up = await api.send("agent-1", "scale", {"replicas": 1})
    done = await api.command(scaled_up["ref"], wait_for="final", wait_seconds=scaled(30))
    assert done["command"]["state"] == "succeeded"

    # The broken release takes start_timeout to fail its health check: kill the agent meanwhile.
    upgrade = await api.send("agent-1", "upgrade", {"version": BROKEN_VERSION})
    await api.command(upgrade["ref"], wait_for="running", wait_seconds=scaled(30))
    agent_process.signal(signal.SIGKILL)
    assert await agent_process.wait() == -signal.SIGKILL

    agent_process.start()
    final = await api.command(upgrade["ref"], wait_for="final", wait_seconds=scaled(30))
    assert final["command"]["state"] == "interrupted"
    assert final["command"]["reason"] == "agent_restarted"

    # The workload is adopted, not duplicated: one replica at the old version answers.
    metrics = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    answer = await api.command(metrics["ref"], wait_for="final", wait_seconds=scaled(30))
    versions = {
        s["labels"]["version"]
        for s in answer["command"]["result"]["samples"]
        if s["name"] == "demo_workload_info"
    }
    assert versions == {"1.0.0"}
    assert answer["command"]["result"]["replicas"] == 1

    agent_process.signal(signal.SIGTERM)
    assert await agent_process.wait() == 0
    assert workload_processes(port_range) == []  # stop_on_close: replicas stopped with it
    records = [json.loads(line) for line in agent_process.paths.audit_log.read_text().splitlines()]
    started = [
        r for r in records if r["event"] == "execution_started" and r["jti"] == upgrade["jti"]
    ]
    assert len(started) == 1  # never re-run
    assert [r["event"] for r in records if r.get("jti") == upgrade["jti"]][-1] == "result_delivered"
    assert verify_file(agent_process.paths.audit_log).summary.records == len(records)


async def test_sigterm_exits_cleanly_and_only_dials_out(
    agent_process: AgentProcess, api: StubClient, stub: StubServer
) -> None:
    agent_process.start()
    await api.agent("agent-1", wait_connected=scaled(30))
    sent = await api.send("agent-1", "scale", {"replicas": 2})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(30))
    assert final["command"]["state"] == "succeeded"

    connections = psutil.Process(agent_process.pid).net_connections(kind="inet")
    listening = [c for c in connections if c.status == psutil.CONN_LISTEN]
    # The one listener is the health endpoint, on loopback ([health] listen; "" turns it off).
    assert [ipaddress.ip_address(c.laddr.ip).is_loopback for c in listening] == [True]
    outbound = [c for c in connections if c.status == psutil.CONN_ESTABLISHED]
    assert any(c.raddr and c.raddr.port == stub.agent_port for c in outbound)

    agent_process.signal(signal.SIGTERM)
    assert await agent_process.wait() == 0
    records = [json.loads(line) for line in agent_process.paths.audit_log.read_text().splitlines()]
    assert records[-1]["event"] == "agent_stopped"
    assert records[-1]["reason"] == "SIGTERM"

    # Operational logs: JSON lines, and never the token.
    token = (await api.command(sent["ref"], with_token=True))["command"]["token"]
    lines = agent_process.log.read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"agent_started", "session_ready", "agent_stopped"} <= {e["event"] for e in events}
    assert token not in agent_process.log.read_text()
    assert token not in agent_process.paths.audit_log.read_text()


async def test_a_second_agent_on_the_same_host_refuses_to_start(
    agent_process: AgentProcess, api: StubClient, tmp_path: Path
) -> None:
    agent_process.start()
    await api.agent("agent-1", wait_connected=scaled(30))
    head_before = verify_file(agent_process.paths.audit_log).summary.head
    twin = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--config",
        str(agent_process.paths.config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(twin.communicate(), scaled(60))
    assert twin.returncode == 1
    assert b"already running" in output
    assert agent_process.popen is not None
    assert agent_process.popen.poll() is None
    # The twin touched nothing: the audit chain is exactly as it was.
    assert verify_file(agent_process.paths.audit_log).summary.head == head_before


async def test_daemon_speaks_sd_notify(
    agent_process: AgentProcess, api: StubClient, tmp_path: Path
) -> None:
    """systemd is not PID 1 here: the test binds the notification socket itself and plays
    systemd's side of the real sd_notify protocol (datagrams of KEY=VALUE lines)."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def next_message() -> str:
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(30))
        return data.decode()

    seen: list[str] = []
    try:
        agent_process.start({**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        while not any("READY=1" in m for m in seen):
            seen.append(await next_message())
        watchdogs = 0
        while watchdogs < 2:  # kept alive from the event loop (WATCHDOG_USEC/2 = 0.2 s)
            message = await next_message()
            seen.append(message)
            watchdogs += message == "WATCHDOG=1"
        await api.agent("agent-1", wait_connected=scaled(30))
        agent_process.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in seen):
            seen.append(await next_message())
        assert await agent_process.wait() == 0
    finally:
        sock.close()
    ready = next(m for m in seen if "READY=1" in m)
    assert "STATUS=agent agent-1 started" in ready
    assert any(m.startswith("STATUS=connected to wss://localhost:") for m in seen)
