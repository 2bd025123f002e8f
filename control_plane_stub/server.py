"""The stub control plane as one object: the agent-facing WebSocket server (mutual TLS), the
operator API on loopback, and the SQLite store behind both."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from agent.frames import MAX_FRAME_TO_CONTROL_PLANE
from agent.session import HeartbeatSettings
from agent.tls import server_context
from control_plane_stub.api import OperatorApi
from control_plane_stub.errors import StubConfigError
from control_plane_stub.hub import Hub, HubSettings
from control_plane_stub.signer import CommandSigner
from control_plane_stub.store import StubStore

AGENT_PATH: Final = "/v1/agent"


@dataclass(frozen=True, kw_only=True)
class StubConfig:
    server_cert: Path
    server_key: Path
    agent_ca: Path
    signing_key: Path
    db: Path
    agent_host: str = "127.0.0.1"
    agent_port: int = 8443
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    issuer: str = "cp-stub"
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)

    def __post_init__(self) -> None:
        try:
            loopback = (
                self.api_host == "localhost" or ipaddress.ip_address(self.api_host).is_loopback
            )
        except ValueError:
            loopback = False
        if not loopback:
            raise StubConfigError(
                f"the operator API has no authentication and binds to loopback only, "
                f"not {self.api_host!r}"
            )


def _only_agent_path(connection: ServerConnection, request: Request) -> Response | None:
    if request.path != AGENT_PATH:
        return connection.respond(404, f"agents connect to {AGENT_PATH}\n")
    return None


class StubServer:
    def __init__(self, config: StubConfig) -> None:
        self.config = config
        self.log = structlog.get_logger("cp-stub").bind(logger="cp-stub")
        self.store = StubStore(config.db)
        self.signer = CommandSigner.from_file(config.signing_key, issuer=config.issuer)
        self.hub = Hub(self.store, HubSettings(heartbeat=config.heartbeat), self.log)
        self.api = OperatorApi(self.store, self.hub, self.signer)
        self._ws: Server | None = None
        self._runner: web.AppRunner | None = None
        self.agent_port = 0
        self.api_port = 0

    async def start(self) -> None:
        config = self.config
        context = server_context(
            cert=config.server_cert, key=config.server_key, client_ca=config.agent_ca
        )
        self._ws = await serve(
            self.hub.handler,
            config.agent_host,
            config.agent_port,
            ssl=context,
            process_request=_only_agent_path,
            max_size=MAX_FRAME_TO_CONTROL_PLANE,
            ping_interval=None,  # the protocol's own heartbeats (hub.py)
            compression=None,
            server_header="cp-stub",
        )
        self.agent_port = self._ws.sockets[0].getsockname()[1]
        self._runner = web.AppRunner(self.api.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.api_host, config.api_port)
        await site.start()
        self.api_port = self._runner.addresses[0][1]  # the bound port, when api_port is 0
        self.log.info(
            "stub_listening",
            agents=f"wss://{config.agent_host}:{self.agent_port}{AGENT_PATH}",
            api=f"http://{config.api_host}:{self.api_port}",
            signing_kid=self.signer.kid,
        )

    async def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()
        self.store.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()


__all__ = ["AGENT_PATH", "StubConfig", "StubServer"]
