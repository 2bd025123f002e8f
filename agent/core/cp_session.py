"""One connection's protocol state, on the control plane's side. Sans-I/O.

The stub control plane (control_plane_stub/hub.py) feeds it what arrives and the time, sends
what :meth:`ControlPlaneSession.data_to_send` returns and acts on the events: the same frames,
limits, heartbeat timer and close codes as the agent's session (agent/core/session.py), the
other side of docs/PROTOCOL.md §4.

Phases::

    AWAITING_HELLO --hello--> READY --(close)--> CLOSED
          |  another frame first, a bad hello, an unsupported protocol, no hello in time: CLOSED

The identity is never read from a frame: the caller gives the session the agent id it took
from the client certificate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from agent.core.errors import ProtocolError
from agent.core.frames import (
    MAX_FRAME_TO_CONTROL_PLANE,
    PROTOCOL_VERSION,
    TO_CONTROL_PLANE,
    Ack,
    Anchor,
    CommandFrame,
    DeliveryRejected,
    ErrorFrame,
    Frame,
    Hello,
    KeySetStatus,
    Ping,
    Pong,
    RenewRequest,
    Status,
    Welcome,
    decode,
    encode,
)
from agent.core.session import CloseCode, CloseRequested, HeartbeatSettings, HeartbeatTimer


class CpPhase(Enum):
    AWAITING_HELLO = "awaiting_hello"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True)
class Greeted:
    """A valid ``hello`` arrived and ``welcome`` is queued: the session is READY."""

    hello: Hello


@dataclass(frozen=True)
class Reported:
    """An outbox frame of the agent's (status, delivery_rejected, anchor): store it durably,
    then :meth:`ControlPlaneSession.ack` it."""

    frame: Status | DeliveryRejected | Anchor


@dataclass(frozen=True)
class RenewalAsked:
    csr: str


@dataclass(frozen=True)
class KeySetAnswered:
    frame: KeySetStatus


@dataclass(frozen=True)
class AgentError:
    frame: ErrorFrame


@dataclass(frozen=True)
class Refused:
    """A frame broke the protocol; an ``error`` frame is queued, the connection stays."""

    error: ProtocolError


CpEvent = Greeted | Reported | RenewalAsked | KeySetAnswered | AgentError | Refused | CloseRequested


class ControlPlaneSession:
    def __init__(
        self,
        *,
        agent_id: str,
        heartbeat: HeartbeatSettings,
        now: float,
        max_frame_bytes: int = MAX_FRAME_TO_CONTROL_PLANE,
    ) -> None:
        self.agent_id = agent_id
        self.phase = CpPhase.AWAITING_HELLO
        self.hello: Hello | None = None
        self._settings = heartbeat
        self._max = max_frame_bytes
        self._started = now
        self.timer = HeartbeatTimer(interval=heartbeat.interval, timeout=heartbeat.timeout, now=now)
        self._outgoing: deque[str] = deque()

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> list[str]:
        frames = list(self._outgoing)
        self._outgoing.clear()
        return frames

    def send(self, frame: Frame) -> None:
        """Queue a frame of the control plane's own (keyset, certificate, error)."""
        self._outgoing.append(encode(frame))

    def deliver(self, ref: str, token: str) -> None:
        self.send(CommandFrame(ref=ref, token=token))

    def ack(self, seq: int) -> None:
        """Only once the reported frame is stored durably (docs/PROTOCOL.md §6.3)."""
        self.send(Ack(seq=seq))

    # -- input ----------------------------------------------------------------------------

    def receive(self, data: str | bytes, now: float, *, server_time: float) -> list[CpEvent]:
        """``server_time``: the control plane's wall clock, for ``welcome``."""
        if self.phase is CpPhase.CLOSED:
            return []
        self.timer.received(now)
        try:
            frame = decode(data, accept=TO_CONTROL_PLANE, max_bytes=self._max)
        except ProtocolError as exc:
            self.send(ErrorFrame(code=exc.code, message=exc.detail, ref=exc.ref))
            if self.phase is CpPhase.AWAITING_HELLO:
                return self._close(CloseCode.PROTOCOL_ERROR, "bad hello")
            return [Refused(exc)]
        if self.phase is CpPhase.AWAITING_HELLO:
            return self._greet(frame, server_time)
        return self._dispatch(frame)

    def _greet(self, frame: Frame, server_time: float) -> list[CpEvent]:
        if not isinstance(frame, Hello):
            return self._close(CloseCode.PROTOCOL_ERROR, f"expected hello, got {frame.type}")
        if frame.protocol != PROTOCOL_VERSION:
            self.send(
                ErrorFrame(
                    code="unsupported_protocol",
                    message=f"this control plane speaks protocol {PROTOCOL_VERSION}",
                )
            )
            return self._close(CloseCode.UNSUPPORTED_PROTOCOL, "unsupported protocol")
        self.phase = CpPhase.READY
        self.hello = frame
        # Never give up on an agent sooner than three of its own ping intervals.
        self.timer.timeout = max(self._settings.timeout, 3 * (frame.heartbeat_interval or 0.0))
        self.send(
            Welcome(
                protocol=PROTOCOL_VERSION,
                agent_id=self.agent_id,
                server_time=server_time,
                heartbeat_interval=self._settings.interval,
            )
        )
        return [Greeted(frame)]

    def _dispatch(self, frame: Frame) -> list[CpEvent]:
        match frame:
            case Status() | DeliveryRejected() | Anchor():
                return [Reported(frame)]
            case RenewRequest(csr=csr):
                return [RenewalAsked(csr)]
            case KeySetStatus():
                return [KeySetAnswered(frame)]
            case Ping(id=ping_id):
                self.send(Pong(id=ping_id))
                return []
            case Pong():
                return []
            case ErrorFrame():
                return [AgentError(frame)]
            case _:
                error = ProtocolError(f"unexpected {frame.type} frame", code="unexpected_frame")
                self.send(ErrorFrame(code=error.code, message=error.detail))
                return [Refused(error)]

    # -- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> list[CpEvent]:
        if self.phase is CpPhase.CLOSED:
            return []
        if self.phase is CpPhase.AWAITING_HELLO:
            if now - self._started >= self._settings.handshake_timeout:
                return self._close(CloseCode.HANDSHAKE_TIMEOUT, "no hello")
            return []
        if self.timer.expired(now):
            return self._close(
                CloseCode.HEARTBEAT_TIMEOUT,
                f"heartbeat timeout: nothing for {now - self.timer.last_received:.1f}s",
            )
        ping = self.timer.ping_due(now)
        if ping is not None:
            self.send(ping)
        return []

    def next_deadline(self) -> float:
        if self.phase is CpPhase.AWAITING_HELLO:
            return self._started + self._settings.handshake_timeout
        return self.timer.next_deadline()

    def _close(self, code: int, reason: str) -> list[CpEvent]:
        self.phase = CpPhase.CLOSED
        return [CloseRequested(code, reason)]
