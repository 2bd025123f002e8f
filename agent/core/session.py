"""One connection's protocol state, on the agent side. Sans-I/O.

The asyncio tunnel feeds it what arrives (:meth:`AgentSession.receive`) and the time
(:meth:`AgentSession.tick`), sends what :meth:`AgentSession.data_to_send` returns, and acts on the
events it gets back. The session never blocks, never reads a clock and never touches a socket.

Phases (docs/PROTOCOL.md §4)::

    AWAITING_WELCOME --welcome--> READY --(close)--> CLOSED
          |  any other frame, bad protocol version, or handshake timeout: CLOSED

Heartbeats: once READY, the session queues a ``ping`` every ``interval`` seconds and answers
every ``ping`` with a ``pong``. Any frame received counts as a sign of life; when nothing has
arrived for ``timeout`` seconds the session asks to close (the peer vanished without a FIN, or a
middlebox dropped the flow).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from agent.core.errors import ProtocolError
from agent.core.frames import (
    MAX_FRAME_TO_AGENT,
    PROTOCOL_VERSION,
    TO_AGENT,
    Ack,
    CertificateFrame,
    CommandFrame,
    ErrorFrame,
    Frame,
    Hello,
    KeySetFrame,
    Ping,
    Pong,
    Welcome,
    decode,
    encode,
)
from agent.core.limits import ErrorBudget


class CloseCode:
    """WebSocket close codes used by the protocol (docs/PROTOCOL.md §4.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 4000
    SUPERSEDED = 4001
    UNSUPPORTED_PROTOCOL = 4002
    HANDSHAKE_TIMEOUT = 4003
    HEARTBEAT_TIMEOUT = 4004
    TOO_MANY_ERRORS = 4005
    CERTIFICATE_REVOKED = 4006


@dataclass(frozen=True, kw_only=True)
class HeartbeatSettings:
    interval: float = 15.0
    timeout: float = 45.0
    handshake_timeout: float = 10.0
    max_peer_errors: int = 100
    """Refused frames and deliveries one connection may cause per ``peer_error_window``."""
    peer_error_window: float = 60.0
    max_peer_deferrals: int = 1000
    """Deliveries refused as no fault of the peer's (a redelivery, ``rate_limited``, ``busy``,
    ``shutting_down``) and re-offers of the key set in force one connection may cause per
    ``peer_error_window``: each writes audit records, so they are bounded too, more loosely."""

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.timeout:
            raise ValueError("heartbeat: need 0 < interval < timeout")
        if self.handshake_timeout <= 0:
            raise ValueError("heartbeat: handshake_timeout must be positive")
        if self.max_peer_errors < 1 or self.max_peer_deferrals < 1:
            raise ValueError("need max_peer_errors >= 1 and max_peer_deferrals >= 1")
        if self.peer_error_window <= 0:
            raise ValueError("need peer_error_window > 0")


class Phase(Enum):
    AWAITING_WELCOME = "awaiting_welcome"
    READY = "ready"
    CLOSED = "closed"


# Events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Welcomed:
    welcome: Welcome


@dataclass(frozen=True)
class CommandDelivered:
    ref: str
    token: str


@dataclass(frozen=True)
class KeySetOffered:
    token: str


@dataclass(frozen=True)
class CertificateIssued:
    frame: CertificateFrame


@dataclass(frozen=True)
class Acked:
    seq: int


@dataclass(frozen=True)
class PeerReportedError:
    frame: ErrorFrame


@dataclass(frozen=True)
class FrameRefused:
    """A frame broke the protocol; an ``error`` frame for the peer is queued."""

    error: ProtocolError
    size: int


@dataclass(frozen=True)
class CloseRequested:
    code: int
    reason: str


Event = (
    Welcomed
    | CommandDelivered
    | KeySetOffered
    | CertificateIssued
    | Acked
    | PeerReportedError
    | FrameRefused
    | CloseRequested
)


class HeartbeatTimer:
    """When to ping and when to give up on a silent peer. Shared by both ends of the tunnel."""

    def __init__(self, *, interval: float, timeout: float, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.last_received = now
        self.last_ping = now
        self._next_id = 0

    def received(self, now: float) -> None:
        self.last_received = now

    def expired(self, now: float) -> bool:
        return now - self.last_received >= self.timeout

    def ping_due(self, now: float) -> Ping | None:
        if now - self.last_ping < self.interval:
            return None
        self.last_ping = now
        self._next_id += 1
        return Ping(id=self._next_id)

    def next_deadline(self) -> float:
        return min(self.last_ping + self.interval, self.last_received + self.timeout)


class AgentSession:
    def __init__(
        self,
        *,
        hello: Hello,
        heartbeat: HeartbeatSettings,
        now: float,
        max_frame_bytes: int = MAX_FRAME_TO_AGENT,
    ) -> None:
        self.phase = Phase.AWAITING_WELCOME
        self.welcome: Welcome | None = None
        self._settings = heartbeat
        self._max_frame_bytes = max_frame_bytes
        self._started = now
        self._now = now
        self._timer = HeartbeatTimer(
            interval=heartbeat.interval, timeout=heartbeat.timeout, now=now
        )
        self._errors = ErrorBudget(
            limit=heartbeat.max_peer_errors, window=heartbeat.peer_error_window
        )
        self._deferrals = ErrorBudget(
            limit=heartbeat.max_peer_deferrals, window=heartbeat.peer_error_window
        )
        self._outgoing: deque[str] = deque([encode(hello)])

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> list[str]:
        frames = list(self._outgoing)
        self._outgoing.clear()
        return frames

    def _queue(self, frame: Frame) -> None:
        self._outgoing.append(encode(frame))

    # -- input ----------------------------------------------------------------------------

    def receive(self, data: str | bytes, now: float) -> list[Event]:
        if self.phase is Phase.CLOSED:
            return []
        self._timer.received(now)
        try:
            frame = decode(data, accept=TO_AGENT, max_bytes=self._max_frame_bytes)
        except ProtocolError as exc:
            if self.phase is Phase.AWAITING_WELCOME:
                return self._close(CloseCode.PROTOCOL_ERROR, f"bad handshake: {exc.detail}")
            self._queue(ErrorFrame(code=exc.code, message=exc.detail, ref=exc.ref))
            return [FrameRefused(exc, _size(data)), *self._spend_error(now)]
        if self.phase is Phase.AWAITING_WELCOME:
            return self._handshake(frame)
        self._now = now
        return self._dispatch(frame, data)

    def _handshake(self, frame: Frame) -> list[Event]:
        if isinstance(frame, ErrorFrame):
            return [
                PeerReportedError(frame),
                *self._close(CloseCode.PROTOCOL_ERROR, f"refused: {frame.code}"),
            ]
        if not isinstance(frame, Welcome):
            return self._close(CloseCode.PROTOCOL_ERROR, f"expected welcome, got {frame.type}")
        if frame.protocol != PROTOCOL_VERSION:
            return self._close(
                CloseCode.UNSUPPORTED_PROTOCOL, f"control plane speaks protocol {frame.protocol}"
            )
        self.phase = Phase.READY
        self.welcome = frame
        # Never expect pings more often than the control plane said it sends them.
        self._timer.timeout = max(self._settings.timeout, 3 * frame.heartbeat_interval)
        return [Welcomed(frame)]

    def _dispatch(self, frame: Frame, data: str | bytes) -> list[Event]:
        match frame:
            case CommandFrame(ref=ref, token=token):
                return [CommandDelivered(ref, token)]
            case KeySetFrame(token=token):
                return [KeySetOffered(token)]
            case CertificateFrame():
                return [CertificateIssued(frame)]
            case Ack(seq=seq):
                return [Acked(seq)]
            case Ping(id=ping_id):
                self._queue(Pong(id=ping_id))
                return []
            case Pong():
                return []
            case ErrorFrame():
                return [PeerReportedError(frame)]
            case _:
                error = ProtocolError(f"unexpected {frame.type} frame", code="unexpected_frame")
                self._queue(ErrorFrame(code=error.code, message=error.detail))
                return [FrameRefused(error, _size(data)), *self._spend_error(self._now)]

    def send(self, frame: Frame) -> None:
        """Queue a frame of the agent's own (e.g. a ``keyset_status``) for the peer."""
        self._queue(frame)

    def delivery_refused(self, now: float) -> list[Event]:
        """The agent refused a delivered command: that spends the peer's error budget too."""
        return self._spend_error(now)

    def delivery_deferred(self, now: float) -> list[Event]:
        """The agent refused a delivery, or a key set, for a reason that is no fault of the
        peer's (a redelivery, ``rate_limited``, ``busy``, ``already_current``...). Each was
        audited, so they have a budget of their own, larger than the error budget: a peer over
        it is closed with the same code (4005)."""
        if self.phase is Phase.CLOSED or not self._deferrals.spend(now):
            return []
        return self._close(
            CloseCode.TOO_MANY_ERRORS,
            f"more than {self._deferrals.limit} deferred deliveries or re-offered key sets "
            f"in {self._settings.peer_error_window:.0f}s",
        )

    def _spend_error(self, now: float) -> list[Event]:
        if self.phase is Phase.CLOSED or not self._errors.spend(now):
            return []
        return self._close(
            CloseCode.TOO_MANY_ERRORS,
            f"more than {self._errors.limit} refused frames or deliveries in "
            f"{self._settings.peer_error_window:.0f}s",
        )

    # -- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Event]:
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.AWAITING_WELCOME:
            if now - self._started >= self._settings.handshake_timeout:
                return self._close(CloseCode.HANDSHAKE_TIMEOUT, "no welcome from control plane")
            return []
        if self._timer.expired(now):
            return self._close(
                CloseCode.HEARTBEAT_TIMEOUT,
                f"nothing received for {now - self._timer.last_received:.1f}s",
            )
        ping = self._timer.ping_due(now)
        if ping is not None:
            self._queue(ping)
        return []

    def next_deadline(self) -> float:
        """The time at which :meth:`tick` must next be called."""
        if self.phase is Phase.AWAITING_WELCOME:
            return self._started + self._settings.handshake_timeout
        return self._timer.next_deadline()

    def _close(self, code: int, reason: str) -> list[Event]:
        self.phase = Phase.CLOSED
        return [CloseRequested(code, reason)]


def _size(data: str | bytes) -> int:
    """Size in bytes on the wire (UTF-8 for text), as the frame limits count it."""
    return len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
