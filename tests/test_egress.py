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
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from websockets.exceptions import InvalidProxy

from agent.config import ControlPlaneConfig, TunnelConfig, parse_config
from agent.core.errors import ConfigError
from agent.core.frames import Hello
from agent.core.session import Outbox
from agent.io.clock import SystemClock
from agent.io.dialer import Dialer
from agent.io.egress import Route, redact_url, route_for
from agent.io.proxy_url import normalize_proxy_url, scrub
from agent.io.tunnel import Link, Tunnel
from certs.pki import PKIPaths, issue_agent_cert
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, scaled, stub_config
from tests.fakes import RecordingDriver
from tests.tinyproxy import running_tinyproxy

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
    async with running_tinyproxy(tmp_path, f"BasicAuth {USER} {PASSWORD}\n") as (port, log):
        yield Tinyproxy(port=port, log=log)


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
    assert up["route"] == f"via proxy http://***@127.0.0.1:{tinyproxy.port}"
    assert PASSWORD not in running.paths.audit_log.read_text()


async def test_a_stream_goes_through_the_proxy_too(
    stub: StubServer,
    api: StubClient,
    start_agent: AgentStarter,
    tinyproxy: Tinyproxy,
    tmp_path: Path,
) -> None:
    """The stream connection takes the tunnel's route (PROTOCOL §13.3): a second CONNECT,
    and version 2 framing end to end through the proxy (TLS inside CONNECT is opaque to it)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    policy = (
        f'version = 1\n[open_stream]\nallow = true\ntargets = ["127.0.0.1:{target_port}"]\n'
        "max_duration = 60\n"
    )
    running = await start_agent(
        port=stub.agent_port,
        driver=RecordingDriver(),
        policy=policy,
        proxy=tinyproxy.url,
        proxy_credentials_file=credentials_file(tmp_path),
    )
    forward = await api.start_forward(
        "agent-1", f"127.0.0.1:{target_port}", listen="127.0.0.1:0", max_duration=60
    )
    host, port = forward["listen"].rsplit(":", 1)
    payload = b"through the proxy " * 10_000
    async with target, asyncio.timeout(scaled(20)):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(payload)
        writer.write_eof()
        echoed = await reader.read()
        writer.close()
    assert echoed == payload
    closed = await running.audit.wait_for("stream_closed")
    assert closed["bytes_to_target"] == len(payload)
    assert tinyproxy.connects().count(f"localhost:{stub.agent_port} HTTP/1.1") == 2
    assert (await api.forwards())[0]["last_framing"] == 2


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
    assert proxied.agent.parts.link.route.startswith("via proxy http://***@127.0.0.1:")
    await proxied.stop()

    monkeypatch.setenv("NO_PROXY", "localhost")
    direct = await start_agent(port=stub.agent_port, driver=RecordingDriver(), name="direct")
    assert direct.agent.parts.link.route == "direct"
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
    assert running.agent.parts.link.route == f"direct to 127.0.0.1:{stub.agent_port}"
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
        ("http://u:p%40ss@proxy:3128", "http://***@proxy:3128"),
        ("http://u:pw@[fd00::1]:3128", "http://***@[fd00::1]:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
        ("proxy:3128", "proxy:3128"),
        # the user name can be the secret (a token), and a scheme-less value has credentials too
        ("http://tok3n@proxy:3128", "http://***@proxy:3128"),
        ("alice:s3cret@proxy.corp:3128", "***@proxy.corp:3128"),
        ("alice:s3://cret@proxy.corp:3128", "***@proxy.corp:3128"),
        # where a URL parser would end the authority at the '/', the password is still hidden
        ("http://u:pa/ss@proxy:3128", "http://***@proxy:3128"),
        ("socks5://u:p@evil:1080", "socks5://***@evil:1080"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128"),  # like curl: no scheme means http://
        ("alice:s3cret@proxy.corp:3128", "http://alice:s3cret@proxy.corp:3128"),
        ("[fd00::1]:3128", "http://[fd00::1]:3128"),
        ("HTTPS://proxy.corp:3129/", "https://proxy.corp:3129"),
        (" http://proxy.corp:3128 ", "http://proxy.corp:3128"),
    ],
)
def test_proxy_url_is_normalised(given: str, normal: str) -> None:
    assert normalize_proxy_url(given, source="HTTPS_PROXY") == normal


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("socks5://u:SECRET-pw@evil:1080", "SOCKS proxy"),
        ("socks5h://SECRET-tok@evil:1080", "SOCKS proxy"),
        ("ftp://u:SECRET-pw@proxy:21", "http:// or https://"),
        ("http://SECRET-tok@proxy:3128", "user name but no password"),
        ("u:SECRET-pw@proxy:notaport", "not a valid proxy URL"),
        ("http://u:SECRET-pw@proxy:3128/path", "path"),
        ("http://u:SECRET-pw%ff@proxy:3128", "percent-encoded UTF-8"),
        ("http://u:SECRET-pw@:3128", "no host"),
    ],
)
def test_bad_proxy_urls_are_refused_without_showing_credentials(given: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as raised:
        normalize_proxy_url(given, source="HTTPS_PROXY")
    assert "SECRET" not in str(raised.value)
    assert str(raised.value).startswith("HTTPS_PROXY: ")


def test_scrub_hides_a_proxy_url_and_its_credentials_in_error_texts() -> None:
    url = "http://tok3n-SECRET:pa%40ss-SECRET@proxy.corp:3128"
    text = (
        f"InvalidProxy: {url} isn't a valid proxy; user tok3n-SECRET, password pa@ss-SECRET, "
        "tok3n-SECRET:pa%40ss-SECRET"
    )
    scrubbed = scrub(text, url)
    assert "SECRET" not in scrubbed
    assert "http://***@proxy.corp:3128 isn't a valid proxy" in scrubbed
    assert scrub(text, None) == text


def test_route_none_explicit_and_private_endpoint(tmp_path: Path) -> None:
    assert route_for(control_plane(tmp_path, proxy="none")) == Route(proxy=None)
    explicit = route_for(control_plane(tmp_path, proxy="http://proxy:3128"))
    assert explicit == Route(proxy="http://proxy:3128")
    private = route_for(control_plane(tmp_path, proxy="none", connect_to=("10.0.0.5", 443)))
    assert private == Route(proxy=None, host="10.0.0.5", port=443)
    assert private.describe() == "direct to 10.0.0.5:443"


PROXY_VARIABLES = ("HTTPS", "NO", "ALL", "WSS", "SOCKS", "HTTP")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for prefix in PROXY_VARIABLES:
        for name in (f"{prefix}_PROXY", f"{prefix}_proxy".lower()):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_route_from_environment(tmp_path: Path, clean_environment: pytest.MonkeyPatch) -> None:
    monkeypatch = clean_environment
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


def test_scheme_less_environment_proxy_means_http(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("HTTPS_PROXY", "alice:s3cret@proxy.corp:3128")
    route = route_for(control_plane(tmp_path))
    assert route == Route(proxy="http://alice:s3cret@proxy.corp:3128")
    assert route.describe() == "via proxy http://***@proxy.corp:3128"


def test_credentials_file_with_a_scheme_less_environment_proxy(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    """/tmp/review3/egress_leak2.py: this used to build ``proxy.corp://alice:PW@/3128``."""
    creds = tmp_path / "creds"
    creds.write_text("alice:FILE-PASSWORD\n")
    creds.chmod(0o600)
    clean_environment.setenv("HTTPS_PROXY", "proxy.corp:3128")
    route = route_for(control_plane(tmp_path, proxy_credentials_file=creds))
    assert route == Route(proxy="http://alice:FILE-PASSWORD@proxy.corp:3128")
    # the file's credentials replace the URL's, so a lone user name there is no error
    clean_environment.setenv("HTTPS_PROXY", "http://someone@proxy.corp:3128")
    route = route_for(control_plane(tmp_path, proxy_credentials_file=creds))
    assert route == Route(proxy="http://alice:FILE-PASSWORD@proxy.corp:3128")


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        (
            {"HTTPS_PROXY": "http://proxy:3128", "SOCKS_PROXY": "socks5://u:SECRET@evil:1080"},
            "SOCKS_PROXY",
        ),
        # websockets' get_proxy reads an http:// SOCKS_PROXY as socks5h://
        (
            {"HTTPS_PROXY": "http://proxy:3128", "socks_proxy": "http://u:SECRET@evil:1080"},
            "SOCKS_PROXY",
        ),
        ({"HTTPS_PROXY": "socks5h://u:SECRET@evil:1080"}, "HTTPS_PROXY"),
        ({"WSS_PROXY": "socks4://SECRET@evil:1080"}, "WSS_PROXY"),
    ],
)
def test_socks_proxies_from_the_environment_are_refused(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    for name, value in variables.items():
        clean_environment.setenv(name, value)
    with pytest.raises(ConfigError, match=r"SOCKS proxy.*HTTP CONNECT") as raised:
        route_for(control_plane(tmp_path))
    assert named in str(raised.value)
    assert "SECRET" not in str(raised.value)


def test_wss_proxy_takes_priority_over_https_proxy(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("HTTPS_PROXY", "http://https-proxy:3128")
    clean_environment.setenv("WSS_PROXY", "http://wss-proxy:3128")
    clean_environment.setenv("ALL_PROXY", "http://all-proxy:3128")  # not read at all
    assert route_for(control_plane(tmp_path)) == Route(proxy="http://wss-proxy:3128")


# -- nothing derived from a proxy URL reaches last_error, logs or status unredacted ----------


def closed_port() -> int:
    """A local port nobody listens on: connecting fails at once (no DNS, no waiting)."""
    return free_port()


@dataclass
class Records:
    """A tunnel handler that only keeps the audit records the tunnel asks for."""

    seen: list[str] = field(default_factory=list)

    def record(self, event: str, /, **fields: object) -> None:
        self.seen.append(f"{event} {fields!r}")

    def command(self, peer: object, ref: str, token: str) -> None:
        raise AssertionError("no session in these tests")

    def ack(self, peer: object, seq: int) -> None:
        raise AssertionError("no session in these tests")

    def keyset(self, peer: object, token: str) -> None:
        raise AssertionError("no session in these tests")

    def certificate(self, frame: object) -> None:
        raise AssertionError("no session in these tests")

    def session_ended(self) -> None:
        pass


def offline_tunnel(tmp_path: Path, cp: ControlPlaneConfig) -> tuple[Tunnel, Records]:
    link, records = Link(), Records()
    tunnel = Tunnel(
        link=link,
        dialer=Dialer(
            cp, ssl_context=ssl.create_default_context, user_agent="t", connected=link.ready
        ),
        control_plane=cp,
        settings=TunnelConfig(),
        ssl_context=ssl.create_default_context,
        hello=lambda: Hello(protocol=1, agent_version="x", capabilities={}, heartbeat_interval=15),
        outbox=Outbox(),
        durable=lambda: 0,
        handler=records,
        agent_id="agent-1",
        clock=SystemClock(),
        log=structlog.get_logger(),
    )
    return tunnel, records


async def attempt_once(offline: tuple[Tunnel, Records]) -> list[str]:
    """One connection attempt; returns everything that could show an error (state, audit
    records and logs)."""
    tunnel, records = offline
    with structlog.testing.capture_logs() as logs:
        await tunnel._attempt(asyncio.Event())
    link = tunnel.link
    return [link.route, str(link.last_error), *records.seen, *(repr(entry) for entry in logs)]


@pytest.mark.parametrize(
    "proxy",
    [
        "alice:s3cret-SECRET@127.0.0.1:{port}",  # scheme-less: was taken as scheme "alice"
        "http://tok3n-SECRET@127.0.0.1:{port}",  # user name only: websockets refused it
        "socks5://u:pw-SECRET@127.0.0.1:{port}",
        "u:pw-SECRET@127.0.0.1:notaport",
    ],
)
async def test_proxy_credentials_never_reach_last_error_or_logs(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, proxy: str
) -> None:
    """/tmp/review3/egress_leak.py: websockets' InvalidProxy text, holding the whole URL,
    went to ``last_error`` (so ``byoc-agent status``) and the ``connect_failed`` log line."""
    clean_environment.setenv("HTTPS_PROXY", proxy.format(port=closed_port()))
    offline = offline_tunnel(tmp_path, control_plane(tmp_path))
    shown = await attempt_once(offline)
    tunnel = offline[0].link
    assert tunnel.last_error is not None
    assert not [text for text in shown if "SECRET" in text]
    assert tunnel.route.startswith(("via proxy http://***@127.0.0.1:", "none "))


async def test_credentials_file_password_never_reaches_last_error_or_logs(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.write_text("alice:FILE-SECRET\n")
    creds.chmod(0o600)
    port = closed_port()
    clean_environment.setenv("HTTPS_PROXY", f"127.0.0.1:{port}")
    offline = offline_tunnel(tmp_path, control_plane(tmp_path, proxy_credentials_file=creds))
    shown = await attempt_once(offline)
    tunnel = offline[0].link
    assert tunnel.route == f"via proxy http://***@127.0.0.1:{port}"
    assert "ConnectionRefusedError" in str(tunnel.last_error)  # it did go to the proxy
    assert not [text for text in shown if "SECRET" in text]


async def test_an_error_text_quoting_the_proxy_url_is_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: whatever a library puts in its error text, the route's proxy URL and
    credentials are scrubbed from it before it is kept or logged."""
    url = "http://tok3n-SECRET:pw-SECRET@proxy.corp:3128"

    async def connect(*_args: object, proxy: str, **_kwargs: object) -> None:
        raise InvalidProxy(proxy, "hostile library text; password pw-SECRET")

    monkeypatch.setattr("agent.io.dialer._ConnectWithoutRedirects", connect)
    offline = offline_tunnel(tmp_path, control_plane(tmp_path, proxy=url))
    shown = await attempt_once(offline)
    tunnel = offline[0].link
    assert tunnel.last_error is not None
    assert "http://***@proxy.corp:3128 isn't a valid proxy" in tunnel.last_error
    assert not [text for text in shown if "SECRET" in text]
