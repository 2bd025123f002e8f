"""Streams end to end: the stub's forward listener -> signed grant -> agent -> target, over real
mutual TLS on loopback, with real TCP targets (docs/PROTOCOL.md §13)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent.cli import main as agent_cli
from agent.io.tls import client_context
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver

AGENT = "agent-1"


def stream_policy(*targets: str, approval: bool = False, max_duration: int = 600) -> str:
    quoted = ", ".join(f'"{t}"' for t in targets)
    return f"""\
version = 1

[open_stream]
allow = true
targets = [{quoted}]
max_duration = {max_duration}
require_approval = {"true" if approval else "false"}

[collect_metrics]
allow = true
targets = ["workload", "host"]

[approvals]
users = ["{getpass.getuser()}"]
"""


@dataclass
class Target:
    """A TCP server on loopback standing in for a database port inside the customer's network."""

    port: int
    server: asyncio.Server
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything, half-close after the peer's EOF (a request/response protocol)."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def tcp_target(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] = echo_until_eof,
) -> AsyncIterator[Target]:
    holder: list[Target] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].connections += 1
        try:
            with contextlib.suppress(ConnectionError):
                await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    target = Target(port=server.sockets[0].getsockname()[1], server=server)
    holder.append(target)
    async with server:
        yield target


async def started(
    start_agent: AgentStarter, stub: StubServer, policy: str, **kwargs: Any
) -> RunningAgent:
    return await start_agent(
        port=stub.agent_port, driver=RecordingDriver(), policy=policy, **kwargs
    )


async def forward_to(api: StubClient, target: str, max_duration: int = 600) -> tuple[str, int, str]:
    forward = await api.start_forward(
        AGENT, target, listen="127.0.0.1:0", max_duration=max_duration
    )
    host, port = forward["listen"].rsplit(":", 1)
    return host, int(port), forward["id"]


async def exchange(host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read until the other side's EOF."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(scaled(30)):
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            return await reader.read()
    finally:
        writer.close()


async def final_stream(api: StubClient) -> dict[str, Any]:
    commands = await api.commands(agent_id=AGENT, limit=1)
    answer = await api.command(commands[0]["ref"], wait_for="final", wait_seconds=scaled(30))
    return dict(answer["command"])


@pytest.mark.parametrize("stub_offers_v2", [True, False], ids=["v2", "older-stub-v1"])
async def test_a_forwarded_connection_reaches_the_target_and_is_audited(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, stub_offers_v2: bool
) -> None:
    """Both framings (PROTOCOL §13.3): version 2, and version 1 with a stub that does not
    answer the agent's offer (as an older control plane)."""
    stub.streams.offer_v2 = stub_offers_v2
    async with tcp_target() as target:
        running = await started(start_agent, stub, stream_policy(f"127.0.0.1:{target.port}"))
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        payload = os.urandom(3 * 1024 * 1024 + 17)  # several messages each way

        echoed = await exchange(host, port, payload)

        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        command = await final_stream(api)
        assert command["type"] == "open_stream"
        assert command["state"] == "succeeded", command
        result = command["result"]
        assert result["bytes_to_target"] == len(payload)
        assert result["bytes_from_target"] == len(payload)
        assert result["ended_by"] == "closed"
        closed = await running.audit.wait_for("stream_closed", jti=command["jti"])
        assert closed["bytes_to_target"] == len(payload)
        assert closed["ended_by"] == "closed"
        received = running.audit.matching("command_received", jti=command["jti"])
        assert received[0]["iss"] == "cp-stub"
        assert running.audit.count("stream_opened", jti=command["jti"]) == 1
        assert target.connections == 1
        assert (await api.forwards())[0]["last_framing"] == (2 if stub_offers_v2 else 1)


async def test_an_older_agent_gets_websocket_messages_from_the_stub(
    stub: StubServer, api: StubClient, pki: PKIPaths
) -> None:
    """An older agent dials with websockets' own client, offers no framing, and carries the
    stream in binary messages (an empty one ends a direction): the stub answers in kind."""
    async with tcp_target() as target:
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        client = asyncio.create_task(exchange(host, port, b"SELECT 1;"))
        async with asyncio.timeout(scaled(20)), stub.streams.changed:
            await stub.streams.changed.wait_for(lambda: stub.streams.waiting_for(AGENT))
        (stream_id,) = stub.streams.waiting_for(AGENT)
        context = client_context(
            ca_bundle=pki.server_ca_cert, cert=pki.agent_cert(AGENT), key=pki.agent_key(AGENT)
        )
        url = f"wss://localhost:{stub.agent_port}/v1/agent/streams/{stream_id}"
        async with asyncio.timeout(scaled(20)), connect(url, ssl=context) as old_agent:
            assert old_agent.response is not None
            assert "BYOC-Stream-Framing" not in old_agent.response.headers
            received = b""
            while message := await old_agent.recv():  # until the client's end
                assert isinstance(message, bytes)
                received += message
            await old_agent.send(received.upper())
            await old_agent.send(b"")
            await old_agent.wait_closed()
        assert old_agent.close_code == 1000
        assert received == b"SELECT 1;"
        assert await client == b"SELECT 1;".upper()


async def test_a_target_outside_the_policy_is_refused_before_anything_connects(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    async with tcp_target() as allowed, tcp_target() as other:
        await started(start_agent, stub, stream_policy(f"127.0.0.1:{allowed.port}"))
        host, port, _ = await forward_to(api, f"127.0.0.1:{other.port}")

        assert await exchange(host, port, b"hello") == b""  # closed without a stream

        command = await final_stream(api)
        assert command["state"] == "rejected"
        assert command["reason"] == "policy_denied"
        assert other.connections == 0


@pytest.mark.parametrize(
    "target", ["169.254.169.254:80", "[fd00:ec2::254]:80", "[::ffff:169.254.169.254]:80"]
)
async def test_metadata_addresses_need_a_rule_that_names_them(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, target: str
) -> None:
    await started(start_agent, stub, stream_policy("0.0.0.0/0:1-65535", "[::/0]:1-65535"))
    host, port, _ = await forward_to(api, target)

    assert await exchange(host, port, b"GET / HTTP/1.0\r\n\r\n") == b""

    command = await final_stream(api)
    assert command["state"] == "rejected"
    assert "link-local or instance-metadata" in command["detail"]


async def test_a_target_that_refuses_fails_the_stream_and_closes_the_client(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    async with tcp_target() as target:
        closed_port = target.port
    await started(start_agent, stub, stream_policy(f"127.0.0.1:{closed_port}"))
    host, port, _ = await forward_to(api, f"127.0.0.1:{closed_port}")

    assert await exchange(host, port, b"hello") == b""

    command = await final_stream(api)
    assert command["state"] == "failed"
    assert command["reason"] == "target_unreachable"


async def settled(condition: Callable[[], bool], within: float = 10.0) -> bool:
    """Wait (bounded) until ``condition`` holds: sockets and tasks close on later loop turns."""
    deadline = time.monotonic() + scaled(within)
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
    return count


async def test_an_approved_stream_waits_for_a_person_on_the_host(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    async with tcp_target() as target:
        running = await started(
            start_agent, stub, stream_policy(f"127.0.0.1:{target.port}", approval=True)
        )
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        client = asyncio.create_task(exchange(host, port, b"SELECT 1;"))
        pending = await running.audit.wait_for("policy_decision", verdict="require_approval")
        assert target.connections == 0
        socket = str(running.paths.control_socket)

        assert (
            await asyncio.to_thread(agent_cli, ["approve", str(pending["jti"]), "--socket", socket])
            == 0
        )

        assert await client == b"SELECT 1;"
        assert (await final_stream(api))["state"] == "succeeded"
        assert target.connections == 1


async def test_max_duration_ends_a_stream(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers, holds the connection open

    async with tcp_target(silent) as target:
        running = await started(start_agent, stub, stream_policy(f"127.0.0.1:{target.port}"))
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}", max_duration=1)
        reader, writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(scaled(20)):
            assert await reader.read() == b""  # the stream ended by itself
        writer.close()

        command = await final_stream(api)
        assert command["state"] == "succeeded"
        assert command["result"]["ended_by"] == "max_duration"
        closed = await running.audit.wait_for("stream_closed", jti=command["jti"])
        assert 1000 <= int(str(closed["duration_ms"])) < 1000 * scaled(15)


async def test_losing_the_tunnel_ends_its_streams(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    async with tcp_target() as target:
        running = await started(start_agent, stub, stream_policy(f"127.0.0.1:{target.port}"))
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"ping")
        async with asyncio.timeout(scaled(20)):
            assert await reader.readexactly(4) == b"ping"  # the stream is up
            stub.hub.links[AGENT].websocket.transport.abort()  # the tunnel drops
            rest = b""
            with contextlib.suppress(ConnectionError):
                rest = await reader.read()
        assert rest == b""
        writer.close()

        command = await final_stream(api)  # reported once the agent is back
        assert command["state"] == "failed"
        assert command["reason"] == "session_lost"
        assert running.agent.parts.streams.active == {}


async def test_many_concurrent_streams_leave_no_task_or_socket_behind(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    streams = 40
    async with tcp_target() as target:
        running = await started(
            start_agent,
            stub,
            stream_policy(f"127.0.0.1:{target.port}"),
            command_rate=1000.0,
            command_burst=1000,
        )
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        await exchange(host, port, b"warm-up")  # the first stream creates lasting state
        assert await settled(lambda: not running.agent.parts.streams.active)
        tasks_before = len(asyncio.all_tasks())
        sockets_before = open_sockets()
        payloads = [os.urandom(256 * 1024 + i) for i in range(streams)]

        echoed = await asyncio.gather(*(exchange(host, port, p) for p in payloads))

        assert echoed == payloads
        assert target.connections == streams + 1
        records = await api.commands(agent_id=AGENT, limit=streams + 1)
        finals = [
            (await api.command(r["ref"], wait_for="final", wait_seconds=scaled(20)))["command"]
            for r in records
        ]
        assert [c["state"] for c in finals] == ["succeeded"] * (streams + 1)
        assert await settled(lambda: len(asyncio.all_tasks()) <= tasks_before), (
            f"{len(asyncio.all_tasks()) - tasks_before} tasks leaked"
        )
        assert await settled(lambda: open_sockets() <= sockets_before), (
            f"{open_sockets() - sockets_before} sockets leaked"
        )
        assert running.agent.parts.streams.describe()["opened_total"] == streams + 1


async def test_commands_keep_flowing_while_a_stream_is_saturated(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """Bulk bytes travel on their own connection: the tunnel never waits behind them. (The
    latency figure is a benchmark: bench/, docs/BENCHMARKS.md.)"""
    chunk = b"x" * 65536

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(chunk)
            await writer.drain()

    async with tcp_target(firehose) as target:
        await started(start_agent, stub, stream_policy(f"127.0.0.1:{target.port}"))
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        reader, writer = await asyncio.open_connection(host, port)
        received = 0
        async with asyncio.timeout(scaled(30)):
            while received < 64 * 1024 * 1024:  # the stream is saturated
                received += len(await reader.read(1 << 20))
            for _ in range(5):
                sent = await api.send(AGENT, "collect_metrics", {"targets": ["host"]})
                answer = await api.command(sent["ref"], wait_for="final", wait_seconds=10)
                assert answer["command"]["state"] == "succeeded"
                received += len(await reader.read(1 << 20))  # and keep it saturated
        writer.close()


async def test_a_slow_reader_never_makes_the_agent_buffer_without_limit(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """The operator's client reads nothing while the target has 256 MiB to send: the target
    must be stopped by back-pressure long before, with only socket buffers and the bounded
    per-stream queues in between."""
    offered = 256 * 1024 * 1024
    sent = 0
    blocked = asyncio.Event()
    chunk = b"y" * 65536

    async def eager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        while sent < offered:
            writer.write(chunk)
            sent += len(chunk)
            try:
                async with asyncio.timeout(scaled(1.0)):
                    await writer.drain()
            except TimeoutError:
                blocked.set()  # nobody reads: back-pressure reached the target
                await writer.drain()

    async with tcp_target(eager) as target:
        running = await started(start_agent, stub, stream_policy(f"127.0.0.1:{target.port}"))
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        reader, writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(scaled(60)):
            await blocked.wait()
        in_flight = sent
        # Socket buffers on loopback autotune to a few MiB each; four sockets and the bounded
        # queues sit between the target and the reader.
        assert in_flight < 48 * 1024 * 1024, f"{in_flight / 2**20:.0f} MiB left the target"
        splice = next(iter(running.agent.parts.streams.active.values()))
        assert splice.from_socket <= in_flight
        got = 0
        async with asyncio.timeout(scaled(60)):  # and it all arrives once the reader reads
            while got < offered:
                data = await reader.read(1 << 20)
                assert data
                got += len(data)
        writer.close()


async def test_only_the_granted_agent_can_attach_to_a_stream(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, pki: PKIPaths
) -> None:
    """Another agent (its own valid certificate) that learns a stream id gets HTTP 404."""
    async with tcp_target() as target:
        running = await started(
            start_agent, stub, stream_policy(f"127.0.0.1:{target.port}", approval=True)
        )
        host, port, _ = await forward_to(api, f"127.0.0.1:{target.port}")
        client = asyncio.create_task(exchange(host, port, b"secret"))
        pending = await running.audit.wait_for("policy_decision", verdict="require_approval")
        stream_id = str(pending["jti"])
        other = client_context(
            ca_bundle=pki.server_ca_cert,
            cert=pki.agent_cert("agent-2"),
            key=pki.agent_key("agent-2"),
        )
        url = f"wss://localhost:{stub.agent_port}/v1/agent/streams/{stream_id}"

        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, ssl=other):
                pass

        assert refused.value.response.status_code == 404
        assert stub.streams.expected(stream_id, AGENT)  # still waiting for the right agent
        client.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await client


async def test_cp_stub_forward_serves_an_http_client_until_interrupted(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """The documented path: ``cp-stub forward`` in a terminal, ``curl`` on its port."""

    async def http_metrics(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'demo_workload_info{version="1.0.0"} 1\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        writer.write(body)
        await writer.drain()

    async with tcp_target(http_metrics) as target:
        await started(start_agent, stub, stream_policy(f"127.0.0.1:{target.port}"))
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control_plane_stub.cli", "forward", AGENT,
            "--target", f"127.0.0.1:{target.port}", "--listen", "127.0.0.1:0",
            "--api", f"http://127.0.0.1:{stub.api_port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert cli.stdout is not None
        try:
            async with asyncio.timeout(scaled(30)):
                banner = (await cli.stdout.readline()).decode()
            listen = banner.split()[1]  # "forwarding 127.0.0.1:PORT -> agent ..."
            async with httpx.AsyncClient(timeout=scaled(20)) as http:
                response = await http.get(f"http://{listen}/metrics")
            assert response.status_code == 200
            assert 'demo_workload_info{version="1.0.0"} 1' in response.text
        finally:
            cli.send_signal(signal.SIGINT)
            async with asyncio.timeout(scaled(30)):
                rest, _ = await cli.communicate()
        assert cli.returncode == 0, rest.decode()
        assert "stopped: 1 connection(s)" in rest.decode()
        assert await api.forwards() == []
