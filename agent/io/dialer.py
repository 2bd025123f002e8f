"""Opening connections to the control plane: the tunnel, and a stream's connection
(docs/PROTOCOL.md §2, §13.3). Both go the same route (direct, a private endpoint, or a proxy:
agent/io/egress.py), present the same client certificate, verify the same server name, and
never follow a redirect.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from agent.config import ControlPlaneConfig
from agent.core.errors import RedirectRefused
from agent.io.egress import Route, route_for
from agent.io.splice import StreamConnection
from agent.io.stream_transport import DialSettings, dial_stream


class _ConnectWithoutRedirects(connect):
    """websockets' ``connect`` follows up to ten 3xx answers to the upgrade, to any host (only
    the TLS server name stays pinned). The control plane is not trusted with the customer's
    network, so every connection the agent opens ends at a redirect: any 3xx, with or without a
    ``Location``, raises :class:`RedirectRefused` and nothing else is dialed."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        if isinstance(exc, InvalidStatus) and 300 <= exc.response.status_code < 400:
            return RedirectRefused(exc.response.status_code, exc.response.headers.get("Location"))
        return exc


class Dialer:
    def __init__(
        self,
        control_plane: ControlPlaneConfig,
        *,
        ssl_context: Callable[[], ssl.SSLContext],
        user_agent: str,
        connected: asyncio.Event,
    ) -> None:
        self._cp = control_plane
        self._ssl_context = ssl_context
        self._user_agent = user_agent
        self._connected = connected

    def route(self) -> Route:
        """The route for the next attempt (chosen afresh: the environment may have changed).
        Raises ConfigError when the settings are unusable."""
        return route_for(self._cp)

    async def tunnel(
        self, route: Route, context: ssl.SSLContext, *, max_size: int
    ) -> ClientConnection:
        return await self._open(self._cp.url, route, context, max_size=max_size, max_queue=16)

    async def stream(self, stream_id: str) -> StreamConnection:
        """The stream connection for ``stream_id``: only while the tunnel session is up
        (agent/io/stream_transport.py: its own upgrade, framing negotiated, no redirect)."""
        if not self._connected.is_set():
            raise ConnectionError("the tunnel is not connected")
        return await dial_stream(
            f"{self._cp.url.rstrip('/')}/streams/{stream_id}",
            self._ssl_context(),
            route_for(self._cp),
            DialSettings(
                user_agent=self._user_agent,
                server_name=self._cp.verify_name,
                open_timeout=self._cp.connect_timeout,
            ),
        )

    async def _open(
        self, url: str, route: Route, context: ssl.SSLContext, *, max_size: int, max_queue: int
    ) -> ClientConnection:
        direct: dict[str, Any] = {}  # create_connection() keywords for a private endpoint
        if route.host is not None:
            direct = {"host": route.host, "port": route.port}
        return await _ConnectWithoutRedirects(
            url,
            ssl=context,
            server_hostname=self._cp.verify_name,
            open_timeout=self._cp.connect_timeout,
            ping_interval=None,  # heartbeats are the protocol's own (agent/core/session.py)
            close_timeout=5,
            max_size=max_size,
            max_queue=max_queue,
            compression=None,
            proxy=route.proxy,
            user_agent_header=self._user_agent,
            **direct,
        )
