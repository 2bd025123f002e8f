"""The outbound tunnel: one mutually authenticated WebSocket connection to the control plane,
kept up for as long as the agent runs. Transport only.

Per connection it runs three tasks around a sans-I/O :class:`~agent.core.session.AgentSession`:
a *reader* (frames in, through the session; what they ask for is handed to the
:class:`Handler`, which queues it for the runner: nothing here touches the disk), a *ticker*
(heartbeats and timeouts, asked of the session) and a *writer*, the one way out: the session's
own frames (hello, pongs, pings, errors, key-set answers, renewal requests) and then the outbox's
frames that are durable, in ``seq`` order, all of them again on every connection. Between
connections it waits with capped exponential backoff and full jitter, or much longer after a
failure that needs a person; :meth:`Link.retry_now` cuts a wait short (SIGHUP, renewed files).

What a failed attempt means is decided in one place, :func:`classify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import structlog
from websockets.asyncio.client import ClientConnection
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
from agent.core.frames import MAX_FRAME_TO_AGENT, CertificateFrame, Frame, Hello
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
    Outbox,
    PeerReportedError,
    Welcomed,
    encode_entry,
)
from agent.io.clock import Clock
from agent.io.dialer import Dialer
from agent.io.egress import Route
from agent.io.tls import PeerCertificate, classify_tls_failure

# Hard cap enforced by the WebSocket layer while reading, so a hostile peer cannot make us buffer
# more than this; frames between MAX_FRAME_TO_AGENT and this cap are refused by the codec with an
# error frame and the connection stays up, frames over it close the connection (1009).
WEBSOCKET_MAX_SIZE: Final = 16 * MAX_FRAME_TO_AGENT
STABLE_AFTER: Final = 10.0
"""A connection READY for this long (or two heartbeat intervals) resets the backoff."""


class Handler(Protocol):
    """Where the tunnel hands what arrives (implemented by the daemon's wiring)."""

    def command(self, peer: Connection, ref: str, token: str) -> None: ...

    def ack(self, peer: Connection, seq: int) -> None: ...

    def keyset(self, peer: Connection, token: str) -> None: ...

    def certificate(self, frame: CertificateFrame) -> None: ...

    def record(self, event: str, /, **fields: object) -> None: ...

    def session_ended(self) -> None: ...


@dataclass
class ConnectionInfo:
    url: str
    peer_sha256: str
    peer_subject: str | None
    tls_version: str | None
    cipher: str | None
    since: float
    agent_id_seen: str | None = None


@dataclass(frozen=True, kw_only=True)
class Failure:
    """What a failed connection attempt means."""

    reason: str
    """``tls_rejected``, ``proxy_refused``, ``http_refused``, ``redirect_refused``,
    ``settings_unusable``, ``internal_error`` or ``network`` (ordinary: retried with
    backoff)."""
    detail: str
    """One line for ``status`` and the log (proxy credentials scrubbed)."""
    needs_person: bool = False
    """Retried slowly (``tls_rejected_retry``): it does not fix itself."""
    audit: dict[str, object] | None = None
    """Fields of the ``connection_failed`` audit record, if it is audited."""


def classify(exc: BaseException, route: Route, *, closed_after_handshake: int) -> Failure:
    """The one place that says what a failed attempt means. ``closed_after_handshake``: how
    many attempts in a row (this one included) the server closed right after the TLS handshake
    (with TLS 1.3 the client's handshake completes before the server checks the client
    certificate, and a server that refuses it may close without its alert reaching us: once
    could be a restart, twice is treated as a refusal)."""
    rejected = classify_tls_failure(exc)
    if rejected is None and closed_after_handshake >= 2:
        rejected = TLSRejected(
            "the control plane closed the connection right after the TLS handshake, twice in a "
            "row: it most likely refused our client certificate",
            by_peer=True,
        )
    if rejected is not None:
        side = "control_plane_refused_agent" if rejected.by_peer else "agent_refused_control_plane"
        detail = route.scrub(str(rejected))
        return Failure(
            reason="tls_rejected",
            detail=detail,
            needs_person=True,
            audit={"reason": "tls_rejected", "side": side, "detail": detail},
        )
    if isinstance(exc, RedirectRefused):
        location = route.scrub(exc.location or "")[:200] or None
        return Failure(
            reason="redirect_refused",
            detail=f"control plane answered HTTP {exc.status} with a redirect; redirects are "
            "never followed (check control_plane.url)",
            needs_person=True,
            audit={"reason": "redirect_refused", "status": exc.status, "location": location},
        )
    if isinstance(exc, InvalidProxyStatus):
        status = exc.response.status_code
        refused = status in (401, 403, 407)  # credentials or proxy policy: needs a person
        return Failure(
            reason="proxy_refused",
            detail=f"the proxy refused the connection: HTTP {status} ({route.describe()})",
            needs_person=refused,
            audit={"reason": "proxy_refused", "status": status, "route": route.describe()}
            if refused
            else None,
        )
    if isinstance(exc, InvalidStatus) and 400 <= exc.response.status_code < 500:
        status = exc.response.status_code
        return Failure(
            reason="http_refused",
            detail=f"control plane refused the connection: HTTP {status}",
            needs_person=True,
            audit={"reason": "http_refused", "status": status},  # e.g. 403: revoked
        )
    # A library's error text may quote the proxy URL, credentials and all (websockets'
    # InvalidProxy does): scrub it before it is kept or logged.
    return Failure(reason="network", detail=route.scrub(f"{type(exc).__name__}: {exc}"))


_NEEDS_PERSON_EVENTS: Final = {
    "tls_rejected": "tls_certificate_rejected",
    "proxy_refused": "proxy_refused",
    "redirect_refused": "connect_redirected",
    "http_refused": "connect_refused",
    "settings_unusable": "connection_settings_unusable",
}
"""The log event of each failure that needs a person (logged at error level)."""


def _closed_after_tls_handshake(exc: BaseException) -> bool:
    """The TLS handshake completed but the server closed before any HTTP response."""
    return isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, EOFError)


class Link:
    """The tunnel as the rest of the agent sees it: is a session up, on what, and how to send
    an informational frame on it."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.connection: ConnectionInfo | None = None
        self.current: Connection | None = None
        self.clock_offset = 0.0
        """The control plane's clock minus ours, measured at the last welcome (seconds)."""
        self.route = "direct"
        """How the last attempt went out (redacted): direct, direct to X, via proxy Y."""
        self.last_failure: Failure | None = None
        self.next_attempt_at: float | None = None
        """Wall-clock time of the next connection attempt while disconnected."""
        self.reconnects = 0
        self.consecutive_failures = 0
        self.failed = asyncio.Event()
        """Set when an attempt (or a session) fails; cleared when a session is ready."""
        self._retry = asyncio.Event()

    @property
    def last_error(self) -> str | None:
        return self.last_failure.detail if self.last_failure is not None else None

    def send(self, frame: Frame) -> None:
        """Send an informational frame (not from the outbox) on the current session."""
        current = self.current
        if current is None or not self.ready.is_set():
            raise ConnectionError("the tunnel is not connected")
        current.send(frame)

    def notify_outbox(self) -> None:
        """New outbox frames may be sendable."""
        if self.current is not None:
            self.current.wake.set()

    def retry_now(self) -> None:
        """Cut the wait before the next attempt short (files renewed, SIGHUP)."""
        self._retry.set()

    async def wait_retry(self, stop: asyncio.Event, delay: float) -> bool:
        """Wait ``delay`` seconds, or until stopped, or until :meth:`retry_now`; True if the
        wait was cut short by a retry."""
        self._retry.clear()
        waiting = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._retry.wait())]
        try:
            await asyncio.wait(waiting, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
        return self._retry.is_set() and not stop.is_set()


@dataclass(eq=False)
class Connection:
    """One WebSocket connection and its session."""

    websocket: ClientConnection
    session: AgentSession
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: CloseRequested | None = None

    def send(self, frame: Frame) -> None:
        self.session.send(frame)
        self.wake.set()

    def close(self, code: int, reason: str) -> None:
        """Ask the writer to close the connection (after what is queued)."""
        if self.closing is None:
            self.closing = CloseRequested(code, reason)
        self.wake.set()


class Tunnel:
    def __init__(
        self,
        *,
        link: Link,
        dialer: Dialer,
        control_plane: ControlPlaneConfig,
        settings: TunnelConfig,
        ssl_context: Callable[[], ssl.SSLContext],
        hello: Callable[[], Hello],
        outbox: Outbox,
        durable: Callable[[], int],
        handler: Handler,
        agent_id: str,
        clock: Clock,
        log: structlog.typing.FilteringBoundLogger,
        on_state: Callable[[str], object] = lambda _text: None,
        backoff: Backoff | None = None,
    ) -> None:
        self.link = link
        self._dialer = dialer
        self._cp = control_plane
        self._settings = settings
        self._ssl_context = ssl_context
        self._hello = hello
        self._outbox = outbox
        self._durable = durable
        self._handler = handler
        self._agent_id = agent_id
        self._clock = clock
        self._log = log
        self._on_state = on_state
        self._backoff = backoff or Backoff(settings.backoff)
        self._closed_after_handshake = 0
        self._ready_since: float | None = None
        self._stable_after = max(STABLE_AFTER, 2 * settings.heartbeat.interval)

    # -- attempts ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a connection up until ``stop`` is set. Only a journal failure ends it early
        (raised: nothing may happen unaudited); anything else is a failed attempt."""
        link = self.link
        while not stop.is_set():
            try:
                delay = await self._attempt(stop)
            except AuditError:
                raise
            except Exception as exc:
                failure = Failure(
                    reason="internal_error", detail=f"{type(exc).__name__} at {_raised_at(exc)}"
                )
                link.last_failure = failure
                link.failed.set()
                self._log.error("tunnel_attempt_failed", error=failure.detail)
                delay = self._backoff.next_delay()
            link.consecutive_failures = self._backoff.attempt
            if stop.is_set():
                break
            link.reconnects += 1
            link.next_attempt_at = self._clock.time() + delay
            self._log.info("reconnect_scheduled", delay_s=round(delay, 3))
            if await link.wait_retry(stop, delay):
                self._log.info("reconnect_now", reason="asked to retry")
            link.next_attempt_at = None

    async def _attempt(self, stop: asyncio.Event) -> float:
        """Connect once and serve the connection; return the delay before the next attempt."""
        link = self.link
        try:
            context = self._ssl_context()
            route = self._dialer.route()
        except ConfigError as exc:
            # Our own texts, which show proxy URLs redacted only (agent/io/proxy_url.py).
            link.route = "none (the connection settings are unusable)"
            return self._failed(
                Failure(reason="settings_unusable", detail=str(exc), needs_person=True)
            )
        link.route = route.describe()
        try:
            websocket = await self._dialer.tunnel(route, context, max_size=WEBSOCKET_MAX_SIZE)
        except Exception as exc:
            self._closed_after_handshake = (
                self._closed_after_handshake + 1 if _closed_after_tls_handshake(exc) else 0
            )
            return self._failed(
                classify(exc, route, closed_after_handshake=self._closed_after_handshake)
            )
        try:
            await self._serve(websocket, stop)
        finally:
            link.ready.clear()
            link.connection = None
            link.current = None
            self._handler.session_ended()  # streams it authorised end with it
        # Reset the backoff only for a connection that stayed up: one that a peer keeps
        # refusing right after the welcome must not turn into a reconnect storm.
        if self._ready_since is not None and (
            self._clock.monotonic() - self._ready_since >= self._stable_after
        ):
            self._backoff.reset()
        self._ready_since = None
        return self._backoff.next_delay()

    def _failed(self, failure: Failure) -> float:
        link = self.link
        link.last_failure = failure
        link.failed.set()
        if failure.needs_person:
            delay = self._backoff.tls_rejected_delay()
            fields = {key: value for key, value in (failure.audit or {}).items() if key != "reason"}
            fields.setdefault("detail", failure.detail)
            fields.setdefault("route", link.route)
            self._log.error(
                _NEEDS_PERSON_EVENTS.get(failure.reason, "connect_refused"),
                reason=failure.reason,
                url=self._cp.url,
                retry_in_s=round(delay, 1),
                **fields,
            )
            self._on_state(f"{failure.detail}; next attempt in {delay:.0f}s")
        else:
            delay = self._backoff.next_delay()
            self._log.warning(
                "connect_failed",
                url=self._cp.url,
                route=link.route,
                error=failure.detail,
                retry_in_s=round(delay, 3),
            )
        if failure.audit is not None:
            self._handler.record("connection_failed", url=self._cp.url, **failure.audit)
        return delay

    # -- one connection -----------------------------------------------------------------------

    async def _serve(self, websocket: ClientConnection, stop: asyncio.Event) -> None:
        link = self.link
        ssl_object = websocket.transport.get_extra_info("ssl_object")
        peer = PeerCertificate.from_ssl_object(ssl_object)
        cipher = ssl_object.cipher() if ssl_object is not None else None
        link.connection = ConnectionInfo(
            url=self._cp.url,
            peer_sha256=peer.sha256,
            peer_subject=peer.subject_cn,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            cipher=cipher[0] if cipher else None,
            since=self._clock.time(),
        )
        self._handler.record(
            "connection_up",
            url=self._cp.url,
            route=link.route,
            peer_cert_sha256=peer.sha256,
            peer_subject=peer.subject_cn,
            tls_version=link.connection.tls_version,
            cipher=link.connection.cipher,
        )
        self._log.info("connected", url=self._cp.url, peer_cert_sha256=peer.sha256)
        loop = asyncio.get_running_loop()
        conn = Connection(
            websocket,
            AgentSession(hello=self._hello(), heartbeat=self._settings.heartbeat, now=loop.time()),
        )
        link.current = conn
        conn.wake.set()  # hello
        rearm = asyncio.Event()
        tasks = [
            asyncio.create_task(self._read(conn, rearm)),
            asyncio.create_task(self._tick(conn, rearm)),
            asyncio.create_task(self._write(conn)),
            asyncio.create_task(_until(stop, "agent stopping")),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            reason = self._outcome(done)
            if stop.is_set() and websocket.state is State.OPEN:
                with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                    async with asyncio.timeout(5):
                        await websocket.close(CloseCode.GOING_AWAY, "agent stopping")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if websocket.state is not State.CLOSED:
                websocket.transport.abort()
        self._handler.record(
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

    async def _read(self, conn: Connection, rearm: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        async for message in conn.websocket:
            events = conn.session.receive(message, loop.time())
            rearm.set()  # the session's next deadline may have moved (e.g. READY after welcome)
            conn.wake.set()  # it may have queued a frame (a pong, an error)
            self._dispatch(conn, events)
        if conn.closing is not None:  # the writer closed it, as the session asked
            return conn.closing.reason
        ws = conn.websocket
        return f"closed by peer: {ws.close_code} {ws.close_reason}".strip()

    def _dispatch(self, conn: Connection, events: list[Event]) -> None:
        for event in events:
            match event:
                case Welcomed(welcome=welcome):
                    self._welcomed(conn, welcome.agent_id, welcome.server_time)
                case CommandDelivered(ref=ref, token=token):
                    self._handler.command(conn, ref, token)
                case KeySetOffered(token=token):
                    self._handler.keyset(conn, token)
                case CertificateIssued(frame=frame):
                    self._handler.certificate(frame)
                case Acked(seq=seq):
                    self._handler.ack(conn, seq)
                case FrameRefused(error=error, size=size):
                    self._handler.record(
                        "frame_rejected", reason=error.code, detail=error.detail, size=size
                    )
                    self._log.warning("frame_rejected", reason=error.code, detail=error.detail)
                case PeerReportedError(frame=frame):
                    self._log.warning("peer_error", code=frame.code, message=frame.message)
                case CloseRequested(code=code, reason=reason):
                    conn.close(code, reason)

    def _welcomed(self, conn: Connection, seen_id: str, server_time: float) -> None:
        link = self.link
        assert link.connection is not None  # noqa: S101  # set in _serve before reading
        link.connection.agent_id_seen = seen_id
        if seen_id != self._agent_id:
            self._log.error("identity_mismatch", ours=self._agent_id, control_plane_says=seen_id)
        skew = self._clock.time() - server_time
        link.clock_offset = -skew
        if abs(skew) > 30:
            self._log.warning("clock_skew_detected", skew_s=round(skew, 1))
        self._ready_since = self._clock.monotonic()
        self._closed_after_handshake = 0
        link.last_failure = None
        link.failed.clear()
        link.ready.set()
        self._log.info("session_ready", agent_id=seen_id)
        self._on_state(f"connected to {self._cp.url}")

    async def _tick(self, conn: Connection, rearm: asyncio.Event) -> str:
        """Call ``session.tick`` at each deadline it gives, recomputing the deadline whenever
        the reader says the session changed (a frame arrived), not only when it expires."""
        loop = asyncio.get_running_loop()
        while True:
            rearm.clear()
            delay = max(0.0, conn.session.next_deadline() - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see _send
                    await rearm.wait()
            events = conn.session.tick(loop.time())
            conn.wake.set()
            self._dispatch(conn, events)

    async def _write(self, conn: Connection) -> str:
        """The one way out: the session's frames, then the outbox's durable frames in order;
        closes the connection when asked to."""
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            for text in conn.session.data_to_send():
                await self._send(conn.websocket, text)
            if self.link.ready.is_set():
                entries = self._outbox.sendable(
                    after=conn.session.last_sent, durable=self._durable()
                )
                for entry in entries:
                    conn.session.sent(entry.seq)  # before the write completes: its ack may win
                    text, problem = encode_entry(entry)
                    if problem is not None:
                        self._log.error("outbox_frame_replaced", seq=entry.seq, problem=problem)
                    await self._send(conn.websocket, text)
            if conn.closing is not None:
                return await _closed(conn)

    async def _send(self, websocket: ClientConnection, text: str) -> None:
        # A peer that stops reading must not stall us forever: time out and reconnect.
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the send completes, leaving the connection task hung for good.
        async with asyncio.timeout(self._settings.send_timeout):
            await websocket.send(text)


async def _closed(conn: Connection) -> str:
    """Close as the session asked; return why."""
    close = conn.closing
    assert close is not None  # noqa: S101  # only called once asked
    if close.code == CloseCode.HEARTBEAT_TIMEOUT:
        conn.websocket.transport.abort()  # the peer is gone; do not wait for a closing handshake
    else:
        with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
            async with asyncio.timeout(5):
                await conn.websocket.close(close.code, close.reason[:120])
    return close.reason


def _raised_at(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of an exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno}"


async def _until(event: asyncio.Event, outcome: str) -> str:
    await event.wait()
    return outcome
