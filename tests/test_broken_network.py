"""A hostile network between the agent and the stub: a direction that stops flowing, latency,
lost bytes and cut connections, injected by a TCP proxy (tests/tcp_proxy.py) on real sockets
carrying real mutual TLS.

The agent and the stub run in this event loop; the agent uses the journal driver (each execution
leaves fsync'd ``start``/``end`` lines: tests/processes.py counts them). Every scenario ends with
the same invariants: each command has exactly one final state at the stub, none executed twice,
the audit log verifies; and since nothing here crashes the agent, every command succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import structlog

from agent.config import load_config
from agent.core.session import HeartbeatSettings
from agent.daemon import Agent
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.drivers.journal import JournalDriver
from byoc_demo.layout import DemoPaths
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AuditWatcher, RunningAgent, scaled, stub_config
from tests.processes import (
    InvariantReport,
    JournalAgentFiles,
    Planned,
    check_invariants,
    plan_commands,
    write_journal_agent,
)
from tests.tcp_proxy import Direction, TcpProxy

JOURNAL_DELAY: Final = 0.02
BIG_BATCH: Final = 4
"""Big results (~0.9 MB each) sent at a time while a direction is stalled: the kernel's socket
buffers on loopback absorb a few megabytes before a send blocks."""


class PaddedJournal(JournalDriver):
    """The journal driver, with ``collect_metrics`` results padded to ``pad_samples`` extra
    samples (~110 bytes each), to make the agent send a lot."""

    def __init__(
        self, settings: Mapping[str, object], env: DriverEnvironment, *, pad_samples: int
    ) -> None:
        super().__init__(settings, env)
        self.pad_samples = pad_samples

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        result = await super().collect_metrics(targets, ctx)
        samples = result["samples"]
        assert isinstance(samples, list)
        samples.extend(
            {
                "target": "workload",
                "name": "journal_padding",
                "labels": {"index": f"{i:06d}", "pad": "x" * 48},
                "value": i,
            }
            for i in range(self.pad_samples)
        )
        return result


@dataclass
class Rig:
    stub: StubServer
    api: StubClient
    proxy: TcpProxy
    agent: RunningAgent
    files: JournalAgentFiles
    submitted: dict[str, str] = field(default_factory=dict)
    """ref -> jti of every command sent."""
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever a command was sent."""

    @property
    def audit(self) -> AuditWatcher:
        return self.agent.audit

    async def send(self, planned: Planned) -> str:
        record = await self.api.send("agent-1", planned.type, planned.params)
        self.submitted[str(record["ref"])] = str(record["jti"])
        self.progress.set()
        return str(record["ref"])

    async def wait_final(self, ref: str, within: float = 30.0) -> dict[str, Any]:
        answer = await self.api.command(ref, wait_for="final", wait_seconds=scaled(within))
        assert not answer["timed_out"], f"{ref} did not reach a final state: {answer}"
        return dict(answer["command"])

    async def finish(self) -> InvariantReport:
        """Wait for every command to be final, stop the agent, check the invariants."""
        async with asyncio.timeout(scaled(60)):
            for ref in self.submitted:
                await self.wait_final(ref)
        await self.agent.stop()
        report = await check_invariants(
            self.api,
            self.submitted,
            journal=self.files.journal,
            audit_log=self.files.audit_log,
            agent_db=self.files.state_dir / "agent.db",
        )
        # Nothing crashed: every command ran, exactly once, and succeeded.
        assert report.final_states == {"succeeded": len(self.submitted)}, report
        return report


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path, pki: PKIPaths, short_tmp: Path) -> AsyncIterator[RigFactory]:
    """Stub, proxy in front of it, agent dialling the proxy; all torn down at the end."""
    cleanups: list[Callable[[], Awaitable[object]]] = []

    async def make(
        *,
        stub_heartbeat: HeartbeatSettings,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        send_timeout: float = 10.0,
        rcvbuf: int | None = None,
        latency: float = 0.0,
        pad_samples: int = 0,
    ) -> Rig:
        stub = StubServer(stub_config(pki, tmp_path / "stub.db", heartbeat=stub_heartbeat))
        await stub.start()
        cleanups.append(stub.close)
        api = StubClient(f"http://127.0.0.1:{stub.api_port}", timeout=scaled(10))
        cleanups.append(api.close)
        proxy = TcpProxy("127.0.0.1", stub.agent_port, rcvbuf=rcvbuf)
        await proxy.start()
        cleanups.append(proxy.close)
        proxy.set_latency(latency)
        files = write_journal_agent(
            tmp_path / "agent",
            pki=pki,
            port=proxy.port,
            run_dir=short_tmp,
            delay=JOURNAL_DELAY,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            send_timeout=send_timeout,
        )
        holder: list[Agent] = []

        async def driver_audit(event: str, /, **fields: object) -> None:
            holder[0].audit.record(event, source="driver", **fields)
            await holder[0].audit.settle()

        driver = PaddedJournal(
            {"path": str(files.journal), "delay": JOURNAL_DELAY},
            DriverEnvironment(
                state_dir=files.state_dir / "driver",
                audit=driver_audit,
                log=structlog.get_logger("journal"),
            ),
            pad_samples=pad_samples,
        )
        agent = Agent(load_config(files.config), driver=driver)
        holder.append(agent)
        watcher = AuditWatcher()
        agent.audit.add_listener(watcher)
        task = asyncio.create_task(agent.run(install_signal_handlers=False))
        paths = DemoPaths(
            root=files.root,
            config=files.config,
            policy=files.policy,
            audit_log=files.audit_log,
            state_dir=files.state_dir,
            control_socket=short_tmp / "control.sock",
        )
        running = RunningAgent(agent, task, paths, watcher)

        async def stop_agent() -> None:
            if not task.done():
                await running.stop()

        cleanups.append(stop_agent)
        await running.wait_connected()
        return Rig(stub=stub, api=api, proxy=proxy, agent=running, files=files)

    yield make
    for cleanup in reversed(cleanups):
        with contextlib.suppress(Exception):
            await cleanup()


def reasons(rig: Rig) -> list[str]:
    return [str(fields["reason"]) for fields in rig.audit.matching("connection_down")]


# -- a direction that stops flowing ------------------------------------------------------------


async def test_stalled_write_times_out_and_reconnects_without_loss(make_rig: RigFactory) -> None:
    """agent->stub stops flowing while stub->agent keeps going (so the stub's pings keep the
    agent's heartbeat timer happy): the agent's send blocks once the socket buffers are full,
    and must give up after ``send_timeout``, reconnect and deliver everything then."""
    send_timeout = 1.0
    rig = await make_rig(
        # The stub would drop a silent agent only after 60 s: only the agent's send timeout can
        # end this connection within the test.
        stub_heartbeat=HeartbeatSettings(interval=0.5, timeout=60.0),
        heartbeat_interval=1.0,
        heartbeat_timeout=10.0,
        send_timeout=send_timeout,
        rcvbuf=4096,  # the proxy's socket buffers fill after a few kilobytes
        pad_samples=8000,  # ~0.9 MB per collect_metrics result (the frame limit is 1 MiB)
    )
    warm_up = await rig.send(Planned("scale", {"replicas": 2}))
    assert (await rig.wait_final(warm_up))["state"] == "succeeded"

    rig.proxy.stall("up")
    stalled_at = time.monotonic()
    down_before = rig.proxy.forwarded["down"]
    rng = random.Random(7)
    for planned in plan_commands(rng, 3):
        await rig.send(planned)
    last_result_at = stalled_at
    # Big results pile up on the agent's side until a send blocks; then the connection must end
    # within the send timeout (a few seconds' margin for a loaded machine).
    for _ in range(5):
        finished = rig.audit.count("execution_finished")
        for _ in range(BIG_BATCH):
            await rig.send(Planned("collect_metrics", {"targets": ["workload"]}))
        await rig.audit.wait_for("execution_finished", count=finished + BIG_BATCH, within=20)
        last_result_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await rig.audit.wait_for("connection_down", within=send_timeout + 2)
            break
    if not rig.audit.count("connection_down"):
        pytest.fail(f"{len(rig.submitted)} commands' results never blocked the agent's send")
    down = rig.audit.matching("connection_down")[0]
    now = time.monotonic()
    # The send timed out (a write that did not complete): not the heartbeat (10 s, and the
    # stub's pings kept arriving), not the stub (60 s), not a close.
    assert "TimeoutError" in str(down["reason"]), reasons(rig)  # how soon: printed below
    # The other direction kept flowing all along: commands and pings reached the agent; the
    # warm-up, the three mixed commands and at least one big one arrived before the end.
    assert rig.proxy.forwarded["down"] > down_before
    events = [name for name, _ in rig.audit.records]
    received = events[: events.index("connection_down")].count("command_received")
    assert received >= 5, events

    await rig.audit.wait_for("connection_up", count=2, within=20)
    report = await rig.finish()
    print(
        f"\nstalled write: stalled at 0s, last result queued at "
        f"{last_result_at - stalled_at:.1f}s, "
        f"connection given up at {now - stalled_at:.1f}s (send_timeout {send_timeout}s), "
        f"{len(rig.submitted)} commands, {report.final_states}, "
        f"duplicates {report.duplicate_executions}, held in the stalled direction "
        f"{rig.proxy.stall_held['up']} B"
    )


# -- latency -----------------------------------------------------------------------------------


async def test_commands_succeed_under_latency_and_heartbeats_hold(make_rig: RigFactory) -> None:
    """200 ms added each way, heartbeat timeouts only ten times that: every command succeeds,
    each taking at least the round trip, and the connection never drops."""
    latency = 0.2
    rig = await make_rig(
        stub_heartbeat=HeartbeatSettings(interval=0.5, timeout=2.0),
        heartbeat_interval=0.5,
        heartbeat_timeout=2.0,
        latency=latency,
    )
    rng = random.Random(11)
    round_trips = []
    for planned in plan_commands(rng, 8):  # one at a time: each pays the round trip
        sent = time.monotonic()
        ref = await rig.send(planned)
        assert (await rig.wait_final(ref))["state"] == "succeeded"
        round_trips.append(time.monotonic() - sent)
    # And a burst, in flight together.
    refs = [await rig.send(planned) for planned in plan_commands(rng, 12)]
    for ref in refs:
        assert (await rig.wait_final(ref))["state"] == "succeeded"
    # command down, status up: at least one round trip per command.
    assert min(round_trips) >= 2 * latency, round_trips
    assert rig.audit.count("connection_down") == 0, reasons(rig)
    assert rig.audit.count("connection_up") == 1
    assert rig.proxy.connections == 1
    report = await rig.finish()
    print(
        f"\nlatency {latency * 1000:.0f} ms each way: {report.commands} commands "
        f"{report.final_states}, round trip min {min(round_trips):.2f}s max "
        f"{max(round_trips):.2f}s, reconnections 0"
    )


# -- lost bytes and cut connections ------------------------------------------------------------


async def stream_commands(rig: Rig, plan: list[Planned], rng: random.Random) -> None:
    for planned in plan:
        await rig.send(planned)
        await asyncio.sleep(rng.uniform(0.02, 0.12))  # the pace of the stream


async def wait_ready(rig: Rig) -> None:
    """Until the agent has a READY connection (hello and welcome went through) after its last
    ``connection_down``."""
    await rig.audit.wait_for("connection_up", count=rig.audit.count("connection_down") + 1)
    await asyncio.wait_for(rig.agent.agent.parts.link.ready.wait(), scaled(20))


async def wait_submitted(rig: Rig, count: int) -> None:
    while len(rig.submitted) < count:
        rig.progress.clear()
        await rig.progress.wait()


async def test_dropped_bytes_are_detected_and_nothing_is_lost_or_repeated(
    make_rig: RigFactory,
) -> None:
    """Bytes silently lost in either direction corrupt the TLS stream: the receiving side must
    notice (a record that does not decrypt, or silence until a heartbeat timeout), the
    connection is replaced, and the command stream loses nothing and runs nothing twice."""
    rig = await make_rig(
        stub_heartbeat=HeartbeatSettings(interval=0.5, timeout=3.0),
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
    )
    rng = random.Random(23)
    plan = plan_commands(rng, 60)
    directions: list[Direction] = ["down", "up", "down", "up"]
    points = sorted(rng.sample(range(5, len(plan) - 5), len(directions)))
    detected = []

    async def faults() -> None:
        for point, direction in zip(points, directions, strict=True):
            await wait_submitted(rig, point)
            await wait_ready(rig)
            downs, lost = rig.audit.count("connection_down"), rig.proxy.dropped[direction]
            # Longer than a heartbeat interval: a ping at least is lost; what follows the
            # window arrives out of sequence.
            dropped_at = time.monotonic()
            rig.proxy.drop(direction, 0.6)
            down = await rig.audit.wait_for("connection_down", count=downs + 1, within=20)
            assert rig.proxy.dropped[direction] > lost  # bytes really were lost
            after = time.monotonic() - dropped_at
            detected.append(f"{direction} after {after:.1f}s: {down['reason']}")

    async with asyncio.timeout(scaled(120)), asyncio.TaskGroup() as group:
        group.create_task(stream_commands(rig, plan, rng))
        group.create_task(faults())
    report = await rig.finish()
    assert rig.audit.count("connection_up") == rig.audit.count("connection_down")
    print(
        f"\ndropped bytes: {report.commands} commands {report.final_states}, duplicates "
        f"{report.duplicate_executions}, lost {rig.proxy.dropped} B, "
        f"{rig.audit.count('connection_up')} connections, detected as {detected}"
    )


async def test_cuts_in_a_command_stream_lose_and_repeat_nothing(make_rig: RigFactory) -> None:
    rig = await make_rig(
        stub_heartbeat=HeartbeatSettings(interval=1.0, timeout=5.0),
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
    )
    rng = random.Random(31)
    plan = plan_commands(rng, 80)
    cuts = 5
    points = sorted(rng.sample(range(5, len(plan) - 5), cuts))

    async def faults() -> None:
        for point in points:
            await wait_submitted(rig, point)
            await wait_ready(rig)
            downs = rig.audit.count("connection_down")
            await asyncio.sleep(rng.uniform(0.0, 0.2))  # a random moment of the stream
            rig.proxy.cut()
            await rig.audit.wait_for("connection_down", count=downs + 1, within=20)

    async with asyncio.timeout(scaled(120)), asyncio.TaskGroup() as group:
        group.create_task(stream_commands(rig, plan, rng))
        group.create_task(faults())
    report = await rig.finish()
    assert rig.audit.count("connection_down") >= cuts
    assert rig.audit.count("connection_up") == rig.audit.count("connection_down")
    print(
        f"\ncuts: {cuts} cuts, {report.commands} commands {report.final_states}, duplicates "
        f"{report.duplicate_executions}, redeliveries refused {report.delivery_refusals}"
    )
