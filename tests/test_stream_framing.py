"""Version 2 framing of stream connections (agent/core/stream_framing.py, PROTOCOL §13.3.2):
records in, events out, bytes only, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.stream_framing import (
    MAX_DATA,
    Close,
    Data,
    Decoder,
    End,
    Event,
    FramingError,
    close_record,
    data_record,
    end_record,
)


def decode(*chunks: bytes) -> list[Event]:
    decoder = Decoder()
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(memoryview(chunk))
    return events


def payload(events: list[Event]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, Data))


def test_records_in_one_read() -> None:
    wire = data_record(b"hello ") + data_record(b"world") + end_record() + close_record(1000, "ok")

    events = decode(wire)

    assert payload(events) == b"hello world"
    assert events[-2:] == [End(), Close(1000, "ok")]


def test_the_wire_format_is_the_documented_one() -> None:
    assert data_record(b"ab") == b"\x00\x00\x00\x02ab"
    assert end_record() == b"\x01\x00\x00\x00"
    assert close_record(4410, "max_duration") == b"\x02\x00\x00\x0e\x11\x3amax_duration"
    assert data_record(b"x" * MAX_DATA)[:4] == b"\x00\x04\x00\x00"
    # PROTOCOL.md §13.3.2's example, byte for byte
    assert (data_record(b"ping") + end_record()).hex(" ") == "00 00 00 04 70 69 6e 67 01 00 00 00"
    assert close_record(1000, "closed").hex(" ") == "02 00 00 08 03 e8 63 6c 6f 73 65 64"


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8), st.data())
def test_any_split_of_the_bytes_gives_the_same_stream(
    messages: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(data_record(m) for m in messages) + end_record() + close_record(1000, "é")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]

    events = decode(*chunks)

    assert payload(events) == b"".join(messages)
    assert events[-2:] == [End(), Close(1000, "é")]


def test_data_is_passed_on_before_its_record_is_complete() -> None:
    decoder = Decoder()
    record = data_record(b"x" * 1000)

    first = decoder.feed(memoryview(record[:500]))

    assert payload(first) == b"x" * 496
    assert payload(decoder.feed(memoryview(record[500:]))) == b"x" * 504


def test_data_events_are_views_of_the_input_not_copies() -> None:
    buffer = bytearray(data_record(b"abc"))
    (event,) = Decoder().feed(memoryview(buffer))
    assert isinstance(event, Data)
    buffer[4] = ord("z")
    assert bytes(event.data) == b"zbc"


@pytest.mark.parametrize(
    ("wire", "ended_by"),
    [
        (b"\x00\x04\x00\x01" + b"x" * 10, "message_too_large"),  # MAX_DATA + 1
        (b"\x00\x00\x00\x00", "protocol_error"),  # empty DATA
        (b"\x07\x00\x00\x00", "protocol_error"),  # unknown type
        (b"\x01\x00\x00\x01", "protocol_error"),  # END with a payload
        (end_record() + end_record(), "protocol_error"),
        (end_record() + data_record(b"late"), "protocol_error"),
        (b"\x02\x00\x00\x01\x03", "protocol_error"),  # CLOSE too short
        (b"\x02\x00\x00\x7e" + b"\x03\xe8" + b"r" * 124, "protocol_error"),  # CLOSE too long
        (b"\x02\x00\x00\x03\x03\xe8\xff", "protocol_error"),  # reason not UTF-8
        (close_record(1000, "") + data_record(b"after"), "protocol_error"),
    ],
)
def test_broken_framing_is_refused_with_its_end_reason(wire: bytes, ended_by: str) -> None:
    with pytest.raises(FramingError) as refused:
        decode(wire)
    assert refused.value.ended_by == ended_by


def test_a_long_close_reason_is_cut_to_fit_whole_characters() -> None:
    record = close_record(1000, "é" * 100)
    assert len(record) - 4 <= 125
    (event,) = decode(record)
    assert isinstance(event, Close)
    assert event.reason == "é" * 61


def test_data_record_refuses_sizes_outside_the_limit() -> None:
    with pytest.raises(ValueError, match=r"1\.\.262144"):
        data_record(b"")
    with pytest.raises(ValueError, match=r"1\.\.262144"):
        data_record(b"x" * (MAX_DATA + 1))
