"""The agent-facing side of the stub: one WebSocket session per connected agent.

Each connection runs a sans-I/O :class:`~agent.core.cp_session.ControlPlaneSession` (the same
frames, limits, heartbeat timer and close codes as the agent's side) and three small tasks: a
reader (frames in, through the session), a ticker (the session's heartbeats and timeouts) and a
writer, the one way out. Identity comes from the verified client certificate (its subject CN),
never from a frame.

What agents report (statuses, refusals, anchors) goes to one store writer, which applies
everything that arrived in a turn of the event loop, from every agent, in one transaction; the
store's syncer makes it durable with one fsync (group commit), and only then is each frame
acknowledged (docs/PROTOCOL.md §6.3: stored durably first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Final

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from agent.config import AGENT_ID_PATTERN
from agent.core.cp_session import (
    AgentError,
    ControlPlaneSession,
    Greeted,
    KeySetAnswered,
    Refused,
    RenewalAsked,
    Reported,
)
from agent.core.errors import TLSRejected
from agent.core.frames import (
    Anchor,
    CertificateFrame,
    DeliveryRejected,
    ErrorFrame,
    Hello,
    KeySetFrame,
    Status,
)
from agent.core.receipts import (
    ReceiptInvalid,
    receipt_certificate_sha256,
    receipt_claims,
    verify_receipt,
)
from agent.core.session import CloseCode, CloseRequested, HeartbeatSettings, HeartbeatTimer
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
    session: ControlPlaneSession
    log: structlog.typing.FilteringBoundLogger
    sent: set[str] = field(default_factory=set)
    """Deliveries sent on this connection (each is sent once per connection)."""
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    """Look for commands to deliver."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """The session has frames to send, or a close to perform."""
    closing: CloseRequested | None = None

    @property
    def timer(self) -> HeartbeatTimer:
        """When the agent was last heard from (any frame), and when to ping it next."""
        return self.session.timer

    def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = CloseRequested(code, reason)
        self.wake.set()


class Hub:
    def __init__(
        self, store: StubStore, settings: HubSettings, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self._store = store
        self._settings = settings
        self._log = log
        self.links: dict[str, AgentLink] = {}
        self.changed = asyncio.Condition()
        self.ca: CertificateAuthority | None = None
        """Issues renewed certificates (``renew`` frames), when the stub holds the agent CA."""
        self._reports: list[tuple[AgentLink, Status | DeliveryRejected | Anchor]] = []
        self._reported = asyncio.Event()

    # -- used by the API ------------------------------------------------------------------

    async def push_keyset(self, agent_id: str, token: str) -> bool:
        """Send a key set to the agent now if it is connected (else it goes on connect)."""
        link = self.links.get(agent_id)
        if link is None:
            return False
        link.session.send(KeySetFrame(token=token))
        link.wake.set()
        return True

    def kick(self, agent_id: str) -> None:
        link = self.links.get(agent_id)
        if link is not None:
            link.kick.set()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def disconnect(self, agent_id: str, code: int, reason: str) -> bool:
        """Close an agent's live session (e.g. its certificate was revoked)."""
        link = self.links.get(agent_id)
        if link is None:
            return False
        link.close(code, reason)
        return True

    # -- the store writer: group commit -------------------------------------------------------

    async def run_store_writer(self) -> None:
        """Apply what the agents reported, a turn's worth at a time, in one transaction each;
        acknowledge each frame once its transaction is durable."""
        while True:
            await self._reported.wait()
            self._reported.clear()
            reports, self._reports = self._reports, []
            acks: list[tuple[AgentLink, int]] = []
            try:
                with self._store.batch() as commit:
                    for link, frame in reports:
                        self._apply(link, frame)
                        acks.append((link, frame.seq))
            except Exception as exc:  # the writer must outlive one bad batch
                # Nothing of the batch is acknowledged: its agents resend it when they are back.
                self._log.error("store_write_failed", error=repr(exc), reports=len(reports))
                for link in {link for link, _ in reports}:
                    link.close(CloseCode.GOING_AWAY, "the control plane could not store a report")
                continue
            self._store.after(commit, functools.partial(self._acknowledge, acks))
            await self.notify()

    def _acknowledge(self, acks: list[tuple[AgentLink, int]]) -> None:
        for link, seq in acks:
            link.session.ack(seq)
            link.wake.set()

    def _apply(self, link: AgentLink, frame: Status | DeliveryRejected | Anchor) -> None:
        log = link.log
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
            case DeliveryRejected():
                self._store.apply_delivery_rejected(link.agent_id, frame)
                log.info(
                    "delivery_rejected", ref=frame.ref, reason=frame.reason, detail=frame.detail
                )
                if frame.reason in ("busy", "rate_limited"):  # not now: try again in a while
                    asyncio.get_running_loop().call_later(BUSY_RETRY, _retry, link, frame.ref)

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
                peer=peer_address(websocket.remote_address),
                detail="the subject must have exactly one CN, an agent id",
            )
            await websocket.close(
                CloseCode.PROTOCOL_ERROR, "certificate must have exactly one CN, an agent id"
            )
            return
        loop = asyncio.get_running_loop()
        link = AgentLink(
            agent_id=agent_id,
            websocket=websocket,
            cert_sha256=peer.sha256,
            session=ControlPlaneSession(
                agent_id=agent_id, heartbeat=self._settings.heartbeat, now=loop.time()
            ),
            log=self._log.bind(agent_id=agent_id, peer=peer_address(websocket.remote_address)),
        )
        rearm = asyncio.Event()
        tasks = [
            asyncio.create_task(self._read(link, rearm)),
            asyncio.create_task(self._tick(link, rearm)),
            asyncio.create_task(self._write(link)),
            asyncio.create_task(self._deliver(link)),
        ]
        reason = "closed"
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
            if link.session.hello is not None:
                link.log.info("agent_disconnected", reason=reason)
            await self.notify()

    def _greeted(self, link: AgentLink, hello: Hello) -> None:
        """A valid hello: this is the agent's session now."""
        websocket, agent_id = link.websocket, link.agent_id
        previous = self.links.get(agent_id)
        if previous is not None:
            # Close the old session without letting it delay this one: over a half-open link
            # its closing handshake would wait out its timeout.
            link.log.warning("agent_superseded")
            previous.close(CloseCode.SUPERSEDED, "superseded by a new connection")
        self.links[agent_id] = link
        ssl_object = websocket.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self._store.remember_certificate(agent_id, link.cert_sha256, der)
        self._store.agent_connected(
            agent_id,
            cert_sha256=link.cert_sha256,
            peer=peer_address(websocket.remote_address),
            agent_version=hello.agent_version,
            capabilities=hello.capabilities,
        )
        link.log.info("agent_connected", cert_sha256=link.cert_sha256, version=hello.agent_version)
        offered = self._store.keyset(agent_id)
        held = hello.capabilities.get("keyset_version")
        if offered is not None and isinstance(held, int) and held < int(str(offered["version"])):
            link.session.send(KeySetFrame(token=str(offered["token"])))
        link.kick.set()

    async def _read(self, link: AgentLink, rearm: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        changed = False
        async for message in link.websocket:
            events = link.session.receive(message, loop.time(), server_time=time.time())
            rearm.set()
            link.wake.set()
            for event in events:
                match event:
                    case Greeted(hello=hello):
                        self._greeted(link, hello)
                        changed = True
                    case Reported(frame=frame):
                        self._reports.append((link, frame))
                        self._reported.set()
                    case RenewalAsked(csr=csr):
                        self._renew(link, csr)
                    case KeySetAnswered(frame=answer):
                        self._store.keyset_answered(link.agent_id, answer.to_json())
                        link.log.info(
                            "keyset_status",
                            version=answer.version,
                            accepted=answer.accepted,
                            reason=answer.reason,
                        )
                        changed = True
                    case AgentError(frame=error):
                        link.log.warning(
                            "agent_reported_error", code=error.code, message=error.message
                        )
                    case Refused(error=error):
                        link.log.warning("frame_rejected", reason=error.code, detail=error.detail)
                    case CloseRequested(code=code, reason=reason):
                        if code == CloseCode.UNSUPPORTED_PROTOCOL:
                            link.log.warning("unsupported_protocol")
                        link.close(code, reason)
            if changed:
                changed = False
                await self.notify()
        if link.closing is not None:
            return link.closing.reason
        ws = link.websocket
        return f"closed by agent: {ws.close_code} {ws.close_reason}".strip()

    async def _tick(self, link: AgentLink, rearm: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        while True:
            rearm.clear()
            delay = max(0.0, link.session.next_deadline() - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await rearm.wait()
            for event in link.session.tick(loop.time()):
                if isinstance(event, CloseRequested):
                    link.close(event.code, event.reason)
            link.wake.set()

    async def _write(self, link: AgentLink) -> str:
        """The one way out: what the session queued, then a close if one was asked for."""
        websocket = link.websocket
        while True:
            await link.wake.wait()
            link.wake.clear()
            for text in link.session.data_to_send():
                async with asyncio.timeout(self._settings.send_timeout):  # not wait_for (3.11)
                    await websocket.send(text)
            closing = link.closing
            if closing is not None:
                if closing.code == CloseCode.HEARTBEAT_TIMEOUT:
                    websocket.transport.abort()
                else:
                    with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                        async with asyncio.timeout(self._settings.send_timeout):
                            await websocket.close(closing.code, closing.reason[:120])
                return closing.reason

    async def _deliver(self, link: AgentLink) -> str:
        while True:
            await link.kick.wait()
            link.kick.clear()
            if link.session.hello is None or self.links.get(link.agent_id) is not link:
                continue
            with self._store.batch():  # one commit for every command sent in this turn
                for record in self._store.undelivered(link.agent_id):
                    if record.ref in link.sent:
                        continue
                    link.session.deliver(record.ref, record.token)
                    self._store.mark_sent(record.ref)
                    link.sent.add(record.ref)
                    link.log.info("command_sent", ref=record.ref, jti=record.jti, type=record.type)
            link.wake.set()
            await self.notify()

    def _renew(self, link: AgentLink, csr: str) -> None:
        if self.ca is None:
            link.session.send(
                ErrorFrame(code="renewal_unavailable", message="this control plane issues none")
            )
            return
        try:
            issued = self.ca.renew(link.agent_id, csr, now=time.time())
        except EnrollmentRefused as exc:
            link.log.warning("renewal_refused", detail=str(exc))
            link.session.send(ErrorFrame(code="renewal_refused", message=str(exc)[:500]))
            return
        link.log.info("certificate_renewed", not_after=int(issued.not_after))
        link.session.send(
            CertificateFrame(certificate=issued.certificate, ca_bundle=issued.ca_bundle)
        )

    def _check_receipt(self, agent_id: str, frame: Status) -> str:
        """``valid`` if the receipt verifies with the certificate of this agent it names and
        says what the status says; otherwise why not (the report is stored either way)."""
        assert frame.receipt is not None  # noqa: S101  # checked by the caller
        sha256 = receipt_certificate_sha256(frame.receipt)
        certificate = None if sha256 is None else self._store.agent_certificate(agent_id, sha256)
        try:
            if certificate is None:
                raise ReceiptInvalid("names no certificate of this agent")
            claims = verify_receipt(frame.receipt, certificate)
        except ReceiptInvalid:
            return "unverified: no certificate of this agent verifies it"
        expected = receipt_claims(
            agent_id=agent_id,
            jti=frame.jti,
            ref=frame.ref,
            state=frame.state,
            reason=frame.reason,
            result=frame.result,
            at=frame.at,  # required in a status: the receipt is for this report
        )
        wrong = sorted(key for key, value in expected.items() if claims.get(key) != value)
        return "valid" if not wrong else f"mismatch: {', '.join(wrong)}"


def _retry(link: AgentLink, ref: str) -> None:
    link.sent.discard(ref)
    link.kick.set()


def peer_address(remote: object) -> str:
    """``host:port`` (``[v6]:port``) for logs and the agent registry."""
    if isinstance(remote, tuple) and len(remote) >= 2:
        host = str(remote[0])
        return f"[{host}]:{remote[1]}" if ":" in host else f"{host}:{remote[1]}"
    return str(remote)
