"""The agent never follows an HTTP redirect, on any connection it opens (docs/PROTOCOL.md §2).

A control plane (or whoever answers for it) that replies 3xx to the tunnel's upgrade, to a
stream connection's upgrade, or to an enrollment request must not be able to send the agent to
another address inside the customer's network. Each redirect target here is a listener that
counts the connections it accepts: it must accept none. And what a stream's failure tells the
control plane must be the same whether the address it pointed at is an open port or a closed
one, or the redirect would be a port scanner.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from agent.core.errors import DriverError
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.drivers.systemd import SystemdDriver
from agent.enroll import EnrollmentFailed, enroll
from certs.pki import PKIPaths
from tests.conftest import AgentStarter, scaled
from tests.independent_cp import IndependentControlPlane

AGENT_ID = "agent-1"
STATUSES = (301, 302, 303, 307, 308)
WAIT = 10.0


class CountingListener:
    """A TCP listener that only counts the connections it accepts (and closes them)."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._accept, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def elsewhere() -> AsyncIterator[CountingListener]:
    """Another host inside the "customer's network" (127.0.0.2: loopback, not the CP's)."""
    listener = CountingListener()
    await listener.start("127.0.0.2")
    yield listener
    await listener.close()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def cp(pki: PKIPaths, tmp_path: Path) -> AsyncIterator[IndependentControlPlane]:
    plane = IndependentControlPlane(
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        agent_ca=pki.agent_ca_cert,
        signing_key=pki.signing_key,
        journal=tmp_path / "cp-journal.jsonl",
    )
    await plane.start()
    yield plane
    await plane.close()


def _location(
    where: str, scheme: str, cp: IndependentControlPlane, elsewhere: CountingListener, closed: int
) -> str:
    return {
        "another_host": f"{scheme}://127.0.0.2:{elsewhere.port}/v1/agent",
        "closed_port": f"{scheme}://127.0.0.2:{closed}/v1/agent",
        "same_host": f"{scheme}://localhost:{cp.port}/v1/agent/elsewhere",
    }[where]


# -- the tunnel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["another_host", "closed_port", "same_host"])
@pytest.mark.parametrize("status", STATUSES)
async def test_tunnel_redirect_is_refused_never_followed(
    cp: IndependentControlPlane,
    start_agent: AgentStarter,
    elsewhere: CountingListener,
    closed_port: int,
    status: int,
    where: str,
) -> None:
    location = _location(where, "wss", cp, elsewhere, closed_port)
    cp.redirects["/v1/agent"] = (status, location)
    agent = await start_agent(port=cp.port, wait=False)
    record = await agent.audit.wait_for("connection_failed", reason="redirect_refused", within=WAIT)
    assert record["status"] == status
    assert record["location"] == location  # logged and audited, never dialed
    assert elsewhere.accepted == 0
    assert cp.requests == ["/v1/agent"]  # not even the same host's other path
    assert cp.connections == []  # no WebSocket session was ever opened
    link = agent.agent.parts.link
    assert not link.ready.is_set()
    assert link.last_error is not None
    assert "redirect" in link.last_error
    assert location not in link.last_error  # the status text names no other host


async def test_tunnel_redirect_without_location_is_refused(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    cp.redirects["/v1/agent"] = (302, None)
    agent = await start_agent(port=cp.port, wait=False)
    record = await agent.audit.wait_for("connection_failed", reason="redirect_refused", within=WAIT)
    assert (record["status"], record["location"]) == (302, None)


# -- stream connections --------------------------------------------------------------------------


@contextlib.contextmanager
def target_listener(port_range: tuple[int, int]) -> Iterator[socket.socket]:
    """A target the policy allows (the demo policy's stream ports are the port range)."""
    for port in range(*port_range):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen(8)
        try:
            yield sock
        finally:
            sock.close()
        return
    raise RuntimeError("no free port in the policy's stream range")


async def _stream_outcome(
    cp: IndependentControlPlane, target: socket.socket, status: int, location: str
) -> dict[str, Any]:
    cp.redirects["/v1/agent/streams/"] = (status, location)
    port = target.getsockname()[1]
    delivery = await cp.command(
        AGENT_ID, "open_stream", {"target": f"127.0.0.1:{port}", "max_duration": 30}
    )
    final = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    frame = final.last_status
    assert frame is not None
    return frame


@pytest.mark.parametrize("status", STATUSES)
async def test_stream_redirect_is_refused_and_reveals_nothing(
    cp: IndependentControlPlane,
    start_agent: AgentStarter,
    elsewhere: CountingListener,
    closed_port: int,
    port_range: tuple[int, int],
    status: int,
) -> None:
    agent = await start_agent(port=cp.port)
    seen: dict[str, dict[str, Any]] = {}
    with target_listener(port_range) as target:
        for where in ("another_host", "closed_port", "same_host"):
            location = _location(where, "wss", cp, elsewhere, closed_port)
            seen[where] = await _stream_outcome(cp, target, status, location)
            record = await agent.audit.wait_for(
                "stream_connection_failed", reason="redirect_refused", location=location
            )
            assert record["status"] == status
    assert elsewhere.accepted == 0
    assert not [path for path in cp.requests if path.endswith("/elsewhere")]
    for frame in seen.values():
        assert (frame["state"], frame["reason"]) == ("failed", "stream_refused")
        assert "redirect" in frame["detail"]
    # What the control plane hears is the same for an open port, a closed one and its own
    # host: no oracle for scanning the customer's network.
    told = {
        where: (frame["reason"], frame["detail"], frame.get("result"))
        for where, frame in seen.items()
    }
    assert told["another_host"] == told["closed_port"] == told["same_host"]
    for where in seen:
        assert str(elsewhere.port) not in str(told[where])
        assert str(closed_port) not in str(told[where])


async def test_stream_connection_failure_detail_is_fixed(
    cp: IndependentControlPlane, start_agent: AgentStarter, port_range: tuple[int, int]
) -> None:
    """A stream connection that cannot be opened at all (the control plane drops it) reports a
    fixed text, not the OS error, whose wording could tell one network failure from another."""
    agent = await start_agent(port=cp.port)
    cp.redirects["/v1/agent/streams/"] = (302, "wss://127.0.0.2:1/x")
    with target_listener(port_range) as target:
        first = await _stream_outcome(cp, target, 302, "wss://127.0.0.2:1/x")
    assert first["reason"] == "stream_refused"
    assert "127.0.0.2" not in first["detail"]
    audited = await agent.audit.wait_for("stream_connection_failed", reason="redirect_refused")
    assert audited["location"] == "wss://127.0.0.2:1/x"  # the whole story stays on the host


# -- enrollment ----------------------------------------------------------------------------------


@pytest.fixture
async def redirecting_enrollment(
    pki: PKIPaths, elsewhere: CountingListener
) -> AsyncIterator[tuple[str, list[int]]]:
    """An HTTPS enrollment endpoint that answers every request with a redirect to ``elsewhere``.
    Yields its URL and a list the test fills with the status to answer."""
    answer: list[int] = [302]

    async def moved(_request: web.Request) -> web.Response:
        return web.Response(
            status=answer[0],
            headers={"Location": f"https://127.0.0.2:{elsewhere.port}/v1/enroll"},
        )

    app = web.Application()
    app.router.add_route("*", "/v1/enroll", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server = site._server  # aiohttp exposes the bound port nowhere else
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    yield f"https://localhost:{port}", answer
    await runner.cleanup()


@pytest.mark.parametrize("status", STATUSES)
async def test_enrollment_redirect_is_refused(
    redirecting_enrollment: tuple[str, list[int]],
    elsewhere: CountingListener,
    pki: PKIPaths,
    tmp_path: Path,
    status: int,
) -> None:
    url, answer = redirecting_enrollment
    answer[0] = status
    files = {name: tmp_path / "tls" / name for name in ("agent.key", "agent.pem", "ca.pem")}
    with pytest.raises(EnrollmentFailed) as info:
        await asyncio.to_thread(
            enroll,
            control_plane=url,
            token="one-time-token",
            trust=pki.server_ca_cert,
            client_key=files["agent.key"],
            client_cert=files["agent.pem"],
            ca_bundle=files["ca.pem"],
        )
    message = str(info.value)
    assert f"HTTP {status}" in message
    assert "redirects are never followed" in message
    assert "one-time-token" not in message
    assert elsewhere.accepted == 0
    assert not any(path.exists() for path in files.values())  # nothing written


# -- release downloads (the systemd driver) -------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
async def test_a_release_download_that_redirects_is_refused(
    elsewhere: CountingListener, tmp_path: Path, status: int
) -> None:
    """The systemd driver's artifact download: a 3xx is its own failure (``redirect_refused``),
    before anything is unpacked or any unit touched; the Location is never dialed."""

    async def moved(_request: web.Request) -> web.Response:
        return web.Response(
            status=status, headers={"Location": f"http://127.0.0.2:{elsewhere.port}/x.tgz"}
        )

    app = web.Application()
    app.router.add_get("/{name}", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    records: list[str] = []

    async def audit(event: str, /, **_fields: object) -> None:
        records.append(event)

    settings = {
        "unit": "milvus-querynode@{index}.service",
        "releases_dir": str(tmp_path / "releases"),
        "current": str(tmp_path / "current"),
        "allowed_urls": [base],
        "releases": {"2.0.0": {"url": f"{base}2.0.0.tgz", "sha256": "0" * 64}},
    }
    env = DriverEnvironment(state_dir=tmp_path, audit=audit, log=structlog.get_logger())
    driver = SystemdDriver(settings, env)
    ctx = ExecContext(jti="j", audit=audit, log=structlog.get_logger())
    try:
        with pytest.raises(DriverError) as info:
            await driver.upgrade("2.0.0", ctx)
    finally:
        await driver.close()
        await runner.cleanup()
    assert info.value.code == "redirect_refused"
    assert f"HTTP {status}" in info.value.detail
    assert elsewhere.accepted == 0
    assert records == ["artifact_downloading"]  # nothing verified, unpacked or switched
    assert not (tmp_path / "releases" / "2.0.0").exists()
