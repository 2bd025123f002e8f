"""What every benchmark needs: a throwaway PKI, the stub control plane (in this process, so that
command round trips are timed where the control plane sees them), real agent processes, TCP
peers in their own processes, and statistics.

Nothing here is mocked: the agent is ``byoc-agent run`` with the ``journal`` driver (a cheap
command that still fsyncs its journal), talking real mutual TLS to the stub on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psutil

from agent.core.session import HeartbeatSettings
from certs.pki import PKIPaths, init_pki
from control_plane_stub.server import StubConfig, StubServer

REPO: Final = Path(__file__).resolve().parent.parent
AGENT_ID: Final = "agent-1"
CONNECT_WITHIN: Final = 60.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Workspace:
    root: Path
    pki: PKIPaths

    @classmethod
    def create(cls, agent_ids: Sequence[str] = (AGENT_ID,)) -> Workspace:
        root = Path(tempfile.mkdtemp(prefix="byoc-bench-"))
        return cls(root=root, pki=init_pki(root / "pki", agent_ids=tuple(agent_ids)))


STREAM_POLICY: Final = """\
version = 1

[collect_metrics]
allow = true
targets = ["workload", "host"]

[scale]
allow = true
max_replicas = 10

[open_stream]
allow = true
targets = ["127.0.0.1:1024-65535"]
max_duration = 3600
"""


def write_agent(
    ws: Workspace,
    *,
    port: int,
    name: str = AGENT_ID,
    heartbeat_interval: float = 15.0,
    heartbeat_timeout: float = 45.0,
    rate: float = 100_000.0,
    burst: int = 100_000,
    max_pending: int = 10_000,
    event_loop: str = "asyncio",
) -> Path:
    """An agent installation (journal driver, everything the benchmarks send allowed)."""
    root = ws.root / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "policy.toml").write_text(STREAM_POLICY)

    def q(value: object) -> str:
        return json.dumps(str(value) if isinstance(value, Path) else value)

    run = Path(tempfile.mkdtemp(prefix="bb-"))  # Unix socket paths are short
    config = root / "agent.toml"
    config.write_text(
        f"""\
[agent]
id = {q(name)}
state_dir = {q(root / "state")}
audit_log = {q(root / "audit" / "audit.jsonl")}
policy = {q(root / "policy.toml")}
control_socket = {q(run / "control.sock")}
log_level = "warning"
event_loop = {q(event_loop)}

[control_plane]
url = "wss://localhost:{port}/v1/agent"
ca_bundle = {q(ws.pki.server_ca_cert)}
client_cert = {q(ws.pki.agent_cert(name))}
client_key = {q(ws.pki.agent_key(name))}

[tunnel]
heartbeat_interval = {heartbeat_interval}
heartbeat_timeout = {heartbeat_timeout}
backoff_base = 0.1
backoff_cap = 2.0

[commands]
trusted_keys = [{q(ws.pki.signing_pub)}]
issuers = ["cp-stub"]
rate = {rate}
burst = {burst}
max_pending = {max_pending}

[streams]
max_streams = 256

[health]
listen = "127.0.0.1:0"

[driver]
kind = "journal"
"""
    )
    return config


def stub_config(ws: Workspace, *, agent_port: int = 0, db: str = "stub.db") -> StubConfig:
    return StubConfig(
        server_cert=ws.pki.server_cert,
        server_key=ws.pki.server_key,
        agent_ca=ws.pki.agent_ca_cert,
        signing_key=ws.pki.signing_key,
        db=ws.root / db,
        agent_port=agent_port,
        api_port=0,
        heartbeat=HeartbeatSettings(),  # the defaults a deployment has
    )


@contextlib.asynccontextmanager
async def running_stub(ws: Workspace, *, agent_port: int = 0) -> AsyncIterator[StubServer]:
    server = StubServer(stub_config(ws, agent_port=agent_port))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class Child:
    """A child process with its output in a file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("ab")
        self.process = subprocess.Popen(  # our own interpreter and modules
            list(argv),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return int(self.process.returncode)


@contextlib.asynccontextmanager
async def running_agent(
    ws: Workspace, stub: StubServer, name: str = AGENT_ID, **settings: Any
) -> AsyncIterator[Child]:
    config = write_agent(ws, port=stub.agent_port, name=name, **settings)
    child = Child(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        ws.root / f"{name}.log",
    )
    try:
        await wait_connected(stub, name)
        yield child
    finally:
        await asyncio.to_thread(child.stop)


async def wait_connected(stub: StubServer, agent_id: str) -> None:
    async with asyncio.timeout(CONNECT_WITHIN), stub.hub.changed:
        await stub.hub.changed.wait_for(lambda: agent_id in stub.hub.links)


def python_child(ws: Workspace, module: str, *args: str, name: str) -> Child:
    return Child([sys.executable, "-m", module, *args], ws.root / f"{name}.log")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)
