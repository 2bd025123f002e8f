"""Getting out of a customer's network: an HTTP CONNECT proxy with authentication (a real
tinyproxy), the standard HTTPS_PROXY/NO_PROXY variables, private endpoints (dial one address,
verify the certificate for another name), IPv6 literals, and renewed certificate files picked
up on the next connection without a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.config import ControlPlaneConfig, parse_config
from agent.egress import Route, redact_url, route_for
from agent.errors import ConfigError
from certs.pki import PKIPaths, issue_agent_cert
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, scaled, stub_config
from tests.fakes import RecordingDriver

USER, PASSWORD = "alice", "s3cret-Pa55"


@dataclass
class Tinyproxy:
    port: int
    log: Path

    def connects(self) -> list[str]:
        """The CONNECT requests the proxy has handled."""
        return [
            line.split("CONNECT ", 2)[-1]
            for line in self.log.read_text(errors="replace").splitlines()
            if "Request (file descriptor" in line and ": CONNECT " in line
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[Tinyproxy]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (.ci/run installs it: apt-get install tinyproxy)")
    port = free_port()
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\nMaxClients 50\n"
        f"Allow 127.0.0.1\nBasicAuth {USER} {PASSWORD}\nDisableViaHeader Yes\n"
    )
    log = tmp_path / "tinyproxy.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            binary, "-d", "-c", str(config), stdout=out, stderr=out
        )
    try:
        async with asyncio.timeout(scaled(10)):  # a readiness probe of the proxy's port
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield Tinyproxy(port=port, log=log)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), scaled(10))


def credentials_file(tmp_path: Path, password: str = PASSWORD) -> Path:
    path = tmp_path / "proxy-credentials"
    path.write_text(f"{USER}:{password}\n")
    path.chmod(0o600)
    return path


async def test_through_an_authenticating_proxy(
    stub: StubServer,
    api: StubClient,
    start_agent: AgentStarter,
    tinyproxy: Tinyproxy,
    tmp_path: Path,
) -> None:
    driver = RecordingDriver()
    running = await start_agent(
        port=stub.agent_port,
        driver=driver,
        proxy=tinyproxy.url,
        proxy_credentials_file=credentials_file(tmp_path),
    )
    sent = await api.send("agent-1", "scale", {"replicas": 2})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "succeeded"
    assert f"localhost:{stub.agent_port} HTTP/1.1" in tinyproxy.connects()
    up = running.audit.matching("connection_up")[0]
    assert up["route"] == f"via proxy http://{USER}:***@127.0.0.1:{tinyproxy.port}"
    assert PASSWORD not in running.paths.audit_log.read_text()


async def test_wrong_proxy_credentials_are_audited_and_retried_slowly(
    stub: StubServer, start_agent: AgentStarter, tinyproxy: Tinyproxy, tmp_path: Path
) -> None:
    running = await start_agent(
        port=stub.agent_port,
        driver=RecordingDriver(),
        wait=False,
        proxy=tinyproxy.url,
        proxy_credentials_file=credentials_file(tmp_path, password="wrong"),
        tls_rejected_retry=300.0,
    )
    failed = await running.audit.wait_for("connection_failed")
    assert failed["reason"] == "proxy_refused"
    assert failed["status"] in (401, 407)  # tinyproxy answers 401; the standard says 407
    assert "wrong" not in str(failed)
    with pytest.raises(TimeoutError):  # the slow retry: no second attempt soon
        await running.audit.wait_for("connection_failed", count=2, within=1.5)
    assert stub.hub.links == {}


async def test_https_proxy_and_no_proxy_from_the_environment(
    stub: StubServer,
    start_agent: AgentStarter,
    tinyproxy: Tinyproxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{PASSWORD}@127.0.0.1:{tinyproxy.port}")
    proxied = await start_agent(port=stub.agent_port, driver=RecordingDriver(), name="proxied")
    assert len(tinyproxy.connects()) == 1
    assert proxied.agent.parts.tunnel.route.startswith("via proxy http://alice:***@")
    await proxied.stop()

    monkeypatch.setenv("NO_PROXY", "localhost")
    direct = await start_agent(port=stub.agent_port, driver=RecordingDriver(), name="direct")
    assert direct.agent.parts.tunnel.route == "direct"
    assert len(tinyproxy.connects()) == 1  # the second agent went around the proxy


async def test_private_endpoint_dials_one_address_and_verifies_another_name(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """The URL names the control plane as its certificate knows it; the agent dials the
    endpoint's address instead (the name need not even resolve here)."""
    running = await start_agent(
        port=stub.agent_port,
        driver=RecordingDriver(),
        control_plane_host="cp.vendor.invalid",
        connect_to="127.0.0.1",
        server_name="localhost",
    )
    assert running.agent.parts.tunnel.route == f"direct to 127.0.0.1:{stub.agent_port}"
    sent = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "succeeded"


async def test_private_endpoint_still_verifies_the_certificate(
    stub: StubServer, start_agent: AgentStarter
) -> None:
    running = await start_agent(
        port=stub.agent_port,
        driver=RecordingDriver(),
        wait=False,
        control_plane_host="cp.vendor.invalid",  # not in the server certificate
        connect_to="127.0.0.1",
    )
    failed = await running.audit.wait_for("connection_failed")
    assert failed["side"] == "agent_refused_control_plane"
    assert "cp.vendor.invalid" in str(failed["detail"])


async def test_ipv6_literal(tmp_path: Path, pki: PKIPaths, start_agent: AgentStarter) -> None:
    config = stub_config(pki, tmp_path / "v6.db")
    server = StubServer(dataclasses.replace(config, agent_host="::1"))
    try:
        await server.start()
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        running = await start_agent(
            port=server.agent_port, driver=RecordingDriver(), control_plane_host="::1"
        )
        assert running.config.control_plane.url == f"wss://[::1]:{server.agent_port}/v1/agent"
        up = running.audit.matching("connection_up")[0]
        assert up["tls_version"] == "TLSv1.3"
        peer = next(iter(server.hub.links.values())).websocket.remote_address
        assert peer[0] == "::1"
        await running.stop()
    finally:
        await server.close()


def cert_sha256(path: Path) -> str:
    der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


async def test_renewed_certificate_files_are_used_on_the_next_connection(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, pki: PKIPaths, tmp_path: Path
) -> None:
    own = PKIPaths.at(tmp_path / "pki")
    shutil.copytree(pki.root, own.root)
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver(), pki_root=own.root)
    before = cert_sha256(own.agent_cert("agent-1"))
    assert (await api.agent("agent-1"))["cert_sha256"] == before

    issue_agent_cert(own, "agent-1")  # a renewal: new key and certificate in the same files
    after = cert_sha256(own.agent_cert("agent-1"))
    assert after != before
    await stub.hub.links["agent-1"].websocket.close(1012, "restart")  # next connection, no restart
    await running.audit.wait_for("connection_up", count=2, within=20)
    assert (await api.agent("agent-1", wait_connected=scaled(10)))["cert_sha256"] == after
    assert not running.task.done()


# -- route choice and redaction (no network) --------------------------------------------------


def control_plane(tmp_path: Path, **fields: object) -> ControlPlaneConfig:
    base = ControlPlaneConfig(
        url="wss://cp.example.com:443/v1/agent",
        host="cp.example.com",
        port=443,
        ca_bundle=tmp_path / "ca.pem",
        client_cert=tmp_path / "agent.pem",
        client_key=tmp_path / "agent.key",
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:p%40ss@proxy:3128", "http://u:***@proxy:3128"),
        ("http://u:pw@[fd00::1]:3128", "http://u:***@[fd00::1]:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_route_none_explicit_and_private_endpoint(tmp_path: Path) -> None:
    assert route_for(control_plane(tmp_path, proxy="none")) == Route(proxy=None)
    explicit = route_for(control_plane(tmp_path, proxy="http://proxy:3128"))
    assert explicit == Route(proxy="http://proxy:3128")
    private = route_for(control_plane(tmp_path, proxy="none", connect_to=("10.0.0.5", 443)))
    assert private == Route(proxy=None, host="10.0.0.5", port=443)
    assert private.describe() == "direct to 10.0.0.5:443"


def test_route_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert route_for(control_plane(tmp_path)) == Route(proxy=None)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert route_for(control_plane(tmp_path)) == Route(proxy="http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", ".example.com")
    assert route_for(control_plane(tmp_path)) == Route(proxy=None)


def test_credentials_file_is_quoted_into_the_url_and_must_be_private(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("bob:p@ss:word\n")
    creds.chmod(0o600)
    route = route_for(
        control_plane(tmp_path, proxy="http://proxy:3128", proxy_credentials_file=creds)
    )
    assert route.proxy == "http://bob:p%40ss%3Aword@proxy:3128"
    assert "p@ss" not in route.describe()
    creds.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        route_for(control_plane(tmp_path, proxy="http://proxy:3128", proxy_credentials_file=creds))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('proxy = "socks://x:1"', "control_plane.proxy"),
        ('proxy = "http://proxy:3128/path"', "control_plane.proxy"),
        ('connect_to = "10.0.0.5:notaport"', "control_plane.connect_to"),
    ],
)
def test_bad_egress_settings_are_refused(tmp_path: Path, value: str, error: str) -> None:
    text = (
        '[control_plane]\nurl = "wss://cp:443/v1/agent"\nca_bundle = "ca"\n'
        f'client_cert = "c"\nclient_key = "k"\n{value}\n'
        '[commands]\ntrusted_keys = ["k.pub"]\nissuers = ["cp"]\n'
    )
    with pytest.raises(ConfigError, match=error):
        parse_config(text.encode(), source=tmp_path / "agent.toml")
