"""A misbehaving control plane: a test double that sends what the real stub never would.

It speaks the real wire format (:mod:`agent.core.frames`) over a real WebSocket with real mutual TLS
on loopback (server certificate from the test PKI, client certificates required from the agent
CA, path ``/v1/agent``, exactly like :mod:`control_plane_stub.server`), and completes the real
handshake: it reads the agent's ``hello`` and answers ``welcome`` with the agent id taken from
the client certificate's CN. After that the test scripts it:

- :meth:`HostileControlPlane.send_raw` sends any WebSocket message (text or binary, any size);
- :meth:`HostileControlPlane.next_frame` waits, bounded, for the next agent frame of a type;
- ``status`` / ``delivery_rejected`` frames are acknowledged automatically (``auto_ack``) and
  ``ping`` frames are answered, so the agent sees a live peer;
- :attr:`HostileControlPlane.connections` lists every connection, each with ``welcomed`` and
  ``closed`` events and the close code the agent sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self, TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from agent.core.errors import ProtocolError, TLSRejected
from agent.core.frames import (
    MAX_FRAME_TO_CONTROL_PLANE,
    PROTOCOL_VERSION,
    TO_CONTROL_PLANE,
    Ack,
    Anchor,
    CommandFrame,
    DeliveryRejected,
    Frame,
    Hello,
    Ping,
    Pong,
    Status,
    Welcome,
    decode,
    encode,
)
from agent.core.session import CloseCode
from agent.io.tls import PeerCertificate, server_context
from certs.pki import PKIPaths

AGENT_PATH: Final = "/v1/agent"

F = TypeVar("F", bound=Frame)
T = TypeVar("T")


@dataclass(eq=False)
class Connection:
    """One agent connection, numbered from 1 in the order they were accepted."""

    number: int
    websocket: ServerConnection
    agent_id: str
    hello: Hello | None = None
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    """The close code the agent sent (1006 if the connection just dropped)."""
    refused: list[str] = field(default_factory=list)
    """Codes of agent messages this control plane could not decode (there should be none)."""


@dataclass(frozen=True)
class Received:
    connection: int
    frame: Frame


def _only_agent_path(connection: ServerConnection, request: Request) -> Response | None:
    if request.path != AGENT_PATH:
        return connection.respond(404, f"agents connect to {AGENT_PATH}\n")
    return None


class HostileControlPlane:
    def __init__(
        self,
        pki: PKIPaths,
        *,
        auto_ack: bool = True,
        heartbeat_interval: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self._pki = pki
        self.auto_ack = auto_ack
        self._heartbeat_interval = heartbeat_interval
        self._timeout = timeout
        self._server: Server | None = None
        self._changed = asyncio.Event()
        self.port = 0
        self.connections: list[Connection] = []
        self.received: list[Received] = []
        self._consumed: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        context = server_context(
            cert=self._pki.server_cert, key=self._pki.server_key, client_ca=self._pki.agent_ca_cert
        )
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            ssl=context,
            process_request=_only_agent_path,
            max_size=MAX_FRAME_TO_CONTROL_PLANE,
            ping_interval=None,
            compression=None,
            server_header="hostile-cp",
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), self._timeout)
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- scripting ------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    @property
    def current(self) -> Connection:
        """The newest connection that got its ``welcome``."""
        for connection in reversed(self.connections):
            if connection.welcomed.is_set():
                return connection
        raise LookupError("no agent connection has completed the handshake")

    async def connection(self, number: int, *, within: float | None = None) -> Connection:
        """Wait until connection ``number`` (1-based) has been welcomed and return it."""

        def check() -> Connection | None:
            if len(self.connections) >= number and self.connections[number - 1].welcomed.is_set():
                return self.connections[number - 1]
            return None

        return await self._until(check, within, f"welcomed connection #{number}")

    async def wait_closed(self, connection: Connection, *, within: float | None = None) -> int:
        """Wait until ``connection`` is closed; return the close code the agent sent."""

        def check() -> int | None:
            if not connection.closed.is_set():
                return None
            return connection.close_code if connection.close_code is not None else -1

        return await self._until(check, within, f"close of connection #{connection.number}")

    async def send_raw(self, message: str | bytes, *, to: Connection | None = None) -> bool:
        """Send one WebSocket message as is. False if the connection closed meanwhile."""
        target = to or self.current
        try:
            await asyncio.wait_for(target.websocket.send(message), self._timeout)
        except ConnectionClosed:
            return False
        return True

    async def send_command(self, ref: str, token: str, *, to: Connection | None = None) -> bool:
        return await self.send_raw(encode(CommandFrame(ref=ref, token=token)), to=to)

    async def next_frame(
        self,
        *,
        type: type[F],
        where: Callable[[F], bool] | None = None,
        within: float | None = None,
    ) -> F:
        """The oldest not yet returned agent frame of ``type`` (matching ``where``), waiting
        for it at most ``within`` seconds (default: the constructor's ``timeout``)."""

        def check() -> F | None:
            for index, item in enumerate(self.received):
                frame = item.frame
                if index in self._consumed or not isinstance(frame, type):
                    continue
                if where is None or where(frame):
                    self._consumed.add(index)
                    return frame
            return None

        return await self._until(check, within, f"{getattr(type, 'type', type.__name__)} frame")

    def frames(self, kind: type[F]) -> list[F]:
        """Every agent frame of ``kind`` received so far, returned or not."""
        return [item.frame for item in self.received if isinstance(item.frame, kind)]

    # -- internals ------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, check: Callable[[], T | None], within: float | None, what: str) -> T:
        seconds = self._timeout if within is None else within
        try:
            async with asyncio.timeout(seconds):
                while True:
                    changed = self._changed
                    result = check()
                    if result is not None:
                        return result
                    await changed.wait()
        except TimeoutError:
            seen = [f"#{r.connection} {encode(r.frame)[:200]}" for r in self.received[-20:]]
            raise TimeoutError(
                f"hostile control plane: no {what} within {seconds}s; "
                f"{len(self.connections)} connection(s); last frames: {seen}"
            ) from None

    async def _handler(self, websocket: ServerConnection) -> None:
        try:
            peer = PeerCertificate.from_ssl_object(websocket.transport.get_extra_info("ssl_object"))
        except TLSRejected:
            await websocket.close(CloseCode.PROTOCOL_ERROR, "client certificate required")
            return
        connection = Connection(
            number=len(self.connections) + 1,
            websocket=websocket,
            agent_id=peer.subject_cn or "unknown",
        )
        self.connections.append(connection)
        self._notify()
        try:
            if await self._handshake(connection):
                async for message in websocket:
                    await self._receive(connection, message)
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            connection.close_code = websocket.close_code
            connection.closed.set()
            self._notify()

    async def _handshake(self, connection: Connection) -> bool:
        websocket = connection.websocket
        async with asyncio.timeout(self._timeout):
            first = await websocket.recv()
        try:
            hello = decode(first, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE)
        except ProtocolError as exc:
            connection.refused.append(exc.code)
            await websocket.close(CloseCode.PROTOCOL_ERROR, "bad hello")
            return False
        if not isinstance(hello, Hello):
            await websocket.close(CloseCode.PROTOCOL_ERROR, f"expected hello, got {hello.type}")
            return False
        connection.hello = hello
        welcome = Welcome(
            protocol=PROTOCOL_VERSION,
            agent_id=connection.agent_id,
            server_time=time.time(),
            heartbeat_interval=self._heartbeat_interval,
        )
        await websocket.send(encode(welcome))
        connection.welcomed.set()
        self._notify()
        return True

    async def _receive(self, connection: Connection, message: str | bytes) -> None:
        try:
            frame = decode(message, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE)
        except ProtocolError as exc:
            connection.refused.append(exc.code)
            self._notify()
            return
        self.received.append(Received(connection.number, frame))
        self._notify()
        match frame:
            case Ping(id=ping_id):
                await connection.websocket.send(encode(Pong(id=ping_id)))
            case Status(seq=seq) | DeliveryRejected(seq=seq) | Anchor(seq=seq) if self.auto_ack:
                await connection.websocket.send(encode(Ack(seq=seq)))
            case _:
                pass


__all__ = ["AGENT_PATH", "Connection", "HostileControlPlane", "Received"]
