"""Version 2 framing of a stream connection (docs/PROTOCOL.md §13.3.2), sans-I/O.

After the upgrade response has accepted version 2, each direction of the stream connection is
a sequence of records::

    +------+----------------------------+-----------------+
    | type | length (3 bytes, big-end.) | payload         |
    +------+----------------------------+-----------------+

- ``DATA`` (0): 1..:data:`MAX_DATA` bytes, the next bytes of the stream;
- ``END`` (1): length 0, the sender's direction has ended (a half-close, like TCP's FIN);
- ``CLOSE`` (2): 2..125 bytes, a close code (2 bytes, big-endian, the codes of §13.4) then a
  UTF-8 reason; the last record its sender sends.

Anything else is a protocol error; a ``DATA`` record longer than :data:`MAX_DATA` is
``message_too_large``. :class:`Decoder` turns bytes into events without copying the data:
a :class:`Data` event is a slice of the bytes it was given, and a record's payload is passed on
as it arrives (a record split across reads gives one event per read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

HEADER: Final = 4
DATA: Final = 0
END: Final = 1
CLOSE: Final = 2
MAX_DATA: Final = 256 * 1024
"""The largest ``DATA`` payload (the same limit as a version 1 message)."""
MAX_CLOSE: Final = 125
MAX_REASON: Final = MAX_CLOSE - 2


class FramingError(Exception):
    """The peer broke the framing. ``ended_by`` is the stream's end reason (§13.4):
    ``protocol_error`` or ``message_too_large``."""

    def __init__(self, ended_by: str, detail: str) -> None:
        super().__init__(detail)
        self.ended_by = ended_by
        self.events: list[Event] = []
        """The events before the broken rule, in the same input (they are valid)."""


@dataclass(frozen=True, slots=True)
class Data:
    data: memoryview


@dataclass(frozen=True, slots=True)
class End:
    pass


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


Event = Data | End | Close


def write_header(buffer: bytearray | memoryview, offset: int, kind: int, length: int) -> None:
    """Put a record header at ``buffer[offset:offset + HEADER]``."""
    buffer[offset] = kind
    buffer[offset + 1] = (length >> 16) & 0xFF
    buffer[offset + 2] = (length >> 8) & 0xFF
    buffer[offset + 3] = length & 0xFF


def data_record(payload: bytes) -> bytes:
    if not 0 < len(payload) <= MAX_DATA:
        raise ValueError(f"a DATA record carries 1..{MAX_DATA} bytes, not {len(payload)}")
    header = bytearray(HEADER)
    write_header(header, 0, DATA, len(payload))
    return bytes(header) + payload


def end_record() -> bytes:
    return bytes((END, 0, 0, 0))


def close_record(code: int, reason: str) -> bytes:
    text = reason.encode()[:MAX_REASON].decode(errors="ignore").encode()
    payload = code.to_bytes(2, "big") + text
    header = bytearray(HEADER)
    write_header(header, 0, CLOSE, len(payload))
    return bytes(header) + payload


class Decoder:
    """Bytes in, events out, for one direction of a version 2 stream connection."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._data_left = 0
        self._close: bytearray | None = None
        self._close_left = 0
        self._ended = False
        self._closed = False

    def feed(self, view: memoryview) -> list[Event]:
        """The events in ``view``; :class:`Data` events are slices of it (valid while it is).
        Raises :class:`FramingError` at the first broken rule (nothing after it is read)."""
        events: list[Event] = []
        try:
            self._feed(view, events)
        except FramingError as exc:
            exc.events = events
            raise
        return events

    def _feed(self, view: memoryview, events: list[Event]) -> None:
        pos, size = 0, len(view)
        while pos < size:
            if self._data_left:
                take = min(self._data_left, size - pos)
                events.append(Data(view[pos : pos + take]))
                self._data_left -= take
                pos += take
                continue
            if self._close is not None:
                take = min(self._close_left, size - pos)
                self._close += view[pos : pos + take]
                self._close_left -= take
                pos += take
                if not self._close_left:
                    events.append(self._closed_by(bytes(self._close)))
                continue
            if self._closed:
                raise FramingError("protocol_error", "bytes after a CLOSE record")
            if self._header or size - pos < HEADER:
                take = min(HEADER - len(self._header), size - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER:
                    break
                header: bytes | memoryview = bytes(self._header)
                self._header.clear()
            else:
                header = view[pos : pos + HEADER]
                pos += HEADER
            event = self._record(header[0], header[1] << 16 | header[2] << 8 | header[3])
            if event is not None:
                events.append(event)

    def _record(self, kind: int, length: int) -> Event | None:
        if kind == DATA:
            if length > MAX_DATA:
                raise FramingError("message_too_large", f"a DATA record of {length} bytes")
            if length == 0:
                raise FramingError("protocol_error", "an empty DATA record")
            if self._ended:
                raise FramingError("protocol_error", "DATA after END")
            self._data_left = length
            return None
        if kind == END:
            if length or self._ended:
                raise FramingError("protocol_error", "a second END, or END with a payload")
            self._ended = True
            return End()
        if kind == CLOSE:
            if not 2 <= length <= MAX_CLOSE:
                raise FramingError("protocol_error", f"a CLOSE record of {length} bytes")
            self._close, self._close_left = bytearray(), length
            return None
        raise FramingError("protocol_error", f"unknown record type {kind}")

    def _closed_by(self, payload: bytes) -> Close:
        self._close = None
        self._closed = True
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError as exc:
            raise FramingError("protocol_error", "a CLOSE reason that is not UTF-8") from exc
        return Close(int.from_bytes(payload[:2], "big"), reason)
