"""Streams end to end: the stub's forward listener -> signed grant -> agent -> target, over real
mutual TLS on loopback, with real TCP targets (docs/PROTOCOL.md §12)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

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
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)

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


async def test_a_forwarded_connection_reaches_the_target_and_is_audited(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
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
