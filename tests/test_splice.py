"""The agent's side of a stream connection (agent/io/stream_transport.py, agent/io/splice.py,
PROTOCOL §13.3-13.4), driven directly over real TLS on loopback.

The peers are control planes of both generations: websockets' own server, which is what an
older control plane is (version 1, WebSocket messages, no framing header in its answer), and a
version 2 peer built from the stub's own parts that writes records byte by byte, so that it can
break the framing. A broken framing must end the stream with a reason of its own
(``message_too_large``, ``protocol_error``: the grant is ``failed``), not look like the peer
closing normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.utils import accept_key

from agent.core.stream_framing import close_record, data_record, end_record
from agent.io import event_loop
from agent.io.egress import Route
from agent.io.splice import MAX_STREAM_MESSAGE, CloseCode, SocketEnd, Splice, StreamConnection
from agent.io.stream_transport import (
    FRAMING_HEADER,
    DialSettings,
    StreamServerConnection,
    answer_upgrade,
    dial_stream,
    take_over,
)
from agent.io.streams import AGENT_SIDE_ENDS
from agent.io.tls import client_context, server_context
from certs.pki import PKIPaths
from tests.conftest import scaled


@dataclass
class Target:
    """A TCP target that records what it receives and can answer."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bytes = b""


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    state = Target()

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(state.answer)
        writer.write_eof()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                state.received += data
        state.eof.set()
        writer.close()

    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()


Handler = Callable[[ServerConnection], Awaitable[None]]


@contextlib.asynccontextmanager
async def control_plane(
    pki: PKIPaths, handler: Handler, *, v2: bool
) -> AsyncIterator[StreamConnection]:
    """A control plane serving ``handler`` (websockets' own server; with ``v2``, one that
    accepts version 2 framing the way the stub does); yields the agent's connection to it."""
    context = server_context(cert=pki.server_cert, key=pki.server_key, client_ca=pki.agent_ca_cert)

    def answer(connection: ServerConnection, request: Request, response: Response) -> None:
        answer_upgrade(connection, request, response, offer_v2=True)

    options: dict[str, object] = {"max_size": None, "compression": None}
    if v2:
        options |= {"create_connection": StreamServerConnection, "process_response": answer}
    async with serve(handler, "127.0.0.1", 0, ssl=context, **options) as server:  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        agent = client_context(
            ca_bundle=pki.server_ca_cert,
            cert=pki.agent_cert("agent-1"),
            key=pki.agent_key("agent-1"),
        )
        connection = await dial_stream(
            f"wss://localhost:{port}/v1/agent/streams/s1",
            agent,
            Route(proxy=None),
            DialSettings(user_agent="byoc-agent/test"),
        )
        yield connection


async def carry(connection: StreamConnection, target: Target) -> str:
    """The agent's side: connect to the target, splice until the stream ends."""
    _, end = await asyncio.get_running_loop().create_connection(SocketEnd, "127.0.0.1", target.port)
    splice = Splice(peer="control_plane", local="target")
    async with asyncio.timeout(scaled(10)):
        return await splice.run(connection, end)


async def test_an_older_control_plane_gets_websocket_messages_both_ways(
    pki: PKIPaths, target: Target
) -> None:
    target.answer = os.urandom(700_000)  # several messages
    sent = os.urandom(600_000)
    got = bytearray()
    offered: list[str | None] = []

    async def old_control_plane(websocket: ServerConnection) -> None:
        assert websocket.request is not None
        offered.append(websocket.request.headers.get(FRAMING_HEADER))
        for start in range(0, len(sent), 100_000):
            await websocket.send(sent[start : start + 100_000])
        await websocket.send(b"")  # our direction ends
        while message := await websocket.recv():
            assert isinstance(message, bytes)
            got.extend(message)
        await websocket.wait_closed()

    async with control_plane(pki, old_control_plane, v2=False) as connection:
        assert connection.version == 1
        ended_by = await carry(connection, target)

    assert ended_by == "closed"
    assert offered == ["2"]  # offered, not taken: version 1
    assert hashlib.sha256(target.received).digest() == hashlib.sha256(sent).digest()
    assert hashlib.sha256(got).digest() == hashlib.sha256(target.answer).digest()
    assert target.eof.is_set()


async def test_a_message_over_the_limit_fails_the_stream(pki: PKIPaths, target: Target) -> None:
    closed: list[int | None] = []

    async def too_big(websocket: ServerConnection) -> None:
        await websocket.send(b"x" * MAX_STREAM_MESSAGE)  # at the limit: carried
        await websocket.send(b"x" * (MAX_STREAM_MESSAGE + 1))
        with contextlib.suppress(ConnectionClosed):
            while True:
                await websocket.recv()
        closed.append(websocket.close_code)

    async with control_plane(pki, too_big, v2=False) as connection:
        ended_by = await carry(connection, target)

    assert ended_by == "message_too_large"
    assert "message_too_large" in AGENT_SIDE_ENDS  # reported as failed, not succeeded
    assert len(target.received) == MAX_STREAM_MESSAGE
    assert closed == [CloseCode.MESSAGE_TOO_BIG]


async def test_a_text_message_is_a_protocol_error(pki: PKIPaths, target: Target) -> None:
    closed: list[int | None] = []

    async def text(websocket: ServerConnection) -> None:
        await websocket.send("not bytes")
        with contextlib.suppress(ConnectionClosed):
            while True:
                await websocket.recv()
        closed.append(websocket.close_code)

    async with control_plane(pki, text, v2=False) as connection:
        assert await carry(connection, target) == "protocol_error"
    assert closed == [CloseCode.UNSUPPORTED_DATA]


async def test_the_peer_closing_is_not_a_framing_failure(pki: PKIPaths, target: Target) -> None:
    async def hello_and_close(websocket: ServerConnection) -> None:
        await websocket.send(b"hello")
        await websocket.close()

    async with control_plane(pki, hello_and_close, v2=False) as connection:
        assert await carry(connection, target) == "control_plane_closed"
    assert target.received == b"hello"


# -- version 2 --------------------------------------------------------------------------------


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


def raw_peer(wire: bytes, collected: list[bytes]) -> Handler:
    """A version 2 control plane that writes ``wire`` as it is and keeps what it receives."""

    async def handler(websocket: ServerConnection) -> None:
        connection = take_over(websocket)
        collect = Collect()
        collect.data += connection.holder.data
        connection.transport.set_protocol(collect)
        connection.transport.resume_reading()
        connection.transport.write(wire)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(scaled(5)):
                await collect.lost
        connection.transport.abort()
        collected.append(bytes(collect.data))
        if connection.on_lost is not None:
            connection.on_lost(None)

    return handler


async def test_version_2_records_both_ways_with_half_close(pki: PKIPaths, target: Target) -> None:
    target.answer = b"pong"
    collected: list[bytes] = []
    wire = data_record(b"ping ") + data_record(b"ping") + end_record()

    async with control_plane(pki, raw_peer(wire, collected), v2=True) as connection:
        assert connection.version == 2
        ended_by = await carry(connection, target)

    assert ended_by == "closed"
    assert target.received == b"ping ping"
    assert collected == [data_record(b"pong") + end_record() + close_record(1000, "closed")]


@pytest.mark.parametrize(
    ("wire", "ended_by", "code"),
    [
        (b"\x00\x04\x00\x01" + b"x" * 64, "message_too_large", CloseCode.MESSAGE_TOO_BIG),
        (b"\x09\x00\x00\x00", "protocol_error", CloseCode.UNSUPPORTED_DATA),
        (close_record(4404, "no such stream"), "control_plane_closed", 4404),
    ],
)
async def test_version_2_framing_failures_end_the_stream_with_their_reason(
    pki: PKIPaths, target: Target, wire: bytes, ended_by: str, code: int
) -> None:
    collected: list[bytes] = []

    async with control_plane(pki, raw_peer(wire, collected), v2=True) as connection:
        assert await carry(connection, target) == ended_by

    (answer,) = collected
    assert answer.startswith(b"\x02")  # the agent's CLOSE record, with the code that says why
    assert int.from_bytes(answer[4:6], "big") == code


async def test_bytes_right_behind_the_upgrade_response_are_the_streams(
    pki: PKIPaths, target: Target
) -> None:
    """A control plane may write records in the same TLS record as its 101: the dialer stops
    reading at the end of the response, and they reach the target."""
    context = server_context(cert=pki.server_cert, key=pki.server_key, client_ca=pki.agent_ca_cert)

    async def one_write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n{FRAMING_HEADER}: 2\r\n\r\n".encode()
            + data_record(b"early")
            + end_record()
        )
        await reader.read()  # until the agent closes
        writer.close()

    server = await asyncio.start_server(one_write, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    agent = client_context(
        ca_bundle=pki.server_ca_cert, cert=pki.agent_cert("agent-1"), key=pki.agent_key("agent-1")
    )
    async with server:
        connection = await dial_stream(
            f"wss://localhost:{port}/v1/agent/streams/s1",
            agent,
            Route(proxy=None),
            DialSettings(user_agent="byoc-agent/test"),
        )
        assert bytes(connection.holder.data) == data_record(b"early") + end_record()
        await carry(connection, target)

    await asyncio.wait_for(target.eof.wait(), scaled(5))
    assert target.received == b"early"


def test_a_saturated_stream_reads_one_chunk_per_event_loop_turn(pki: PKIPaths) -> None:
    """The bounded share of each event-loop turn (agent/io/splice.py), on uvloop, whose libuv
    reads up to 32 times per readiness event: between two turns of the loop (a callback that
    reschedules itself marks them) the splice moves at most about one chunk per direction, so
    the tunnel's frames never wait behind a burst. Counted in bytes, not timed."""
    pytest.importorskip("uvloop")
    total = 32 * MAX_STREAM_MESSAGE

    async def scenario() -> list[int]:
        drained = asyncio.Event()

        async def discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(1 << 20):
                pass
            writer.close()
            await writer.wait_closed()
            drained.set()

        sink = await asyncio.start_server(discard, "127.0.0.1", 0)
        target = Target(port=sink.sockets[0].getsockname()[1])
        wire = b"".join(data_record(b"z" * MAX_STREAM_MESSAGE) for _ in range(32))
        collected: list[bytes] = []
        per_turn: list[int] = []
        async with sink, control_plane(pki, raw_peer(wire + end_record(), collected), v2=True) as c:
            _, end = await asyncio.get_running_loop().create_connection(
                SocketEnd, "127.0.0.1", target.port
            )
            splice = Splice(peer="control_plane", local="target")
            moved = asyncio.Event()
            last = 0

            def tick() -> None:  # once per turn of the loop: what moved since the last one
                nonlocal last
                per_turn.append(splice.to_socket - last)
                last = splice.to_socket
                if splice.to_socket < total:
                    asyncio.get_running_loop().call_soon(tick)
                else:
                    moved.set()

            asyncio.get_running_loop().call_soon(tick)
            run = asyncio.ensure_future(splice.run(c, end))
            await asyncio.wait_for(moved.wait(), scaled(20))
            splice.abort("test_done")
            await run
            await asyncio.wait_for(drained.wait(), scaled(10))
        return per_turn

    per_turn = event_loop.run(scenario(), "uvloop")

    assert sum(per_turn) == total
    assert max(per_turn) <= 2 * MAX_STREAM_MESSAGE, sorted(per_turn)[-5:]
