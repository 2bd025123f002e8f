"""A test-only TCP proxy between the agent and the stub that can cut or freeze connections.

Failure injection on real sockets: the agent dials the proxy, the proxy dials the stub, and bytes
flow through unchanged (TLS is end to end; the proxy sees only ciphertext). ``freeze()`` stops
forwarding on the current connections without closing them, which is what a peer that vanished
without a FIN (or a middlebox that dropped the flow) looks like. ``cut()`` closes them abruptly.
New connections after either are forwarded normally.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    frozen: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self.connected = asyncio.Event()
        self._pipes: set[_Pipe] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def freeze(self) -> None:
        """Stop forwarding on every current connection, leaving the sockets open."""
        for pipe in self._pipes:
            pipe.frozen.set()

    def cut(self) -> None:
        """Abort every current connection (RST), as a crashed middlebox would."""
        for pipe in list(self._pipes):
            for writer in (pipe.client, pipe.upstream):
                writer.transport.abort()
            for task in pipe.tasks:
                task.cancel()
        self._pipes.clear()

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
            asyncio.create_task(self._copy(reader, up_writer, pipe)),
            asyncio.create_task(self._copy(up_reader, writer, pipe)),
        ]
        await asyncio.gather(*pipe.tasks, return_exceptions=True)
        self._pipes.discard(pipe)

    @staticmethod
    async def _copy(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: _Pipe
    ) -> None:
        try:
            while data := await reader.read(65536):
                if pipe.frozen.is_set():
                    await asyncio.Event().wait()  # hold the bytes forever: a black hole
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not pipe.frozen.is_set():
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    writer.close()
