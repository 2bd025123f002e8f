"""The console's web application (aiohttp): the pages, the forms that send commands, the event
stream that keeps the pages current, and signing in.

Routes (every one but signing in and the stylesheet needs the token: a session cookie from
``/login``, or ``Authorization: Bearer TOKEN``)::

    GET  /login, POST /login, POST /logout       sign in with the token, sign out
    GET  /                                       the fleet
    GET  /agents/{agent_id}                      one agent: commands, refusals, metrics, streams
    GET  /agents/{agent_id}/commands/{ref}       one command: timeline, receipt, result
    POST /agents/{agent_id}/commands             send scale, upgrade or collect_metrics
                                                 (form fields: kind, replicas, version, target,
                                                 ttl; csrf with a session); 303 back to the
                                                 agent, or 201 JSON with Accept: application/json
    GET  /events?agent_id=                       the operator API's event stream (text/event-stream)
    GET  /static/console.css, /static/console.js, /static/favicon.svg

The data comes from the operator API's views (:class:`OperatorApi`), in process, so the pages
and ``/v1`` always agree; commands are signed and queued by the same call as ``POST
/v1/agents/{id}/commands``, with parameters built as ``cp-stub send`` builds them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web
from multidict import MultiDictProxy

from agent.config import AGENT_ID_PATTERN
from agent.core.targets import is_loopback_host
from control_plane_stub.api import OperatorApi, event_stream, host_name
from control_plane_stub.console.auth import SESSION_COOKIE, SESSION_LIFETIME, ConsoleAuth, Session
from control_plane_stub.console.render import environment
from control_plane_stub.errors import BadRequest, UnknownAgent, UnknownCommand
from control_plane_stub.operator_commands import operator_command, parse_replicas
from control_plane_stub.signer import DEFAULT_TTL

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: then a form post says Origin: null
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
PUBLIC: Final = frozenset(
    {
        ("GET", "/login"),
        ("HEAD", "/login"),
        ("POST", "/login"),
        ("GET", "/static/console.css"),
        ("GET", "/static/favicon.svg"),
    }
)
"""What answers without the token: the sign-in page, its stylesheet and icon (no data)."""
SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
STATIC: Final = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
FORM_FIELDS: Final = frozenset({"csrf", "kind", "replicas", "version", "target", "ttl"})
COMMANDS_SHOWN: Final = 30
ANCHORS_SHOWN: Final = 5
SESSION_KEY: Final = web.RequestKey[Session | None]("console_session")
"""On an authenticated request: its session, or None for a bearer token."""
REF_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,100}")
MAX_BODY: Final = 16 * 1024


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _agent_id(request: web.Request) -> str:
    agent_id = request.match_info["agent_id"]
    if not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise UnknownAgent(f"{agent_id[:80]!r} is not an agent id")
    return agent_id


def _field(form: MultiDictProxy[Any], name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text")
    return value


def _ttl(text: str | None) -> int:
    if text is None or not text.strip():
        return DEFAULT_TTL
    try:
        ttl = int(text)
    except ValueError:
        raise BadRequest("ttl must be a whole number of seconds") from None
    if not 1 <= ttl <= 86400:
        raise BadRequest("ttl must be in 1..86400 seconds")
    return ttl


def command_from_form(form: MultiDictProxy[Any]) -> tuple[str, dict[str, object], int]:
    """``(type, params, ttl)`` from the send form, as ``cp-stub send`` would build them from the
    same inputs; :class:`BadRequest` for anything else (another kind, an unknown field)."""
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise BadRequest(f"unexpected form fields: {', '.join(unknown)[:200]}")
    kind = _field(form, "kind") or ""
    replicas_text = _field(form, "replicas")
    targets = form.getall("target", [])
    if not all(isinstance(t, str) for t in targets):
        raise BadRequest("target must be text")
    command_type, params = operator_command(
        kind,
        replicas=parse_replicas(replicas_text) if kind == "scale" and replicas_text else None,
        version=_field(form, "version"),
        targets=[str(t) for t in targets],
    )
    return command_type, params, _ttl(_field(form, "ttl"))


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")


class Console:
    def __init__(
        self,
        api: OperatorApi,
        auth: ConsoleAuth,
        *,
        log: structlog.typing.FilteringBoundLogger,
        loopback_only: bool,
        tls: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``loopback_only``: answer only requests that name a loopback host (the console is
        bound to loopback: this keeps DNS-rebinding pages out). ``tls``: served over HTTPS
        (the session cookie is then ``Secure``)."""
        self._api = api
        self._auth = auth
        self.token = auth.token
        """For showing once at start (the CLI prints it or writes it to a 0600 file)."""
        self._log = log
        self._loopback_only = loopback_only
        self._tls = tls
        self._clock = clock
        self._templates = environment()
        package = resources.files("control_plane_stub.console") / "static"
        self._static = {name: (package / name).read_bytes() for name in STATIC}
        self.app = web.Application(
            middlewares=[self._guard, self._errors], client_max_size=MAX_BODY
        )
        self.app.on_response_prepare.append(_security_headers)
        self.app.on_shutdown.append(api.end_streams)  # end event streams, or shutdown waits
        self.app.add_routes(
            [
                web.get("/login", self.login_page),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.get("/", self.fleet_page),
                web.get("/agents/{agent_id}", self.agent_page),
                web.get("/agents/{agent_id}/commands/{ref}", self.command_page),
                web.post("/agents/{agent_id}/commands", self.send),
                web.get("/events", self.events),
                web.get("/static/{name}", self.static),
            ]
        )

    # -- who is asking --------------------------------------------------------------------

    def _same_origin(self, request: web.Request) -> bool:
        """A request from a page of this console (or from no page at all, e.g. curl)."""
        origin = request.headers.get("Origin")
        return origin is None or origin == f"{request.scheme}://{request.host}"

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._loopback_only and not is_loopback_host(host_name(request.host).strip("[]")):
            return web.Response(status=403, text="this console answers to loopback names only\n")
        if (request.method, request.path) in PUBLIC:
            return await handler(request)
        session: Session | None = None
        if not self._auth.bearer_matches(request.headers.get("Authorization")):
            session = self._auth.session(request.cookies.get(SESSION_COOKIE), self._clock())
            if session is None:
                if request.method in SAFE_METHODS and not _wants_json(request):
                    raise web.HTTPSeeOther("/login")
                return web.json_response(
                    {
                        "error": "unauthorized",
                        "message": "sign in at /login, or send Authorization: Bearer TOKEN",
                    },
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="cp-stub console"'},
                )
            if request.method not in SAFE_METHODS:
                form = await request.post()
                csrf = form.get("csrf")
                if not self._same_origin(request) or not self._auth.csrf_matches(
                    session, csrf if isinstance(csrf, str) else None
                ):
                    self._log.warning("console_request_refused", reason="csrf", path=request.path)
                    return web.json_response(
                        {"error": "forbidden", "message": "cross-site request refused (CSRF)"},
                        status=403,
                    )
        request[SESSION_KEY] = session
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (UnknownAgent, UnknownCommand) as exc:
            return self._failure(request, 404, "Not found", str(exc))
        except BadRequest as exc:
            return self._failure(request, 400, "Not possible", str(exc))

    def _failure(
        self, request: web.Request, status: int, heading: str, message: str
    ) -> web.Response:
        if _wants_json(request):
            code = "not_found" if status == 404 else "bad_request"
            return web.json_response({"error": code, "message": message}, status=status)
        return self._render(request, "error.html", status=status, heading=heading, message=message)

    # -- rendering ------------------------------------------------------------------------

    def _render(
        self, request: web.Request, template: str, *, status: int = 200, **context: Any
    ) -> web.Response:
        session = request.get(SESSION_KEY)
        signed_in = SESSION_KEY in request
        context.setdefault("events_url", None)
        context.setdefault("page", None)
        html = self._templates.get_template(template).render(
            signed_in=signed_in,
            csrf=session.csrf if isinstance(session, Session) else "",
            now=self._clock(),
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=STATIC[name], charset="utf-8")

    # -- signing in -----------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        return self._render(request, "login.html", error=None)

    async def login(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            return web.Response(status=403, text="cross-site sign-in refused\n")
        form = await request.post()
        token = form.get("token")
        session = self._auth.sign_in(token if isinstance(token, str) else None, self._clock())
        if session is None:
            self._log.warning("console_sign_in_refused", peer=request.remote)
            return self._render(
                request,
                "login.html",
                status=401,
                error="That is not this stub's console token. Use the one it showed at start.",
            )
        self._log.info("console_signed_in", peer=request.remote)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=int(SESSION_LIFETIME),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._tls,
        )
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        if isinstance(session, Session):
            self._auth.sign_out(session.id)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    # -- pages ----------------------------------------------------------------------------

    async def fleet_page(self, request: web.Request) -> web.Response:
        return self._render(
            request, "fleet.html", page="fleet", agents=self._api.fleet(), events_url="/events"
        )

    async def agent_page(self, request: web.Request) -> web.Response:
        return self._agent_page(request)

    def _agent_page(
        self, request: web.Request, *, error: str | None = None, status: int = 200
    ) -> web.Response:
        agent_id = _agent_id(request)
        agent = self._api.agent(agent_id)
        commands = self._api.command_views(agent_id, COMMANDS_SHOWN)
        sent = request.query.get("sent")
        return self._render(
            request,
            "agent.html",
            status=status,
            agent=agent,
            commands=commands,
            pending=self._api.pending_approvals(agent_id),
            refusals=self._api.refusals(agent_id),
            metrics=self._api.metrics(agent_id),
            streams=self._api.streams(agent_id),
            anchors=self._api.anchors(agent_id, ANCHORS_SHOWN),
            events_url=f"/events?agent_id={agent_id}",
            ttl=DEFAULT_TTL,
            error=error,
            sent=sent if sent and REF_PATTERN.fullmatch(sent) else None,
        )

    async def command_page(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        command = self._api.command_view(request.match_info["ref"])
        if command["agent_id"] != agent_id:
            raise UnknownCommand(f"no command {request.match_info['ref']!r} for {agent_id}")
        return self._render(
            request, "command.html", command=command, events_url=f"/events?agent_id={agent_id}"
        )

    # -- sending --------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        agent_id = _agent_id(request)
        self._api.agent(agent_id)  # only to an agent this stub knows
        try:
            command_type, params, ttl = command_from_form(await request.post())
        except BadRequest as exc:
            self._log.warning("console_command_refused", agent_id=agent_id, reason=str(exc))
            if _wants_json(request):
                raise
            return self._agent_page(request, error=f"Not sent: {exc}", status=400)
        record = await self._api.queue_command(agent_id, command_type, params, ttl)
        self._log.info(
            "console_command_queued", agent_id=agent_id, ref=record.ref, type=command_type
        )
        if _wants_json(request):
            return web.json_response({"command": record.to_json()}, status=201)
        raise web.HTTPSeeOther(f"/agents/{agent_id}?sent={record.ref}#h-commands")

    async def events(self, request: web.Request) -> web.StreamResponse:
        agent_id = request.query.get("agent_id")
        if agent_id is not None and not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise BadRequest(f"{agent_id[:80]!r} is not an agent id")
        return await event_stream(request, self._api.changes(agent_id))
