"""The operator API: HTTP + JSON, bound to loopback. The ``cp-stub`` CLI and the console
(:mod:`control_plane_stub.console`) are its clients.

    GET  /v1/healthz
    GET  /v1/agents                                   all agents ever seen, with the fleet view:
                                                      connected (live), agent_version,
                                                      certificate_not_after, last_heard,
                                                      last_anchor {audit_seq, audit_hash, age},
                                                      clock_offset (see AGENT FIELDS below)
    GET  /v1/agents/{agent_id}?wait_connected=S       one agent; optionally wait until connected
    GET  /v1/agents/{agent_id}/anchors?limit=&before= audit chain heads the agent reported,
                                                      highest seq first, at most limit (100,
                                                      up to 1000) a page; "next" is the before=
                                                      cursor of the next page, null at the end
    GET  /v1/agents/{agent_id}/streams                its forwards (live byte counters) and its
                                                      open_stream grants (bytes each way, final)
    GET  /v1/agents/{agent_id}/metrics?collections=N  per replica, from its last N (20, up to
                                                      100) collect_metrics results: a memory
                                                      series and the latest figures; the host's
    POST /v1/agents/{agent_id}/keyset                 {"token"}: offer a signed key set
    GET  /v1/agents/{agent_id}/keyset?wait_answer=S   what was offered and what the agent said
    POST /v1/agents/{agent_id}/commands               {"type", "params", "ttl"?}: sign and queue.
                                                      With an Idempotency-Key header (1..128
                                                      visible ASCII characters), a retry
                                                      returns the command stored the first time
                                                      (200, Idempotent-Replayed: true) instead
                                                      of signing another; the same key with
                                                      another body is refused (422)
    POST /v1/agents/{agent_id}/commands/signed        {"token"}: relay a token signed elsewhere
    POST /v1/agents/{agent_id}/enroll-token           {"ttl"?}: a one-time bootstrap token
    POST /v1/agents/{agent_id}/revoke                 revoke its certificates, close its session
    GET  /v1/agents/{agent_id}/certificates           certificates issued to it
    POST /v1/agents/{agent_id}/forwards               {"target", "listen", "max_duration"?}: a
                                                      loopback listener whose connections are
                                                      carried to target through the agent
    GET  /v1/forwards                                 forwards and their counters
    GET  /v1/forwards/{id}?after=N&wait=S             one forward; "outcomes": how its latest
                                                      connections ended (n, ok, outcome, and
                                                      for a connection given no stream the
                                                      reason and detail: policy_denied,
                                                      target_unreachable, ...); with wait, the
                                                      answer waits until a connection numbered
                                                      above N has ended (or the forward stops)
    DELETE /v1/forwards/{id}                          stop a forward (closes its connections)
    GET  /v1/commands?agent_id=&final=1&state=&type=&limit=&timeline=1
                                                      newest first; with timeline=1 each has its
                                                      "timeline" and "receipt" (as below)
    GET  /v1/commands/{ref}?wait_for=STATE&timeout=S&include_token=1
                                                      one command and its status history; with
                                                      wait_for (received, pending_approval,
                                                      running, final) the answer waits until the
                                                      command got that far. "timeline": every
                                                      step (queued, delivered, then what the
                                                      agent reported), "receipt_verified":
                                                      true, false or null (no receipt)
    GET  /v1/events?agent_id=                         server-sent events (text/event-stream):
                                                      "agent" {agent_id, connected,
                                                      agent_version, audit_seq} and "command"
                                                      {ref, agent_id, type, state, reason} when
                                                      they change; "tick" {at} after 10 s of
                                                      quiet (the page's ages move on)

AGENT FIELDS (beyond the registry's): ``connected`` is whether the agent has a session now;
``last_heard`` when its last frame (pings included) arrived, or its last session ended;
``certificate_not_after`` the expiry of the certificate it connected with; ``clock_offset``
its clock minus the stub's in seconds, estimated from its latest reports (each says when the
agent wrote it): too low by at most a report's delay on the way, null before any report.
Times are Unix times on the stub's clock; ages and durations in seconds.

Errors are ``{"error": code, "message": text}`` with a 4xx status.

IDEMPOTENCY: an operator whose POST got no answer (the stub crashed after storing the command,
the connection broke) cannot tell whether the command was stored; sending it again without a
key would sign a second command under a new jti, which the agent would run as another command.
With the same ``Idempotency-Key`` the stub answers with the command it stored the first time
(keys are per agent, kept with the command in one transaction, and never expire).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import jwt
from aiohttp import web

from agent.config import AGENT_ID_PATTERN
from agent.core.commands import MAX_STREAM_DURATION
from agent.core.frames import MAX_TOKEN_CHARS
from agent.core.session import CloseCode
from agent.core.verifier import peek
from control_plane_stub import overview
from control_plane_stub.enrollment import TOKEN_TTL, CertificateAuthority
from control_plane_stub.errors import (
    BadRequest,
    IdempotencyKeyReused,
    IdempotencyKeyTaken,
    StubError,
    UnknownAgent,
    UnknownCommand,
    UnknownForward,
)
from control_plane_stub.hub import Hub
from control_plane_stub.signer import DEFAULT_TTL, CommandSigner
from control_plane_stub.store import RANK, CommandRecord, StubStore
from control_plane_stub.streams import StreamBroker

MAX_WAIT: Final = 600.0
IDEMPOTENCY_KEY: Final = "Idempotency-Key"
REPLAYED: Final = "Idempotent-Replayed"
_IDEMPOTENCY_KEY_FORM: Final = re.compile(r"[\x21-\x7e]{1,128}")
DEFAULT_STREAM_DURATION: Final = 600
ANCHORS_PAGE: Final = 100
MAX_ANCHORS_PAGE: Final = 1000
MAX_COLLECTIONS: Final = 100
EVENT_TICK: Final = 10.0
"""Seconds of quiet after which an event stream sends a ``tick``."""
WATCHED_COMMANDS: Final = 100
"""An event stream compares the states of the commands that changed last, this many."""
WAIT_TARGETS: Final = {
    "received": RANK["received"],
    "pending_approval": RANK["pending_approval"],
    "running": RANK["running"],
    "final": RANK["succeeded"],
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "[::1]"})


def host_name(host: str) -> str:
    """``127.0.0.1:8080`` -> ``127.0.0.1``; ``[::1]:8080`` -> ``[::1]``."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0]


@web.middleware
async def _same_machine_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API has no authentication and lives on loopback; keep browsers out too.

    A web page in the operator's browser could otherwise POST here (a "simple" cross-site
    request needs no preflight) or reach it through DNS rebinding. So the Host header must name
    a loopback host, and a request with a body must be ``application/json``, which a cross-site
    page cannot send without a CORS preflight that this API never answers."""
    if host_name(request.host) not in LOOPBACK_HOSTS:
        return web.json_response(
            {"error": "forbidden", "message": f"Host {request.host!r} is not loopback"},
            status=403,
        )
    if request.method not in ("GET", "HEAD") and request.content_type != "application/json":
        return web.json_response(
            {"error": "unsupported_media_type", "message": "send application/json"},
            status=415,
        )
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (UnknownAgent, UnknownCommand, UnknownForward) as exc:
        return web.json_response({"error": "not_found", "message": str(exc)}, status=404)
    except IdempotencyKeyReused as exc:
        return web.json_response(
            {"error": "idempotency_key_reused", "message": str(exc)}, status=422
        )
    except BadRequest as exc:
        return web.json_response({"error": "bad_request", "message": str(exc)}, status=400)
    except StubError as exc:
        return web.json_response({"error": "stub_error", "message": str(exc)}, status=500)


def _agent_id(request: web.Request) -> str:
    agent_id = request.match_info["agent_id"]
    if not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise BadRequest(f"{agent_id!r} is not a valid agent id")
    return agent_id


def _number(request: web.Request, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise BadRequest(f"{name} must be a number") from exc
    if not 0 <= value <= high:
        raise BadRequest(f"{name} must be in [0, {high}]")
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest("body must be JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


class OperatorApi:
    def __init__(
        self,
        store: StubStore,
        hub: Hub,
        signer: CommandSigner,
        streams: StreamBroker,
        ca: CertificateAuthority | None = None,
    ) -> None:
        self._streams = streams
        self._ca = ca
        self._store = store
        self._hub = hub
        self._signer = signer
        self.app = web.Application(
            middlewares=[_same_machine_only, _errors], client_max_size=2 * MAX_TOKEN_CHARS
        )
        self.app.add_routes(
            [
                web.get("/v1/healthz", self.healthz),
                web.get("/v1/agents", self.list_agents),
                web.get("/v1/agents/{agent_id}", self.get_agent),
                web.get("/v1/agents/{agent_id}/anchors", self.list_anchors),
                web.get("/v1/agents/{agent_id}/streams", self.list_streams),
                web.get("/v1/agents/{agent_id}/metrics", self.get_metrics),
                web.post("/v1/agents/{agent_id}/keyset", self.push_keyset),
                web.get("/v1/agents/{agent_id}/keyset", self.get_keyset),
                web.post("/v1/agents/{agent_id}/commands", self.send_command),
                web.post("/v1/agents/{agent_id}/commands/signed", self.relay_command),
                web.post("/v1/agents/{agent_id}/forwards", self.start_forward),
                web.post("/v1/agents/{agent_id}/enroll-token", self.enroll_token),
                web.post("/v1/agents/{agent_id}/revoke", self.revoke),
                web.get("/v1/agents/{agent_id}/certificates", self.certificates),
                web.get("/v1/forwards", self.list_forwards),
                web.get("/v1/forwards/{forward_id}", self.get_forward),
                web.delete("/v1/forwards/{forward_id}", self.stop_forward),
                web.get("/v1/commands", self.list_commands),
                web.get("/v1/commands/{ref}", self.get_command),
                web.get("/v1/events", self.events),
            ]
        )
        self.closing = asyncio.Event()
        """Set when the stub shuts down: event streams end."""
        self.app.on_shutdown.append(self.end_streams)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "agents_connected": len(self._hub.links)})

    async def list_agents(self, request: web.Request) -> web.Response:
        return web.json_response({"agents": self.fleet()})

    # -- views: used by the JSON routes here and by the console's pages -------------------

    def _last_heard(self, agent_id: str) -> float | None:
        """When the agent's last frame arrived (this stub's clock), if it is connected."""
        link = self._hub.links.get(agent_id)
        if link is None:
            return None
        since = asyncio.get_running_loop().time() - link.timer.last_received
        return time.time() - since

    def _agent_view(self, agent: dict[str, Any], now: float) -> dict[str, object]:
        agent_id = str(agent["agent_id"])
        live = agent_id in self._hub.links
        sha256 = agent.get("cert_sha256")
        since = agent.get("connected_since") if live else None
        return overview.agent_view(
            agent,
            live=live,
            last_heard=self._last_heard(agent_id),
            certificate_der=self._store.certificate(str(sha256)) if sha256 else None,
            anchors=self._store.anchors(agent_id, 1),
            clock_samples=self._store.clock_samples(
                agent_id, since=float(since or 0.0), limit=overview.CLOCK_SAMPLES
            ),
            now=now,
        )

    def fleet(self) -> list[dict[str, object]]:
        """Every agent ever seen, with what the fleet view adds (see AGENT FIELDS)."""
        now = time.time()
        return [self._agent_view(agent, now) for agent in self._store.agents()]

    def agent(self, agent_id: str) -> dict[str, object]:
        agent = self._find_agent(agent_id)
        if agent is None:
            raise UnknownAgent(f"agent {agent_id!r} has never connected")
        return self._agent_view(agent, time.time())

    def command_views(self, agent_id: str | None, limit: int = 50) -> list[dict[str, object]]:
        """Recent commands, newest first, each with its timeline and receipt check."""
        return self._views(self._store.commands(agent_id=agent_id, limit=limit))

    def _views(self, records: list[CommandRecord]) -> list[dict[str, object]]:
        refs = [r.ref for r in records]
        histories = self._store.histories(refs)
        receipts = self._store.receipts(refs)
        return [
            overview.command_view(r, histories.get(r.ref, []), receipts.get(r.ref)) for r in records
        ]

    def command_view(self, ref: str) -> dict[str, object]:
        (view,) = self._views([self._store.get(ref)])
        return view

    def refusals(self, agent_id: str, limit: int = 20) -> list[dict[str, object]]:
        """The agent's latest refusals (commands it rejected), newest first, with reasons."""
        rejected = self._store.commands(agent_id=agent_id, state="rejected", limit=limit)
        return overview.refusals(r.to_json() for r in rejected)

    def pending_approvals(self, agent_id: str, limit: int = 50) -> list[dict[str, object]]:
        waiting = self._store.commands(agent_id=agent_id, state="pending_approval", limit=limit)
        return overview.pending_approvals(r.to_json() for r in waiting)

    def anchors(self, agent_id: str, limit: int) -> list[dict[str, object]]:
        return self._store.anchors(agent_id, limit)

    def streams(self, agent_id: str) -> dict[str, object]:
        """The agent's forwards (live counters: bytes to and from the agent) and its stream
        grants (bytes to and from the target, as the agent reports them when a stream ends)."""
        forwards = [f.to_json() for f in self._streams.forwards.values() if f.agent_id == agent_id]
        grants = self._store.commands(agent_id=agent_id, command_type="open_stream", limit=50)
        return {"forwards": forwards, "grants": overview.stream_grants(grants)}

    def metrics(
        self, agent_id: str, collections: int = overview.METRIC_COLLECTIONS
    ) -> dict[str, object]:
        records = self._store.commands(
            agent_id=agent_id, command_type="collect_metrics", state="succeeded", limit=collections
        )
        results = [
            (r.updated_at, (r.result or {}).get("samples") or [])
            for r in records
            if isinstance((r.result or {}).get("samples"), list)
        ]
        return overview.replica_metrics(results)

    async def queue_command(
        self,
        agent_id: str,
        command_type: str,
        params: dict[str, Any],
        ttl: int = DEFAULT_TTL,
        *,
        idempotency: tuple[str, str] | None = None,
    ) -> CommandRecord:
        """Sign a command with the stub's key and queue it for the agent (what ``cp-stub send``
        and the console's forms do). ``idempotency``: ``(key, request fingerprint)`` to store
        with it (see IDEMPOTENCY). It is on disk before it is delivered or answered."""
        signed = self._signer.sign(
            agent_id=agent_id, command_type=command_type, params=params, now=time.time(), ttl=ttl
        )
        record = self._store.add_command(
            ref=signed.jti,
            agent_id=agent_id,
            token=signed.token,
            origin="signed",
            jti=signed.jti,
            command_type=command_type,
            params=params,
            idempotency=idempotency,
        )
        await self._store.wait_durable()
        self._hub.kick(agent_id)
        return record

    def _snapshot(self, agent_id: str | None) -> overview.Snapshot:
        agents = self._store.agents()
        if agent_id is not None:
            agents = [a for a in agents if a["agent_id"] == agent_id]
        return overview.snapshot(
            agents,
            self._hub.links,
            self._store.anchor_heads(),
            self._store.recently_updated(agent_id, WATCHED_COMMANDS),
        )

    def _change_mark(self) -> tuple[object, ...]:
        return (*self._store.change_mark(), len(self._hub.links))

    def _moved_on(self, mark: tuple[object, ...]) -> bool:
        """Something changed since ``mark``, or the stub is shutting down."""
        return self.closing.is_set() or self._change_mark() != mark

    def changes(
        self, agent_id: str | None = None, *, tick: float = EVENT_TICK
    ) -> AsyncIterator[tuple[str, dict[str, object]]]:
        """Events as agents and commands change (all of them, or one agent's) from now on,
        until the stub shuts down; a ``tick`` after ``tick`` seconds without any. "Now" is this
        call: the state it compares with is read here, before the first event is awaited."""
        seen = self._snapshot(agent_id)
        mark = self._change_mark()

        async def follow() -> AsyncIterator[tuple[str, dict[str, object]]]:
            nonlocal seen, mark
            while not self.closing.is_set():
                moved = await self._until(functools.partial(self._moved_on, mark), tick)
                if self.closing.is_set():
                    return
                # On a tick too: a change the mark cannot see (the clock stepped back between
                # two updates) is found there at the latest.
                mark = self._change_mark()
                current = self._snapshot(agent_id)
                for event in overview.changes(seen, current):
                    yield event
                seen = current
                if not moved:
                    yield "tick", {"at": time.time()}

        return follow()

    async def end_streams(self, app: web.Application) -> None:
        """End the event streams (the stub is shutting down)."""
        self.closing.set()
        await self._hub.notify()

    def _find_agent(self, agent_id: str) -> dict[str, object] | None:
        return next((a for a in self._store.agents() if a["agent_id"] == agent_id), None)

    async def get_agent(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        wait = _number(request, "wait_connected", 0.0, MAX_WAIT)
        await self._until(lambda: agent_id in self._hub.links, wait)
        return web.json_response({"agent": self.agent(agent_id)})

    async def list_anchors(self, request: web.Request) -> web.Response:
        limit = int(_number(request, "limit", ANCHORS_PAGE, MAX_ANCHORS_PAGE))
        if limit < 1:
            raise BadRequest("limit must be at least 1")
        page = self._store.anchors(_agent_id(request), limit, before=request.query.get("before"))
        after = page[-1]["cursor"] if len(page) == limit else None
        return web.json_response({"anchors": page, "next": after})

    async def list_streams(self, request: web.Request) -> web.Response:
        return web.json_response(self.streams(_agent_id(request)))

    async def get_metrics(self, request: web.Request) -> web.Response:
        collections = int(
            _number(request, "collections", overview.METRIC_COLLECTIONS, MAX_COLLECTIONS)
        )
        return web.json_response(self.metrics(_agent_id(request), max(1, collections)))

    async def events(self, request: web.Request) -> web.StreamResponse:
        agent_id = request.query.get("agent_id")
        if agent_id is not None and not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise BadRequest(f"{agent_id[:80]!r} is not a valid agent id")
        return await event_stream(request, self.changes(agent_id))

    async def push_keyset(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        body = await _json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise BadRequest("'token' must be a signed key set")
        try:  # for display and delivery decisions only: the agent is the one that verifies
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise BadRequest(f"not a JWS: {exc}") from exc
        version = claims.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadRequest("the key set has no integer version")
        self._store.offer_keyset(agent_id, version, token)
        await self._store.wait_durable()  # offered for good before anyone is told
        sent = await self._hub.push_keyset(agent_id, token)
        return web.json_response({"version": version, "sent": sent}, status=202)

    async def get_keyset(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        if self._store.keyset(agent_id) is None:
            raise UnknownAgent(f"no key set was offered to {agent_id!r}")
        wait = _number(request, "wait_answer", 0.0, MAX_WAIT)

        def answered() -> bool:
            offered = self._store.keyset(agent_id)
            return offered is not None and offered["last_result"] is not None

        await self._until(answered, wait)
        keyset = self._store.keyset(agent_id)
        assert keyset is not None  # noqa: S101  # offers are never deleted
        keyset.pop("token", None)
        return web.json_response({"keyset": keyset})

    async def send_command(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        body = await _json_body(request)
        command_type = body.get("type")
        params = body.get("params", {})
        ttl = body.get("ttl", DEFAULT_TTL)
        if not isinstance(command_type, str) or not command_type:
            raise BadRequest("'type' must be a non-empty string")
        if not isinstance(params, dict):
            raise BadRequest("'params' must be an object")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 86400:
            raise BadRequest("'ttl' must be an integer number of seconds in 1..86400")
        key = request.headers.get(IDEMPOTENCY_KEY)
        idempotency = None
        if key is not None:
            if not _IDEMPOTENCY_KEY_FORM.fullmatch(key):
                raise BadRequest(f"{IDEMPOTENCY_KEY} must be 1..128 visible ASCII characters")
            fingerprint = hashlib.sha256(
                json.dumps([command_type, params, ttl], sort_keys=True).encode()
            ).hexdigest()
            idempotency = (key, fingerprint)
        try:
            record = await self.queue_command(
                agent_id, command_type, params, ttl, idempotency=idempotency
            )
        except IdempotencyKeyTaken as taken:  # the store claims keys atomically
            if idempotency is None or taken.fingerprint != idempotency[1]:
                raise IdempotencyKeyReused(
                    f"{IDEMPOTENCY_KEY} {key!r} came with another command first ({taken.ref}); "
                    "use a new key for a new command"
                ) from taken
            await self._store.wait_durable()  # the first request may still be waiting for it
            return web.json_response(
                {"command": self._store.get(taken.ref).to_json(), "replayed": True},
                headers={REPLAYED: "true"},
            )
        return web.json_response({"command": record.to_json()}, status=201)

    async def relay_command(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        body = await _json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise BadRequest(f"'token' must be a string of 1..{MAX_TOKEN_CHARS} characters")
        claimed = peek(token)  # for display only: the agent is the one that verifies
        record = self._store.add_command(
            ref=f"relay-{uuid.uuid4().hex}",
            agent_id=agent_id,
            token=token,
            origin="relayed",
            jti=claimed.jti,
            command_type=claimed.type,
            params=dict(claimed.params) if claimed.params is not None else None,
        )
        await self._store.wait_durable()
        self._hub.kick(agent_id)
        return web.json_response({"command": record.to_json()}, status=201)

    async def start_forward(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        body = await _json_body(request)
        target = body.get("target")
        listen = body.get("listen", "127.0.0.1:0")
        max_duration = body.get("max_duration", DEFAULT_STREAM_DURATION)
        if not isinstance(target, str) or not isinstance(listen, str):
            raise BadRequest("'target' and 'listen' must be strings (host:port)")
        if (
            not isinstance(max_duration, int)
            or isinstance(max_duration, bool)
            or not 1 <= max_duration <= MAX_STREAM_DURATION
        ):
            raise BadRequest(f"'max_duration' must be an integer in 1..{MAX_STREAM_DURATION}")
        forward = await self._streams.start_forward(agent_id, target, listen, max_duration)
        return web.json_response({"forward": forward.to_json()}, status=201)

    def _authority(self) -> CertificateAuthority:
        if self._ca is None:
            raise BadRequest("this stub holds no agent CA key (serve it with --pki)")
        return self._ca

    async def enroll_token(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        body = await _json_body(request)
        ttl = body.get("ttl", TOKEN_TTL)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 86400:
            raise BadRequest("'ttl' must be an integer number of seconds in 1..86400")
        now = time.time()
        token = self._authority().make_token(agent_id, ttl=ttl, now=now)
        return web.json_response(
            {"agent_id": agent_id, "token": token, "expires_at": now + ttl}, status=201
        )

    async def revoke(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        revoked = self._authority().revoke(agent_id, now=time.time())
        disconnected = self._hub.disconnect(
            agent_id, CloseCode.CERTIFICATE_REVOKED, "certificate revoked"
        )
        return web.json_response({"revoked": revoked, "disconnected": disconnected})

    async def certificates(self, request: web.Request) -> web.Response:
        return web.json_response({"certificates": self._authority().issued(_agent_id(request))})

    async def list_forwards(self, request: web.Request) -> web.Response:
        forwards = [f.to_json() for f in self._streams.forwards.values()]
        return web.json_response({"forwards": forwards})

    async def get_forward(self, request: web.Request) -> web.Response:
        forward_id = request.match_info["forward_id"]
        after = int(_number(request, "after", 0, 2**53))
        wait = _number(request, "wait", 0.0, MAX_WAIT)
        forwards = self._streams.forwards
        if forward_id not in forwards:
            raise UnknownForward(f"no forward {forward_id!r}")

        def moved_on() -> bool:
            forward = forwards.get(forward_id)
            return forward is None or any(o.n > after for o in forward.outcomes)

        await self._until(moved_on, wait)
        forward = forwards.get(forward_id)
        if forward is None:
            raise UnknownForward(f"forward {forward_id!r} was stopped")
        return web.json_response({"forward": forward.to_json()})

    async def stop_forward(self, request: web.Request) -> web.Response:
        forward = await self._streams.stop_forward(request.match_info["forward_id"])
        return web.json_response({"forward": forward.to_json()})

    async def list_commands(self, request: web.Request) -> web.Response:
        agent_id = request.query.get("agent_id")
        final_only = request.query.get("final") in ("1", "true")
        limit = int(_number(request, "limit", 50, 10_000))
        records = self._store.commands(
            agent_id=agent_id,
            final_only=final_only,
            limit=limit,
            command_type=request.query.get("type"),
            state=request.query.get("state"),
        )
        if request.query.get("timeline") in ("1", "true"):
            return web.json_response({"commands": self._views(records)})
        return web.json_response({"commands": [r.to_json() for r in records]})

    async def get_command(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        target = request.query.get("wait_for")
        if target is not None and target not in WAIT_TARGETS:
            raise BadRequest(f"wait_for must be one of {sorted(WAIT_TARGETS)}")
        timeout = _number(request, "timeout", 30.0, MAX_WAIT)
        self._store.get(ref)  # 404 before waiting for a command that does not exist
        timed_out = False
        if target is not None:
            rank = WAIT_TARGETS[target]
            timed_out = not await self._until(
                lambda: RANK.get(self._store.get(ref).state, 0) >= rank, timeout
            )
        record = self._store.get(ref)
        history = self._store.history(ref)
        receipt = self._store.receipt(ref)
        return web.json_response(
            {
                "command": record.to_json(with_token=request.query.get("include_token") == "1"),
                "history": history,
                "timeline": overview.timeline(record, history),
                "receipt": receipt,
                "receipt_verified": overview.receipt_view(receipt, record.state)["verified"],
                "timed_out": timed_out,
            }
        )

    async def _until(self, condition: Callable[[], bool], seconds: float) -> bool:
        """Wait until ``condition()`` holds (re-checked on every change); False on timeout."""
        try:
            async with asyncio.timeout(seconds), self._hub.changed:
                await self._hub.changed.wait_for(condition)
        except TimeoutError:
            return condition()
        return True


async def event_stream(
    request: web.Request, events: AsyncIterator[tuple[str, dict[str, object]]]
) -> web.StreamResponse:
    """Serve ``events`` as server-sent events (``event:`` name, ``data:`` one line of JSON)
    until they end or the client goes away."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    try:
        async for name, data in events:
            payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
            await response.write(f"event: {name}\ndata: {payload}\n\n".encode())
    except ConnectionResetError:
        pass  # the client went away
    return response
