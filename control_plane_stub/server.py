"""The stub control plane as one object: the agent-facing WebSocket server (mutual TLS), the
operator API on loopback, and the SQLite store behind both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from cryptography import x509
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from agent.core.errors import TLSRejected
from agent.core.frames import MAX_FRAME_TO_CONTROL_PLANE
from agent.core.session import HeartbeatSettings
from agent.core.targets import is_loopback_host
from agent.io.files import write_atomic
from agent.io.splice import STREAM_QUEUE
from agent.io.stream_transport import StreamServerConnection, answer_upgrade
from agent.io.tls import PeerCertificate, enrollment_server_context, server_context
from certs.pki import PKIPaths
from control_plane_stub.api import OperatorApi
from control_plane_stub.console import Console, ConsoleAuth
from control_plane_stub.enrollment import CERT_LIFETIME, CertificateAuthority, enrollment_app
from control_plane_stub.errors import CannotListen, StubConfigError, StubError
from control_plane_stub.hub import Hub, HubSettings, peer_address
from control_plane_stub.signer import CommandSigner
from control_plane_stub.store import StubStore
from control_plane_stub.streams import STREAM_PREFIX, StreamBroker

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
    pki: Path | None = None
    """A PKI directory holding the agent CA's key: enables enrollment, renewal, revocation."""
    enroll_host: str = "127.0.0.1"
    enroll_port: int | None = None
    """The enrollment listener (HTTPS, server-authenticated only); None: no enrollment."""
    cert_lifetime: float = CERT_LIFETIME.total_seconds()
    console_host: str = "127.0.0.1"
    console_port: int | None = None
    """The web console's listener (control_plane_stub/console); None: no console."""
    console_remote: bool = False
    """Allow the console on an address other than loopback (then served over HTTPS)."""
    console_tls: bool | None = None
    """Serve the console over HTTPS with the server certificate; None: when not on loopback."""
    console_token_file: Path | None = None
    """Write the console token here (0600) instead of printing it."""

    def __post_init__(self) -> None:
        if not is_loopback_host(self.api_host):
            raise StubConfigError(
                f"the operator API has no authentication and binds to loopback only, "
                f"not {self.api_host!r}"
            )
        if (
            self.console_port is not None
            and not is_loopback_host(self.console_host)
            and not self.console_remote
        ):
            raise StubConfigError(
                f"the console binds to loopback unless asked otherwise: {self.console_host!r} "
                f"needs --console-remote (it is then served over HTTPS, token required)"
            )
        if self.console_tls is False and not is_loopback_host(self.console_host):
            raise StubConfigError("a console on a non-loopback address is served over HTTPS")

    @property
    def console_uses_tls(self) -> bool:
        if self.console_tls is not None:
            return self.console_tls
        return not is_loopback_host(self.console_host)


def _peer_serial(connection: ServerConnection) -> int:
    ssl_object = connection.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der).serial_number if der else -1


def _peer_agent_id(connection: ServerConnection) -> str | None:
    try:
        peer = PeerCertificate.from_ssl_object(connection.transport.get_extra_info("ssl_object"))
    except TLSRejected:
        return None
    return peer.subject_cn


_NO_CLIENT_CERTIFICATE: Final = ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED")


def log_refused_certificates(
    context: ssl.SSLContext, log: structlog.typing.FilteringBoundLogger
) -> None:
    """Log every TLS handshake that ``context`` fails: a refused client certificate at warning
    level (``client_certificate_refused``: not from the agent CA, expired, none presented),
    anything else at info (``tls_handshake_failed``: an old client, a port scanner).

    asyncio reports a failed server-side handshake to nobody (an ``OSError``, logged only in
    debug mode), so the check sits where OpenSSL's verdict surfaces: the ``SSLObject`` that
    asyncio drives (``SSLContext.sslobject_class``, a documented hook). The peer's address is
    not known there; the reason is."""

    class _Watched(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: the handshake goes on when more bytes arrive
            except ssl.SSLCertVerificationError as exc:
                log.warning(
                    "client_certificate_refused",
                    reason=exc.verify_message,
                    detail="the client's certificate does not verify against the agent CA",
                )
                raise
            except ssl.SSLError as exc:
                reason = str(exc.reason or exc)
                if any(marker in reason for marker in _NO_CLIENT_CERTIFICATE):
                    log.warning(
                        "client_certificate_refused",
                        reason="no client certificate",
                        detail="agents must present their certificate",
                    )
                else:
                    log.info("tls_handshake_failed", reason=reason)
                raise

    context.sslobject_class = _Watched


class StubServer:
    def __init__(self, config: StubConfig) -> None:
        self.config = config
        self.log = structlog.get_logger("cp-stub").bind(logger="cp-stub")
        self.store = StubStore(config.db, group_commit=True)
        self.signer = CommandSigner.from_file(config.signing_key, issuer=config.issuer)
        self.hub = Hub(self.store, HubSettings(heartbeat=config.heartbeat), self.log)
        self.ca = (
            CertificateAuthority(
                PKIPaths.at(config.pki), config.db, lifetime=timedelta(seconds=config.cert_lifetime)
            )
            if config.pki is not None
            else None
        )
        self.hub.ca = self.ca
        self.streams = StreamBroker(self.store, self.hub, self.signer, self.log)
        self.api = OperatorApi(self.store, self.hub, self.signer, self.streams, self.ca)
        self.console: Console | None = None
        if config.console_port is not None:
            self.console = Console(
                self.api,
                ConsoleAuth.generate(),
                log=self.log,
                loopback_only=is_loopback_host(config.console_host),
                tls=config.console_uses_tls,
            )
        self._ws: Server | None = None
        self._writer: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._enroll_runner: web.AppRunner | None = None
        self._console_runner: web.AppRunner | None = None
        self.agent_port = 0
        self.api_port = 0
        self.enroll_port = 0
        self.console_port = 0
        self._opening = "cannot start"
        """What :meth:`start` is opening, for its error message."""

    async def start(self) -> None:
        """Open every listener; if one cannot be opened (its port is in use, say), close those
        already open and raise :class:`CannotListen` naming it."""
        try:
            await self._start()
        except OSError as exc:
            await self.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise CannotListen(f"{self._opening}: {why}") from exc
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        config = self.config
        self.store.start_group_commit()
        self._writer = asyncio.create_task(self.hub.run_store_writer(), name="store-writer")
        self._opening = f"cannot listen for agents on {config.agent_host}:{config.agent_port}"
        context = server_context(
            cert=config.server_cert, key=config.server_key, client_ca=config.agent_ca
        )
        log_refused_certificates(context, self.log)
        self._ws = await serve(
            self._route,
            config.agent_host,
            config.agent_port,
            ssl=context,
            process_request=self._check_path,
            process_response=self._answer_stream_upgrade,
            create_connection=StreamServerConnection,  # stream connections leave websockets
            max_size=MAX_FRAME_TO_CONTROL_PLANE,
            max_queue=STREAM_QUEUE,  # per connection: bounds what a stream buffers here
            ping_interval=None,  # the protocol's own heartbeats (hub.py)
            compression=None,
            server_header="cp-stub",
            backlog=4096,  # a fleet reconnecting at once must not overflow the accept queue
        )
        self.agent_port = self._ws.sockets[0].getsockname()[1]
        self._opening = f"cannot listen for the operator API on {config.api_host}:{config.api_port}"
        self._runner = web.AppRunner(self.api.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.api_host, config.api_port)
        await site.start()
        self.api_port = self._runner.addresses[0][1]  # the bound port, when api_port is 0
        if self.ca is not None and config.enroll_port is not None:
            self._opening = (
                f"cannot listen for enrollment on {config.enroll_host}:{config.enroll_port}"
            )
            self._enroll_runner = web.AppRunner(enrollment_app(self.ca, self.log), access_log=None)
            await self._enroll_runner.setup()
            enroll_site = web.TCPSite(
                self._enroll_runner,
                config.enroll_host,
                config.enroll_port,
                ssl_context=enrollment_server_context(
                    cert=config.server_cert, key=config.server_key
                ),
            )
            await enroll_site.start()
            self.enroll_port = self._enroll_runner.addresses[0][1]
        if self.console is not None:
            await self._start_console(self.console)
        self.log.info(
            "stub_listening",
            agents=f"wss://{config.agent_host}:{self.agent_port}{AGENT_PATH}",
            api=f"http://{config.api_host}:{self.api_port}",
            console=self.console_url or None,
            signing_kid=self.signer.kid,
        )

    async def _start_console(self, console: Console) -> None:
        config = self.config
        self._opening = (
            f"cannot listen for the console on {config.console_host}:{config.console_port}"
        )
        self._console_runner = web.AppRunner(console.app, access_log=None)
        await self._console_runner.setup()
        tls = (
            enrollment_server_context(cert=config.server_cert, key=config.server_key)
            if config.console_uses_tls
            else None
        )
        site = web.TCPSite(
            self._console_runner, config.console_host, config.console_port, ssl_context=tls
        )
        await site.start()
        self.console_port = self._console_runner.addresses[0][1]
        if config.console_token_file is not None:
            try:
                write_atomic(config.console_token_file, console.token.encode() + b"\n", 0o600)
            except OSError as exc:
                raise StubConfigError(
                    f"cannot write the console token to {config.console_token_file}: {exc}"
                ) from exc

    @property
    def console_url(self) -> str:
        """Where a browser opens the console (empty without one)."""
        if self.console is None or not self.console_port:
            return ""
        scheme = "https" if self.config.console_uses_tls else "http"
        host = self.config.console_host
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.console_port}/"

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        """Before the WebSocket handshake: the control path, or a stream this agent is expected
        to dial (404 otherwise, so the agent fails fast)."""
        serial = _peer_serial(connection) if self.ca is not None else None
        if self.ca is not None and serial is not None and self.ca.is_revoked(serial):
            self.log.warning(
                "client_certificate_refused",
                reason="revoked",
                agent_id=_peer_agent_id(connection),
                serial=serial,
                peer=peer_address(connection.remote_address),
            )
            return connection.respond(403, "this client certificate is revoked\n")
        if request.path == AGENT_PATH:
            return None
        if request.path.startswith(STREAM_PREFIX):
            stream_id = request.path.removeprefix(STREAM_PREFIX)
            agent_id = _peer_agent_id(connection)
            if agent_id is not None and self.streams.expected(stream_id, agent_id):
                return None
            return connection.respond(404, "no such stream for this agent\n")
        return connection.respond(404, f"agents connect to {AGENT_PATH}\n")

    def _answer_stream_upgrade(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        """A stream connection's 101: its framing (docs/PROTOCOL.md §13.3)."""
        if request.path.startswith(STREAM_PREFIX):
            answer_upgrade(connection, request, response, offer_v2=self.streams.offer_v2)

    async def _route(self, websocket: ServerConnection) -> None:
        path = websocket.request.path if websocket.request is not None else ""
        if path.startswith(STREAM_PREFIX):
            agent_id = _peer_agent_id(websocket) or ""
            await self.streams.attach(websocket, path.removeprefix(STREAM_PREFIX), agent_id)
        else:
            await self.hub.handler(websocket)

    async def close(self) -> None:
        await self.streams.close()
        if self._enroll_runner is not None:
            await self._enroll_runner.cleanup()
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        if self._console_runner is not None:
            await self._console_runner.cleanup()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        with contextlib.suppress(StubError):  # what was committed reaches the disk first
            await self.store.wait_durable()
        self.store.close()
        if self.ca is not None:
            self.ca.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()


__all__ = ["AGENT_PATH", "StubConfig", "StubServer"]
