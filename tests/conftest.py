"""Shared fixtures: a development PKI made with the project's own tooling, a stub control plane
running in-process on ephemeral loopback ports with real mutual TLS, and agents to point at it.

Timeouts in tests are multiplied by ``$BYOC_TEST_TIMEOUT_FACTOR`` (default 1) for slow machines.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.config import AgentConfig, load_config
from agent.core.session import HeartbeatSettings
from agent.daemon import Agent
from agent.drivers.base import Driver
from agent.io.clock import Clock
from byoc_demo.layout import DemoPaths, write_agent_files
from certs.pki import PKIPaths, init_pki
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubConfig, StubServer

if TYPE_CHECKING:
    from tests.aws_moto import MotoServer

TIMEOUT_FACTOR = float(os.environ.get("BYOC_TEST_TIMEOUT_FACTOR", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return init_pki(tmp_path_factory.mktemp("pki"), agent_ids=("agent-1", "agent-2", "agent-3"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    """A second, unrelated PKI: its CAs are unknown to everything built from ``pki``."""
    return init_pki(tmp_path_factory.mktemp("foreign-pki"), agent_ids=("agent-1",))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="byoc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def port_range() -> tuple[int, int]:
    """A random window of ports for workload replicas, so parallel runs do not collide."""
    start = random.randrange(22000, 29000, 100)
    return start, start + 99


def stub_config(
    pki: PKIPaths, db: Path, *, agent_port: int = 0, heartbeat: HeartbeatSettings | None = None
) -> StubConfig:
    return StubConfig(
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        agent_ca=pki.agent_ca_cert,
        signing_key=pki.signing_key,
        db=db,
        agent_port=agent_port,
        api_port=0,
        heartbeat=heartbeat or HeartbeatSettings(interval=1.0, timeout=5.0),
    )


@pytest.fixture
async def stub(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[StubServer]:
    server = StubServer(stub_config(pki, tmp_path / "stub.db"))
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def api(stub: StubServer) -> AsyncIterator[StubClient]:
    async with StubClient(f"http://127.0.0.1:{stub.api_port}", timeout=scaled(10)) as client:
        yield client


class AuditWatcher:
    """Collects an agent's audit events as they are written, and lets a test await them."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, object]]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: str, fields: Mapping[str, object]) -> None:
        self.records.append((event, dict(fields)))
        self._changed.set()

    def count(self, event: str, **match: object) -> int:
        return len(self.matching(event, **match))

    def matching(self, event: str, **match: object) -> list[dict[str, object]]:
        return [
            fields
            for name, fields in self.records
            if name == event and all(fields.get(k) == v for k, v in match.items())
        ]

    async def wait_for(
        self, event: str, *, count: int = 1, within: float = 10.0, **match: object
    ) -> dict[str, object]:
        """Wait until ``count`` records of ``event`` (with the given fields) exist."""
        async with asyncio.timeout(scaled(within)):
            while self.count(event, **match) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.matching(event, **match)[count - 1]


@dataclass
class RunningAgent:
    agent: Agent
    task: asyncio.Task[None]
    paths: DemoPaths
    audit: AuditWatcher

    @property
    def config(self) -> AgentConfig:
        return self.agent.config

    async def stop(self) -> None:
        self.agent.request_stop("test")
        await asyncio.wait_for(self.task, scaled(60))

    async def wait_connected(self) -> None:
        await asyncio.wait_for(self.agent.started.wait(), scaled(30))
        await asyncio.wait_for(self.agent.parts.link.ready.wait(), scaled(30))


AgentStarter = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
async def start_agent(
    tmp_path: Path, pki: PKIPaths, short_tmp: Path, port_range: tuple[int, int]
) -> AsyncIterator[AgentStarter]:
    """Start agents in this event loop; each is stopped at the end of the test."""
    running: list[RunningAgent] = []

    async def start(
        *,
        port: int,
        driver: Driver | None = None,
        name: str = "agent",
        pki_root: Path | None = None,
        wait: bool = True,
        clock: Clock | None = None,
        **layout: Any,
    ) -> RunningAgent:
        layout.setdefault("heartbeat_interval", 1.0)
        layout.setdefault("heartbeat_timeout", 5.0)
        layout.setdefault("backoff_base", 0.05)
        layout.setdefault("backoff_cap", 0.5)
        layout.setdefault("port_range", port_range)
        paths = write_agent_files(
            tmp_path / name,
            pki=pki_root or pki.root,
            control_plane_port=port,
            run_dir=short_tmp / name,
            **layout,
        )
        agent = Agent(load_config(paths.config), driver=driver, clock=clock)
        watcher = AuditWatcher()
        agent.audit.add_listener(watcher)
        task = asyncio.create_task(agent.run(install_signal_handlers=False))
        handle = RunningAgent(agent, task, paths, watcher)
        running.append(handle)
        if wait:
            await handle.wait_connected()
        return handle

    yield start
    # Every agent is stopped, and one that crashed, or failed to stop, fails the test: the
    # shutdown path is part of what is tested.
    problems: list[str] = []
    for handle in running:
        try:
            if not handle.task.done():
                await handle.stop()
            elif not handle.task.cancelled() and handle.task.exception() is not None:
                raise handle.task.exception()  # type: ignore[misc]
        except Exception as exc:  # collected, then reported together
            problems.append(f"{handle.paths.root.name}: {type(exc).__name__}: {exc}")
    if problems:
        pytest.fail("agents failed at or before shutdown: " + "; ".join(problems))


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """The AWS stand-in (moto's server, a separate process on loopback), once per session:
    tests/aws_moto.py and tests/aws_stand_in.py."""
    from tests.aws_moto import running_moto  # boto3 only for the VPC tests

    with running_moto() as server:
        yield server


# -- the EC2 host (issue 10): systemd as PID 1 in a container, shared by the session -----------

from tests.ec2_host import ec2_host, harness_timings  # noqa: E402, F401


def pytest_terminal_summary(terminalreporter: Any) -> None:
    timings = harness_timings()
    if timings:
        steps = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        terminalreporter.write_line(f"EC2 host harness (tests/nspawn.py): {steps}")
