"""The agent-facing side of the stub: one WebSocket session per connected agent.

Identity comes from the verified client certificate (its subject CN), never from a frame. Per
session: wait for ``hello``, answer ``welcome``, then deliver queued commands, store each status
report durably *before* acknowledging it, answer pings, send our own, and drop a peer that has
been silent for the heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

import structlog
from cryptography import x509
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from agent.config import AGENT_ID_PATTERN
from agent.core.errors import ProtocolError, TLSRejected
from agent.core.frames import (
    MAX_FRAME_TO_CONTROL_PLANE,
    PROTOCOL_VERSION,
    TO_CONTROL_PLANE,
    Ack,
    Anchor,
    CertificateFrame,
    CommandFrame,
    DeliveryRejected,
    ErrorFrame,
    Frame,
    Hello,
    KeySetFrame,
    KeySetStatus,
    Ping,
    Pong,
    RenewRequest,
    Status,
    Welcome,
    decode,
    encode,
)
from agent.core.receipts import ReceiptInvalid, result_sha256, verify_receipt
from agent.core.session import CloseCode, HeartbeatSettings, HeartbeatTimer
from agent.io.tls import PeerCertificate
from control_plane_stub.enrollment import CertificateAuthority, EnrollmentRefused
from control_plane_stub.store import StubStore

BUSY_RETRY: Final = 5.0
"""Seconds before a delivery the agent refused as ``busy`` is sent again."""


@dataclass(frozen=True, kw_only=True)
class HubSettings:
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    send_timeout: float = 10.0


@dataclass(eq=False)
class AgentLink:
    agent_id: str
    websocket: ServerConnection
    cert_sha256: str
    timer: HeartbeatTimer
    sent: set[str] = field(default_factory=set)
    """Deliveries sent on this connection (each is sent once per connection)."""
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Hub:
    def __init__(
        self, store: StubStore, settings: HubSettings, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self._store = store
        self._settings = settings
        self._log = log
        self.links: dict[str, AgentLink] = {}
        self.changed = asyncio.Condition()
        self._closing: set[asyncio.Task[None]] = set()
        self.ca: CertificateAuthority | None = None
        """Issues renewed certificates (``renew`` frames), when the stub holds the agent CA."""

    # -- used by the API ------------------------------------------------------------------

    async def push_keyset(self, agent_id: str, token: str) -> bool:
        """Send a key set to the agent now if it is connected (else it goes on connect)."""
        link = self.links.get(agent_id)
        if link is None:
            return False
        await self._send(link, KeySetFrame(token=token))
        return True

    def kick(self, agent_id: str) -> None:
        link = self.links.get(agent_id)
        if link is not None:
            link.kick.set()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # -- one agent session ----------------------------------------------------------------

    async def handler(self, websocket: ServerConnection) -> None:
        try:
            peer = PeerCertificate.from_ssl_object(websocket.transport.get_extra_info("ssl_object"))
        except TLSRejected:
            await websocket.close(CloseCode.PROTOCOL_ERROR, "client certificate required")
            return
        agent_id = peer.subject_cn or ""  # None: no CN, or several (no single identity)
        if not AGENT_ID_PATTERN.fullmatch(agent_id):
            self._log.warning(
                "agent_certificate_refused",
                cert_sha256=peer.sha256,
                peer=_address(websocket.remote_address),
                detail="the subject must have exactly one CN, an agent id",
            )
            await websocket.close(
                CloseCode.PROTOCOL_ERROR, "certificate must have exactly one CN, an agent id"
            )
            return
        log = self._log.bind(agent_id=agent_id, peer=_address(websocket.remote_address))
        hello = await self._handshake(websocket, log)
        if hello is None:
            return
        heartbeat = self._settings.heartbeat
        # Never give up on an agent sooner than three of its own ping intervals.
        timeout = max(heartbeat.timeout, 3 * (hello.heartbeat_interval or 0.0))
        link = AgentLink(
            agent_id=agent_id,
            websocket=websocket,
            cert_sha256=peer.sha256,
            timer=HeartbeatTimer(
                interval=heartbeat.interval, timeout=timeout, now=asyncio.get_running_loop().time()
            ),
        )
        previous = self.links.get(agent_id)
        if previous is not None:
            # Close the old session in the background: over a half-open link the closing
            # handshake would wait out its timeout, and the new session must not.
            log.warning("agent_superseded")
            closing = asyncio.create_task(
                previous.websocket.close(CloseCode.SUPERSEDED, "superseded by a new connection")
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self.links[agent_id] = link
        ssl_object = websocket.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self._store.remember_certificate(agent_id, peer.sha256, der)
        self._store.agent_connected(
            agent_id,
            cert_sha256=peer.sha256,
            peer=_address(websocket.remote_address),
            agent_version=hello.agent_version,
            capabilities=hello.capabilities,
        )
        await self._send(
            link,
            Welcome(
                protocol=PROTOCOL_VERSION,
                agent_id=agent_id,
                server_time=time.time(),
                heartbeat_interval=self._settings.heartbeat.interval,
            ),
        )
        log.info("agent_connected", cert_sha256=peer.sha256, version=hello.agent_version)
        offered = self._store.keyset(agent_id)
        held = hello.capabilities.get("keyset_version")
        if offered is not None and isinstance(held, int) and held < int(str(offered["version"])):
            await self._send(link, KeySetFrame(token=str(offered["token"])))
        await self.notify()
        reason = "closed"
        tasks = [
            asyncio.create_task(self._read(link, log)),
            asyncio.create_task(self._heartbeat(link)),
            asyncio.create_task(self._deliver(link, log)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            task = next(iter(done))
            exc = task.exception()
            reason = task.result() if exc is None else f"connection lost: {exc!r}"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if websocket.state is not State.CLOSED:
                websocket.transport.abort()
            if self.links.get(agent_id) is link:
                del self.links[agent_id]
                self._store.agent_disconnected(agent_id, reason)
            log.info("agent_disconnected", reason=reason)
            await self.notify()

    async def _handshake(
        self, websocket: ServerConnection, log: structlog.typing.FilteringBoundLogger
    ) -> Hello | None:
        try:
            async with asyncio.timeout(self._settings.heartbeat.handshake_timeout):
                message = await websocket.recv()
            frame = decode(message, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE)
        except TimeoutError:
            await websocket.close(CloseCode.HANDSHAKE_TIMEOUT, "no hello")
            return None
        except ConnectionClosed:
            return None
        except ProtocolError as exc:
            await websocket.send(encode(ErrorFrame(code=exc.code, message=exc.detail)))
            await websocket.close(CloseCode.PROTOCOL_ERROR, "bad hello")
            return None
        if not isinstance(frame, Hello):
            await websocket.close(CloseCode.PROTOCOL_ERROR, f"expected hello, got {frame.type}")
            return None
        if frame.protocol != PROTOCOL_VERSION:
            log.warning("unsupported_protocol", protocol=frame.protocol)
            await websocket.send(
                encode(
                    ErrorFrame(
                        code="unsupported_protocol",
                        message=f"this control plane speaks protocol {PROTOCOL_VERSION}",
                    )
                )
            )
            await websocket.close(CloseCode.UNSUPPORTED_PROTOCOL, "unsupported protocol")
            return None
        return frame

    async def _send(self, link: AgentLink, frame: Frame) -> None:
        async with link.send_lock:
            async with asyncio.timeout(self._settings.send_timeout):  # not wait_for (3.11)
                await link.websocket.send(encode(frame))

    async def _read(self, link: AgentLink, log: structlog.typing.FilteringBoundLogger) -> str:
        async for message in link.websocket:
            link.timer.received(asyncio.get_running_loop().time())
            try:
                frame = decode(
                    message, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE
                )
            except ProtocolError as exc:
                log.warning("frame_rejected", reason=exc.code, detail=exc.detail)
                await self._send(link, ErrorFrame(code=exc.code, message=exc.detail, ref=exc.ref))
                continue
            await self._dispatch(link, frame, log)
        ws = link.websocket
        return f"closed by agent: {ws.close_code} {ws.close_reason}".strip()

    async def _dispatch(
        self, link: AgentLink, frame: Frame, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        match frame:
            case Status():
                if self._store.apply_status(link.agent_id, frame):
                    log.info(
                        "status",
                        ref=frame.ref,
                        jti=frame.jti,
                        state=frame.state,
                        reason=frame.reason,
                    )
                if frame.receipt is not None:
                    verdict = self._check_receipt(link.agent_id, frame)
                    if not self._store.record_receipt(link.agent_id, frame, verdict):
                        log.info("receipt_not_kept", ref=frame.ref, state=frame.state)
                await self._send(link, Ack(seq=frame.seq))  # stored durably first
                await self.notify()
            case Anchor():
                conflict = self._store.record_anchor(
                    link.agent_id, frame.audit_seq, frame.audit_hash, frame.at
                )
                if conflict is not None:
                    log.error(
                        "audit_anchor_conflict",
                        audit_seq=frame.audit_seq,
                        reason=conflict,
                        detail="the agent's audit log differs from the anchors held here",
                    )
                await self._send(link, Ack(seq=frame.seq))
                await self.notify()
            case DeliveryRejected():
                self._store.apply_delivery_rejected(link.agent_id, frame)
                log.info(
                    "delivery_rejected", ref=frame.ref, reason=frame.reason, detail=frame.detail
                )
                await self._send(link, Ack(seq=frame.seq))
                if frame.reason in ("busy", "rate_limited"):  # not now: try again in a while
                    asyncio.get_running_loop().call_later(BUSY_RETRY, self._retry, link, frame.ref)
                await self.notify()
            case RenewRequest(csr=csr):
                await self._renew(link, csr, log)
            case KeySetStatus():
                self._store.keyset_answered(link.agent_id, frame.to_json())
                log.info(
                    "keyset_status",
                    version=frame.version,
                    accepted=frame.accepted,
                    reason=frame.reason,
                )
                await self.notify()
            case Ping(id=ping_id):
                await self._send(link, Pong(id=ping_id))
            case Pong():
                pass
            case ErrorFrame(code=code, message=message):
                log.warning("agent_reported_error", code=code, message=message)
            case _:
                await self._send(
                    link,
                    ErrorFrame(code="unexpected_frame", message=f"unexpected {frame.type} frame"),
                )

    async def _renew(
        self, link: AgentLink, csr: str, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        if self.ca is None:
            await self._send(
                link,
                ErrorFrame(code="renewal_unavailable", message="this control plane issues none"),
            )
            return
        try:
            issued = self.ca.renew(link.agent_id, csr, now=time.time())
        except EnrollmentRefused as exc:
            log.warning("renewal_refused", detail=str(exc))
            await self._send(link, ErrorFrame(code="renewal_refused", message=str(exc)[:500]))
            return
        log.info("certificate_renewed", not_after=int(issued.not_after))
        await self._send(
            link, CertificateFrame(certificate=issued.certificate, ca_bundle=issued.ca_bundle)
        )

    def disconnect(self, agent_id: str, code: int, reason: str) -> bool:
        """Close an agent's live session (e.g. its certificate was revoked)."""
        link = self.links.get(agent_id)
        if link is None:
            return False
        closing = asyncio.get_running_loop().create_task(link.websocket.close(code, reason))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        return True

    async def _heartbeat(self, link: AgentLink) -> str:
        loop = asyncio.get_running_loop()
        timer = link.timer
        while True:
            await asyncio.sleep(max(0.0, timer.next_deadline() - loop.time()))
            now = loop.time()
            if timer.expired(now):
                return f"heartbeat timeout: nothing for {now - timer.last_received:.1f}s"
            ping = timer.ping_due(now)
            if ping is not None:
                await self._send(link, ping)

    def _check_receipt(self, agent_id: str, frame: Status) -> str:
        """``valid`` if the receipt verifies with one of the agent's certificates and says what
        the status says; otherwise why not (the report is stored either way)."""
        assert frame.receipt is not None  # noqa: S101  # checked by the caller
        for der in reversed(self._store.certificates(agent_id)):
            try:
                claims = verify_receipt(frame.receipt, x509.load_der_x509_certificate(der))
            except ReceiptInvalid:
                continue
            expected = {
                "iss": agent_id,
                "jti": frame.jti,
                "ref": frame.ref,
                "state": frame.state,
                "reason": frame.reason,
                "at": frame.at,  # required in a status: the receipt is for this report
                "result_sha256": result_sha256(frame.result),
            }
            wrong = sorted(key for key, value in expected.items() if claims.get(key) != value)
            return "valid" if not wrong else f"mismatch: {', '.join(wrong)}"
        return "unverified: no certificate of this agent verifies it"

    @staticmethod
    def _retry(link: AgentLink, ref: str) -> None:
        link.sent.discard(ref)
        link.kick.set()

    async def _deliver(self, link: AgentLink, log: structlog.typing.FilteringBoundLogger) -> str:
        link.kick.set()
        while True:
            await link.kick.wait()
            link.kick.clear()
            for record in self._store.undelivered(link.agent_id):
                if record.ref in link.sent:
                    continue
                await self._send(link, CommandFrame(ref=record.ref, token=record.token))
                self._store.mark_sent(record.ref)
                link.sent.add(record.ref)
                log.info("command_sent", ref=record.ref, jti=record.jti, type=record.type)
            await self.notify()


def _address(remote: object) -> str:
    """``host:port`` (``[v6]:port``) for logs and the agent registry."""
    if isinstance(remote, tuple) and len(remote) >= 2:
        host = str(remote[0])
        return f"[{host}]:{remote[1]}" if ":" in host else f"{host}:{remote[1]}"
    return str(remote)
