"""Carry bytes between a TCP socket and a stream connection (a WebSocket), both ways, until the
stream ends. The agent uses it between the target and the control plane; the stub control plane
between an operator's local connection and the agent. docs/PROTOCOL.md §13.3 is the
contract.

Framing: each binary message carries the next bytes of the stream; an empty binary message ends
one direction (the receiver half-closes its socket, like a TCP FIN). A text message is a
protocol error. The stream ends when both directions have ended, when either side closes or
fails, at the deadline, or when ``abort`` is set.

Flow control is TCP's: each direction holds at most one read chunk in hand, ``send`` waits while
the WebSocket's write buffer is above its high-water mark, ``drain`` waits while the socket's is,
and the WebSocket stops reading when ``max_queue`` messages are waiting. Nothing here grows with
the amount of data carried.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

MAX_STREAM_MESSAGE: Final = 256 * 1024
"""The largest binary message either side may send on a stream connection."""
CLOSE_WAIT: Final = 2.0
"""Seconds to wait for the peer's close frame once a stream has ended normally."""
STREAM_QUEUE: Final = 4
"""Messages a stream connection buffers before it stops reading (TCP then pushes back)."""


class CloseCode:
    """WebSocket close codes on a stream connection (docs/PROTOCOL.md §13.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the agent is stopping
    UNSUPPORTED_DATA = 1003  # a text message on a stream connection
    INVALID_DATA = 1007  # invalid UTF-8 in a text message (the WebSocket layer's own rule)
    MESSAGE_TOO_BIG = 1009  # a message over MAX_STREAM_MESSAGE (the WebSocket layer's own rule)
    MAX_DURATION = 4410
    SOCKET_FAILED = 4411  # the target (or the operator's local connection) failed
    SESSION_LOST = 4412


@dataclass(eq=False)
class Splice:
    """One stream's counters and its abort switch."""

    peer: str
    """Who is at the WebSocket end, for end reasons: ``control_plane`` or ``agent``."""
    local: str
    """Who is at the socket end: ``target`` or ``client``."""
    read_chunk: int = MAX_STREAM_MESSAGE
    to_socket: int = 0
    from_socket: int = 0
    abort_reason: str | None = None
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
            self.aborted.set()

    async def run(
        self,
        websocket: Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        deadline: float | None = None,
    ) -> str:
        """Carry the stream until it ends; close both ends and return why it ended:
        ``closed`` (both directions ended), ``<peer>_closed``, ``<local>_failed``,
        ``protocol_error``, ``max_duration`` (``deadline``, on the monotonic clock) or the
        abort reason."""
        inbound = asyncio.create_task(self._to_socket(websocket, writer))
        outbound = asyncio.create_task(self._from_socket(reader, websocket))
        aborted = asyncio.create_task(self.aborted.wait())
        ends: dict[str, str] = {}
        ended_by = ""
        try:
            while not ended_by:
                waiting = {t for t in (inbound, outbound) if not t.done()} | {aborted}
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    ended_by = "max_duration"
                elif aborted in done:
                    ended_by = str(self.abort_reason)
                else:
                    for task, side in ((inbound, "in"), (outbound, "out")):
                        if task in done and side not in ends:
                            ends[side] = task.result()
                    failures = [end for end in ends.values() if end != "eof"]
                    if failures:
                        ended_by = failures[0]
                    elif len(ends) == 2:
                        ended_by = "closed"
        finally:
            for pending in (inbound, outbound, aborted):
                pending.cancel()
            await asyncio.gather(inbound, outbound, aborted, return_exceptions=True)
            writer.transport.abort()
            await self._close(websocket, ended_by)
        return ended_by

    @staticmethod
    async def _close(websocket: Connection, ended_by: str) -> None:
        """Close with the code that says why; do not wait long for the peer's half of the
        closing handshake (after an abnormal end the pipe may be full): abort instead."""
        # Both directions ended: the pipe is empty and the handshake is quick. Otherwise the
        # pipe may be full (the peer stopped reading): give the close frame a moment only.
        wait = CLOSE_WAIT if ended_by == "closed" or ended_by.endswith("_closed") else 0.25
        try:
            async with asyncio.timeout(wait):
                await websocket.close(close_code(ended_by), ended_by[:100])
        except (TimeoutError, OSError, ConnectionClosed):
            websocket.transport.abort()

    async def _to_socket(self, websocket: Connection, writer: asyncio.StreamWriter) -> str:
        while True:
            try:
                message = await websocket.recv()
            except ConnectionClosed as exc:
                return self._closed(exc)
            if isinstance(message, str):
                return "protocol_error"
            try:
                if not message:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return "eof"
                writer.write(message)
                await writer.drain()
            except OSError:
                return f"{self.local}_failed"
            if writer.transport.is_closing():  # drain() does not raise once the peer reset
                return f"{self.local}_failed"
            self.to_socket += len(message)

    def _closed(self, exc: ConnectionClosed) -> str:
        """Why the stream connection closed under us: the peer closed it, or our WebSocket layer
        failed it because the peer broke the framing (a message over the size limit: 1009;
        invalid UTF-8 in a text message: 1007)."""
        we_failed_it = exc.sent is not None and (exc.rcvd is None or not exc.rcvd_then_sent)
        if we_failed_it and exc.sent is not None:
            if exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                return "message_too_large"
            if exc.sent.code == CloseCode.INVALID_DATA:
                return "protocol_error"
        return f"{self.peer}_closed"

    async def _from_socket(self, reader: asyncio.StreamReader, websocket: Connection) -> str:
        while True:
            try:
                data = await reader.read(self.read_chunk)
            except OSError:
                return f"{self.local}_failed"
            try:
                await websocket.send(data)  # b"" ends this direction
            except ConnectionClosed:
                return f"{self.peer}_closed"
            if not data:
                return "eof"
            self.from_socket += len(data)


def close_code(ended_by: str) -> int:
    if ended_by.endswith("_failed"):
        return CloseCode.SOCKET_FAILED
    return {
        "agent_stopping": CloseCode.GOING_AWAY,
        "protocol_error": CloseCode.UNSUPPORTED_DATA,
        "message_too_large": CloseCode.MESSAGE_TOO_BIG,
        "max_duration": CloseCode.MAX_DURATION,
        "session_lost": CloseCode.SESSION_LOST,
    }.get(ended_by, CloseCode.NORMAL)
