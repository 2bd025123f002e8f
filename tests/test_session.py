"""Agent-side protocol state machine (agent.core.session), driven with explicit times."""

from __future__ import annotations

import json

import pytest

from agent.core.errors import ProtocolError
from agent.core.frames import (
    MAX_FRAME_TO_AGENT,
    PROTOCOL_VERSION,
    TO_CONTROL_PLANE,
    Ack,
    CommandFrame,
    ErrorFrame,
    Hello,
    Ping,
    Pong,
    Welcome,
    decode,
    encode,
)
from agent.core.session import (
    Acked,
    AgentSession,
    CloseCode,
    CloseRequested,
    CommandDelivered,
    FrameRefused,
    HeartbeatSettings,
    HeartbeatTimer,
    PeerReportedError,
    Phase,
    Welcomed,
)

T0 = 1000.0
HELLO = Hello(protocol=PROTOCOL_VERSION, agent_version="0.1.0", capabilities={"x": 1})
SETTINGS = HeartbeatSettings(interval=10.0, timeout=30.0, handshake_timeout=5.0)


def welcome(*, protocol: int = PROTOCOL_VERSION, heartbeat_interval: float = 5.0) -> Welcome:
    return Welcome(
        protocol=protocol,
        agent_id="agent-1",
        server_time=T0,
        heartbeat_interval=heartbeat_interval,
    )


def new_session(settings: HeartbeatSettings = SETTINGS) -> AgentSession:
    return AgentSession(hello=HELLO, heartbeat=settings, now=T0)


def ready_session(
    settings: HeartbeatSettings = SETTINGS, *, heartbeat_interval: float = 5.0, at: float = T0 + 1
) -> AgentSession:
    session = new_session(settings)
    session.data_to_send()
    events = session.receive(encode(welcome(heartbeat_interval=heartbeat_interval)), at)
    assert len(events) == 1
    assert isinstance(events[0], Welcomed)
    assert phase(session) is Phase.READY
    return session


def phase(session: AgentSession) -> Phase:
    """The session's phase, read through a call so that type checkers do not narrow it."""
    return session.phase


def sent(session: AgentSession) -> list[dict[str, object]]:
    frames = session.data_to_send()
    for frame in frames:  # everything the agent sends must be valid towards the control plane
        decode(frame, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_AGENT)
    return [json.loads(frame) for frame in frames]


# -- handshake ------------------------------------------------------------------------------------


def test_hello_queued_first() -> None:
    session = new_session()
    assert phase(session) is Phase.AWAITING_WELCOME
    frames = session.data_to_send()
    assert frames == [encode(HELLO)]
    assert decode(frames[0], accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_AGENT) == HELLO
    assert session.data_to_send() == []


def test_welcome_makes_session_ready() -> None:
    session = new_session()
    frame = welcome()
    events = session.receive(encode(frame), T0 + 1)
    assert events == [Welcomed(frame)]
    assert phase(session) is Phase.READY
    assert session.welcome == frame
    assert sent(session) == [json.loads(encode(HELLO))]


@pytest.mark.parametrize(
    "frame",
    [Ping(id=1), Pong(id=1), Ack(seq=1), CommandFrame(ref="d-1", token="a.b.c")],
    ids=lambda f: f.type,
)
def test_non_welcome_first_frame(frame: Ping | Pong | Ack | CommandFrame) -> None:
    session = new_session()
    events = session.receive(encode(frame), T0 + 1)
    assert len(events) == 1
    assert isinstance(events[0], CloseRequested)
    assert events[0].code == CloseCode.PROTOCOL_ERROR == 4000
    assert f"expected welcome, got {frame.type}" in events[0].reason
    assert phase(session) is Phase.CLOSED


def test_error_first_frame() -> None:
    session = new_session()
    error = ErrorFrame(code="unknown_agent", message="who are you")
    events = session.receive(encode(error), T0 + 1)
    assert events == [
        PeerReportedError(error),
        CloseRequested(CloseCode.PROTOCOL_ERROR, "refused: unknown_agent"),
    ]
    assert phase(session) is Phase.CLOSED


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        '{"type":"welcome"}',
        '{"type":"hello","protocol":1,"agent_version":"x"}',
        b'{"type":"welcome"}',
        "x" * (MAX_FRAME_TO_AGENT + 1),
    ],
    ids=["garbage", "incomplete-welcome", "wrong-direction", "binary", "oversize"],
)
def test_malformed_first_frame(data: str | bytes) -> None:
    session = new_session()
    events = session.receive(data, T0 + 1)
    assert len(events) == 1
    assert isinstance(events[0], CloseRequested)
    assert events[0].code == CloseCode.PROTOCOL_ERROR
    assert events[0].reason.startswith("bad handshake: ")
    assert phase(session) is Phase.CLOSED
    assert session.data_to_send() == [encode(HELLO)]


@pytest.mark.parametrize("protocol", [0, 2, 99])
def test_wrong_protocol_version(protocol: int) -> None:
    session = new_session()
    events = session.receive(encode(welcome(protocol=protocol)), T0 + 1)
    assert events == [
        CloseRequested(CloseCode.UNSUPPORTED_PROTOCOL, f"control plane speaks protocol {protocol}")
    ]
    assert CloseCode.UNSUPPORTED_PROTOCOL == 4002
    assert phase(session) is Phase.CLOSED
    assert session.welcome is None


def test_handshake_timeout() -> None:
    session = new_session()
    assert session.next_deadline() == T0 + 5.0
    assert session.tick(T0 + 4.999) == []
    assert phase(session) is Phase.AWAITING_WELCOME
    events = session.tick(T0 + 5.0)
    assert events == [CloseRequested(CloseCode.HANDSHAKE_TIMEOUT, "no welcome from control plane")]
    assert CloseCode.HANDSHAKE_TIMEOUT == 4003
    assert phase(session) is Phase.CLOSED


def test_no_pings_before_welcome() -> None:
    session = new_session(HeartbeatSettings(interval=1.0, timeout=30.0, handshake_timeout=5.0))
    session.data_to_send()
    assert session.tick(T0 + 4) == []
    assert session.data_to_send() == []


# -- ready ----------------------------------------------------------------------------------------


def test_ping_answered_with_pong_of_same_id() -> None:
    session = ready_session()
    assert session.receive(encode(Ping(id=42)), T0 + 2) == []
    assert sent(session) == [{"type": "pong", "id": 42}]
    assert session.receive(encode(Ping(id=0)), T0 + 3) == []
    assert session.receive(encode(Ping(id=7)), T0 + 3) == []
    assert sent(session) == [{"type": "pong", "id": 0}, {"type": "pong", "id": 7}]


def test_command_delivered() -> None:
    session = ready_session()
    events = session.receive(encode(CommandFrame(ref="d-7", token="h.p.s")), T0 + 2)
    assert events == [CommandDelivered("d-7", "h.p.s")]
    assert session.data_to_send() == []


def test_ack() -> None:
    session = ready_session()
    assert session.receive(encode(Ack(seq=12)), T0 + 2) == [Acked(12)]


def test_pong_is_silent() -> None:
    session = ready_session()
    assert session.receive(encode(Pong(id=1)), T0 + 2) == []
    assert session.data_to_send() == []


def test_error_frame_reported() -> None:
    session = ready_session()
    error = ErrorFrame(code="frame_too_large", message="too big", ref="d-1")
    assert session.receive(encode(error), T0 + 2) == [PeerReportedError(error)]
    assert phase(session) is Phase.READY


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("not json", "malformed_frame"),
        ('{"type":"ping","id":"x"}', "malformed_frame"),
        ('{"type":"status","seq":1}', "unknown_frame_type"),
        ('{"type":"teleport"}', "unknown_frame_type"),
        (b"\x00\x01", "unsupported_frame"),
        ('{"type":"ping","id":1,"pad":"' + "x" * MAX_FRAME_TO_AGENT + '"}', "frame_too_large"),
    ],
)
def test_malformed_frame_refused_connection_stays(data: str | bytes, code: str) -> None:
    session = ready_session()
    events = session.receive(data, T0 + 2)
    assert len(events) == 1
    refused = events[0]
    assert isinstance(refused, FrameRefused)
    assert isinstance(refused.error, ProtocolError)
    assert refused.error.code == code
    assert refused.size == len(data)
    assert phase(session) is Phase.READY
    queued = sent(session)
    assert len(queued) == 1
    assert queued[0]["type"] == "error"
    assert queued[0]["code"] == code
    assert queued[0]["message"] == refused.error.detail
    # The connection still works.
    assert session.receive(encode(Ack(seq=1)), T0 + 3) == [Acked(1)]


def test_second_welcome_is_unexpected() -> None:
    session = ready_session()
    first = session.welcome
    text = encode(welcome(heartbeat_interval=100.0))
    events = session.receive(text, T0 + 2)
    assert len(events) == 1
    refused = events[0]
    assert isinstance(refused, FrameRefused)
    assert refused.error.code == "unexpected_frame"
    assert refused.size == len(text.encode())
    assert sent(session) == [
        {"type": "error", "code": "unexpected_frame", "message": "unexpected welcome frame"}
    ]
    assert phase(session) is Phase.READY
    assert session.welcome == first


# -- heartbeats -----------------------------------------------------------------------------------


def test_ping_queued_every_interval() -> None:
    session = ready_session()  # welcome at T0 + 1; the timer started at T0
    assert session.tick(T0 + 9.999) == []
    assert session.data_to_send() == []
    assert session.tick(T0 + 10) == []
    assert sent(session) == [{"type": "ping", "id": 1}]
    assert session.tick(T0 + 15) == []
    assert session.data_to_send() == []
    session.receive(encode(Pong(id=1)), T0 + 15)
    assert session.tick(T0 + 20) == []
    assert sent(session) == [{"type": "ping", "id": 2}]
    session.receive(encode(Pong(id=2)), T0 + 21)
    assert session.tick(T0 + 30.5) == []
    assert sent(session) == [{"type": "ping", "id": 3}]


def test_next_deadline() -> None:
    session = ready_session(at=T0 + 1)
    # The next ping (last ping T0 + interval) comes before the timeout (T0 + 1 + 30).
    assert session.next_deadline() == T0 + 10
    session.tick(T0 + 10)
    assert session.next_deadline() == T0 + 20
    session.tick(T0 + 20)
    # Nothing received since T0 + 1: the ping at T0 + 30 comes just before the timeout at T0 + 31.
    assert session.next_deadline() == T0 + 30
    session.tick(T0 + 30)
    # Now the timeout comes first.
    assert session.next_deadline() == T0 + 31


def test_heartbeat_timeout_when_nothing_received() -> None:
    session = ready_session(at=T0 + 1)
    session.receive(encode(Pong(id=1)), T0 + 12)
    assert session.tick(T0 + 41.999) == []
    assert phase(session) is Phase.READY
    events = session.tick(T0 + 42)
    assert len(events) == 1
    close = events[0]
    assert isinstance(close, CloseRequested)
    assert close.code == CloseCode.HEARTBEAT_TIMEOUT == 4004
    assert "30.0s" in close.reason
    assert phase(session) is Phase.CLOSED


def test_any_frame_counts_as_sign_of_life() -> None:
    session = ready_session(at=T0 + 1)
    session.receive("garbage", T0 + 25)  # even a malformed frame shows the peer is there
    assert session.tick(T0 + 54) == []
    assert phase(session) is Phase.READY
    assert isinstance(session.tick(T0 + 55)[0], CloseRequested)


def test_timeout_stretched_to_three_control_plane_intervals() -> None:
    # The control plane pings every 20 s: 3 * 20 = 60 s > the configured 30 s.
    session = ready_session(heartbeat_interval=20.0, at=T0 + 1)
    assert session.next_deadline() == T0 + 10
    for now in (T0 + 10, T0 + 20, T0 + 30, T0 + 40, T0 + 50):
        assert session.tick(now) == []
    assert phase(session) is Phase.READY
    assert session.tick(T0 + 60.999) == []
    events = session.tick(T0 + 61)
    assert events == [CloseRequested(CloseCode.HEARTBEAT_TIMEOUT, "nothing received for 60.0s")]


def test_timeout_not_shortened_by_fast_control_plane() -> None:
    session = ready_session(heartbeat_interval=1.0, at=T0 + 1)
    for now in (T0 + 10, T0 + 20, T0 + 30):
        assert session.tick(now) == []
    assert phase(session) is Phase.READY
    assert session.tick(T0 + 31) == [
        CloseRequested(CloseCode.HEARTBEAT_TIMEOUT, "nothing received for 30.0s")
    ]


def test_closed_session_ignores_everything() -> None:
    session = new_session()
    session.tick(T0 + 100)
    assert phase(session) is Phase.CLOSED
    session.data_to_send()
    assert session.receive(encode(welcome()), T0 + 101) == []
    assert session.receive("garbage", T0 + 101) == []
    assert session.tick(T0 + 200) == []
    assert phase(session) is Phase.CLOSED
    assert session.data_to_send() == []


def test_closed_after_heartbeat_timeout_ignores_everything() -> None:
    session = ready_session()
    assert isinstance(session.tick(T0 + 1000)[0], CloseRequested)
    session.data_to_send()
    assert session.receive(encode(Ping(id=1)), T0 + 1001) == []
    assert session.tick(T0 + 2000) == []
    assert session.data_to_send() == []


# -- settings and the timer -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0.0},
        {"interval": -1.0},
        {"interval": 45.0, "timeout": 45.0},
        {"interval": 50.0, "timeout": 45.0},
        {"handshake_timeout": 0.0},
        {"handshake_timeout": -1.0},
    ],
)
def test_heartbeat_settings_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        HeartbeatSettings(**kwargs)  # type: ignore[arg-type]  # only float fields vary here


def test_heartbeat_settings_defaults() -> None:
    assert HeartbeatSettings() == HeartbeatSettings(
        interval=15.0, timeout=45.0, handshake_timeout=10.0
    )


def test_heartbeat_timer() -> None:
    timer = HeartbeatTimer(interval=5.0, timeout=12.0, now=100.0)
    assert timer.next_deadline() == 105.0
    assert timer.ping_due(104.999) is None
    assert timer.ping_due(105.0) == Ping(id=1)
    assert timer.ping_due(105.0) is None
    assert timer.next_deadline() == 110.0
    assert timer.ping_due(111.0) == Ping(id=2)
    # Pings are scheduled from the last ping, not from a fixed grid.
    assert timer.next_deadline() == 112.0  # the timeout (100 + 12) comes first
    assert not timer.expired(111.999)
    assert timer.expired(112.0)
    timer.received(111.0)
    assert not timer.expired(122.999)
    assert timer.expired(123.0)
    assert timer.next_deadline() == 116.0


def test_heartbeat_timer_ids_increase() -> None:
    timer = HeartbeatTimer(interval=1.0, timeout=3.0, now=0.0)
    ids = []
    for now in range(1, 6):
        ping = timer.ping_due(float(now))
        assert ping is not None
        ids.append(ping.id)
    assert ids == [1, 2, 3, 4, 5]
