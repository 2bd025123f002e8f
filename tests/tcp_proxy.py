"""A test-only TCP proxy between the agent and the stub that injects network faults.

Failure injection on real sockets: the agent dials the proxy, the proxy dials the stub, and bytes
flow through unchanged (TLS is end to end; the proxy sees only ciphertext). Faults:

- ``freeze()`` stops forwarding on the current connections without closing them, which is what a
  peer that vanished without a FIN (or a middlebox that dropped the flow) looks like;
- ``cut()`` closes them abruptly (RST);
- ``stall(direction)`` stops forwarding one direction of the current connections while the other
  keeps flowing. The proxy stops *reading* that direction, so TCP flow control pushes back: the
  sender's socket buffers fill and its writes block, as with a peer that stopped reading. With
  ``rcvbuf`` (the proxy's SO_RCVBUF, and a matching small read limit) this happens after a few
  kilobytes instead of megabytes;
- ``set_latency(seconds)`` delays every chunk by that much (order and throughput are kept: each
  chunk is due ``seconds`` after it arrived);
- ``drop(direction, seconds)`` silently discards the bytes of that direction for a while, on
  current and new connections: a TLS record loses bytes, which its receiver must detect.

New connections after ``freeze``, ``cut`` or ``stall`` are forwarded normally. ``"up"`` is the
client-to-target direction (agent to stub), ``"down"`` the other one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Final, Literal

Direction = Literal["up", "down"]
DIRECTIONS: Final[tuple[Direction, Direction]] = ("up", "down")
CHUNK: Final = 65536
QUEUED_CHUNKS: Final = 64
"""Chunks in flight per direction when latency is added (beyond it, reading waits)."""


def _flags() -> dict[Direction, asyncio.Event]:
    return {direction: asyncio.Event() for direction in DIRECTIONS}


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    frozen: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: dict[Direction, asyncio.Event] = field(default_factory=_flags)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> tuple[asyncio.StreamWriter, asyncio.StreamWriter]:
        return self.client, self.upstream

    def abort(self) -> None:
        for writer in self.writers():
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


@dataclass(eq=False)
class _Lane:
    """Chunks of one direction held back by latency, oldest first."""

    queue: asyncio.Queue[tuple[float, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUED_CHUNKS)
    )
    pending: int = 0
    """Chunks queued or being delayed: while any are, later ones queue behind them."""


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, rcvbuf: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.rcvbuf = rcvbuf
        self.port = 0
        self.connections = 0
        self.connected = asyncio.Event()
        self.latency: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self.forwarded: dict[Direction, int] = dict.fromkeys(DIRECTIONS, 0)
        """Bytes forwarded in each direction, over all connections."""
        self.dropped: dict[Direction, int] = dict.fromkeys(DIRECTIONS, 0)
        """Bytes discarded by ``drop`` in each direction."""
        self.stall_held: dict[Direction, int] = dict.fromkeys(DIRECTIONS, 0)
        """Bytes read in a direction just as it was stalled, and never forwarded."""
        self._drop_until: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self._pipes: set[_Pipe] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.rcvbuf is not None:  # inherited by accepted sockets; set before listen()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        limit = CHUNK if self.rcvbuf is None else max(1024, self.rcvbuf)
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=limit)
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    # -- faults ---------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop forwarding on every current connection, leaving the sockets open."""
        for pipe in self._pipes:
            pipe.frozen.set()

    def cut(self) -> None:
        """Abort every current connection (RST), as a crashed middlebox would."""
        for pipe in list(self._pipes):
            pipe.abort()
        self._pipes.clear()

    def stall(self, direction: Direction) -> None:
        """Stop reading (and so forwarding) ``direction`` on every current connection; the other
        direction keeps flowing. When the other direction ends, the connection is aborted."""
        for pipe in self._pipes:
            pipe.stalled[direction].set()

    def set_latency(self, seconds: float, direction: Direction | None = None) -> None:
        """Delay every chunk by ``seconds`` in ``direction`` (both when None), from now on."""
        for each in DIRECTIONS if direction is None else (direction,):
            self.latency[each] = seconds

    def drop(self, direction: Direction, seconds: float) -> None:
        """Silently discard every byte read in ``direction`` for the next ``seconds``."""
        self._drop_until[direction] = asyncio.get_running_loop().time() + seconds

    def dropping(self, direction: Direction) -> bool:
        return asyncio.get_running_loop().time() < self._drop_until[direction]

    # -- forwarding -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe(client=writer, upstream=up_writer)
        self._pipes.add(pipe)
        self.connections += 1
        self.connected.set()
        pipe.tasks = [
            asyncio.create_task(self._copy(reader, up_writer, pipe, "up")),
            asyncio.create_task(self._copy(up_reader, writer, pipe, "down")),
        ]
        try:
            _, pending = await asyncio.wait(pipe.tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending and any(flag.is_set() for flag in pipe.stalled.values()):
                # A stalled direction never reads again, so it would never see the end.
                pipe.abort()
            await asyncio.gather(*pipe.tasks, return_exceptions=True)
        finally:
            self._pipes.discard(pipe)

    async def _hold_forever(self, direction: Direction, data: bytes) -> None:
        self.stall_held[direction] += len(data)
        await asyncio.Event().wait()  # a black hole, until the pipe is aborted

    async def _copy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pipe: _Pipe,
        direction: Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        lane = _Lane()
        sender = asyncio.create_task(self._send_later(lane, writer, pipe, direction))
        graceful = False
        try:
            while True:
                if pipe.stalled[direction].is_set():
                    await self._hold_forever(direction, b"")
                data = await reader.read(CHUNK)
                if not data:
                    graceful = True
                    break
                if pipe.frozen.is_set() or pipe.stalled[direction].is_set():
                    await self._hold_forever(direction, data)
                if self.dropping(direction):
                    self.dropped[direction] += len(data)
                    continue
                if sender.done():  # the destination failed (and aborted the pipe)
                    break
                if self.latency[direction] <= 0 and lane.pending == 0:
                    writer.write(data)  # no latency and nothing delayed ahead: at once
                    await writer.drain()
                    self.forwarded[direction] += len(data)
                else:
                    lane.pending += 1
                    await lane.queue.put((loop.time() + self.latency[direction], data))
        except (ConnectionError, OSError):
            pass
        finally:
            if graceful and not sender.done():
                await lane.queue.put(None)  # forward what is delayed, then close
                with contextlib.suppress(ConnectionError, OSError):
                    await sender
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
            if not pipe.frozen.is_set():
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    writer.close()

    async def _send_later(
        self, lane: _Lane, writer: asyncio.StreamWriter, pipe: _Pipe, direction: Direction
    ) -> None:
        """Forward the delayed chunks of one direction, each when it is due, in order."""
        loop = asyncio.get_running_loop()
        try:
            while (item := await lane.queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # the injected latency itself
                writer.write(data)
                await writer.drain()
                lane.pending -= 1
                self.forwarded[direction] += len(data)
        except (ConnectionError, OSError):
            pipe.abort()  # the destination is gone: so is the connection, both ways
