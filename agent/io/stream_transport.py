"""Opening a stream connection (docs/PROTOCOL.md §13.3) on either side, and choosing its
framing: the agent dials it with :func:`dial_stream`; the stub control plane accepts it in its
WebSocket server through :class:`StreamServerConnection` and :func:`answer_upgrade`.

The connection opens as an ordinary WebSocket upgrade (so HTTP proxies and L7 load balancers
treat it as one). The agent offers version 2 framing with the request header
``BYOC-Stream-Framing: 2``; a control plane that accepts answers the 101 with the same header,
and from the first byte after the response both directions carry version 2 records
(agent/core/stream_framing.py). Without the header in the answer (an older control plane, or
one whose front inspects WebSocket frames) the connection stays version 1: WebSocket binary
messages. An older agent sends no header and gets version 1. Either way the bytes are moved by
agent/io/splice.py; only the codec differs.

The agent's dialer is its own (not websockets' ``connect``) so that it can stop reading at the
exact end of the upgrade response: bytes after it belong to the stream. It keeps the rules of
every connection the agent opens: the same TLS context and server name, the same route (a
private endpoint, or an HTTP CONNECT proxy through websockets' own CONNECT code), and no
redirect followed: any 3xx is :class:`RedirectRefused`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Final, cast

from websockets.asyncio.client import connect_http_proxy
from websockets.asyncio.server import ServerConnection
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHeader, InvalidMessage, InvalidStatus
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.proxy import parse_proxy
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from agent.core.errors import RedirectRefused
from agent.io.egress import Route
from agent.io.splice import MAX_STREAM_MESSAGE, StreamConnection
from agent.io.stream_codecs import Codec, RecordCodec, WebSocketCodec

FRAMING_HEADER: Final = "BYOC-Stream-Framing"
FRAMING_V2: Final = "2"
MAX_RESPONSE_HEAD: Final = 16 * 1024
"""The largest upgrade response head the agent reads (status line and headers)."""


@dataclass(frozen=True, kw_only=True)
class DialSettings:
    user_agent: str
    server_name: str | None = None
    """The name to verify the certificate for (and send as SNI); None: the URL's host."""
    open_timeout: float = 10.0
    """Seconds for TCP, the proxy, TLS and the upgrade together."""
    offer_v2: bool = True


async def dial_stream(
    url: str, context: ssl.SSLContext, route: Route, settings: DialSettings
) -> StreamConnection:
    """Open the stream connection at ``url`` (``wss://.../streams/<id>``) by ``route``.

    Raises :class:`RedirectRefused` for a 3xx, websockets' ``InvalidStatus`` for another
    refusal, ``InvalidProxyStatus``/``InvalidHandshake`` for a failed proxy or upgrade, and
    ``OSError``/``TimeoutError`` for the network: the exceptions websockets' ``connect``
    raises, so callers classify them alike."""
    ws_uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    server_hostname = settings.server_name or ws_uri.host
    handshake = _Handshake()
    async with asyncio.timeout(settings.open_timeout):
        if route.proxy is not None:
            proxy = parse_proxy(route.proxy)
            proxy_tls = {"ssl": ssl.create_default_context()} if proxy.scheme == "https" else {}
            tunnel = await connect_http_proxy(
                proxy, ws_uri, user_agent_header=settings.user_agent, **proxy_tls
            )
            try:
                tunnel.set_protocol(handshake)
                secured = await loop.start_tls(
                    tunnel, handshake, context, server_hostname=server_hostname
                )
            except BaseException:
                tunnel.abort()
                raise
            if secured is None:  # pragma: no cover  # only for a closing transport
                raise ConnectionError("the proxy closed the connection")
            handshake.connection_made(secured)
            transport: asyncio.Transport = secured
        else:
            host, port = ws_uri.host, ws_uri.port
            if route.host is not None and route.port is not None:
                host, port = route.host, route.port
            transport, _ = await loop.create_connection(
                lambda: handshake, host, port, ssl=context, server_hostname=server_hostname
            )
        try:
            return await handshake.upgrade(ws_uri, settings)
        except BaseException:
            transport.abort()
            raise


class _Handshake(asyncio.Protocol):
    """Reads the upgrade response, and not one byte past it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.changed.set()

    async def _more(self) -> None:
        if self.eof:
            raise InvalidMessage("the connection closed during the upgrade")
        self.changed.clear()
        await self.changed.wait()

    async def upgrade(self, ws_uri: object, settings: DialSettings) -> StreamConnection:
        transport = self.transport
        assert transport is not None  # noqa: S101  # connected
        protocol = ClientProtocol(ws_uri, max_size=MAX_STREAM_MESSAGE)  # type: ignore[arg-type]
        request = protocol.connect()
        request.headers["User-Agent"] = settings.user_agent
        if settings.offer_v2:
            request.headers[FRAMING_HEADER] = FRAMING_V2
        protocol.send_request(request)
        for chunk in protocol.data_to_send():
            transport.write(chunk)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_RESPONSE_HEAD:
                raise InvalidMessage("the upgrade response head is too large")
            await self._more()
        head = bytes(self.buffer[: end + 4])
        leftover = b""
        accepted: str | None = None
        if _status(head) == 101:
            leftover = bytes(self.buffer[end + 4 :])
            protocol.receive_data(head)  # the response only: what follows is the stream's
            for event in protocol.events_received():
                if isinstance(event, Response):
                    accepted = event.headers.get(FRAMING_HEADER)
        else:
            protocol.receive_data(bytes(self.buffer))  # a refusal: its body too, if any
            while not protocol.events_received() and protocol.handshake_exc is None:
                self.buffer.clear()
                if self.eof:
                    protocol.receive_eof()
                    break
                await self._more()
                protocol.receive_data(bytes(self.buffer))
        self.buffer.clear()
        response = protocol.handshake_exc
        if response is not None:
            if isinstance(response, InvalidStatus):
                status = response.response.status_code
                if 300 <= status < 400:
                    raise RedirectRefused(status, response.response.headers.get("Location"))
            raise response
        if protocol.state is not OPEN:
            raise InvalidMessage("no upgrade response")
        if accepted == FRAMING_V2 and not settings.offer_v2:
            raise InvalidHeader(FRAMING_HEADER, "answered without an offer")
        codec: Codec = RecordCodec() if accepted == FRAMING_V2 else WebSocketCodec(protocol)
        return StreamConnection.take(transport, codec, leftover)


def _status(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise InvalidMessage("not an HTTP response")
    return int(parts[1])


# -- the control plane's side (the stub) --------------------------------------------------------


class StreamServerConnection(ServerConnection):
    """websockets' server connection that can give its transport to a stream once it has
    answered a stream connection's upgrade.

    :func:`answer_upgrade` (a ``process_response`` hook) marks the connection before the 101 is
    written; from then on the bytes the agent sends are kept, not parsed as WebSocket frames
    (version 2 records would not parse), and :func:`take_over` hands them and the transport
    to a splice. Control connections are untouched."""

    stream_framing: str | None = None
    """The framing of a stream connection (``1`` or ``2``), set by :func:`answer_upgrade`."""
    _held: bytearray | None = None
    _held_eof = False
    _detached = False

    def data_received(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
            return
        super().data_received(data)

    def eof_received(self) -> None:
        if self._held is not None:
            self._held_eof = True
            return
        super().eof_received()

    def send_data(self) -> None:
        if self._detached:
            self.protocol.data_to_send()  # nothing of websockets' goes on a taken-over stream
            return
        super().send_data()


def answer_upgrade(
    connection: ServerConnection, request: Request, response: Response, *, offer_v2: bool
) -> None:
    """For a stream connection's successful upgrade: accept version 2 framing if the agent
    offered it (and ``offer_v2``), and keep the bytes that follow for :func:`take_over`."""
    if response.status_code != 101 or not isinstance(connection, StreamServerConnection):
        return
    framing = "1"
    if offer_v2 and request.headers.get(FRAMING_HEADER) == FRAMING_V2:
        response.headers[FRAMING_HEADER] = FRAMING_V2
        framing = FRAMING_V2
    connection.stream_framing = framing
    connection._held = bytearray()


def take_over(connection: ServerConnection) -> StreamConnection:
    """The stream connection behind a WebSocket connection whose upgrade
    :func:`answer_upgrade` answered."""
    if not isinstance(connection, StreamServerConnection) or connection._held is None:
        raise TypeError("not a stream connection answered by answer_upgrade()")
    connection._detached = True
    codec: Codec = (
        RecordCodec()
        if connection.stream_framing == FRAMING_V2
        else WebSocketCodec(ServerProtocol(state=OPEN, max_size=MAX_STREAM_MESSAGE))
    )
    held = bytes(connection._held)
    connection._held = bytearray()

    def lost(exc: Exception | None) -> None:
        if not connection.connection_lost_waiter.done():
            connection.connection_lost(exc)

    taken = StreamConnection.take(connection.transport, codec, held, on_lost=lost)
    taken.holder.eof = connection._held_eof
    taken.holder.lost = connection.connection_lost_waiter.done()
    return taken
