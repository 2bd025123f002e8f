"""How the bytes of a stream connection are framed (docs/PROTOCOL.md §13.3): the codecs the
splice (agent/io/splice.py) drives.

- :class:`RecordCodec`, version 2: length-prefixed records (agent/core/stream_framing.py); a
  socket read is framed in place, in the headroom kept in front of it, with no copy;
- :class:`WebSocketCodec`, version 1: RFC 6455 binary messages, an empty one ending a
  direction, for peers that predate version 2; RFC 6455 itself (masking, fragments, ping/pong,
  the closing handshake, the size limit) is websockets' sans-I/O protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.protocol import Protocol as WebSocketProtocol

from agent.core import stream_framing
from agent.core.stream_framing import Close, Data, End, Event, FramingError

HEADROOM: Final = stream_framing.HEADER
"""Bytes kept in front of each socket read for the record header (version 2)."""
_TOO_BIG: Final = 1009
_BROKEN: Final = (1002, 1007)


class Codec(Protocol):
    version: int

    def receive(self, data: memoryview) -> list[Event]:
        """Events in ``data`` (``Data`` slices valid while ``data`` is); FramingError."""

    def encode_data(self, buffer: bytearray, size: int) -> Sequence[bytes | memoryview]:
        """What to write for the ``size`` bytes at ``buffer[HEADROOM:]`` (may use the
        headroom in front of them)."""

    def encode_end(self) -> bytes: ...

    def encode_close(self, code: int, reason: str) -> bytes:
        """The close record, or b"" if one was sent already."""

    def pending(self) -> list[bytes]:
        """Bytes the codec must send by itself (version 1: pongs, the echo of a close)."""


class RecordCodec:
    """Version 2: length-prefixed records (agent/core/stream_framing.py)."""

    version = 2

    def __init__(self) -> None:
        self._decoder = stream_framing.Decoder()
        self._close_sent = False

    def receive(self, data: memoryview) -> list[Event]:
        return self._decoder.feed(data)

    def encode_data(self, buffer: bytearray, size: int) -> Sequence[bytes | memoryview]:
        start = HEADROOM - stream_framing.HEADER
        stream_framing.write_header(buffer, start, stream_framing.DATA, size)
        return (memoryview(buffer)[start : HEADROOM + size],)

    def encode_end(self) -> bytes:
        return stream_framing.end_record()

    def encode_close(self, code: int, reason: str) -> bytes:
        if self._close_sent:
            return b""
        self._close_sent = True
        return stream_framing.close_record(code, reason)

    def pending(self) -> list[bytes]:
        return []


class WebSocketCodec:
    """Version 1: each binary message carries the next bytes, an empty one ends a direction;
    RFC 6455 itself (masking, fragments, ping/pong, the closing handshake, the size limit) is
    websockets' sans-I/O protocol, given in the OPEN state."""

    version = 1

    def __init__(self, protocol: WebSocketProtocol) -> None:
        self._ws = protocol
        self._message_bytes = 0

    def receive(self, data: memoryview) -> list[Event]:
        ws = self._ws
        ws.receive_data(bytes(data))
        events: list[Event] = []
        for frame in ws.events_received():
            if not isinstance(frame, Frame):
                continue
            if frame.opcode is Opcode.TEXT:
                exc = FramingError("protocol_error", "a text message on a stream connection")
                exc.events = events
                raise exc
            if frame.opcode in (Opcode.BINARY, Opcode.CONT):
                if frame.opcode is Opcode.BINARY:
                    self._message_bytes = 0
                if frame.data:
                    self._message_bytes += len(frame.data)
                    events.append(Data(memoryview(frame.data)))
                if frame.fin and not self._message_bytes:
                    events.append(End())
            elif frame.opcode is Opcode.CLOSE and ws.close_rcvd is not None:
                events.append(Close(ws.close_rcvd.code, ws.close_rcvd.reason))
        failed = ws.close_sent if ws.close_rcvd is None else None
        if failed is not None and (failed.code == _TOO_BIG or failed.code in _BROKEN):
            exc = FramingError(
                "message_too_large" if failed.code == _TOO_BIG else "protocol_error",
                failed.reason,
            )
            exc.events = events
            raise exc
        return events

    def encode_data(self, buffer: bytearray, size: int) -> Sequence[bytes | memoryview]:
        self._ws.send_binary(bytes(buffer[HEADROOM : HEADROOM + size]))
        return self._ws.data_to_send()

    def encode_end(self) -> bytes:
        self._ws.send_binary(b"")
        return b"".join(self._ws.data_to_send())

    def encode_close(self, code: int, reason: str) -> bytes:
        if self._ws.state is not OPEN:
            return b""
        try:
            self._ws.send_close(code, reason)
        except InvalidState:
            return b""
        return b"".join(self._ws.data_to_send())

    def pending(self) -> list[bytes]:
        return [chunk for chunk in self._ws.data_to_send() if chunk]
