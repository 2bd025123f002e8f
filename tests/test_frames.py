"""Wire codec (agent.core.frames): round trips, direction sets, size and shape rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.errors import FrameTooLarge, MalformedFrame, ProtocolError
from agent.core.frames import (
    COMMAND_STATES,
    MAX_FRAME_TO_AGENT,
    MAX_FRAME_TO_CONTROL_PLANE,
    MAX_JSON_DEPTH,
    MAX_TEXT_CHARS,
    MAX_TOKEN_CHARS,
    TO_AGENT,
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
    UnknownFrameType,
    Welcome,
    decode,
    encode,
)

ALL_TYPES = TO_AGENT | TO_CONTROL_PLANE

SAMPLES: list[Frame] = [
    Hello(protocol=1, agent_version="0.1.0", capabilities={"drivers": ["process"], "x": 1}),
    Hello(protocol=1, agent_version="0.1.0"),
    Welcome(protocol=1, agent_id="agent-1", server_time=1_700_000_000.25, heartbeat_interval=15.0),
    CommandFrame(ref="d-1", token="aaa.bbb.ccc"),
    Ack(seq=7),
    Status(seq=1, ref="d-1", jti="j-1", state="received", at=1.5),
    Status(
        seq=2,
        ref="d-1",
        jti="j-1",
        state="failed",
        at=2.5,
        reason="unhealthy_rolled_back",
        detail="health check failed",
        result={"rolled_back": True, "version": "1.0.0"},
    ),
    Status(seq=5, ref="d-1", jti="j-1", state="succeeded", at=5.5, result={}, receipt="a.b.c"),
    Anchor(seq=6, audit_seq=42, audit_hash="ab" * 32, at=6.0),
    KeySetFrame(token="a.b.c"),
    KeySetStatus(version=3, accepted=False, reason="rollback", detail="older"),
    Hello(protocol=1, agent_version="0.1.0", heartbeat_interval=15.0),
    DeliveryRejected(seq=3, ref="d-2", reason="bad_signature", detail="nope", at=3.0),
    DeliveryRejected(seq=4, ref="d-3", reason="expired", detail="late", at=4.0, jti="j-3"),
    Ping(id=0),
    Ping(id=2**63 - 1),
    Pong(id=5),
    ErrorFrame(code="malformed_frame", message="bad"),
    ErrorFrame(code="malformed_frame", message="bad", ref="d-9"),
    RenewRequest(csr="-----BEGIN CERTIFICATE REQUEST-----\nx\n"),
    CertificateFrame(certificate="-----BEGIN CERTIFICATE-----\nx\n"),
    CertificateFrame(certificate="-----BEGIN CERTIFICATE-----\nx\n", ca_bundle="-----BEGIN x"),
]


def _decode_agent(data: str | bytes) -> Frame:
    return decode(data, accept=TO_AGENT, max_bytes=MAX_FRAME_TO_AGENT)


def _decode_cp(data: str | bytes) -> Frame:
    return decode(data, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE)


def _decode_any(data: str | bytes) -> Frame:
    return decode(data, accept=ALL_TYPES, max_bytes=MAX_FRAME_TO_CONTROL_PLANE)


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


# -- round trips and directions -----------------------------------------------------------------


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: Frame) -> None:
    text = encode(frame)
    assert json.loads(text)["type"] == frame.type
    assert _decode_any(text) == frame


def test_encode_is_compact_and_omits_none() -> None:
    text = encode(ErrorFrame(code="x", message="m"))
    assert text == '{"type":"error","code":"x","message":"m"}'


def test_encode_keeps_non_ascii() -> None:
    text = encode(ErrorFrame(code="x", message="é"))
    assert "é" in text
    assert _decode_any(text) == ErrorFrame(code="x", message="é")


def test_sample_list_covers_every_frame_type() -> None:
    assert {frame.type for frame in SAMPLES} == ALL_TYPES


def test_direction_sets() -> None:
    assert {
        "welcome",
        "command",
        "keyset",
        "certificate",
        "ack",
        "ping",
        "pong",
        "error",
    } == TO_AGENT
    assert {
        "hello",
        "status",
        "delivery_rejected",
        "anchor",
        "keyset_status",
        "renew",
        "ping",
        "pong",
        "error",
    } == TO_CONTROL_PLANE


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_each_direction_accepts_only_its_frames(frame: Frame) -> None:
    text = encode(frame)
    for accept, max_bytes in (
        (TO_AGENT, MAX_FRAME_TO_AGENT),
        (TO_CONTROL_PLANE, MAX_FRAME_TO_CONTROL_PLANE),
    ):
        if frame.type in accept:
            assert decode(text, accept=accept, max_bytes=max_bytes) == frame
        else:
            with pytest.raises(UnknownFrameType) as info:
                decode(text, accept=accept, max_bytes=max_bytes)
            assert info.value.code == "unknown_frame_type"


def test_command_refused_on_control_plane_side() -> None:
    with pytest.raises(UnknownFrameType) as info:
        _decode_cp(encode(CommandFrame(ref="d-1", token="a.b.c")))
    assert info.value.code == "unknown_frame_type"


def test_status_refused_on_agent_side() -> None:
    with pytest.raises(UnknownFrameType):
        _decode_agent(encode(Status(seq=1, ref="r", jti="j", state="received", at=1.0)))


def test_unknown_frame_type() -> None:
    with pytest.raises(UnknownFrameType) as info:
        _decode_any('{"type":"teleport","id":1}')
    assert info.value.code == "unknown_frame_type"
    assert isinstance(info.value, MalformedFrame)


@pytest.mark.parametrize("body", ['{"id":1}', '{"type":5}', '{"type":null}', '{"type":["ping"]}'])
def test_missing_or_non_string_type(body: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(body)
    assert not isinstance(info.value, UnknownFrameType)
    assert info.value.code == "malformed_frame"


def test_unknown_fields_are_ignored() -> None:
    assert _decode_any('{"type":"ping","id":3,"future":{"x":[1,2]}}') == Ping(id=3)


# -- size -----------------------------------------------------------------------------------------


def _padded_ping(total_bytes: int, pad_char: str) -> str:
    """A ping frame whose UTF-8 encoding is exactly ``total_bytes`` long."""
    empty = '{"type":"ping","id":1,"pad":""}'
    remaining = total_bytes - len(empty.encode("utf-8"))
    width = len(pad_char.encode("utf-8"))
    assert remaining % width == 0
    text = '{"type":"ping","id":1,"pad":"' + pad_char * (remaining // width) + '"}'
    assert len(text.encode("utf-8")) == total_bytes
    return text


@pytest.mark.parametrize("limit", [MAX_FRAME_TO_AGENT, MAX_FRAME_TO_CONTROL_PLANE])
def test_size_exactly_at_limit_is_accepted(limit: int) -> None:
    assert decode(_padded_ping(limit, "a"), accept=ALL_TYPES, max_bytes=limit) == Ping(id=1)


@pytest.mark.parametrize("limit", [MAX_FRAME_TO_AGENT, MAX_FRAME_TO_CONTROL_PLANE])
def test_size_one_above_limit_is_refused(limit: int) -> None:
    with pytest.raises(FrameTooLarge) as info:
        decode(_padded_ping(limit + 1, "a"), accept=ALL_TYPES, max_bytes=limit)
    assert info.value.code == "frame_too_large"
    assert str(limit + 1) in info.value.detail


def test_size_is_counted_in_utf8_bytes() -> None:
    limit = 1000
    # 485 two-byte characters: 31 + 970 = 1001 bytes, but only 516 characters.
    text = '{"type":"ping","id":1,"pad":"' + "é" * 485 + '"}'
    assert len(text) == 516
    assert len(text.encode("utf-8")) == limit + 1
    with pytest.raises(FrameTooLarge):
        decode(text, accept=ALL_TYPES, max_bytes=limit)
    # Four-byte characters exactly at the limit are accepted.
    at_limit = _padded_ping(31 + 4 * 240, "\U0001f600")
    assert decode(at_limit, accept=ALL_TYPES, max_bytes=31 + 4 * 240) == Ping(id=1)
    with pytest.raises(FrameTooLarge):
        decode(at_limit, accept=ALL_TYPES, max_bytes=31 + 4 * 240 - 1)


def test_agent_side_default_limit_refuses_a_control_plane_sized_frame() -> None:
    with pytest.raises(FrameTooLarge):
        _decode_agent(_padded_ping(MAX_FRAME_TO_AGENT + 1, "a"))


def test_a_long_token_is_the_verifiers_to_refuse_not_the_codecs() -> None:
    """The codec only bounds the frame: a token over MAX_TOKEN_CHARS still decodes, so that the
    agent refuses it as a delivery (delivery_rejected naming the ref), docs/PROTOCOL.md §5.2."""
    long = "a" * (MAX_TOKEN_CHARS + 1)
    assert _decode_agent(_dumps({"type": "command", "ref": "r", "token": long})) == CommandFrame(
        ref="r", token=long
    )


def test_an_error_about_a_frame_names_its_ref() -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_agent(_dumps({"type": "command", "ref": "r-7", "token": 5}))
    assert info.value.ref == "r-7"
    with pytest.raises(MalformedFrame) as unnamed:
        _decode_agent(_dumps({"type": "command", "ref": "bad ref!", "token": "t"}))
    assert unnamed.value.ref is None


# -- JSON shape -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "not json",
        '{"type":"ping","id":1}garbage',
        "{'type':'ping'}",
        '{"type":"ping","id":1,}',
    ],
)
def test_malformed_json(text: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(text)
    assert info.value.code == "malformed_frame"


@pytest.mark.parametrize("text", ["[]", '"ping"', "1", "null", "true", '[{"type":"ping"}]'])
def test_non_object(text: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(text)
    assert "not a JSON object" in info.value.detail


def test_duplicate_keys() -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any('{"type":"ping","id":1,"id":2}')
    assert "duplicate key 'id'" in info.value.detail


def test_duplicate_keys_nested() -> None:
    with pytest.raises(MalformedFrame):
        _decode_any('{"type":"ping","id":1,"x":{"a":1,"a":1}}')


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity(constant: str) -> None:
    with pytest.raises(MalformedFrame):
        _decode_any('{"type":"ping","id":1,"x":' + constant + "}")
    with pytest.raises(MalformedFrame):
        _decode_any(
            '{"type":"welcome","protocol":1,"agent_id":"a","server_time":'
            + constant
            + ',"heartbeat_interval":1}'
        )


def test_overflowing_float_literal_is_refused_where_a_number_is_read() -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(
            '{"type":"welcome","protocol":1,"agent_id":"a","server_time":1e999,'
            '"heartbeat_interval":1}'
        )
    assert "finite" in info.value.detail


def test_integer_too_large_for_a_float_field_is_malformed() -> None:
    huge = "9" * 400  # an integer literal beyond the range of a float
    text = '{"type":"status","seq":1,"ref":"r","jti":"j","state":"received","at":' + huge + "}"
    with pytest.raises(MalformedFrame):
        _decode_any(text)


def _nested(levels: int) -> str:
    """A JSON object ``levels`` containers deep in total (the frame itself is the first)."""
    inner = "[" * (levels - 1) + "]" * (levels - 1)
    return '{"type":"ping","id":1,"x":' + inner + "}"


def test_nesting_at_limit_is_accepted() -> None:
    assert _decode_any(_nested(MAX_JSON_DEPTH)) == Ping(id=1)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 100, 100_000])
def test_nesting_beyond_limit_is_malformed(levels: int) -> None:
    with pytest.raises(MalformedFrame) as info:
        decode(_nested(levels), accept=ALL_TYPES, max_bytes=10**7)
    assert info.value.code == "malformed_frame"


def test_binary_refused_whatever_it_holds() -> None:
    # Text frames arrive as str; bytes are binary WebSocket messages.
    with pytest.raises(ProtocolError) as info:
        _decode_any(b"\xff\xfe")
    assert info.value.code == "unsupported_frame"


def test_binary_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        _decode_any(encode(Ping(id=1)).encode("utf-8"))
    assert info.value.code == "unsupported_frame"
    assert not isinstance(info.value, MalformedFrame)


def test_lone_surrogate_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        _decode_any('{"type":"ping","id":1,"x":"\ud800"}')


# -- fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"type": "hello", "agent_version": "1"},
        {"type": "hello", "protocol": 1},
        {"type": "welcome", "agent_id": "a", "server_time": 1, "heartbeat_interval": 1},
        {"type": "welcome", "protocol": 1, "server_time": 1, "heartbeat_interval": 1},
        {"type": "welcome", "protocol": 1, "agent_id": "a", "heartbeat_interval": 1},
        {"type": "welcome", "protocol": 1, "agent_id": "a", "server_time": 1},
        {"type": "command", "ref": "r"},
        {"type": "command", "token": "t"},
        {"type": "ack"},
        {"type": "ack", "seq": None},
        {"type": "status", "ref": "r", "jti": "j", "state": "received", "at": 1},
        {"type": "status", "seq": 1, "jti": "j", "state": "received", "at": 1},
        {"type": "status", "seq": 1, "ref": "r", "state": "received", "at": 1},
        {"type": "status", "seq": 1, "ref": "r", "jti": "j", "at": 1},
        {"type": "status", "seq": 1, "ref": "r", "jti": "j", "state": "received"},
        {"type": "delivery_rejected", "seq": 1, "ref": "r", "reason": "x", "detail": "d"},
        {"type": "delivery_rejected", "seq": 1, "ref": "r", "reason": "x", "at": 1},
        {"type": "delivery_rejected", "seq": 1, "ref": "r", "detail": "d", "at": 1},
        {"type": "ping"},
        {"type": "pong"},
        {"type": "error", "message": "m"},
        {"type": "error", "code": "c"},
    ],
)
def test_missing_field(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps(body))
    assert "missing field" in info.value.detail


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "hello", "protocol": "1", "agent_version": "1"}, "protocol"),
        ({"type": "hello", "protocol": 1, "agent_version": 1}, "agent_version"),
        (
            {"type": "hello", "protocol": 1, "agent_version": "1", "capabilities": []},
            "capabilities",
        ),
        ({"type": "command", "ref": "r", "token": 5}, "token"),
        ({"type": "ack", "seq": "1"}, "seq"),
        ({"type": "ack", "seq": 1.0}, "seq"),
        ({"type": "ping", "id": 1.5}, "id"),
        ({"type": "pong", "id": "1"}, "id"),
        (
            {"type": "status", "seq": 1, "ref": "r", "jti": "j", "state": "received", "at": "1"},
            "at",
        ),
        (
            {
                "type": "status",
                "seq": 1,
                "ref": "r",
                "jti": "j",
                "state": "received",
                "at": 1,
                "result": [1],
            },
            "result",
        ),
        ({"type": "error", "code": "c", "message": ["m"]}, "message"),
    ],
)
def test_mistyped_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps(body))
    assert f"field {field!r} must be" in info.value.detail


@pytest.mark.parametrize(
    "body",
    [
        {"type": "hello", "protocol": True, "agent_version": "1"},
        {"type": "ack", "seq": True},
        {"type": "ping", "id": True},
        {"type": "pong", "id": False},
        {"type": "status", "seq": True, "ref": "r", "jti": "j", "state": "received", "at": 1},
        {"type": "status", "seq": 1, "ref": "r", "jti": "j", "state": "received", "at": True},
        {
            "type": "welcome",
            "protocol": 1,
            "agent_id": "a",
            "server_time": 1,
            "heartbeat_interval": True,
        },
    ],
)
def test_bool_where_number_expected(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps(body))
    assert "got bool" in info.value.detail


def test_int_accepted_where_float_expected() -> None:
    frame = _decode_any(
        _dumps(
            {
                "type": "welcome",
                "protocol": 1,
                "agent_id": "a",
                "server_time": 100,
                "heartbeat_interval": 5,
            }
        )
    )
    assert frame == Welcome(protocol=1, agent_id="a", server_time=100.0, heartbeat_interval=5.0)
    assert isinstance(frame, Welcome)
    assert isinstance(frame.server_time, float)


@pytest.mark.parametrize("value", [0, -1, 2**63])
def test_seq_out_of_range(value: int) -> None:
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps({"type": "ack", "seq": value}))
    assert "out of range" in info.value.detail


def test_seq_range_bounds_accepted() -> None:
    assert _decode_any(_dumps({"type": "ack", "seq": 1})) == Ack(seq=1)
    assert _decode_any(_dumps({"type": "ack", "seq": 2**63 - 1})) == Ack(seq=2**63 - 1)


@pytest.mark.parametrize("value", [-1, 2**63])
def test_ping_id_out_of_range(value: int) -> None:
    with pytest.raises(MalformedFrame):
        _decode_any(_dumps({"type": "ping", "id": value}))


@pytest.mark.parametrize("value", [0, 3600.5, -1])
def test_welcome_heartbeat_interval_range(value: float) -> None:
    body = {
        "type": "welcome",
        "protocol": 1,
        "agent_id": "a",
        "server_time": 1,
        "heartbeat_interval": value,
    }
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps(body))
    assert "heartbeat_interval" in info.value.detail


@pytest.mark.parametrize("bad_id", ["", "has space", "slash/x", "é", "a" * 129, "new\nline"])
@pytest.mark.parametrize("field", ["ref", "jti"])
def test_status_ids_must_match_pattern(bad_id: str, field: str) -> None:
    body: dict[str, Any] = {"type": "status", "seq": 1, "ref": "r", "jti": "j"}
    body |= {"state": "received", "at": 1, field: bad_id}
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps(body))
    assert repr(field) in info.value.detail


@pytest.mark.parametrize("bad_id", ["", "has space", "a" * 129])
def test_command_ref_and_welcome_agent_id_must_match_pattern(bad_id: str) -> None:
    with pytest.raises(MalformedFrame):
        _decode_any(_dumps({"type": "command", "ref": bad_id, "token": "t"}))
    with pytest.raises(MalformedFrame):
        _decode_any(
            _dumps(
                {
                    "type": "welcome",
                    "protocol": 1,
                    "agent_id": bad_id,
                    "server_time": 1,
                    "heartbeat_interval": 1,
                }
            )
        )


def test_longest_id_accepted() -> None:
    ref = "A-z_0.9:" * 16
    assert len(ref) == 128
    assert _decode_any(_dumps({"type": "command", "ref": ref, "token": "t"})) == CommandFrame(
        ref=ref, token="t"
    )


def test_unknown_state_in_status() -> None:
    body = {"type": "status", "seq": 1, "ref": "r", "jti": "j", "state": "exploded", "at": 1}
    with pytest.raises(MalformedFrame) as info:
        _decode_any(_dumps(body))
    assert "unknown state 'exploded'" in info.value.detail


@pytest.mark.parametrize("state", COMMAND_STATES)
def test_every_known_state_accepted(state: str) -> None:
    body = {"type": "status", "seq": 1, "ref": "r", "jti": "j", "state": state, "at": 1}
    frame = _decode_any(_dumps(body))
    assert isinstance(frame, Status)
    assert frame.state == state


@pytest.mark.parametrize("code", ["", "Upper", "1abc", "has space", "a" * 65])
def test_codes_must_match_pattern(code: str) -> None:
    with pytest.raises(MalformedFrame):
        _decode_any(_dumps({"type": "error", "code": code, "message": "m"}))
    with pytest.raises(MalformedFrame):
        _decode_any(
            _dumps(
                {
                    "type": "delivery_rejected",
                    "seq": 1,
                    "ref": "r",
                    "reason": code,
                    "detail": "d",
                    "at": 1,
                }
            )
        )
    with pytest.raises(MalformedFrame):
        _decode_any(
            _dumps(
                {
                    "type": "status",
                    "seq": 1,
                    "ref": "r",
                    "jti": "j",
                    "state": "failed",
                    "at": 1,
                    "reason": code,
                }
            )
        )


def test_null_optional_fields_are_absent() -> None:
    body = {
        "type": "status",
        "seq": 1,
        "ref": "r",
        "jti": "j",
        "state": "received",
        "at": 1,
        "reason": None,
        "detail": None,
        "result": None,
    }
    assert _decode_any(_dumps(body)) == Status(seq=1, ref="r", jti="j", state="received", at=1.0)


# -- free text ------------------------------------------------------------------------------------


def test_long_text_fields_truncated() -> None:
    long = "x" * (MAX_TEXT_CHARS * 3)
    status = _decode_any(
        _dumps(
            {
                "type": "status",
                "seq": 1,
                "ref": "r",
                "jti": "j",
                "state": "failed",
                "at": 1,
                "detail": long,
            }
        )
    )
    assert isinstance(status, Status)
    assert status.detail == "x" * MAX_TEXT_CHARS

    error = _decode_any(_dumps({"type": "error", "code": "c", "message": long, "ref": long}))
    assert isinstance(error, ErrorFrame)
    assert error.message == "x" * MAX_TEXT_CHARS
    assert error.ref == "x" * MAX_TEXT_CHARS

    hello = _decode_any(_dumps({"type": "hello", "protocol": 1, "agent_version": long}))
    assert isinstance(hello, Hello)
    assert hello.agent_version == "x" * MAX_TEXT_CHARS

    rejected = _decode_any(
        _dumps(
            {
                "type": "delivery_rejected",
                "seq": 1,
                "ref": "r",
                "reason": "bad_typ",
                "detail": long,
                "at": 1,
                "jti": long,
            }
        )
    )
    assert isinstance(rejected, DeliveryRejected)
    assert rejected.detail == "x" * MAX_TEXT_CHARS
    assert rejected.jti == "x" * MAX_TEXT_CHARS


def test_text_at_limit_not_truncated() -> None:
    exact = "y" * MAX_TEXT_CHARS
    error = _decode_any(_dumps({"type": "error", "code": "c", "message": exact}))
    assert isinstance(error, ErrorFrame)
    assert error.message == exact


# -- property tests -------------------------------------------------------------------------------


def _decode_or_protocol_error(text: str) -> None:
    outcome: Frame | ProtocolError
    try:
        outcome = _decode_any(text)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert isinstance(outcome.code, str)
        assert outcome.code
    else:
        assert isinstance(outcome, Frame)
        assert outcome.type in ALL_TYPES


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_decode_arbitrary_text_never_raises_anything_else(text: str) -> None:
    _decode_or_protocol_error(text)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_field_names = st.sampled_from(
    [
        "protocol",
        "agent_version",
        "capabilities",
        "agent_id",
        "server_time",
        "heartbeat_interval",
        "ref",
        "token",
        "seq",
        "jti",
        "state",
        "at",
        "reason",
        "detail",
        "result",
        "id",
        "code",
        "message",
    ]
)
_typed_field_values = (
    _json_values
    | st.sampled_from(["r-1", "received", "failed", "bad_typ", "a.b.c", ""])
    | st.integers(min_value=-2, max_value=2**64)
)


@st.composite
def _frame_like_objects(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = draw(
        st.dictionaries(_field_names | st.text(max_size=8), _typed_field_values, max_size=10)
    )
    if draw(st.booleans()):
        body["type"] = draw(st.sampled_from(sorted(ALL_TYPES)) | _json_values)
    return body


@settings(max_examples=500, deadline=None)
@given(_frame_like_objects())
def test_decode_arbitrary_json_objects_never_raises_anything_else(body: dict[str, Any]) -> None:
    _decode_or_protocol_error(json.dumps(body))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=2**63 - 1),
    st.sampled_from(COMMAND_STATES),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=2000),
)
def test_status_round_trip_property(seq: int, state: str, at: float, detail: str) -> None:
    frame = Status(seq=seq, ref="r-1", jti="j-1", state=state, at=at, detail=detail)
    decoded = _decode_any(encode(frame))
    assert isinstance(decoded, Status)
    assert decoded.seq == seq
    assert decoded.at == at
    assert decoded.detail == detail[:MAX_TEXT_CHARS]


def test_depth_counts_containers_not_the_values_inside_them() -> None:
    at_limit = "[" * (MAX_JSON_DEPTH - 1) + "1" + "]" * (MAX_JSON_DEPTH - 1)
    assert _decode_any('{"type":"ping","id":1,"x":' + at_limit + "}") == Ping(id=1)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "renew", "csr": "not pem"},
        {"type": "renew", "csr": "-----BEGIN " + "x" * 20_000},
        {"type": "renew"},
        {"type": "certificate", "certificate": 5},
    ],
)
def test_certificate_frames_carry_bounded_pem(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame):
        _decode_any(_dumps(body))
