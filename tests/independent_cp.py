"""An independent control plane written from docs/PROTOCOL.md alone.

It uses only third-party libraries (websockets, PyJWT, cryptography) and the standard library;
nothing from ``agent`` or ``control_plane_stub``. Section numbers in comments refer to the spec.

It is meant for conformance tests: besides speaking the protocol it records every frame it
receives and sends, and lets a test wait (bounded) for what it observes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http
import itertools
import json
import os
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

_T = TypeVar("_T")

# -- protocol constants (§3, §4, §10) ------------------------------------------------------------

PROTOCOL_VERSION: Final = 1
PATH: Final = "/v1/agent"
MAX_FRAME_TO_AGENT: Final = 65_536
MAX_FRAME_TO_CP: Final = 1_048_576
MAX_DEPTH: Final = 32
MAX_TEXT: Final = 1_024
MAX_TOKEN: Final = 16_384
MAX_SEQ: Final = 2**63 - 1
HANDSHAKE_TIMEOUT: Final = 10.0
SEND_TIMEOUT: Final = 10.0
TOKEN_TYP: Final = "byoc-command+jwt"

IDENTIFIER: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CODE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
AGENT_ID: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# §6.1 / §6.3: states only move forward; a final state never changes.
STATE_RANK: Final[dict[str, int]] = {
    "received": 0,
    "pending_approval": 1,
    "running": 2,
    "succeeded": 3,
    "failed": 3,
    "rejected": 3,
    "interrupted": 3,
}
FINAL_STATES: Final = frozenset({"succeeded", "failed", "rejected", "interrupted"})
# §8.2: transient refusals; the delivery is tried again later.
TRANSIENT_REJECTIONS: Final = frozenset({"shutting_down", "busy"})

# Close codes (§4.2).
CLOSE_NORMAL: Final = 1000
CLOSE_HANDSHAKE_ERROR: Final = 4000
CLOSE_SUPERSEDED: Final = 4001
CLOSE_UNSUPPORTED_PROTOCOL: Final = 4002
CLOSE_HANDSHAKE_TIMEOUT: Final = 4003

# Frame types the control plane receives after the handshake, and those it never accepts.
_CP_ACCEPTS: Final = frozenset(
    {"status", "delivery_rejected", "anchor", "keyset_status", "ping", "pong", "error"}
)


class MalformedFrame(ValueError):
    """A frame that breaks the parsing rules of §3 (error code ``malformed_frame``)."""


# -- JSON parsing (§3) -----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedFrame(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise MalformedFrame(f"{name} is not allowed")


def _depth(value: object) -> int:
    """Nesting depth: a scalar is 0, ``{}`` / ``[]`` is 1 (the top-level object counts)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def parse_frame(text: str) -> dict[str, Any]:
    """Parse one frame per §3; MalformedFrame if it breaks a rule."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except MalformedFrame:
        raise
    except (ValueError, RecursionError) as exc:
        raise MalformedFrame(f"not JSON: {exc}") from None
    if _depth(value) > MAX_DEPTH:
        raise MalformedFrame(f"nesting deeper than {MAX_DEPTH} levels")
    if not isinstance(value, dict):
        raise MalformedFrame("the top-level value is not an object")
    if not isinstance(value.get("type"), str):
        raise MalformedFrame("no string member 'type'")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and value == value  # noqa: PLR0124


def _require(frame: dict[str, Any], name: str, check: Callable[[object], bool], what: str) -> None:
    if name not in frame or frame[name] is None:
        raise MalformedFrame(f"{frame['type']}: member {name!r} is missing")
    if not check(frame[name]):
        raise MalformedFrame(f"{frame['type']}: member {name!r} is not {what}")


def _optional(frame: dict[str, Any], name: str, check: Callable[[object], bool], what: str) -> None:
    if frame.get(name) is not None and not check(frame[name]):
        raise MalformedFrame(f"{frame['type']}: member {name!r} is not {what}")


def _identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None


def _code(value: object) -> bool:
    return isinstance(value, str) and CODE.fullmatch(value) is not None


def _seq(value: object) -> bool:
    return _is_int(value) and 1 <= value <= MAX_SEQ  # type: ignore[operator]


def _ping_id(value: object) -> bool:
    return _is_int(value) and 0 <= value <= MAX_SEQ  # type: ignore[operator]


def _truncate(frame: dict[str, Any], *names: str) -> None:
    for name in names:
        value = frame.get(name)
        if isinstance(value, str) and len(value) > MAX_TEXT:
            frame[name] = value[:MAX_TEXT]


def validate_hello(frame: dict[str, Any]) -> None:
    """§7.1; ``protocol`` is checked by the caller first (4002 vs 4000)."""
    _require(frame, "protocol", _is_int, "an integer")
    _require(frame, "agent_version", lambda v: isinstance(v, str), "a string")
    _optional(frame, "capabilities", lambda v: isinstance(v, dict), "an object")
    _truncate(frame, "agent_version")


def validate_agent_frame(frame: dict[str, Any]) -> None:
    """Member types of the frames an agent sends after the handshake (§7.5-§7.8)."""
    kind = frame["type"]
    if kind in ("ping", "pong"):
        _require(frame, "id", _ping_id, "an integer in 0..2^63-1")
    elif kind == "status":
        _require(frame, "seq", _seq, "a positive integer")
        _require(frame, "ref", _identifier, "an identifier")
        _require(frame, "jti", _identifier, "an identifier")
        _require(frame, "state", lambda v: v in STATE_RANK, "a state of §6.1")
        _require(frame, "at", _is_num, "a number")
        _optional(frame, "reason", _code, "a code")
        _optional(frame, "detail", lambda v: isinstance(v, str), "a string")
        _optional(frame, "result", lambda v: isinstance(v, dict), "an object")
        _truncate(frame, "detail")
    elif kind == "delivery_rejected":
        _require(frame, "seq", _seq, "a positive integer")
        _require(frame, "ref", _identifier, "an identifier")
        _require(frame, "reason", _code, "a code")
        _require(frame, "detail", lambda v: isinstance(v, str), "a string")
        _require(frame, "at", _is_num, "a number")
        _optional(frame, "jti", lambda v: isinstance(v, str), "a string")
        _truncate(frame, "detail")
    elif kind == "anchor":  # §6.5, §7.7a
        _require(frame, "seq", _seq, "a positive integer")
        _require(frame, "audit_seq", _seq, "a positive integer")
        _require(
            frame,
            "audit_hash",
            lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
            "64 lowercase hex digits",
        )
        _require(frame, "at", _is_num, "a number")
    elif kind == "keyset_status":  # §7.7c
        _require(frame, "version", _is_int, "an integer")
        _require(frame, "accepted", lambda v: isinstance(v, bool), "a boolean")
    elif kind == "error":
        _require(frame, "code", _code, "a code")
        _require(frame, "message", lambda v: isinstance(v, str), "a string")
        _optional(frame, "ref", lambda v: isinstance(v, str), "a string")
        _truncate(frame, "message")


def encode_frame(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# -- signed commands (§5) ------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk_thumbprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint as §5.1 spells it out."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + b64url(raw) + '"}'
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def claimed_jti(token: str) -> str | None:
    """The ``jti`` a token claims, unverified (for bookkeeping only)."""
    try:
        payload = json.loads(b64url_decode(token.split(".")[1]))
    except (ValueError, IndexError):
        return None
    jti = payload.get("jti") if isinstance(payload, dict) else None
    return jti if isinstance(jti, str) else None


class CommandSigner:
    """Mints §5 tokens with an Ed25519 key."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey, *, issuer: str) -> None:
        self.private_key = private_key
        self.issuer = issuer
        self.kid = jwk_thumbprint(private_key.public_key())

    @classmethod
    def from_pem(cls, path: Path, *, issuer: str) -> CommandSigner:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TypeError(f"{path} is not an Ed25519 private key")
        return cls(key, issuer=issuer)

    def claims(
        self,
        aud: str,
        cmd_type: str,
        params: dict[str, Any],
        *,
        lifetime: int = 300,
        now: int | None = None,
        jti: str | None = None,
    ) -> dict[str, Any]:
        issued = int(time.time()) if now is None else now
        return {
            "iss": self.issuer,
            "aud": aud,
            "iat": issued,
            "nbf": issued,
            "exp": issued + lifetime,
            "jti": jti or uuid.uuid4().hex,
            "cmd": {"type": cmd_type, "params": params},
        }

    def sign(self, claims: dict[str, Any], *, headers: dict[str, Any] | None = None) -> str:
        header: dict[str, Any] = {"typ": TOKEN_TYP, "kid": self.kid}
        header.update(headers or {})
        token = jwt.encode(claims, self.private_key, algorithm="EdDSA", headers=header)
        if len(token) > MAX_TOKEN:
            raise ValueError(f"token of {len(token)} characters exceeds {MAX_TOKEN}")
        return token

    def mint(
        self, aud: str, cmd_type: str, params: dict[str, Any], **claims: Any
    ) -> tuple[str, str]:
        """A signed token and its ``jti``."""
        body = self.claims(aud, cmd_type, params, **claims)
        return self.sign(body), body["jti"]


# -- state -----------------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One delivery (``ref``) of a token to one agent, and what the agent reported about it."""

    agent_id: str
    ref: str
    token: str
    jti: str | None
    """The jti of the token as we minted it (or, for relayed tokens, as it claims)."""
    states: list[str] = field(default_factory=list)
    """States applied, once each, in the order they were applied."""
    status_frames: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None
    """A non-transient delivery_rejected reason, when no status exists for this delivery."""
    sent_count: int = 0

    @property
    def state(self) -> str | None:
        return self.states[-1] if self.states else None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def last_status(self) -> dict[str, Any] | None:
        return self.status_frames[-1] if self.status_frames else None

    @property
    def wants_delivery(self) -> bool:
        """§6.4: deliver again on every new connection until a status exists."""
        return not self.states and self.refused is None


@dataclass
class AgentConnection:
    """One WebSocket connection of one agent (after the client certificate was checked)."""

    id: int
    agent_id: str
    ws: ServerConnection
    request_headers: Headers
    tls_version: str | None
    cipher: str | None
    hello: dict[str, Any] | None = None
    ready: bool = False
    received: list[dict[str, Any]] = field(default_factory=list)
    """Every post-handshake frame that parsed, in arrival order (after member validation)."""
    raw_received: list[str | bytes] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    close_code_sent: int | None = None
    close_code_received: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False
    last_rx: float = field(default_factory=time.monotonic)

    def frames(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f["type"] == kind]


class IndependentControlPlane:
    """A control plane for BYOC agents, following docs/PROTOCOL.md (version 1)."""

    def __init__(
        self,
        *,
        server_cert: Path,
        server_key: Path,
        agent_ca: Path,
        signing_key: Path,
        issuer: str = "cp-stub",
        journal: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval: float = 1.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.signer = CommandSigner.from_pem(signing_key, issuer=issuer)
        self._ssl = self._tls_context(server_cert, server_key, agent_ca)
        self._host = host
        self._port = port
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = 3 * heartbeat_interval  # §4.3: the reference uses 3x
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.journal = journal
        self.ack_enabled = True
        """Tests switch this off to withhold acks (§6.3 resend behaviour)."""
        self.before_welcome: list[dict[str, Any]] = []
        """Test hook: frames sent before ``welcome`` (a conforming control plane sends none)."""
        self.welcome_overrides: dict[str, Any] = {}
        """Test hook: members replaced in ``welcome``."""
        self.withhold_welcome = False
        """Test hook: never answer ``hello`` (the agent's handshake timeout, §4.1.4)."""
        self.silent = False
        """Test hook: after ``welcome`` send nothing at all (the agent's heartbeat timeout)."""
        self.deliveries: dict[tuple[str, str], Delivery] = {}
        self.unmatched: list[tuple[str, dict[str, Any]]] = []
        """Outbox frames stored but not applied (unknown ref, other agent, jti mismatch)."""
        self.seen_rejections: set[tuple[str, str, str]] = set()
        self.ack_counts: dict[tuple[str, int], int] = {}
        self.anchors: list[tuple[str, int, str]] = []
        """(agent, audit_seq, audit_hash) of every anchor received (§6.5)."""
        self.connections: list[AgentConnection] = []
        self.active: dict[str, AgentConnection] = {}
        self.refused_requests: list[str] = []
        self.requests: list[str] = []
        """Every upgrade request's path, in order."""
        self.redirects: dict[str, tuple[int, str | None]] = {}
        """Test hook: path prefix -> (3xx status, Location or None): answer such upgrade requests
        with that redirect instead (§2: the agent MUST NOT follow one)."""
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._replaying = False
        if journal is not None and journal.exists():
            self._replay_journal(journal)

    # -- TLS (§2) ---------------------------------------------------------------------------------

    @staticmethod
    def _tls_context(server_cert: Path, server_key: Path, agent_ca: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2: ECDHE key exchange with AEAD ciphers only. (TLS 1.3 suites are all AEAD.)
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_verify_locations(cafile=str(agent_ca))
        ctx.load_cert_chain(str(server_cert), str(server_key))
        return ctx

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        sockets = list(self._server.sockets)
        port: int = sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self._host,
            self._port,
            ssl=self._ssl,
            compression=None,  # §2: permessage-deflate MUST NOT be negotiated
            process_request=self._process_request,
            max_size=MAX_FRAME_TO_CP,  # §3: above this, close 1009
            ping_interval=None,  # liveness is the protocol's own ping/pong (§4.3)
            open_timeout=self.handshake_timeout,
            close_timeout=2,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> IndependentControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request.path)
        self._notify()
        for prefix, (status, location) in self.redirects.items():
            if request.path.startswith(prefix):
                response = connection.respond(http.HTTPStatus(status), "moved\n")
                if location is not None:
                    response.headers["Location"] = location
                return response
        if urlsplit(request.path).path != PATH:
            self.refused_requests.append(request.path)
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return None

    # -- waiting --------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], _T | None], *, within: float) -> _T:
        """Wait until ``predicate`` returns something truthy; return it."""
        async with asyncio.timeout(within):
            while True:
                value = predicate()
                if value:
                    return value
                self._changed.clear()
                await self._changed.wait()

    async def wait_connection(
        self, agent_id: str, *, within: float, after: AgentConnection | None = None
    ) -> AgentConnection:
        """The first READY connection of ``agent_id`` newer than ``after``."""
        floor = after.id if after is not None else 0

        def ready() -> AgentConnection | None:
            for conn in self.connections:
                if conn.agent_id == agent_id and conn.id > floor and conn.ready:
                    return conn
            return None

        return await self.wait_until(ready, within=within)

    async def wait_frame(
        self,
        conn: AgentConnection,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        within: float,
        start: int = 0,
    ) -> dict[str, Any]:
        """The first frame received on ``conn`` (from index ``start``) matching ``predicate``."""

        def find() -> dict[str, Any] | None:
            return next((f for f in conn.received[start:] if predicate(f)), None)

        return await self.wait_until(find, within=within)

    async def wait_state(
        self, agent_id: str, ref: str, states: Iterable[str], *, within: float
    ) -> Delivery:
        """Wait until the delivery has reached one of ``states``."""
        wanted = frozenset(states)
        delivery = self.deliveries[(agent_id, ref)]
        return await self.wait_until(
            lambda: delivery if wanted.intersection(delivery.states) else None, within=within
        )

    async def wait_final(self, agent_id: str, ref: str, *, within: float) -> Delivery:
        return await self.wait_state(agent_id, ref, FINAL_STATES, within=within)

    async def wait_rejection(
        self, agent_id: str, ref: str, *, within: float, count: int = 1
    ) -> dict[str, Any]:
        """The ``count``-th distinct delivery_rejected frame stored for the delivery."""
        delivery = self.deliveries[(agent_id, ref)]
        return await self.wait_until(
            lambda: delivery.rejections[count - 1] if len(delivery.rejections) >= count else None,
            within=within,
        )

    # -- commands (§6.4) ------------------------------------------------------------------------

    async def deliver(self, agent_id: str, token: str, *, ref: str | None = None) -> Delivery:
        """Record a delivery and send it now if the agent is connected (else on reconnection)."""
        jti = claimed_jti(token)
        if ref is None:
            ref = jti if jti is not None and self._is_own(token) else f"relay-{uuid.uuid4()}"
        key = (agent_id, ref)
        if key in self.deliveries:
            raise ValueError(f"ref {ref!r} already used for {agent_id}; use redeliver()")
        delivery = Delivery(agent_id=agent_id, ref=ref, token=token, jti=jti)
        self.deliveries[key] = delivery
        self._journal({"kind": "delivery", "agent": agent_id, "ref": ref, "token": token})
        conn = self.active.get(agent_id)
        if conn is not None and conn.ready:
            await self._send_delivery(conn, delivery)
        return delivery

    async def redeliver(self, agent_id: str, ref: str) -> None:
        """Send an existing delivery again (same ``ref``, same token) on the live connection."""
        conn = self.active[agent_id]
        await self._send_delivery(conn, self.deliveries[(agent_id, ref)])

    async def command(
        self, agent_id: str, cmd_type: str, params: dict[str, Any], **claims: Any
    ) -> Delivery:
        """Mint a command for ``agent_id`` and deliver it under ``ref`` = its jti."""
        token, _ = self.signer.mint(agent_id, cmd_type, params, **claims)
        return await self.deliver(agent_id, token)

    def _is_own(self, token: str) -> bool:
        try:
            header = json.loads(b64url_decode(token.split(".", maxsplit=1)[0]))
        except (ValueError, IndexError):
            return False
        return isinstance(header, dict) and header.get("kid") == self.signer.kid

    async def _send_delivery(self, conn: AgentConnection, delivery: Delivery) -> None:
        delivery.sent_count += 1
        await self.send(conn, {"type": "command", "ref": delivery.ref, "token": delivery.token})

    # -- sending --------------------------------------------------------------------------------

    async def send(self, conn: AgentConnection, frame: dict[str, Any]) -> None:
        """Send one frame; §3 limits it to 65,536 bytes; §4.3 bounds the write to 10 s."""
        text = encode_frame(frame)
        if len(text.encode("utf-8")) > MAX_FRAME_TO_AGENT:
            raise ValueError(f"a {frame['type']} frame exceeds {MAX_FRAME_TO_AGENT} bytes")
        conn.sent.append(frame)
        await self.send_raw(conn, text)

    async def send_raw(self, conn: AgentConnection, data: str | bytes) -> None:
        """Send a message as is (tests use this for deliberately broken frames)."""
        try:
            await asyncio.wait_for(conn.ws.send(data), self.send_timeout)
        except TimeoutError:
            self._abort(conn)
        except ConnectionClosed:
            pass

    async def drop(self, conn: AgentConnection, *, code: int = CLOSE_NORMAL) -> None:
        """Close a connection from the control plane's side and wait until it is gone."""
        conn.close_code_sent = code
        await conn.ws.close(code, "dropped by the control plane")
        await asyncio.wait_for(conn.closed.wait(), self.send_timeout)

    def _abort(self, conn: AgentConnection) -> None:
        conn.aborted = True
        conn.ws.transport.abort()

    # -- connection handling (§4) ---------------------------------------------------------------

    @staticmethod
    def _identity(ws: ServerConnection) -> str | None:
        """§2: the subject CN of the verified client certificate, nothing else."""
        ssl_object = ws.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return None
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            return None
        value = names[0].value
        if not isinstance(value, str) or AGENT_ID.fullmatch(value) is None:
            return None
        return value

    async def _handle(self, ws: ServerConnection) -> None:
        ssl_object = ws.transport.get_extra_info("ssl_object")
        cipher = ssl_object.cipher() if ssl_object is not None else None
        agent_id = self._identity(ws)
        conn = AgentConnection(
            id=next(self._ids),
            agent_id=agent_id or "",
            ws=ws,
            request_headers=ws.request.headers if ws.request is not None else Headers(),
            tls_version=ssl_object.version() if ssl_object is not None else None,
            cipher=cipher[0] if cipher else None,
        )
        self.connections.append(conn)
        self._notify()
        try:
            if agent_id is None:
                await self._close(conn, CLOSE_HANDSHAKE_ERROR, "bad identity")
                return
            if not await self._handshake(conn):
                return
            await self._serve(conn)
        finally:
            if self.active.get(conn.agent_id) is conn:
                del self.active[conn.agent_id]
            rcvd = ws.protocol.close_rcvd
            conn.close_code_received = rcvd.code if rcvd is not None else None
            conn.closed.set()
            self._notify()

    async def _close(self, conn: AgentConnection, code: int, reason: str) -> None:
        conn.close_code_sent = code
        await conn.ws.close(code, reason)

    async def _handshake(self, conn: AgentConnection) -> bool:
        """§4.1: wait for hello, answer welcome. False if the connection was closed."""
        try:
            first = await asyncio.wait_for(conn.ws.recv(), self.handshake_timeout)
        except TimeoutError:
            await self._close(conn, CLOSE_HANDSHAKE_TIMEOUT, "no hello in time")
            return False
        except ConnectionClosed:
            return False
        conn.raw_received.append(first)
        conn.last_rx = time.monotonic()
        try:
            if not isinstance(first, str):
                raise MalformedFrame("the first frame is binary")
            hello = parse_frame(first)
            if hello["type"] != "hello":
                raise MalformedFrame(f"the first frame is {hello['type']!r}, not 'hello'")
            _require(hello, "protocol", _is_int, "an integer")
        except MalformedFrame as exc:
            await self._send_error(conn, "protocol_error", str(exc))
            await self._close(conn, CLOSE_HANDSHAKE_ERROR, "expected hello")
            return False
        conn.hello = hello
        self._notify()
        if hello["protocol"] != PROTOCOL_VERSION:
            await self._send_error(
                conn, "unsupported_protocol", f"protocol {hello['protocol']} is not supported"
            )
            await self._close(conn, CLOSE_UNSUPPORTED_PROTOCOL, "unsupported protocol")
            return False
        try:
            validate_hello(hello)
        except MalformedFrame as exc:
            await self._send_error(conn, "malformed_frame", str(exc))
            await self._close(conn, CLOSE_HANDSHAKE_ERROR, "invalid hello")
            return False
        if self.withhold_welcome:
            await conn.ws.wait_closed()
            return False
        previous = self.active.get(conn.agent_id)
        self.active[conn.agent_id] = conn
        if previous is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._close(previous, CLOSE_SUPERSEDED, "superseded")
        for frame in self.before_welcome:
            await self.send(conn, frame)
        welcome = {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "agent_id": conn.agent_id,
            "server_time": time.time(),
            "heartbeat_interval": self.heartbeat_interval,
        }
        await self.send(conn, welcome | self.welcome_overrides)
        conn.ready = True
        self._notify()
        for delivery in list(self.deliveries.values()):
            if delivery.agent_id == conn.agent_id and delivery.wants_delivery:
                await self._send_delivery(conn, delivery)
        return True

    async def _serve(self, conn: AgentConnection) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(conn))
        try:
            async for message in conn.ws:
                conn.last_rx = time.monotonic()
                conn.raw_received.append(message)
                await self._on_message(conn, message)
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat(self, conn: AgentConnection) -> None:
        """§4.3: ping every interval; abort when nothing arrived for the heartbeat timeout."""
        for ping_id in itertools.count(1):
            await asyncio.sleep(self.heartbeat_interval)
            if self.silent:
                continue
            if time.monotonic() - conn.last_rx > self.heartbeat_timeout:
                self._abort(conn)
                return
            await self.send(conn, {"type": "ping", "id": ping_id})

    async def _send_error(
        self, conn: AgentConnection, code: str, message: str, ref: str | None = None
    ) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message[:MAX_TEXT]}
        if ref is not None:
            frame["ref"] = ref
        await self.send(conn, frame)

    async def _on_message(self, conn: AgentConnection, message: str | bytes) -> None:
        if self.silent:
            with contextlib.suppress(MalformedFrame):
                conn.received.append(parse_frame(message) if isinstance(message, str) else {})
            return
        if isinstance(message, bytes):
            await self._send_error(conn, "unsupported_frame", "binary messages are reserved")
            return
        try:
            frame = parse_frame(message)
        except MalformedFrame as exc:
            await self._send_error(conn, "malformed_frame", str(exc))
            return
        kind = frame["type"]
        if kind == "hello":
            await self._send_error(conn, "unexpected_frame", "hello after the handshake")
            return
        if kind not in _CP_ACCEPTS:
            await self._send_error(conn, "unknown_frame_type", f"unknown frame type {kind!r}")
            return
        try:
            validate_agent_frame(frame)
        except MalformedFrame as exc:
            await self._send_error(conn, "malformed_frame", str(exc))
            return
        conn.received.append(frame)
        if kind == "ping":
            await self.send(conn, {"type": "pong", "id": frame["id"]})
        elif kind in ("status", "delivery_rejected"):
            self._store(conn.agent_id, frame)
            if self.ack_enabled:
                await self._ack(conn, frame["seq"])
        elif kind == "anchor":  # kept, then acknowledged like any outbox frame (§6.5)
            self.anchors.append((conn.agent_id, frame["audit_seq"], frame["audit_hash"]))
            if self.ack_enabled:
                await self._ack(conn, frame["seq"])

    async def _ack(self, conn: AgentConnection, seq: int) -> None:
        key = (conn.agent_id, seq)
        await self.send(conn, {"type": "ack", "seq": seq})
        self.ack_counts[key] = self.ack_counts.get(key, 0) + 1
        conn.acked.append(seq)

    # -- storage and deduplication (§6.3) --------------------------------------------------------

    def _store(self, agent_id: str, frame: dict[str, Any]) -> None:
        """Apply an outbox frame once, durably, before it is acknowledged.

        §6.3: statuses are deduplicated by (agent, ref, state), delivery_rejected frames by
        (agent, ref, reason). ``seq`` is not used, so an agent whose state was reset (seq from 1
        again) is not silently ignored.
        """
        delivery = self.deliveries.get((agent_id, frame["ref"]))
        if delivery is None:
            # Not a delivery we addressed to *this* agent: stored, never applied.
            if (agent_id, frame) not in self.unmatched:
                self._journal({"kind": "frame", "agent": agent_id, "frame": frame})
                self.unmatched.append((agent_id, frame))
            return
        if frame["type"] == "status":
            self._apply_status(delivery, frame)
            return
        key = (agent_id, frame["ref"], frame["reason"])
        if key not in self.seen_rejections:
            self.seen_rejections.add(key)
            self._apply_rejection(delivery, frame)

    def _apply_status(self, delivery: Delivery, frame: dict[str, Any]) -> None:
        if delivery.jti is not None and frame["jti"] != delivery.jti:
            if (delivery.agent_id, frame) not in self.unmatched:  # §6.3 SHOULD ignore
                self._journal({"kind": "frame", "agent": delivery.agent_id, "frame": frame})
                self.unmatched.append((delivery.agent_id, frame))
            return
        state = frame["state"]
        if state in delivery.states:
            return  # the same (agent, ref, state) again: applied once
        if delivery.final:
            return  # a final state never changes
        current = delivery.state
        if current is not None and STATE_RANK[state] <= STATE_RANK[current]:
            return  # states only move forward
        self._journal({"kind": "frame", "agent": delivery.agent_id, "frame": frame})
        delivery.states.append(state)
        delivery.status_frames.append(frame)
        delivery.refused = None

    def _apply_rejection(self, delivery: Delivery, frame: dict[str, Any]) -> None:
        self._journal({"kind": "frame", "agent": delivery.agent_id, "frame": frame})
        delivery.rejections.append(frame)
        reason = frame["reason"]
        if reason in TRANSIENT_REJECTIONS or reason == "duplicate_delivery":
            return  # try again later / statuses arrive as usual (§6.4, §8.2)
        if not delivery.states:  # never overrides a status (§6.4)
            delivery.refused = reason

    def _journal(self, record: dict[str, Any]) -> None:
        if self.journal is None or self._replaying:
            return
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(encode_frame(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _replay_journal(self, path: Path) -> None:
        self._replaying = True
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record["kind"] == "delivery":
                    key = (record["agent"], record["ref"])
                    token = record["token"]
                    self.deliveries[key] = Delivery(
                        agent_id=key[0], ref=key[1], token=token, jti=claimed_jti(token)
                    )
                else:
                    self._store(record["agent"], record["frame"])
        finally:
            self._replaying = False
