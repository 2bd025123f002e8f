"""The agent side of the protocol: one connection's state (:class:`AgentSession`) and the
outbox that outlives connections (:class:`Outbox`). Sans-I/O.

The asyncio tunnel feeds a session what arrives (:meth:`AgentSession.receive`) and the time
(:meth:`AgentSession.tick`), sends what :meth:`AgentSession.data_to_send` returns, and acts on the
events it gets back. The session never blocks, never reads a clock and never touches a socket.
It owns the connection's budgets: which refusal spends which one is decided here only
(:meth:`AgentSession.delivery_outcome`, :meth:`AgentSession.keyset_outcome`), and which ack is
acceptable (:meth:`AgentSession.acknowledge`).

The outbox numbers the frames that must arrive (``status``, ``delivery_rejected``, ``anchor``:
docs/PROTOCOL.md §6.3), keeps them until acknowledged and says which may go out: one that the
durable store has not got yet never does, so the control plane cannot hear of a state the agent
could lose.

Phases (docs/PROTOCOL.md §4)::

    AWAITING_WELCOME --welcome--> READY --(close)--> CLOSED
          |  any other frame, bad protocol version, or handshake timeout: CLOSED

Heartbeats: once READY, the session queues a ``ping`` every ``interval`` seconds and answers
every ``ping`` with a ``pong``. Any frame received counts as a sign of life; when nothing has
arrived for ``timeout`` seconds the session asks to close (the peer vanished without a FIN, or a
middlebox dropped the flow).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from agent.core.errors import ProtocolError
from agent.core.frames import (
    FINAL_STATES,
    MAX_FRAME_TO_AGENT,
    MAX_FRAME_TO_CONTROL_PLANE,
    PROTOCOL_VERSION,
    TO_AGENT,
    Ack,
    Anchor,
    CertificateFrame,
    CommandFrame,
    DeliveryRejected,
    ErrorFrame,
    Frame,
    Hello,
    KeySetFrame,
    Ping,
    Pong,
    Status,
    Welcome,
    decode,
    encode,
)
from agent.core.limits import ErrorBudget

BENIGN_REFUSALS: Final = frozenset({"shutting_down", "busy", "rate_limited", "duplicate_delivery"})
"""Delivery refusals that are no fault of the peer's (docs/PROTOCOL.md §3): they spend the
deferral budget, not the error budget."""
MAX_OUTBOX: Final = 10_000
"""Unacknowledged frames beyond which refusals are audited but not queued (a peer that never
acknowledges cannot make the outbox grow without bound)."""


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


@dataclass(frozen=True)
class AckRefused:
    """An ``ack`` for a frame not sent on this connection (ignored, and counted as an error)."""

    seq: int
    last_sent: int


Event = (
    Welcomed
    | CommandDelivered
    | KeySetOffered
    | CertificateIssued
    | Acked
    | PeerReportedError
    | FrameRefused
    | CloseRequested
    | AckRefused
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
        self.last_sent = 0
        """The highest outbox ``seq`` sent on this connection."""

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

    def delivery_outcome(self, refusal: str | None, now: float) -> list[Event]:
        """A delivery on this connection was accepted (``None``) or refused for ``refusal``:
        a refusal spends the error budget, or the deferral budget when it is no fault of the
        peer's (:data:`BENIGN_REFUSALS`)."""
        if refusal is None:
            return []
        if refusal in BENIGN_REFUSALS:
            return self._spend_deferral(now)
        return self._spend_error(now)

    def keyset_outcome(self, accepted: bool, reason: str | None, now: float) -> list[Event]:
        """A key set offered on this connection was answered: a re-offer of the set in force
        (``already_current``) spends the deferral budget, any other refusal the error budget."""
        if accepted:
            return []
        if reason == "already_current":
            return self._spend_deferral(now)
        return self._spend_error(now)

    def sent(self, seq: int) -> None:
        """The outbox frame ``seq`` went out on this connection (counted before the write
        completes: its ack may arrive first)."""
        self.last_sent = max(self.last_sent, seq)

    def acknowledge(
        self, seq: int, outbox: Outbox, now: float
    ) -> tuple[OutboxEntry | None, list[Event]]:
        """Apply an ``ack``: the entry it removed from the outbox (None if it was gone already,
        a repeated ack). An ack for a frame not sent on this connection is ignored (an early ack
        must not lose a frame) and spends the error budget."""
        if seq > self.last_sent:
            return None, [AckRefused(seq, self.last_sent), *self._spend_error(now)]
        return outbox.remove(seq), []

    def _spend_deferral(self, now: float) -> list[Event]:
        """Refusals that are no fault of the peer's were audited too, so they have a budget of
        their own, larger than the error budget: a peer over it is closed with the same code
        (4005)."""
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


# -- the outbox ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OutboxEntry:
    """One frame that must reach the control plane."""

    seq: int
    kind: str
    """``status``, ``delivery_rejected`` or ``anchor``."""
    body: Mapping[str, Any]
    """The frame's members except ``type`` and ``seq``."""
    jti: str | None = None
    state: str | None = None
    commit: int = 0
    """The store commit that holds it: it may go out once that commit is durable."""

    def frame(self) -> Status | DeliveryRejected | Anchor:
        if self.kind == Status.type:
            return Status(seq=self.seq, **self.body)
        if self.kind == Anchor.type:
            return Anchor(seq=self.seq, **self.body)
        return DeliveryRejected(seq=self.seq, **self.body)

    @property
    def reports_final(self) -> bool:
        return self.kind == Status.type and self.state in FINAL_STATES


class Outbox:
    """Unacknowledged frames, by ``seq``: strictly increasing over the agent's life (the next
    number is stored with every entry), sent in order, again on every connection."""

    def __init__(self, entries: Iterable[OutboxEntry] = (), *, next_seq: int = 1) -> None:
        self._entries: dict[int, OutboxEntry] = {}
        """In ``seq`` order (loaded sorted, numbered as added), which :meth:`sendable` uses."""
        self._anchor: int | None = None
        """The ``seq`` of the anchor not acknowledged yet, if any."""
        for entry in sorted(entries, key=lambda e: e.seq):
            self._keep(entry)
        self.next_seq = max([next_seq, *(seq + 1 for seq in self._entries)])

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, kind: str, body: Mapping[str, Any], *, commit: int, jti: str | None = None,
        state: str | None = None,
    ) -> OutboxEntry | None:  # fmt: skip
        """Number and keep a frame. A refusal is not kept once the outbox holds
        :data:`MAX_OUTBOX` frames (the caller audited it; a peer that never acknowledges cannot
        make this grow): None then."""
        if kind == DeliveryRejected.type and len(self._entries) >= MAX_OUTBOX:
            return None
        entry = OutboxEntry(
            seq=self.next_seq, kind=kind, body=body, jti=jti, state=state, commit=commit
        )
        self._keep(entry)
        self.next_seq += 1
        return entry

    def _keep(self, entry: OutboxEntry) -> None:
        self._entries[entry.seq] = entry
        if entry.kind == Anchor.type:
            self._anchor = entry.seq

    def waiting_anchor(self) -> OutboxEntry | None:
        """An anchor not acknowledged yet (a new one replaces it: only the newest matters)."""
        return None if self._anchor is None else self._entries.get(self._anchor)

    def remove(self, seq: int) -> OutboxEntry | None:
        """Forget an entry (acknowledged, or replaced); None if it was not kept."""
        if seq == self._anchor:
            self._anchor = None
        return self._entries.pop(seq, None)

    def sendable(self, *, after: int, durable: int) -> list[OutboxEntry]:
        """Entries numbered above ``after`` whose commit is durable, in order; it stops at the
        first one that is not durable yet (frames go out in ``seq`` order)."""
        newer = itertools.takewhile(lambda e: e.seq > after, reversed(self._entries.values()))
        out = []
        for entry in reversed(list(newer)):  # the newest ones only, without sorting them all
            if entry.commit > durable:
                break
            out.append(entry)
        return out

    def unsent_results(self) -> int:
        """Entries that report on deliveries and commands (anchors are best effort, and a
        control plane that ignores them must not hold up a stop)."""
        return sum(1 for e in self._entries.values() if e.kind != Anchor.type)


def encode_entry(entry: OutboxEntry) -> tuple[str, str | None]:
    """The text of an outbox frame, and the problem, if it could not be sent as it is: a frame
    that is not strict JSON or over the limit is replaced by one that says so, so that it
    cannot block the outbox."""
    try:
        text = encode(entry.frame())
        if len(text.encode("utf-8")) <= MAX_FRAME_TO_CONTROL_PLANE:
            return text, None
        problem = "over the frame size limit"
    except (ValueError, TypeError) as exc:
        problem = f"not valid JSON: {exc}"
    frame = entry.frame()
    if isinstance(frame, Status):
        frame = dataclasses.replace(
            frame, result={"truncated": True}, detail=f"result could not be sent: {problem}"
        )
    elif isinstance(frame, DeliveryRejected):
        frame = dataclasses.replace(frame, detail=frame.detail[:200], jti=None)
    return encode(frame), problem
