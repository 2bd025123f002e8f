"""The wire codec of docs/PROTOCOL.md: JSON text frames in, typed frames out, and back.

Sans-I/O: these functions take and return ``str``/``bytes`` and never touch a socket. Both the
agent and the stub control plane use them, and every size and type rule of the protocol is
enforced here, so a frame that got past :func:`decode` is well-formed.

Rules (see docs/PROTOCOL.md §3):

- one WebSocket *text* message carries one JSON object (UTF-8); binary messages are reserved;
- a frame is at most ``max_bytes`` bytes of UTF-8 (64 KiB towards the agent, 1 MiB towards the
  control plane);
- duplicate object keys, ``NaN``/``Infinity`` and nesting deeper than 32 levels are malformed;
- ``type`` selects the frame; fields not listed for a type are ignored (forward compatibility);
  a listed field with the wrong type is malformed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from agent.core.errors import FrameTooLarge, MalformedFrame, ProtocolError

PROTOCOL_VERSION: Final = 1
MAX_FRAME_TO_AGENT: Final = 64 * 1024
MAX_FRAME_TO_CONTROL_PLANE: Final = 1024 * 1024
MAX_JSON_DEPTH: Final = 32
MAX_TOKEN_CHARS: Final = 16 * 1024
MAX_TEXT_CHARS: Final = 1024
MAX_PEM_CHARS: Final = 16 * 1024

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CODE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
HASH_PATTERN: Final = re.compile(r"[0-9a-f]{64}")

# Command states, in the order a command moves through them (docs/PROTOCOL.md §6).
COMMAND_STATES: Final = (
    "received",
    "pending_approval",
    "running",
    "succeeded",
    "failed",
    "rejected",
    "interrupted",
)
FINAL_STATES: Final = frozenset({"succeeded", "failed", "rejected", "interrupted"})


class UnknownFrameType(MalformedFrame):
    code = "unknown_frame_type"


# --------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True, kw_only=True)
class Frame:
    type: ClassVar[str]

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"type": self.type}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


@dataclass(frozen=True, kw_only=True)
class Hello(Frame):
    """Agent -> control plane, the first frame of every connection."""

    type: ClassVar[str] = "hello"
    protocol: int
    agent_version: str
    capabilities: Mapping[str, object] = field(default_factory=dict)
    heartbeat_interval: float | None = None
    """Seconds between the agent's pings, so the control plane can size its timeout."""


@dataclass(frozen=True, kw_only=True)
class Welcome(Frame):
    """Control plane -> agent, the answer to ``hello``."""

    type: ClassVar[str] = "welcome"
    protocol: int
    agent_id: str
    server_time: float
    heartbeat_interval: float


@dataclass(frozen=True, kw_only=True)
class CommandFrame(Frame):
    """Control plane -> agent: deliver one signed command (a JWS in compact serialization)."""

    type: ClassVar[str] = "command"
    ref: str
    token: str


@dataclass(frozen=True, kw_only=True)
class KeySetFrame(Frame):
    """Control plane -> agent: a new signed key set (docs/PROTOCOL.md §5.4)."""

    type: ClassVar[str] = "keyset"
    token: str


@dataclass(frozen=True, kw_only=True)
class KeySetStatus(Frame):
    """Agent -> control plane: the answer to ``keyset`` (informational, not acknowledged)."""

    type: ClassVar[str] = "keyset_status"
    version: int
    """The version in force after the offer (0: none)."""
    accepted: bool
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True, kw_only=True)
class RenewRequest(Frame):
    """Agent -> control plane: a CSR for a new client certificate (docs/PROTOCOL.md §14)."""

    type: ClassVar[str] = "renew"
    csr: str


@dataclass(frozen=True, kw_only=True)
class CertificateFrame(Frame):
    """Control plane -> agent: the certificate issued for the agent's last ``renew``."""

    type: ClassVar[str] = "certificate"
    certificate: str
    ca_bundle: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ack(Frame):
    """Control plane -> agent: the frame numbered ``seq`` is stored durably; stop resending it."""

    type: ClassVar[str] = "ack"
    seq: int


@dataclass(frozen=True, kw_only=True)
class Status(Frame):
    """Agent -> control plane: a verified command (``jti``) entered ``state``."""

    type: ClassVar[str] = "status"
    seq: int
    ref: str
    jti: str
    state: str
    at: float
    reason: str | None = None
    detail: str | None = None
    result: Mapping[str, object] | None = None
    receipt: str | None = None
    """For final states: a JWS signed with the agent's own key over this report (§6.6)."""


@dataclass(frozen=True, kw_only=True)
class Anchor(Frame):
    """Agent -> control plane: the head of the agent's audit chain, for the control plane to
    keep (so that a log truncated or rewritten later on the host can be detected)."""

    type: ClassVar[str] = "anchor"
    seq: int
    audit_seq: int
    audit_hash: str
    at: float


@dataclass(frozen=True, kw_only=True)
class DeliveryRejected(Frame):
    """Agent -> control plane: the delivery ``ref`` was refused before its command was accepted.

    ``jti`` is what the token claimed, unverified, when it could be read at all.
    """

    type: ClassVar[str] = "delivery_rejected"
    seq: int
    ref: str
    reason: str
    detail: str
    at: float
    jti: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ping(Frame):
    type: ClassVar[str] = "ping"
    id: int


@dataclass(frozen=True, kw_only=True)
class Pong(Frame):
    type: ClassVar[str] = "pong"
    id: int


@dataclass(frozen=True, kw_only=True)
class ErrorFrame(Frame):
    """Either direction: the peer's last frame could not be processed. Informational only."""

    type: ClassVar[str] = "error"
    code: str
    message: str
    ref: str | None = None


# --------------------------------------------------------------------------------------------
# Encoding


def encode(frame: Frame) -> str:
    """Serialise a frame to its JSON text (compact, no NaN)."""
    return json.dumps(frame.to_json(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Decoding


def _reject_constant(name: str) -> object:
    raise MalformedFrame(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedFrame(f"duplicate key {key!r}")
        result[key] = value
    return result


def _depth(value: object, limit: int) -> int:
    """How many objects/arrays are nested in a parsed JSON value (scalars add nothing),
    stopping early past ``limit``."""
    stack: list[tuple[object, int]] = [(value, 0)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def parse_json_object(data: str | bytes, *, max_bytes: int, what: str = "frame") -> dict[str, Any]:
    """Parse one JSON object under the protocol's rules (size, duplicates, depth, no NaN)."""
    try:
        size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    except UnicodeEncodeError as exc:
        raise MalformedFrame(f"{what} is not valid UTF-8") from exc
    if size > max_bytes:
        raise FrameTooLarge(f"{what} of {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except MalformedFrame:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFrame(f"{what} is not valid JSON: {_short(exc)}") from exc
    if not isinstance(value, dict):
        raise MalformedFrame(f"{what} is not a JSON object")
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise MalformedFrame(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


T = TypeVar("T")


def _opt(body: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    """An optional field: absent or null gives None; present with the wrong type is malformed."""
    value = body.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**53:
            raise MalformedFrame(f"{body.get('type')!s} frame: field {name!r} is out of range")
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise MalformedFrame(
            f"{body.get('type')!s} frame: field {name!r} must be {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedFrame(f"{body.get('type')!s} frame: field {name!r} must be finite")
    return value


def _req(body: Mapping[str, Any], name: str, kind: type[T]) -> T:
    value = _opt(body, name, kind)
    if value is None:
        raise MalformedFrame(f"{body.get('type')!s} frame: missing field {name!r}")
    return value


def _ident(body: Mapping[str, Any], name: str) -> str:
    value = _req(body, name, str)
    if not ID_PATTERN.fullmatch(value):
        raise MalformedFrame(
            f"{body.get('type')!s} frame: field {name!r} must match {ID_PATTERN.pattern}"
        )
    return value


def _code(body: Mapping[str, Any], name: str) -> str:
    value = _req(body, name, str)
    if not CODE_PATTERN.fullmatch(value):
        raise MalformedFrame(f"{body.get('type')!s} frame: field {name!r} is not a valid code")
    return value


def _text(value: str | None) -> str | None:
    """Free text is kept, truncated to MAX_TEXT_CHARS."""
    return None if value is None else value[:MAX_TEXT_CHARS]


def _seq(body: Mapping[str, Any], name: str) -> int:
    value = _req(body, name, int)
    if not 0 < value < 2**63:
        raise MalformedFrame(f"{body.get('type')!s} frame: field {name!r} is out of range")
    return value


def _interval(body: Mapping[str, Any], *, required: bool) -> float | None:
    interval = (
        _req(body, "heartbeat_interval", float)
        if required
        else _opt(body, "heartbeat_interval", float)
    )
    if interval is not None and not 0 < interval <= 3600:
        raise MalformedFrame(f"{body['type']} frame: heartbeat_interval must be in (0, 3600]")
    return interval


def _hello(body: Mapping[str, Any]) -> Frame:
    return Hello(
        protocol=_req(body, "protocol", int),
        agent_version=_req(body, "agent_version", str)[:MAX_TEXT_CHARS],
        capabilities=_opt(body, "capabilities", dict) or {},
        heartbeat_interval=_interval(body, required=False),
    )


def _welcome(body: Mapping[str, Any]) -> Frame:
    interval = _interval(body, required=True)
    assert interval is not None  # noqa: S101  # required
    return Welcome(
        protocol=_req(body, "protocol", int),
        agent_id=_ident(body, "agent_id"),
        server_time=_req(body, "server_time", float),
        heartbeat_interval=interval,
    )


def _command(body: Mapping[str, Any]) -> Frame:
    # The token's own limits (MAX_TOKEN_CHARS, its shape) are the verifier's to enforce: a bad
    # token is refused as a delivery (delivery_rejected, with the ref), not as a bad frame.
    return CommandFrame(ref=_ident(body, "ref"), token=_req(body, "token", str))


def _pem(body: Mapping[str, Any], name: str) -> str:
    value = _req(body, name, str)
    if not 0 < len(value) <= MAX_PEM_CHARS or not value.startswith("-----BEGIN "):
        raise MalformedFrame(f"field {name!r} must be PEM text of at most {MAX_PEM_CHARS} chars")
    return value


def _opt_pem(body: Mapping[str, Any], name: str) -> str | None:
    return _pem(body, name) if body.get(name) is not None else None


def _keyset_status(body: Mapping[str, Any]) -> Frame:
    version = _req(body, "version", int)
    if not 0 <= version < 2**53:
        raise MalformedFrame("keyset_status frame: version is out of range")
    reason = _opt(body, "reason", str)
    if reason is not None and not CODE_PATTERN.fullmatch(reason):
        raise MalformedFrame("keyset_status frame: field 'reason' is not a valid code")
    return KeySetStatus(
        version=version,
        accepted=_req(body, "accepted", bool),
        reason=reason,
        detail=_text(_opt(body, "detail", str)),
    )


def _status(body: Mapping[str, Any]) -> Frame:
    state = _req(body, "state", str)
    if state not in COMMAND_STATES:
        raise MalformedFrame(f"status frame: unknown state {state!r}")
    reason = _opt(body, "reason", str)
    if reason is not None and not CODE_PATTERN.fullmatch(reason):
        raise MalformedFrame("status frame: field 'reason' is not a valid code")
    return Status(
        seq=_seq(body, "seq"),
        ref=_ident(body, "ref"),
        jti=_ident(body, "jti"),
        state=state,
        at=_req(body, "at", float),
        reason=reason,
        detail=_text(_opt(body, "detail", str)),
        result=_opt(body, "result", dict),
        receipt=_opt(body, "receipt", str),
    )


def _anchor(body: Mapping[str, Any]) -> Frame:
    audit_hash = _req(body, "audit_hash", str)
    if not HASH_PATTERN.fullmatch(audit_hash):
        raise MalformedFrame("anchor frame: audit_hash must be 64 lowercase hex digits")
    audit_seq = _req(body, "audit_seq", int)
    if not 0 < audit_seq < 2**63:
        raise MalformedFrame("anchor frame: audit_seq is out of range")
    return Anchor(
        seq=_seq(body, "seq"),
        audit_seq=audit_seq,
        audit_hash=audit_hash,
        at=_req(body, "at", float),
    )


def _delivery_rejected(body: Mapping[str, Any]) -> Frame:
    return DeliveryRejected(
        seq=_seq(body, "seq"),
        ref=_ident(body, "ref"),
        reason=_code(body, "reason"),
        detail=_req(body, "detail", str)[:MAX_TEXT_CHARS],
        at=_req(body, "at", float),
        jti=_text(_opt(body, "jti", str)),
    )


def _ping_id(body: Mapping[str, Any]) -> int:
    value = _req(body, "id", int)
    if not 0 <= value < 2**63:
        raise MalformedFrame(f"{body['type']} frame: field 'id' is out of range")
    return value


def _error(body: Mapping[str, Any]) -> Frame:
    return ErrorFrame(
        code=_code(body, "code"),
        message=_req(body, "message", str)[:MAX_TEXT_CHARS],
        ref=_text(_opt(body, "ref", str)),
    )


_PARSERS: Final[dict[str, Callable[[Mapping[str, Any]], Frame]]] = {
    "hello": _hello,
    "welcome": _welcome,
    "command": _command,
    "ack": lambda b: Ack(seq=_seq(b, "seq")),
    "status": _status,
    "delivery_rejected": _delivery_rejected,
    "anchor": _anchor,
    "keyset": lambda b: KeySetFrame(token=_req(b, "token", str)),
    "keyset_status": _keyset_status,
    "renew": lambda b: RenewRequest(csr=_pem(b, "csr")),
    "certificate": lambda b: CertificateFrame(
        certificate=_pem(b, "certificate"), ca_bundle=_opt_pem(b, "ca_bundle")
    ),
    "ping": lambda b: Ping(id=_ping_id(b)),
    "pong": lambda b: Pong(id=_ping_id(b)),
    "error": _error,
}

TO_AGENT: Final = frozenset(
    {"welcome", "command", "keyset", "certificate", "ack", "ping", "pong", "error"}
)
TO_CONTROL_PLANE: Final = frozenset(
    {
        "hello",
        "status",
        "delivery_rejected",
        "anchor",
        "keyset_status",
        "renew",
        "ping",
        "pong",
        "error",
    }
)


def decode(data: str | bytes, *, accept: frozenset[str], max_bytes: int) -> Frame:
    """Decode one frame received from the peer.

    ``accept`` is the set of frame types this side may receive (:data:`TO_AGENT` or
    :data:`TO_CONTROL_PLANE`). Binary WebSocket messages must be passed as ``bytes`` and are
    refused: they are reserved for a future version.

    Raises :class:`~agent.core.errors.FrameTooLarge`, :class:`~agent.core.errors.MalformedFrame` or
    :class:`UnknownFrameType`, each with a ``code`` for an ``error`` frame.
    """
    if isinstance(data, bytes):
        raise ProtocolError(
            "binary messages are reserved and not accepted", code="unsupported_frame"
        )
    body = parse_json_object(data, max_bytes=max_bytes)
    kind = body.get("type")
    try:
        if not isinstance(kind, str):
            raise MalformedFrame("frame has no string field 'type'")
        if kind not in accept:
            raise UnknownFrameType(f"frame type {kind[:64]!r} is not accepted here")
        return _PARSERS[kind](body)
    except ProtocolError as exc:
        # Name the delivery concerned in the error frame, when the frame carries a valid ref.
        ref = body.get("ref")
        if isinstance(ref, str) and ID_PATTERN.fullmatch(ref):
            exc.ref = ref
        raise


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
