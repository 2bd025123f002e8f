"""The outbound tunnel: one mutually authenticated WebSocket connection to the control plane,
kept up for as long as the agent runs.

This is the I/O shell around :class:`agent.core.session.AgentSession`. Per connection it runs three
tasks: a reader (frames in, through the session), a ticker (heartbeats and timeouts, asked of the
session) and an outbox pump (unacknowledged status frames out, from SQLite, oldest first; all of
them again after every reconnect). Between connections it waits with capped exponential backoff
and full jitter, or much longer after a certificate rejection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidMessage,
    InvalidProxyStatus,
    InvalidStatus,
)
from websockets.protocol import State

from agent.config import ControlPlaneConfig, TunnelConfig
from agent.core.backoff import Backoff
from agent.core.errors import AuditError, ConfigError, RedirectRefused, TLSRejected
from agent.core.frames import (
    FINAL_STATES,
    MAX_FRAME_TO_AGENT,
    MAX_FRAME_TO_CONTROL_PLANE,
    Anchor,
    CertificateFrame,
    DeliveryRejected,
    Frame,
    Hello,
    KeySetStatus,
    Status,
    encode,
)
from agent.core.session import (
    Acked,
    AgentSession,
    CertificateIssued,
    CloseCode,
    CloseRequested,
    CommandDelivered,
    Event,
    FrameRefused,
    KeySetOffered,
    PeerReportedError,
    Welcomed,
)
from agent.executor import DeliveryOutcome
from agent.io.audit_file import AuditLog
from agent.io.egress import Route, route_for
from agent.io.splice import StreamConnection
from agent.io.store import AgentState, OutboxRow
from agent.io.stream_transport import DialSettings, dial_stream
from agent.io.tls import PeerCertificate, classify_tls_failure

# Hard cap enforced by the WebSocket layer while reading, so a hostile peer cannot make us buffer
# more than this; frames between MAX_FRAME_TO_AGENT and this cap are refused by the codec with an
# error frame and the connection stays up, frames over it close the connection (1009).
WEBSOCKET_MAX_SIZE: Final = 16 * MAX_FRAME_TO_AGENT
STABLE_AFTER: Final = 10.0
"""A connection READY for this long (or two heartbeat intervals) resets the backoff."""


class _ConnectWithoutRedirects(connect):
    """websockets' ``connect`` follows up to ten 3xx answers to the upgrade, to any host (only
    the TLS server name stays pinned). The control plane is not trusted with the customer's
    network, so every connection the agent opens ends at a redirect: any 3xx, with or without a
    ``Location``, raises :class:`RedirectRefused` and nothing else is dialed."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        if isinstance(exc, InvalidStatus) and 300 <= exc.response.status_code < 400:
            return RedirectRefused(exc.response.status_code, exc.response.headers.get("Location"))
        return exc


@dataclass
class ConnectionInfo:
    url: str
    peer_sha256: str
    peer_subject: str | None
    tls_version: str | None
    cipher: str | None
    since: float
    agent_id_seen: str | None = None


class Tunnel:
    def __init__(
        self,
        *,
        control_plane: ControlPlaneConfig,
        settings: TunnelConfig,
        ssl_context: Callable[[], ssl.SSLContext],
        hello: Hello | Callable[[], Hello],
        state: AgentState,
        audit: AuditLog,
        on_delivery: Callable[[str, str], DeliveryOutcome],
        on_keyset: Callable[[str], KeySetStatus] | None = None,
        log: structlog.typing.FilteringBoundLogger,
        agent_id: str,
        backoff: Backoff | None = None,
        on_state: Callable[[str], object] | None = None,
        on_session_end: Callable[[], object] | None = None,
        on_certificate: Callable[[CertificateFrame], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cp = control_plane
        self._settings = settings
        self._ssl_context = ssl_context
        self._hello = hello if callable(hello) else (lambda: hello)
        self._state = state
        self._audit = audit
        self._on_delivery = on_delivery
        self._on_keyset = on_keyset or _no_keysets
        self._log = log
        self._agent_id = agent_id
        self._backoff = backoff or Backoff(settings.backoff)
        self._on_state = on_state or (lambda _text: None)
        self._on_session_end = on_session_end or (lambda: None)
        self._on_certificate = on_certificate or (lambda _frame: None)
        self._clock = clock
        self.clock_offset = 0.0
        """The control plane's clock minus ours, measured at the last welcome (seconds)."""
        self._websocket: ClientConnection | None = None
        self._outbox_changed = asyncio.Event()
        self._acked = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self.connection: ConnectionInfo | None = None
        self.ready = asyncio.Event()
        self.reconnects = 0
        self.last_error: str | None = None
        self.route = "direct"
        """How the last attempt went out (redacted): direct, direct to X, via proxy Y."""
        self._route = Route(proxy=None)
        """The last attempt's route: its proxy URL (credentials included) is scrubbed from every
        error text kept in ``last_error`` or logged."""
        self._closed_after_handshake = 0
        self._ready_since: float | None = None
        self._stable_after = max(STABLE_AFTER, 2 * settings.heartbeat.interval)
        self._last_sent = 0

    # -- public ---------------------------------------------------------------------------

    @property
    def consecutive_failures(self) -> int:
        """Connection attempts that failed (or did not stay up) since the last stable one."""
        return self._backoff.attempt

    def notify_outbox(self) -> None:
        self._outbox_changed.set()

    async def wait_flushed(self) -> bool:
        """Wait until every queued result (status, refusal) is acknowledged; False if the tunnel
        is down. Anchors are best effort and not waited for.

        Bound it with ``asyncio.timeout``."""
        while self._state.unsent_results() > 0:
            if not self.ready.is_set():
                return False
            self._acked.clear()
            await self._acked.wait()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a connection up until ``stop`` is set.

        Only an audit failure ends it early (raised: nothing may happen unaudited); any other
        error is logged and treated as a failed attempt."""
        while not stop.is_set():
            try:
                delay = await self._attempt(stop)
            except AuditError:
                raise
            except Exception as exc:
                self.last_error = self._route.scrub(f"{type(exc).__name__}: {exc}")
                self._log.error(
                    "tunnel_attempt_failed", error=self.last_error, raised_at=_raised_at(exc)
                )
                delay = self._backoff.next_delay()
            if stop.is_set():
                break
            self.reconnects += 1
            self._log.info("reconnect_scheduled", delay_s=round(delay, 3))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    # -- one connection -------------------------------------------------------------------

    async def _attempt(self, stop: asyncio.Event) -> float:
        """Connect once and serve the connection; return the delay before the next attempt."""
        try:
            context = self._ssl_context()
            route = route_for(self._cp)
        except ConfigError as exc:
            # Our own texts, which show proxy URLs redacted only (agent/io/proxy_url.py).
            self._route = Route(proxy=None)
            self.route = "none (the connection settings are unusable)"
            self.last_error = str(exc)
            self._log.error("connection_settings_unusable", error=str(exc))
            return self._backoff.tls_rejected_delay()
        self._route = route
        self.route = route.describe()
        try:
            websocket = await self._connect(
                self._cp.url, context, route, max_size=WEBSOCKET_MAX_SIZE, max_queue=16
            )
        except Exception as exc:
            return self._connect_failed(exc)
        try:
            await self._serve(websocket, stop)
        finally:
            self.ready.clear()
            self.connection = None
            self._on_session_end()  # streams it authorised end with it
            self._acked.set()  # wake wait_flushed(): no ack will come on this connection
        # Reset the backoff only for a connection that stayed up: one that a peer keeps
        # refusing right after the welcome must not turn into a reconnect storm.
        if self._ready_since is not None and (
            time.monotonic() - self._ready_since >= self._stable_after
        ):
            self._backoff.reset()
        self._ready_since = None
        return self._backoff.next_delay()

    async def _connect(
        self, url: str, context: ssl.SSLContext, route: Route, *, max_size: int, max_queue: int
    ) -> ClientConnection:
        direct: dict[str, Any] = {}  # create_connection() keywords for a private endpoint
        if route.host is not None:
            direct = {"host": route.host, "port": route.port}
        return await _ConnectWithoutRedirects(
            url,
            ssl=context,
            server_hostname=self._cp.verify_name,
            open_timeout=self._cp.connect_timeout,
            ping_interval=None,  # heartbeats are the protocol's own (session.py)
            close_timeout=5,
            max_size=max_size,
            max_queue=max_queue,
            compression=None,
            proxy=route.proxy,
            user_agent_header=f"byoc-agent/{self._hello().agent_version}",
            **direct,
        )

    async def open_stream_connection(self, stream_id: str) -> StreamConnection:
        """Dial the stream connection for ``stream_id`` (docs/PROTOCOL.md §13): same identity,
        same route, same checks as the tunnel; only while the tunnel session is up."""
        if not self.ready.is_set():
            raise ConnectionError("the tunnel is not connected")
        return await dial_stream(
            f"{self._cp.url.rstrip('/')}/streams/{stream_id}",
            self._ssl_context(),
            route_for(self._cp),
            DialSettings(
                user_agent=f"byoc-agent/{self._hello().agent_version}",
                server_name=self._cp.verify_name,
                open_timeout=self._cp.connect_timeout,
            ),
        )

    def _connect_failed(self, exc: Exception) -> float:
        rejected = classify_tls_failure(exc)
        if rejected is None and _closed_after_tls_handshake(exc):
            # With TLS 1.3 the client's handshake completes before the server has checked the
            # client certificate; a server that refuses it may close without its alert reaching
            # us (Python's asyncio servers do). Once could be a server restarting; twice in a row
            # is treated as a refusal, so the agent never retries it in a tight loop.
            self._closed_after_handshake += 1
            if self._closed_after_handshake >= 2:
                rejected = TLSRejected(
                    "the control plane closed the connection right after the TLS handshake, "
                    "twice in a row: it most likely refused our client certificate",
                    by_peer=True,
                )
        else:
            self._closed_after_handshake = 0
        if rejected is not None:
            return self._tls_rejected(rejected)
        if isinstance(exc, InvalidProxyStatus):
            status = exc.response.status_code
            self.last_error = f"the proxy refused the connection: HTTP {status} ({self.route})"
            if status in (401, 403, 407):  # credentials or proxy policy: needs a person
                delay = self._backoff.tls_rejected_delay()
                self._audit.append(
                    "connection_failed",
                    url=self._cp.url,
                    reason="proxy_refused",
                    status=status,
                    route=self.route,
                )
                self._log.error("proxy_refused", status=status, route=self.route)
                self._on_state(f"proxy refused the connection (HTTP {status})")
                return delay
            self._log.warning("proxy_failed", status=status, route=self.route)
            return self._backoff.next_delay()
        if isinstance(exc, RedirectRefused):
            # Not followed, and not retried soon: a redirecting control plane needs a person.
            location = self._route.scrub(exc.location or "")[:200] or None
            self.last_error = (
                f"control plane answered HTTP {exc.status} with a redirect; "
                "redirects are never followed (check control_plane.url)"
            )
            self._audit.append(
                "connection_failed",
                url=self._cp.url,
                reason="redirect_refused",
                status=exc.status,
                location=location,
            )
            self._log.error("connect_redirected", status=exc.status, location=location)
            return self._backoff.tls_rejected_delay()
        if isinstance(exc, InvalidStatus) and 400 <= exc.response.status_code < 500:
            self.last_error = (
                f"control plane refused the connection: HTTP {exc.response.status_code}"
            )
            self._audit.append(
                "connection_failed",
                url=self._cp.url,
                reason="http_refused",  # e.g. 403: our certificate was revoked
                status=exc.response.status_code,
            )
            self._log.error("connect_refused", status=exc.response.status_code)
            return self._backoff.tls_rejected_delay()
        # A library's error text may quote the proxy URL, credentials and all (websockets'
        # InvalidProxy does): scrub it before it is kept or logged.
        self.last_error = self._route.scrub(f"{type(exc).__name__}: {exc}")
        delay = self._backoff.next_delay()
        self._log.warning(
            "connect_failed",
            url=self._cp.url,
            route=self.route,
            error=self.last_error,
            retry_in_s=round(delay, 3),
        )
        return delay

    def _tls_rejected(self, rejected: TLSRejected) -> float:
        delay = self._backoff.tls_rejected_delay()
        detail = self._route.scrub(str(rejected))
        self.last_error = detail
        side = "control_plane_refused_agent" if rejected.by_peer else "agent_refused_control_plane"
        self._audit.append(
            "connection_failed",
            url=self._cp.url,
            reason="tls_rejected",
            side=side,
            detail=detail,
        )
        # Loud: this does not fix itself; an operator has to look at certificates.
        self._on_state(f"certificate rejected ({side}); next attempt in {delay:.0f}s")
        self._log.error(
            "tls_certificate_rejected",
            side=side,
            detail=detail,
            url=self._cp.url,
            retry_in_s=round(delay, 1),
        )
        return delay

    async def send_frame(self, frame: Frame) -> None:
        """Send an informational frame (not from the outbox) on the current session; raises
        ConnectionError when there is none."""
        websocket = self._websocket
        if websocket is None or not self.ready.is_set():
            raise ConnectionError("the tunnel is not connected")
        await self._send(websocket, encode(frame))

    async def _serve(self, websocket: ClientConnection, stop: asyncio.Event) -> None:
        self._websocket = websocket
        try:
            await self._serve_connected(websocket, stop)
        finally:
            self._websocket = None

    async def _serve_connected(self, websocket: ClientConnection, stop: asyncio.Event) -> None:
        ssl_object = websocket.transport.get_extra_info("ssl_object")
        peer = PeerCertificate.from_ssl_object(ssl_object)
        cipher = ssl_object.cipher() if ssl_object is not None else None
        self.connection = ConnectionInfo(
            url=self._cp.url,
            peer_sha256=peer.sha256,
            peer_subject=peer.subject_cn,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            cipher=cipher[0] if cipher else None,
            since=time.time(),
        )
        self._audit.append(
            "connection_up",
            url=self._cp.url,
            route=self.route,
            peer_cert_sha256=peer.sha256,
            peer_subject=peer.subject_cn,
            tls_version=self.connection.tls_version,
            cipher=self.connection.cipher,
        )
        self._log.info("connected", url=self._cp.url, peer_cert_sha256=peer.sha256)
        loop = asyncio.get_running_loop()
        session = AgentSession(
            hello=self._hello(), heartbeat=self._settings.heartbeat, now=loop.time()
        )
        tasks: list[asyncio.Task[str]] = []
        try:
            await self._flush(websocket, session)  # hello
            rearm = asyncio.Event()
            tasks = [
                asyncio.create_task(self._read(websocket, session, rearm)),
                asyncio.create_task(self._tick(websocket, session, rearm)),
                asyncio.create_task(self._pump(websocket)),
                asyncio.create_task(_wait_for(stop, "agent stopping")),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            reason = self._outcome(done)
            if stop.is_set():
                await websocket.close(CloseCode.GOING_AWAY, "agent stopping")
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            reason = f"connection lost: {exc!r}"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if websocket.state is not State.CLOSED:
            websocket.transport.abort()
        self._audit.append(
            "connection_down", url=self._cp.url, peer_cert_sha256=peer.sha256, reason=reason
        )
        self._log.warning("disconnected", reason=reason)
        self._on_state(f"disconnected: {reason}")

    def _outcome(self, done: set[asyncio.Task[str]]) -> str:
        """Why the connection ended, from the first task that finished."""
        task = next(iter(done))
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, ConnectionClosed | OSError | TimeoutError):
            return f"connection lost: {exc!r}"
        # A bug, possibly triggered by the peer: record where it happened, not its message
        # (which could carry what the peer sent, a token for instance).
        where = _raised_at(exc)
        self._log.error("tunnel_task_failed", error=type(exc).__name__, raised_at=where)
        return f"internal error: {type(exc).__name__} at {where}"

    async def _send(self, websocket: ClientConnection, text: str) -> None:
        async with self._send_lock:
            # A peer that stops reading must not stall us forever: time out and reconnect.
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the send completes, leaving the connection task hung for good.
            async with asyncio.timeout(self._settings.send_timeout):
                await websocket.send(text)

    async def _flush(self, websocket: ClientConnection, session: AgentSession) -> None:
        for text in session.data_to_send():
            await self._send(websocket, text)

    async def _read(
        self, websocket: ClientConnection, session: AgentSession, rearm: asyncio.Event
    ) -> str:
        loop = asyncio.get_running_loop()
        async for message in websocket:
            events = session.receive(message, loop.time())
            rearm.set()  # the session's next deadline may have moved (e.g. READY after welcome)
            outcome = await self._react(websocket, session, events)
            if outcome is not None:
                return outcome
        return f"closed by peer: {websocket.close_code} {websocket.close_reason}".strip()

    async def _react(
        self, websocket: ClientConnection, session: AgentSession, events: list[Event]
    ) -> str | None:
        """Act on the session's events (audit records first), then send what it queued,
        then close if it asked to. Returns why the connection ends, if it does."""
        close = self._handle(session, events)
        await self._flush(websocket, session)
        if close is None:
            return None
        if close.code == CloseCode.HEARTBEAT_TIMEOUT:
            websocket.transport.abort()  # the peer is gone; do not wait for a closing handshake
        else:
            await websocket.close(close.code, close.reason[:120])
        return close.reason

    def _handle(self, session: AgentSession, events: list[Event]) -> CloseRequested | None:
        pending = list(events)
        while pending:
            event = pending.pop(0)
            match event:
                case Welcomed(welcome=welcome):
                    self._welcomed(welcome.agent_id, welcome.server_time)
                case CommandDelivered(ref=ref, token=token):
                    outcome = self._on_delivery(ref, token)
                    now = asyncio.get_running_loop().time()
                    if outcome == "refused":  # spends the error budget
                        pending.extend(session.delivery_refused(now))
                    elif outcome == "deferred":  # audited too: spends the deferral budget
                        pending.extend(session.delivery_deferred(now))
                case KeySetOffered(token=token):
                    answer = self._on_keyset(token)
                    session.send(answer)
                    now = asyncio.get_running_loop().time()
                    if answer.reason == "already_current":
                        pending.extend(session.delivery_deferred(now))
                    elif not answer.accepted:
                        pending.extend(session.delivery_refused(now))
                case CertificateIssued(frame=frame):
                    self._on_certificate(frame)
                case Acked(seq=seq):
                    if not self._acknowledged(seq):
                        pending.extend(session.delivery_refused(asyncio.get_running_loop().time()))
                case FrameRefused(error=error, size=size):
                    self._audit.append(
                        "frame_rejected", reason=error.code, detail=error.detail, size=size
                    )
                    self._log.warning("frame_rejected", reason=error.code, detail=error.detail)
                case PeerReportedError(frame=frame):
                    self._log.warning("peer_error", code=frame.code, message=frame.message)
                case CloseRequested():
                    return event
        return None

    def _welcomed(self, seen_id: str, server_time: float) -> None:
        assert self.connection is not None  # noqa: S101  # set in _serve before reading
        self.connection.agent_id_seen = seen_id
        if seen_id != self._agent_id:
            self._log.error("identity_mismatch", ours=self._agent_id, control_plane_says=seen_id)
        skew = self._clock() - server_time
        self.clock_offset = -skew
        if abs(skew) > 30:
            self._log.warning("clock_skew_detected", skew_s=round(skew, 1))
        self._ready_since = time.monotonic()
        self._closed_after_handshake = 0
        self.last_error = None
        self.ready.set()
        self._outbox_changed.set()
        self._log.info("session_ready", agent_id=seen_id)
        self._on_state(f"connected to {self._cp.url}")

    def _acknowledged(self, seq: int) -> bool:
        """Apply an ack; False if it is for a frame not sent on this connection (a peer bug,
        which must not lose the frame and spends the peer's error budget)."""
        if seq > self._last_sent:
            self._log.warning("ack_for_unsent_frame", seq=seq, last_sent=self._last_sent)
            return False
        row = self._state.ack(seq)
        self._acked.set()
        if row is None or row.kind == Anchor.type:
            # A repeated ack, or an anchor's (whose record would move the head it reported).
            return True
        if row.kind == Status.type and row.state in FINAL_STATES:
            self._audit.append("result_delivered", jti=row.jti, state=row.state, frame_seq=seq)
        elif row.kind != Status.type:
            self._audit.append(
                "result_delivered",
                ref=row.body.get("ref"),
                state="delivery_rejected",
                reason=row.body.get("reason"),
                frame_seq=seq,
            )
        return True

    async def _tick(
        self, websocket: ClientConnection, session: AgentSession, rearm: asyncio.Event
    ) -> str:
        """Call ``session.tick`` at each deadline it gives, recomputing the deadline whenever
        the reader says the session changed (a frame arrived), not only when it expires."""
        loop = asyncio.get_running_loop()
        while True:
            rearm.clear()
            delay = max(0.0, session.next_deadline() - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see _send
                    await rearm.wait()
            outcome = await self._react(websocket, session, session.tick(loop.time()))
            if outcome is not None:
                return outcome

    async def _pump(self, websocket: ClientConnection) -> str:
        self._last_sent = 0
        await self.ready.wait()
        while True:
            self._outbox_changed.clear()
            rows = self._state.outbox_after(self._last_sent)
            for row in rows:
                # Counted as sent before the send completes: its ack may arrive first.
                self._last_sent = row.seq
                await self._send(websocket, self._encode_row(row))
            if not rows:
                await self._outbox_changed.wait()

    def _encode_row(self, row: OutboxRow) -> str:
        """The frame for an outbox row; a frame that cannot be sent as it is (not strict JSON,
        or over the limit) is replaced by one that says so, so it cannot block the outbox."""
        try:
            text = encode(row.frame())
            if len(text.encode("utf-8")) <= MAX_FRAME_TO_CONTROL_PLANE:
                return text
            problem = "over the frame size limit"
        except (ValueError, TypeError) as exc:
            problem = f"not valid JSON: {exc}"
        self._log.error("outbox_frame_replaced", seq=row.seq, problem=problem)
        frame = row.frame()
        if isinstance(frame, Status):
            frame = dataclasses.replace(
                frame, result={"truncated": True}, detail=f"result could not be sent: {problem}"
            )
        elif isinstance(frame, DeliveryRejected):
            frame = dataclasses.replace(frame, detail=frame.detail[:200], jti=None)
        return encode(frame)


def _raised_at(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of an exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno}"


def _no_keysets(token: str) -> KeySetStatus:
    return KeySetStatus(
        version=0,
        accepted=False,
        reason="keysets_not_enabled",
        detail="this agent trusts a fixed list of command keys (commands.trusted_keys)",
    )


def _closed_after_tls_handshake(exc: BaseException) -> bool:
    """The TLS handshake completed but the server closed before any HTTP response."""
    return isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, EOFError)


async def _wait_for(event: asyncio.Event, outcome: str) -> str:
    await event.wait()
    return outcome
