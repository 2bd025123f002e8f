"""Carry bytes between a TCP socket and a stream connection, both ways, until the stream ends.
The agent uses it between the target and the control plane; the stub control plane between an
operator's local connection and the agent. docs/PROTOCOL.md §13.3 is the contract.

How bytes move (the stream's speed, docs/BENCHMARKS.md): both ends are asyncio
``BufferedProtocol``\\ s wired to each other, with no task per chunk and no queue. A read from the
socket lands in a buffer with room for a record header in front of it, and goes to the stream
connection's TLS transport in one write (version 2 framing: no copy in Python); a read from the
stream connection lands in another buffer, and the payload slices in it are written to the
socket as they arrive (a record's bytes are passed on before the record is complete). A buffer
still referenced by a transport's write queue is never reused: the next read gets a new one.

Framing is a codec (agent/io/stream_codecs.py): version 2 records or version 1 WebSocket
messages, negotiated in the upgrade (agent/io/stream_transport.py).

Flow control is TCP's and bounded: each end stops reading while the other end's write buffer
is above its high-water mark (one read chunk), so each direction holds at most a read chunk and
a transport's write buffer; nothing grows with the amount of data carried.

A saturated stream takes a bounded share of every event-loop turn: an end that has read
``read_chunk`` bytes stops reading until the next turn, so the tunnel's frames never wait behind
more than one chunk per stream direction.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from agent.core import stream_framing
from agent.core.stream_framing import Close, Data, End, FramingError
from agent.io.stream_codecs import HEADROOM, Codec, RecordCodec

MAX_STREAM_MESSAGE: Final = stream_framing.MAX_DATA
"""The largest message (version 1) or DATA record (version 2) either side may send."""
CLOSE_WAIT: Final = 2.0
"""Seconds to wait for the peer's close once a stream has ended normally."""
ABNORMAL_CLOSE_WAIT: Final = 0.25
"""After an abnormal end the pipe may be full (the peer stopped reading): a moment only."""
STREAM_QUEUE: Final = 4
"""Messages websockets may queue per connection in the stub's server (its control
connections; stream connections leave websockets after their upgrade)."""


class CloseCode:
    """Close codes on a stream connection (docs/PROTOCOL.md §13.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the agent is stopping
    UNSUPPORTED_DATA = 1003  # a text message (v1) or a broken record (v2)
    INVALID_DATA = 1007  # invalid UTF-8 in a text message (the WebSocket layer's own rule)
    MESSAGE_TOO_BIG = 1009  # a message over MAX_STREAM_MESSAGE
    MAX_DURATION = 4410
    SOCKET_FAILED = 4411  # the target (or the operator's local connection) failed
    SESSION_LOST = 4412


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


# -- the two ends -----------------------------------------------------------------------------


class _Holder(asyncio.Protocol):
    """Keeps what arrives on a transport (reading paused) until a splice takes it over."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass(eq=False)
class StreamConnection:
    """An opened stream connection: its TLS transport (reading paused) and its framing."""

    transport: asyncio.Transport
    codec: Codec
    holder: _Holder = field(default_factory=_Holder)
    on_lost: Callable[[Exception | None], object] | None = None
    """Told when the transport is lost (the stub's WebSocket layer, which handed it over)."""

    @classmethod
    def take(
        cls,
        transport: asyncio.Transport,
        codec: Codec,
        leftover: bytes = b"",
        on_lost: Callable[[Exception | None], object] | None = None,
    ) -> StreamConnection:
        transport.pause_reading()
        holder = _Holder(leftover)
        transport.set_protocol(holder)
        return cls(transport=transport, codec=codec, holder=holder, on_lost=on_lost)

    @property
    def version(self) -> int:
        return self.codec.version

    async def close(self, code: int, reason: str) -> None:
        """Close a connection that never carried a stream."""
        if not self.transport.is_closing():
            self.transport.write(self.codec.encode_close(code, reason))
            self.transport.close()
        if self.on_lost is not None:
            self.on_lost(None)


class _End(asyncio.BufferedProtocol):
    """What both ends share: the transport, its loss, its flow control."""

    def __init__(self) -> None:
        self.splice: Splice | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.held_by_peer = False
        """The other end's write buffer is above its high-water mark: do not read."""
        self.held_for_turn = False
        """This end has had its share of the current event-loop turn: read on the next."""
        self.moved = 0
        """Bytes read since this end last gave way."""

    def reading(self, allowed: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if allowed and not self.held_by_peer and not self.held_for_turn:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def pause_writing(self) -> None:
        if self.splice is not None:
            self.splice._writing_paused(self)

    def resume_writing(self) -> None:
        if self.splice is not None:
            self.splice._writing_resumed(self)

    def _lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class SocketEnd(_End):
    """The TCP socket: the target (agent) or the operator's local connection (stub). Created
    with reading paused; nothing is read until a splice runs."""

    def __init__(self) -> None:
        super().__init__()
        self.eof = False
        self.held = bytearray()
        """What arrived before the splice started (at most one read: reading then pauses)."""
        self._eof_seen: asyncio.Future[None] | None = None
        self._buffer = bytearray()

    async def close_unused(self, wait: float = CLOSE_WAIT) -> None:
        """Close a connection that got no stream, without a reset: half-close, read (and
        discard) until the peer's EOF, for at most ``wait`` seconds."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.eof:
            self._eof_seen = asyncio.get_running_loop().create_future()
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()
            waiting: list[asyncio.Future[Any]] = [self._eof_seen, self.lost]
            await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        size = HEADROOM + (self.splice.read_chunk if self.splice else MAX_STREAM_MESSAGE)
        if len(self._buffer) != size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[HEADROOM:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.splice is None:  # some event loops start reading after connection_made()
            if self._eof_seen is None and self.transport is not None:  # (else: discarded)
                self.held += memoryview(self._buffer)[HEADROOM : HEADROOM + nbytes]
                self.transport.pause_reading()
            return
        if self.splice._from_socket_read(self._buffer, nbytes):
            self._buffer = bytearray()  # still in the connection's write queue: a new one
        self.splice._after_read(self, nbytes)

    def eof_received(self) -> bool:
        self.eof = True
        if self._eof_seen is not None and not self._eof_seen.done():
            self._eof_seen.set_result(None)
        if self.splice is not None:
            self.splice._socket_eof()
        return True  # half-open: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)
        if self.splice is not None:
            self.splice._socket_lost(exc)


class _ConnectionEnd(_End):
    """The stream connection's TLS transport, framed by a codec."""

    def __init__(self, splice: Splice, connection: StreamConnection) -> None:
        super().__init__()
        self.splice = self._splice = splice
        self.connection = connection
        self.transport = connection.transport
        self._buffer = bytearray()

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self._buffer:
            self._buffer = bytearray(self._splice.read_chunk + 1024)
        return memoryview(self._buffer)  # a view: the SSL layer fills it by slices

    def buffer_updated(self, nbytes: int) -> None:
        if self._splice._from_connection(memoryview(self._buffer)[:nbytes]):
            self._buffer = bytearray()  # slices of it still in the socket's write queue
        self._splice._after_read(self, nbytes)

    def eof_received(self) -> bool:
        self._splice._connection_lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)
        self._splice._connection_lost()
        if self.connection.on_lost is not None:
            self.connection.on_lost(exc)


# -- the splice -------------------------------------------------------------------------------


@dataclass(eq=False)
class Splice:
    """One stream's counters, its abort switch, and the wiring of its two ends."""

    peer: str
    """Who is at the stream connection's end, for end reasons: ``control_plane`` or ``agent``."""
    local: str
    """Who is at the socket end: ``target`` or ``client``."""
    read_chunk: int = MAX_STREAM_MESSAGE
    to_socket: int = 0
    from_socket: int = 0
    abort_reason: str | None = None
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.read_chunk = max(1, min(self.read_chunk, MAX_STREAM_MESSAGE))
        self._ended: asyncio.Future[str] | None = None
        self._socket: SocketEnd | None = None
        self._conn: _ConnectionEnd | None = None
        self._codec: Codec = RecordCodec()
        self._in_done = False  # the peer's END arrived (we half-closed the socket)
        self._out_done = False  # the socket's EOF arrived (we sent END)
        self._close_rcvd: Close | None = None
        self._closing: asyncio.Future[None] | None = None
        """While we wait for the peer's answer to our close: resolved when it arrives."""

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
            self.aborted.set()
            self._end(reason)

    async def run(
        self, connection: StreamConnection, sock: SocketEnd, *, deadline: float | None = None
    ) -> str:
        """Carry the stream until it ends; close both ends and return why it ended:
        ``closed`` (both directions ended), ``<peer>_closed``, ``<local>_failed``,
        ``protocol_error``, ``message_too_large``, ``max_duration`` (``deadline``, on the
        monotonic clock) or the abort reason."""
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._codec = connection.codec
        self._socket = sock
        sock.splice = self
        conn = self._conn = _ConnectionEnd(self, connection)
        held = connection.holder
        connection.transport.set_protocol(conn)
        for end in (conn, sock):
            if end.transport is not None:
                end.transport.set_write_buffer_limits(high=self.read_chunk)
        timer = None
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            timer = loop.call_later(left, self._end, "max_duration")
        if self.abort_reason is not None:
            self._end(self.abort_reason)
        try:
            if sock.held:
                self._from_socket_read(bytearray(HEADROOM) + sock.held, len(sock.held))
                sock.held.clear()
            if held.data:
                self._from_connection(memoryview(bytes(held.data)))
            if held.lost or held.eof:
                self._connection_lost()
            if sock.eof:
                self._socket_eof()
            if sock.lost.done():
                self._socket_lost(sock.lost.result())
            if not self._ended.done():
                connection.transport.resume_reading()
                if sock.transport is not None:
                    sock.transport.resume_reading()
            ended_by = await asyncio.shield(self._ended)
        except asyncio.CancelledError:
            self._end("cancelled")
            raise
        finally:
            if timer is not None:
                timer.cancel()
            await self._shutdown(self._ended.result() if self._ended.done() else "cancelled")
        return ended_by

    # -- events from the ends (callbacks; no awaiting) -----------------------------------------

    def _end(self, ended_by: str) -> None:
        if self._ended is None or self._ended.done():
            return
        self._ended.set_result(ended_by)
        for end in (self._conn, self._socket):
            if end is not None and end.transport is not None and not end.transport.is_closing():
                end.transport.pause_reading()

    def _from_socket_read(self, buffer: bytearray, size: int) -> bool:
        """``size`` bytes at ``buffer[HEADROOM:]`` from the socket; True if ``buffer`` may
        still be referenced by the connection's write queue."""
        conn = self._conn
        if conn is None or conn.transport is None or self._done():
            return False
        transport = conn.transport
        for chunk in self._codec.encode_data(buffer, size):
            transport.write(chunk)
        self.from_socket += size
        return transport.get_write_buffer_size() > 0

    def _from_connection(self, data: memoryview) -> bool:
        """Bytes from the stream connection; True if ``data`` may still be referenced by the
        socket's write queue."""
        if self._done():
            if self._closing is not None and not self._closing.done():
                self._await_close(data)
            return False
        failure: FramingError | None = None
        try:
            events = self._codec.receive(data)
        except FramingError as exc:
            events, failure = exc.events, exc
        self._flush_pending()
        sock = self._socket
        if sock is None or sock.transport is None:
            return False
        target = sock.transport
        if failure is not None:
            events.append(Close(close_code(failure.ended_by), failure.ended_by))
        for event in events:
            if isinstance(event, Data):
                if not self._in_done:
                    target.write(event.data)
                    self.to_socket += len(event.data)
            elif isinstance(event, End):
                self._in_done = True
                if target.can_write_eof():
                    target.write_eof()
                if self._out_done:
                    self._end("closed")
            elif failure is not None:  # the events before it were carried; the stream ends
                self._end(failure.ended_by)
            else:
                self._close_rcvd = event
                self._end(f"{self.peer}_closed")
                break
        return target.get_write_buffer_size() > 0

    def _await_close(self, data: memoryview) -> None:
        """After our close: only the peer's close matters; data is discarded."""
        assert self._closing is not None  # noqa: S101
        try:
            events = self._codec.receive(data)
        except FramingError:
            events = [Close(CloseCode.UNSUPPORTED_DATA, "")]
        self._flush_pending()
        if any(isinstance(event, Close) for event in events):
            self._closing.set_result(None)

    def _flush_pending(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None:
            for chunk in self._codec.pending():
                conn.transport.write(chunk)

    def _socket_eof(self) -> None:
        if self._out_done or self._done():
            return
        self._out_done = True
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.write(self._codec.encode_end())
        if self._in_done:
            self._end("closed")

    def _socket_lost(self, exc: Exception | None) -> None:
        self._end(f"{self.local}_failed")

    def _connection_lost(self) -> None:
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        self._end(f"{self.peer}_closed")

    def _writing_paused(self, end: _End) -> None:
        other = self._socket if end is self._conn else self._conn
        if other is not None:
            other.held_by_peer = True
            other.reading(self._may_read(other))

    def _writing_resumed(self, end: _End) -> None:
        other = self._socket if end is self._conn else self._conn
        if other is not None:
            other.held_by_peer = False
            other.reading(self._may_read(other))

    def _after_read(self, end: _End, size: int) -> None:
        """A bounded share of each event-loop turn: once an end has read ``read_chunk`` bytes
        it stops until the next turn, so the event loop polls every other socket (the
        tunnel's among them) in between. Without it one readiness event can read dozens of
        chunks in a row (libuv reads up to 32 times)."""
        end.moved += size
        if end.moved < self.read_chunk:
            return
        end.moved = 0
        end.held_for_turn = True
        end.reading(False)
        asyncio.get_running_loop().call_soon(self._next_turn, end)

    def _next_turn(self, end: _End) -> None:
        end.held_for_turn = False
        end.reading(self._may_read(end))

    def _may_read(self, end: _End) -> bool:
        if not self._done():
            return True
        # After our close: the stream connection is read for the peer's answer only.
        return end is self._conn and self._closing is not None and not self._closing.done()

    def _done(self) -> bool:
        return self._ended is None or self._ended.done()

    # -- the end ------------------------------------------------------------------------------

    async def _shutdown(self, ended_by: str) -> None:
        """Close with the code that says why, then both transports. A normal end waits a
        little for the peer's close and for the socket's last bytes to be written; an
        abnormal one aborts soon (the pipe may be full)."""
        normal = ended_by == "closed" or ended_by.endswith("_closed")
        wait = CLOSE_WAIT if normal else ABNORMAL_CLOSE_WAIT
        conn, sock = self._conn, self._socket
        closing: list[asyncio.Future[Exception | None]] = []
        if sock is not None and sock.transport is not None and not sock.lost.done():
            if ended_by == f"{self.local}_failed":
                sock.transport.abort()
            else:
                sock.transport.close()  # once its buffered bytes are written
                closing.append(sock.lost)
        if conn is not None and conn.transport is not None and not conn.lost.done():
            transport = conn.transport
            closing.append(conn.lost)
            if self._close_rcvd is not None:
                reply = self._codec.encode_close(self._close_rcvd.code, self._close_rcvd.reason)
            else:
                reply = self._codec.encode_close(close_code(ended_by), ended_by[:100])
            self._flush_pending()
            if reply:
                transport.write(reply)
            if self._close_rcvd is None and normal:
                # Our close first: read on (discarding) until the peer's answers it.
                answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._closing = answered
                transport.resume_reading()
                waiting: list[asyncio.Future[Any]] = [answered, conn.lost]
                await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            transport.close()
        if closing:
            _, late = await asyncio.wait(closing, timeout=wait)
            if late:
                for end in (conn, sock):
                    if end is not None and end.transport is not None and not end.lost.done():
                        end.transport.abort()
                await asyncio.wait(late, timeout=wait)
