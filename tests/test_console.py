"""The web console and the operator API it reads, without a browser: who may use it (token,
session, CSRF), what it can send (exactly what ``cp-stub send`` sends, nothing else), that its
pages read without JavaScript, the event stream, and the API's fleet fields.

Real stub (in process, real TLS to a real agent), real HTTP; the browser tests are in
tests/test_console_browser.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import ssl
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from structlog.testing import capture_logs

from agent.core.frames import Status
from certs.pki import PKIPaths
from control_plane_stub import overview
from control_plane_stub.client import StubClient
from control_plane_stub.console.app import PUBLIC
from control_plane_stub.console.auth import SESSION_COOKIE, ConsoleAuth
from control_plane_stub.console.charts import Point, line_chart
from control_plane_stub.errors import BadRequest, StubConfigError
from control_plane_stub.operator_commands import operator_command
from control_plane_stub.server import StubConfig, StubServer
from control_plane_stub.store import RANK, StubStore
from tests.conftest import AgentStarter, scaled, stub_config
from tests.fakes import RecordingDriver

pytestmark = pytest.mark.filterwarnings("error")


def console_config(pki: PKIPaths, db: Path, **console: Any) -> StubConfig:
    return dataclasses.replace(stub_config(pki, db), console_port=0, **console)


@pytest.fixture
async def stub(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[StubServer]:
    """The stub with its console (this module's own ``stub``: the shared one has none)."""
    server = StubServer(console_config(pki, tmp_path / "stub.db"))
    await server.start()
    yield server
    await server.close()


def token_of(stub: StubServer) -> str:
    assert stub.console is not None
    return stub.console.token


@pytest.fixture
async def web(stub: StubServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the console that has not signed in."""
    async with httpx.AsyncClient(base_url=stub.console_url, timeout=scaled(10)) as client:
        yield client


async def sign_in(web: httpx.AsyncClient, token: str) -> str:
    """Sign in as a browser does; returns the session's CSRF token (from the agent page's
    forms, or the fleet's sign-out form)."""
    response = await web.post("/login", data={"token": token})
    assert response.status_code == 303, response.text
    page = await web.get("/")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


async def run_scale(api: StubClient, replicas: int) -> dict[str, Any]:
    sent = await api.send("agent-1", "scale", {"replicas": replicas})
    answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    return dict(answer["command"])


# -- who may use it ---------------------------------------------------------------------------


async def test_every_route_refuses_a_request_without_the_token(
    stub: StubServer, web: httpx.AsyncClient
) -> None:
    assert stub.console is not None
    routes = {
        (route.method, route.resource.canonical)
        for route in stub.console.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    guarded = sorted(routes - PUBLIC)
    assert len(guarded) >= 7  # the routes are read from the app: a new one is covered too
    for method, template in guarded:
        path = template.format(agent_id="agent-1", ref="abc", name="console.js")
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Cookie": "cp_console=x"}):
            response = await web.request(method, path, headers=headers, data={"kind": "scale"})
            if method == "GET":  # a person is sent to sign in
                assert response.status_code == 303, (method, path, headers)
                assert response.headers["Location"] == "/login"
            else:
                assert response.status_code == 401, (method, path, headers)
            assert "agent-1" not in response.text
    assert not stub.store.commands()  # nothing was queued on the way
    answer = await web.get("/events", headers={"Accept": "application/json"})
    assert answer.status_code == 401  # a script is told
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


async def test_signing_in_gives_a_strict_http_only_cookie_and_a_wrong_token_nothing(
    stub: StubServer, web: httpx.AsyncClient
) -> None:
    with capture_logs() as logs:
        refused = await web.post("/login", data={"token": "x" * 43})
        assert refused.status_code == 401
        assert SESSION_COOKIE not in refused.cookies
        assert "That is not this stub" in refused.text
        accepted = await web.post("/login", data={"token": token_of(stub)})
    assert accepted.status_code == 303
    cookie = accepted.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would not be sent
    assert (await web.get("/")).status_code == 200
    assert [e["event"] for e in logs] == ["console_sign_in_refused", "console_signed_in"]
    assert token_of(stub) not in repr(logs)
    # Signing out ends the session on the server, not only in the browser.
    session = web.cookies[SESSION_COOKIE]
    page = (await web.get("/")).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    assert (await web.post("/logout", data={"csrf": csrf.group(1)})).status_code == 303
    assert SESSION_COOKIE not in web.cookies
    stale = await web.get("/", headers={"Cookie": f"{SESSION_COOKIE}={session}"})
    assert stale.status_code == 303


async def test_the_console_answers_to_loopback_names_only(
    stub: StubServer, web: httpx.AsyncClient
) -> None:
    """A DNS-rebinding page reaches the port under another name: it is refused before any
    authentication, so it cannot even try tokens."""
    response = await web.get("/login", headers={"Host": f"evil.example:{stub.console_port}"})
    assert response.status_code == 403
    for host in ("localhost", "127.0.0.1", "[::1]"):
        ok = await web.get("/login", headers={"Host": f"{host}:{stub.console_port}"})
        assert ok.status_code == 200, host


async def test_a_form_post_needs_the_sessions_csrf_token_and_its_own_origin(
    stub: StubServer, web: httpx.AsyncClient
) -> None:
    stub.store.agent_connected(
        "agent-1", cert_sha256="00", peer="127.0.0.1:1", agent_version="0.1.0", capabilities={}
    )
    csrf = await sign_in(web, token_of(stub))
    form = {"kind": "scale", "replicas": "2"}
    assert (await web.post("/agents/agent-1/commands", data=form)).status_code == 403
    wrong = {**form, "csrf": "a" * 43}
    assert (await web.post("/agents/agent-1/commands", data=wrong)).status_code == 403
    cross = await web.post(
        "/agents/agent-1/commands",
        data={**form, "csrf": csrf},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.status_code == 403
    assert not stub.store.commands()
    sent = await web.post(
        "/agents/agent-1/commands",
        data={**form, "csrf": csrf},
        headers={"Origin": stub.console_url.rstrip("/")},
    )
    assert sent.status_code == 303
    (record,) = stub.store.commands()
    assert sent.headers["Location"] == f"/agents/agent-1?sent={record.ref}#h-commands"
    # A bearer-token client (a script) needs no CSRF token: no page can send that header.
    scripted = await web.post(
        "/agents/agent-1/commands",
        data=form,
        headers={"Authorization": f"Bearer {token_of(stub)}", "Accept": "application/json"},
    )
    assert scripted.status_code == 201
    assert scripted.json()["command"]["type"] == "scale"


# -- what it can send -------------------------------------------------------------------------


def claims_of(token: str, pki: PKIPaths) -> dict[str, Any]:
    key = load_pem_public_key(pki.signing_pub.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["EdDSA"], audience="agent-1", options={"verify_exp": False}
    )
    return claims


async def test_the_console_signs_exactly_what_cp_stub_send_signs(
    stub: StubServer, web: httpx.AsyncClient, pki: PKIPaths
) -> None:
    from control_plane_stub.cli import main as stub_cli

    stub.store.agent_connected(
        "agent-1", cert_sha256="00", peer="127.0.0.1:1", agent_version="0.1.0", capabilities={}
    )
    auth = {"Authorization": f"Bearer {token_of(stub)}", "Accept": "application/json"}
    api = ["--api", f"http://127.0.0.1:{stub.api_port}"]
    cases: list[tuple[dict[str, str | list[str]], list[str]]] = [
        ({"kind": "scale", "replicas": "4"}, ["scale", "--replicas", "4"]),
        ({"kind": "upgrade", "version": "2.0.0"}, ["upgrade", "--version", "2.0.0"]),
        ({"kind": "collect_metrics"}, ["collect-metrics"]),
        (
            {"kind": "collect_metrics", "target": ["host"]},
            ["collect-metrics", "--target", "host"],
        ),
    ]
    for form, argv in cases:
        answer = await web.post("/agents/agent-1/commands", data=form, headers=auth)
        assert answer.status_code == 201, answer.text
        by_console = stub.store.get(answer.json()["command"]["ref"])
        assert await asyncio.to_thread(stub_cli, ["send", *api, "agent-1", *argv]) == 0
        by_cli = stub.store.commands(limit=1)[0]
        console_claims = claims_of(by_console.token, pki)
        cli_claims = claims_of(by_cli.token, pki)
        for claims in (console_claims, cli_claims):
            assert claims["exp"] - claims["iat"] == 300
        same = ("iss", "aud", "cmd")
        assert {k: console_claims[k] for k in same} == {k: cli_claims[k] for k in same}
        assert jwt.get_unverified_header(by_console.token) == jwt.get_unverified_header(
            by_cli.token
        )


async def test_the_console_sends_nothing_else(stub: StubServer, web: httpx.AsyncClient) -> None:
    stub.store.agent_connected(
        "agent-1", cert_sha256="00", peer="127.0.0.1:1", agent_version="0.1.0", capabilities={}
    )
    auth = {"Authorization": f"Bearer {token_of(stub)}", "Accept": "application/json"}
    refused = [
        {"kind": "open_stream", "target": "127.0.0.1:22"},
        {"kind": "scale"},
        {"kind": "scale", "replicas": "three"},
        {"kind": "scale", "replicas": "2", "params": '{"replicas": 99}'},
        {"kind": "upgrade"},
        {"kind": "upgrade", "version": "v" * 300},
        {"kind": "collect_metrics", "ttl": "999999"},
        {"kind": "revoke"},
        {},
    ]
    for form in refused:
        answer = await web.post("/agents/agent-1/commands", data=form, headers=auth)
        assert answer.status_code == 400, form
        assert answer.json()["error"] == "bad_request"
    unknown = await web.post(
        "/agents/agent-9/commands", data={"kind": "scale", "replicas": "1"}, headers=auth
    )
    assert unknown.status_code == 404  # only to an agent this stub knows
    assert not stub.store.commands()
    # Without JavaScript, a refused form comes back as the agent's page with the reason.
    html = await web.post(
        "/agents/agent-1/commands",
        data={"kind": "scale", "replicas": "three"},
        headers={"Authorization": f"Bearer {token_of(stub)}"},
    )
    assert html.status_code == 400
    assert "Not sent: replicas must be a whole number" in html.text
    assert "<h1>Agent agent-1</h1>" in html.text


def test_operator_commands_are_built_one_way() -> None:
    assert operator_command("scale", replicas=3) == ("scale", {"replicas": 3})
    assert operator_command("collect_metrics") == (
        "collect_metrics",
        {"targets": ["workload", "host"]},
    )
    for kind in ("open_stream", "keyset", ""):
        with pytest.raises(BadRequest):
            operator_command(kind, replicas=1)


# -- off loopback -----------------------------------------------------------------------------


def test_a_console_off_loopback_must_be_asked_for(tmp_path: Path, pki: PKIPaths) -> None:
    with pytest.raises(StubConfigError, match="--console-remote"):
        console_config(pki, tmp_path / "db", console_host="192.0.2.1")
    with pytest.raises(StubConfigError, match="HTTPS"):
        console_config(
            pki, tmp_path / "db", console_host="192.0.2.1", console_remote=True, console_tls=False
        )
    remote = console_config(pki, tmp_path / "db", console_host="192.0.2.1", console_remote=True)
    assert remote.console_uses_tls
    assert not console_config(pki, tmp_path / "db").console_uses_tls


async def test_a_console_over_tls_serves_https_only_with_a_secure_cookie(
    tmp_path: Path, pki: PKIPaths
) -> None:
    """What a console off loopback gets (here on loopback, where a test may listen)."""
    server = StubServer(console_config(pki, tmp_path / "stub.db", console_tls=True))
    await server.start()
    try:
        assert server.console_url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(pki.server_ca_cert))
        async with httpx.AsyncClient(
            base_url=server.console_url, verify=trust, timeout=scaled(10)
        ) as client:
            answer = await client.post("/login", data={"token": token_of(server)})
            assert answer.status_code == 303
            assert "Secure" in answer.headers["Set-Cookie"]
        plain = server.console_url.replace("https://", "http://")
        async with httpx.AsyncClient(timeout=scaled(10)) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(f"{plain}login")
    finally:
        await server.close()


# -- the token: shown once, never logged ------------------------------------------------------


async def serve_until_console(pki: PKIPaths, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Run ``cp-stub serve --console`` as a process until it says where the console is; return
    (what it printed, what it logged), both from its stdout (logs are JSON lines there)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane_stub.cli",
        "serve",
        "--pki",
        str(pki.root),
        "--agents",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--db",
        str(tmp_path / "serve.db"),
        "--console",
        "127.0.0.1:0",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(scaled(30)):
            while not any(line.startswith("console:") for line in lines):
                line = (await process.stdout.readline()).decode()
                assert line, "\n".join(lines)
                lines.append(line.rstrip("\n"))
    finally:
        process.terminate()
    rest, _ = await asyncio.wait_for(process.communicate(), scaled(30))
    lines.extend(rest.decode().splitlines())
    assert process.returncode == 0, "\n".join(lines)
    printed = [line for line in lines if not line.startswith("{")]
    logged = [line for line in lines if line.startswith("{")]
    assert logged  # the stub did log (stub_listening, ...): the check below means something
    return "\n".join(printed), "\n".join(logged)


async def test_the_token_is_printed_once_and_never_logged(pki: PKIPaths, tmp_path: Path) -> None:
    printed, logged = await serve_until_console(pki, tmp_path)
    (line,) = [line for line in printed.splitlines() if "token" in line]
    url, token = re.fullmatch(r"console: (\S+) token: (\S+)", line).groups()  # type: ignore[union-attr]
    assert url.startswith("http://127.0.0.1:")
    assert len(token) >= 43
    assert printed.count(token) == 1
    assert token not in logged
    assert url in logged  # where the console is, is logged


async def test_a_token_file_is_private_and_the_token_then_goes_nowhere_else(
    pki: PKIPaths, tmp_path: Path
) -> None:
    token_file = tmp_path / "console.token"
    printed, logged = await serve_until_console(
        pki, tmp_path, "--console-token-file", str(token_file)
    )
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token) >= 43
    assert token not in printed
    assert token not in logged
    assert f"(token in {token_file})" in printed


def test_the_auth_object_keeps_the_token_out_of_its_repr() -> None:
    auth = ConsoleAuth.generate()
    assert auth.token not in repr(auth)
    assert auth.sign_in("wrong", now=0.0) is None
    session = auth.sign_in(auth.token, now=0.0)
    assert session is not None
    assert auth.session(session.id, now=1.0) == session
    assert auth.session(session.id, now=session.expires) is None  # expired
    with pytest.raises(ValueError, match="32"):
        ConsoleAuth("short")


# -- reading without JavaScript, the live stream ----------------------------------------------


async def test_the_pages_read_without_javascript(
    stub: StubServer, web: httpx.AsyncClient, api: StubClient, start_agent: AgentStarter
) -> None:
    await start_agent(port=stub.agent_port, driver=RecordingDriver())
    done = await run_scale(api, 2)
    refused = await run_scale(api, 10)
    assert refused["state"] == "rejected"
    auth = {"Authorization": f"Bearer {token_of(stub)}"}

    fleet = await web.get("/", headers=auth)
    assert fleet.status_code == 200
    assert 'data-connection="connected"' in fleet.text
    assert "0.1.0" in fleet.text  # the agent version from its hello
    for header in ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options"):
        assert header in fleet.headers
    assert "script-src 'self'" in fleet.headers["Content-Security-Policy"]
    assert "<script>" not in fleet.text  # no inline script: the page is whole without any

    page = await web.get("/agents/agent-1", headers=auth)
    assert page.status_code == 200
    assert f'id="cmd-{done["ref"]}"' in page.text
    assert 'data-state="succeeded"' in page.text
    assert 'data-receipt="verified"' in page.text
    assert "10 replicas is above the policy maximum" in page.text  # in the refusals
    assert "data-anchor-seq=" in page.text

    command = await web.get(f"/agents/agent-1/commands/{done['ref']}", headers=auth)
    assert command.status_code == 200
    for state in ("queued", "delivered", "received", "running", "succeeded"):
        assert f">{state}</span>" in command.text
    other = await web.get(f"/agents/agent-2/commands/{done['ref']}", headers=auth)
    assert other.status_code == 404  # a command is shown under its own agent only


async def events_of(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The server-sent events of an open response: (event name, data)."""
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    name = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


async def states_until_final(response: httpx.Response) -> list[tuple[str, str]]:
    """(ref, state) of each command event, up to the first ``succeeded``."""
    seen: list[tuple[str, str]] = []
    async for name, data in events_of(response):
        if name == "command":
            seen.append((data["ref"], data["state"]))
            if data["state"] == "succeeded":
                break
    return seen


async def test_events_follow_a_command_to_its_final_state(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """The same stream from the operator API and, with the token, from the console."""
    await start_agent(port=stub.agent_port, driver=RecordingDriver())
    bearer = {"Authorization": f"Bearer {token_of(stub)}"}
    async with (
        httpx.AsyncClient(timeout=scaled(20)) as client,
        client.stream(
            "GET", f"http://127.0.0.1:{stub.api_port}/v1/events?agent_id=agent-1"
        ) as from_api,
        client.stream(
            "GET", f"{stub.console_url}events?agent_id=agent-1", headers=bearer
        ) as from_console,
    ):
        # Both streams answered, so both compare with the state before this command.
        sent = await api.send("agent-1", "scale", {"replicas": 2})
        async with asyncio.timeout(scaled(20)):
            seen = await asyncio.gather(
                states_until_final(from_api), states_until_final(from_console)
            )
    for events in seen:
        assert {ref for ref, _ in events} == {sent["ref"]}
        states = [state for _, state in events]
        assert states[0] in ("queued", "sent")
        assert states[-1] == "succeeded"
        assert states == sorted(states, key=list(RANK).index)  # forward only, in order


async def test_an_open_event_stream_does_not_hold_up_shutdown(
    tmp_path: Path, pki: PKIPaths
) -> None:
    server = StubServer(console_config(pki, tmp_path / "stub.db"))
    await server.start()
    async with (
        httpx.AsyncClient(timeout=scaled(30)) as client,
        client.stream("GET", f"http://127.0.0.1:{server.api_port}/v1/events") as stream,
    ):
        async with asyncio.timeout(scaled(10)):  # aiohttp would wait 60 s for a handler
            await server.close()
            assert [event async for event in events_of(stream)] == []  # it ended


# -- the operator API's fleet fields ----------------------------------------------------------


async def test_the_api_reports_what_the_fleet_page_shows(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, pki: PKIPaths
) -> None:
    before = time.time()
    await start_agent(port=stub.agent_port, driver=RecordingDriver())
    done = await run_scale(api, 2)
    async with asyncio.timeout(scaled(10)), stub.hub.changed:  # the anchor follows the status
        await stub.hub.changed.wait_for(lambda: bool(stub.store.anchors("agent-1")))
    (agent,) = await api.agents()
    assert agent["connected"] is True
    assert agent["agent_version"] == "0.1.0"
    cert = pki.agent_cert("agent-1")
    from cryptography import x509

    expected = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()
    assert agent["certificate_not_after"] == expected
    assert before <= agent["last_heard"] <= time.time()
    anchor = agent["last_anchor"]
    assert anchor["audit_seq"] == stub.store.anchors("agent-1")[0]["audit_seq"]
    assert 0 <= anchor["age"] < scaled(10)
    assert abs(agent["clock_offset"]) < 1.0  # the same host's clock, minus a loopback delay

    detail = await api.command(done["ref"])
    steps = [step["state"] for step in detail["timeline"]]
    assert steps == ["queued", "delivered", "received", "running", "succeeded"]
    assert detail["receipt_verified"] is True

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stub.api_port}") as client:
        streams = (await client.get("/v1/agents/agent-1/streams")).json()
        assert streams == {"forwards": [], "grants": []}
        listed = (await client.get("/v1/commands?agent_id=agent-1&timeline=1")).json()
        assert listed["commands"][0]["receipt"]["verified"] is True
        refused = (await client.get("/v1/commands?agent_id=agent-1&state=rejected")).json()
        assert refused["commands"] == []


# -- the sans-I/O parts -----------------------------------------------------------------------


def test_clock_offset_takes_the_report_with_the_least_delay() -> None:
    # Agent 2 s ahead; reports delayed by 0.3, 0.01 and 5 s (one replayed after a reconnect).
    assert overview.clock_offset([2 - 0.3, 2 - 0.01, 2 - 5]) == pytest.approx(1.99)
    assert overview.clock_offset([]) is None


def queue(store: StubStore, ref: str) -> None:
    store.add_command(
        ref=ref,
        agent_id="agent-1",
        token="t",
        origin="signed",
        jti=ref,
        command_type="scale",
        params={},
    )


def test_the_store_samples_the_clock_from_reports_and_anchors(tmp_path: Path) -> None:
    store = StubStore(tmp_path / "stub.db")
    queue(store, "r1")
    now = time.time()
    store.apply_status("agent-1", Status(seq=1, ref="r1", jti="r1", state="received", at=now + 3.0))
    store.record_anchor("agent-1", 5, "a" * 64, now + 2.5)
    samples = store.clock_samples("agent-1", since=0.0)
    assert len(samples) == 2
    assert max(samples) == pytest.approx(3.0, abs=0.5)
    assert store.clock_samples("agent-1", since=time.time() + 60) == []
    mark = store.change_mark()
    queue(store, "r2")
    assert store.change_mark() != mark
    mark = store.change_mark()
    store.mark_sent("r2")
    assert store.change_mark() != mark
    mark = store.change_mark()
    store.record_anchor("agent-1", 6, "b" * 64, now)
    assert store.change_mark() != mark


def test_replica_metrics_follow_each_replica_and_skip_what_is_not_a_sample() -> None:
    def sample(replica: str, name: str, value: object, **labels: str) -> dict[str, object]:
        return {
            "target": "workload",
            "name": name,
            "labels": {"replica": replica, **labels},
            "value": value,
        }

    first = [
        sample("0", "process_resident_memory_bytes", 10 * 2**20),
        sample("0", "demo_workload_info", 1.0, version="1.0.0"),
        sample("1", "process_resident_memory_bytes", 12 * 2**20),
        {"target": "host", "name": "host_cpu_percent", "labels": {}, "value": 7.0},
        "not a sample",
        sample("0", "process_cpu_seconds_total", "NaN"),
    ]
    second = [
        sample("0", "process_resident_memory_bytes", 11 * 2**20),
        sample("0", "demo_workload_requests_total", 3.0, path="/metrics"),
        sample("0", "demo_workload_requests_total", 2.0, path="/healthz"),
    ]
    result = overview.replica_metrics([(200.0, second), (100.0, first)])
    replicas = {r["replica"]: r for r in result["replicas"]}  # type: ignore[attr-defined]
    assert replicas["0"]["memory_series"] == [[100.0, 10 * 2**20], [200.0, 11 * 2**20]]
    assert replicas["0"]["latest"]["requests"] == 5.0
    assert replicas["0"]["current"] is True
    assert replicas["1"]["current"] is False  # not in the latest collection
    assert result["host"] == {"at": 100.0, "host_cpu_percent": 7.0}


def test_changes_name_what_moved() -> None:
    from control_plane_stub.store import CommandRecord

    def record(state: str) -> CommandRecord:
        return CommandRecord(
            ref="r1",
            agent_id="agent-1",
            jti="r1",
            type="scale",
            params={},
            token="t",
            origin="signed",
            state=state,
            reason=None,
            detail=None,
            result=None,
            created_at=1.0,
            sent_at=None,
            updated_at=1.0,
        )

    agent = {"agent_id": "agent-1", "agent_version": "0.1.0"}
    before = overview.snapshot([agent], [], {}, [record("queued")])
    after = overview.snapshot([agent], ["agent-1"], {"agent-1": 7}, [record("sent")])
    assert overview.changes(before, after) == [
        (
            "agent",
            {"agent_id": "agent-1", "connected": True, "agent_version": "0.1.0", "audit_seq": 7},
        ),
        (
            "command",
            {"ref": "r1", "agent_id": "agent-1", "type": "scale", "state": "sent", "reason": None},
        ),
    ]
    assert overview.changes(after, after) == []


def test_a_chart_escapes_its_text_and_draws_each_point() -> None:
    svg = str(
        line_chart(
            [Point(2.0, 5.0), Point(1.0, 3.0), Point(3.0, 4.0)],
            chart_id='x"><script>',
            title="<b>memory</b>",
            unit="MiB",
        )
    )
    assert "<script>" not in svg
    assert "<b>" not in svg
    assert svg.count("<circle") == 3
    assert 'role="img"' in svg
    assert "&lt;b&gt;memory&lt;/b&gt;" in svg
    assert "no data yet" in str(line_chart([], chart_id="c", title="t", unit="MiB"))
