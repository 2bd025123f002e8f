"""The operator API: HTTP + JSON, bound to loopback. The ``cp-stub`` CLI is a client of it.

    GET  /v1/healthz
    GET  /v1/agents                                   all agents ever seen
    GET  /v1/agents/{agent_id}?wait_connected=S       one agent; optionally wait until connected
    GET  /v1/agents/{agent_id}/anchors?limit=&before= audit chain heads the agent reported,
                                                      highest seq first, at most limit (100,
                                                      up to 1000) a page; "next" is the before=
                                                      cursor of the next page, null at the end
    POST /v1/agents/{agent_id}/keyset                 {"token"}: offer a signed key set
    GET  /v1/agents/{agent_id}/keyset?wait_answer=S   what was offered and what the agent said
    POST /v1/agents/{agent_id}/commands               {"type", "params", "ttl"?}: sign and queue
    POST /v1/agents/{agent_id}/commands/signed        {"token"}: relay a token signed elsewhere
    POST /v1/agents/{agent_id}/enroll-token           {"ttl"?}: a one-time bootstrap token
    POST /v1/agents/{agent_id}/revoke                 revoke its certificates, close its session
    GET  /v1/agents/{agent_id}/certificates           certificates issued to it
    POST /v1/agents/{agent_id}/forwards               {"target", "listen", "max_duration"?}: a
                                                      loopback listener whose connections are
                                                      carried to target through the agent
    GET  /v1/forwards                                 forwards and their counters
    DELETE /v1/forwards/{id}                          stop a forward (closes its connections)
    GET  /v1/commands?agent_id=&final=1&limit=        newest first
    GET  /v1/commands/{ref}?wait_for=STATE&timeout=S&include_token=1
                                                      one command and its status history; with
                                                      wait_for (received, pending_approval,
                                                      running, final) the answer waits until the
                                                      command got that far

Errors are ``{"error": code, "message": text}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import jwt
from aiohttp import web

from agent.config import AGENT_ID_PATTERN
from agent.core.commands import MAX_STREAM_DURATION
from agent.core.frames import MAX_TOKEN_CHARS
from agent.core.session import CloseCode
from agent.core.verifier import peek
from control_plane_stub.enrollment import TOKEN_TTL, CertificateAuthority
from control_plane_stub.errors import (
    BadRequest,
    StubError,
    UnknownAgent,
    UnknownCommand,
    UnknownForward,
)
from control_plane_stub.hub import Hub
from control_plane_stub.signer import DEFAULT_TTL, CommandSigner
from control_plane_stub.store import RANK, StubStore
from control_plane_stub.streams import StreamBroker

MAX_WAIT: Final = 600.0
DEFAULT_STREAM_DURATION: Final = 600
ANCHORS_PAGE: Final = 100
MAX_ANCHORS_PAGE: Final = 1000
WAIT_TARGETS: Final = {
    "received": RANK["received"],
    "pending_approval": RANK["pending_approval"],
    "running": RANK["running"],
    "final": RANK["succeeded"],
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "[::1]"})


def _host_name(host: str) -> str:
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
    if _host_name(request.host) not in LOOPBACK_HOSTS:
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
                web.post("/v1/agents/{agent_id}/keyset", self.push_keyset),
                web.get("/v1/agents/{agent_id}/keyset", self.get_keyset),
                web.post("/v1/agents/{agent_id}/commands", self.send_command),
                web.post("/v1/agents/{agent_id}/commands/signed", self.relay_command),
                web.post("/v1/agents/{agent_id}/forwards", self.start_forward),
                web.post("/v1/agents/{agent_id}/enroll-token", self.enroll_token),
                web.post("/v1/agents/{agent_id}/revoke", self.revoke),
                web.get("/v1/agents/{agent_id}/certificates", self.certificates),
                web.get("/v1/forwards", self.list_forwards),
                web.delete("/v1/forwards/{forward_id}", self.stop_forward),
                web.get("/v1/commands", self.list_commands),
                web.get("/v1/commands/{ref}", self.get_command),
            ]
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "agents_connected": len(self._hub.links)})

    async def list_agents(self, request: web.Request) -> web.Response:
        return web.json_response({"agents": self._store.agents()})

    def _find_agent(self, agent_id: str) -> dict[str, object] | None:
        return next((a for a in self._store.agents() if a["agent_id"] == agent_id), None)

    async def get_agent(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        wait = _number(request, "wait_connected", 0.0, MAX_WAIT)
        await self._until(lambda: agent_id in self._hub.links, wait)
        agent = self._find_agent(agent_id)
        if agent is None:
            raise UnknownAgent(f"agent {agent_id!r} has never connected")
        return web.json_response({"agent": agent})

    async def list_anchors(self, request: web.Request) -> web.Response:
        limit = int(_number(request, "limit", ANCHORS_PAGE, MAX_ANCHORS_PAGE))
        if limit < 1:
            raise BadRequest("limit must be at least 1")
        page = self._store.anchors(_agent_id(request), limit, before=request.query.get("before"))
        after = page[-1]["cursor"] if len(page) == limit else None
        return web.json_response({"anchors": page, "next": after})

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
        )
        self._hub.kick(agent_id)
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

    async def stop_forward(self, request: web.Request) -> web.Response:
        forward = await self._streams.stop_forward(request.match_info["forward_id"])
        return web.json_response({"forward": forward.to_json()})

    async def list_commands(self, request: web.Request) -> web.Response:
        agent_id = request.query.get("agent_id")
        final_only = request.query.get("final") in ("1", "true")
        limit = int(_number(request, "limit", 50, 10_000))
        records = self._store.commands(agent_id=agent_id, final_only=final_only, limit=limit)
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
        return web.json_response(
            {
                "command": record.to_json(with_token=request.query.get("include_token") == "1"),
                "history": self._store.history(ref),
                "receipt": self._store.receipt(ref),
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
