"""How a stream connection's framing failures end a stream (agent/io/splice.py, PROTOCOL §13.4).

The agent's side of a stream connection is driven here directly, over a real WebSocket on
loopback, by a peer that breaks the framing rules: the stream must end with a reason of its own
(``message_too_large``: the grant is ``failed``), not look like the peer closing normally.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent.io.splice import MAX_STREAM_MESSAGE, CloseCode, Splice
from agent.io.streams import AGENT_SIDE_ENDS
from tests.conftest import scaled


@pytest.fixture
async def target() -> AsyncIterator[int]:
    """A TCP target that reads until EOF."""

    async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(drain, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@contextlib.asynccontextmanager
async def agent_side(target: int) -> AsyncIterator[tuple[int, asyncio.Future[str]]]:
    """A stream connection endpoint carrying bytes to ``target`` as the agent does: its port,
    and how the stream ended."""
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def carry(websocket: ServerConnection) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", target)
        splice = Splice(peer="control_plane", local="target")
        ended.set_result(await splice.run(websocket, reader, writer))

    async with serve(
        carry, "127.0.0.1", 0, max_size=MAX_STREAM_MESSAGE, compression=None
    ) as server:
        yield server.sockets[0].getsockname()[1], ended
        await asyncio.wait_for(asyncio.shield(ended), scaled(10))


async def test_a_message_over_the_limit_fails_the_stream(target: int) -> None:
    async with (
        agent_side(target) as (port, ended),
        connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as peer,
    ):
        await peer.send(b"x" * MAX_STREAM_MESSAGE)  # at the limit: carried
        await peer.send(b"x" * (MAX_STREAM_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(scaled(10)):
                await peer.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CloseCode.MESSAGE_TOO_BIG
    assert await asyncio.wait_for(ended, scaled(10)) == "message_too_large"
    assert "message_too_large" in AGENT_SIDE_ENDS  # reported as failed, not succeeded


async def test_the_peer_closing_is_not_a_framing_failure(target: int) -> None:
    async with (
        agent_side(target) as (port, ended),
        connect(f"ws://127.0.0.1:{port}", compression=None) as peer,
    ):
        await peer.send(b"hello")
    assert await asyncio.wait_for(ended, scaled(10)) == "control_plane_closed"
