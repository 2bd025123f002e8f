"""Enrollment with a one-time token, renewal over the tunnel, revocation (issue 5), against the
real stub (its agent CA, its HTTPS enrollment listener) and real agents, over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli import main as agent_cli
from agent.config import load_config
from agent.daemon import Agent
from agent.enroll import EnrollmentFailed, enroll
from agent.io.clock import Clock, OffsetClock
from agent.io.files import write_atomic
from agent.io.renewal import Validity, new_key_and_csr, private_key_pem, renewal_due
from byoc_demo.layout import DemoPaths, write_agent_files
from certs.issuing import issue_from_csr, parse_csr
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.enrollment import EnrollmentRefused
from control_plane_stub.server import StubServer
from tests.conftest import AuditWatcher, scaled, stub_config
from tests.fakes import RecordingDriver

LIFETIME = 9.0
"""Seconds a certificate lives in these tests: renewal is due after about two thirds."""


@pytest.fixture
async def ca_stub(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[StubServer]:
    config = dataclasses.replace(
        stub_config(pki, tmp_path / "stub.db"),
        pki=pki.root,
        enroll_port=0,
        cert_lifetime=LIFETIME,
    )
    server = StubServer(config)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def ca_api(ca_stub: StubServer) -> AsyncIterator[StubClient]:
    async with StubClient(f"http://127.0.0.1:{ca_stub.api_port}", timeout=scaled(10)) as client:
        yield client


def agent_files(
    tmp_path: Path, short_tmp: Path, pki: PKIPaths, stub: StubServer, name: str
) -> DemoPaths:
    """An installation whose key, certificate and CA bundle do not exist yet."""
    paths = write_agent_files(
        tmp_path / name,
        pki=pki.root,
        control_plane_port=stub.agent_port,
        agent_id=name,
        run_dir=short_tmp / name,
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    fresh = tmp_path / name / "tls"
    text = paths.config.read_text()
    for key, file in (
        ("client_cert", "agent.pem"),
        ("client_key", "agent.key"),
        ("ca_bundle", "ca.pem"),
    ):
        start = text.index(f"{key} = ")
        end = text.index("\n", start)
        text = text[:start] + f'{key} = "{fresh / file}"' + text[end:]
    paths.config.write_text(text)
    return paths


def enroll_with(
    stub: StubServer, pki: PKIPaths, paths: DemoPaths, token: str, *, force: bool = False
) -> str:
    config = load_config(paths.config)
    cp = config.control_plane
    return enroll(
        control_plane=f"https://localhost:{stub.enroll_port}",
        token=token,
        trust=pki.server_ca_cert,
        client_key=cp.client_key,
        client_cert=cp.client_cert,
        ca_bundle=cp.ca_bundle,
        expected_id=config.agent_id,
        force=force,
    ).agent_id


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def enrolled(
    stub: StubServer, api: StubClient, pki: PKIPaths, tmp_path: Path, short_tmp: Path, name: str
) -> DemoPaths:
    """An installation for ``name``, enrolled with a fresh token."""
    paths = agent_files(tmp_path, short_tmp, pki, stub, name)
    token = (await api.enroll_token(name, ttl=60))["token"]
    await asyncio.to_thread(enroll_with, stub, pki, paths, token)
    return paths


@contextlib.asynccontextmanager
async def running_agent(
    paths: DemoPaths, clock: Clock | None = None, *, ready: bool = True
) -> AsyncIterator[tuple[Agent, AuditWatcher]]:
    """The agent of ``paths``, in this loop (connected, unless ``ready`` is False)."""
    agent = Agent(load_config(paths.config), driver=RecordingDriver(), clock=clock)
    watcher = AuditWatcher()
    agent.audit.add_listener(watcher)
    task = asyncio.create_task(agent.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(agent.started.wait(), scaled(30))
        if ready:
            await asyncio.wait_for(agent.parts.link.ready.wait(), scaled(30))
        yield agent, watcher
    finally:
        agent.request_stop("test")
        await asyncio.wait_for(task, scaled(30))


async def test_an_enrolled_agent_connects_with_a_key_that_never_left_the_host(
    ca_stub: StubServer, ca_api: StubClient, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_files(tmp_path, short_tmp, pki, ca_stub, "agent-7")
    token = (await ca_api.enroll_token("agent-7", ttl=60))["token"]

    assert await asyncio.to_thread(enroll_with, ca_stub, pki, paths, token) == "agent-7"

    cp = load_config(paths.config).control_plane
    assert stat.S_IMODE(cp.client_key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cp.client_cert.read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= LIFETIME * 1.2  # short-lived
    async with running_agent(paths):
        link = ca_stub.hub.links["agent-7"]
        assert link.cert_sha256 == fingerprint(cert)


async def test_a_token_works_once(
    ca_stub: StubServer, ca_api: StubClient, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_files(tmp_path, short_tmp, pki, ca_stub, "agent-8")
    token = (await ca_api.enroll_token("agent-8", ttl=60))["token"]
    await asyncio.to_thread(enroll_with, ca_stub, pki, paths, token)
    first = load_config(paths.config).control_plane.client_cert.read_bytes()

    with pytest.raises(EnrollmentFailed, match="used already"):
        await asyncio.to_thread(enroll_with, ca_stub, pki, paths, token, force=True)
    with pytest.raises(EnrollmentFailed, match="unknown enrollment token"):
        await asyncio.to_thread(enroll_with, ca_stub, pki, paths, "made-up-token", force=True)

    assert load_config(paths.config).control_plane.client_cert.read_bytes() == first


@pytest.mark.parametrize("broken", ["key_dir", "ca_bundle", "url"])
async def test_a_local_precondition_fails_before_the_token_is_spent(
    ca_stub: StubServer,
    ca_api: StubClient,
    pki: PKIPaths,
    tmp_path: Path,
    short_tmp: Path,
    broken: str,
) -> None:
    """Each failure is one line naming the fix, and the same token then works. (Permissions as
    the unprivileged service user are exercised under real systemd: test_systemd_service.py;
    these tests run as root, so a file standing where a directory should be breaks writing.)"""
    paths = agent_files(tmp_path, short_tmp, pki, ca_stub, "agent-4")
    token = (await ca_api.enroll_token("agent-4", ttl=60))["token"]
    cp = load_config(paths.config).control_plane
    url, trust, key = f"https://localhost:{ca_stub.enroll_port}", pki.server_ca_cert, cp.client_key
    if broken == "key_dir":
        (tmp_path / "not-a-dir").write_text("")
        key = tmp_path / "not-a-dir" / "agent.key"
        expected = "cannot write the key"
    elif broken == "ca_bundle":
        trust = tmp_path / "missing-ca.pem"
        expected = "--ca-bundle"
    else:
        url = f"http://localhost:{ca_stub.enroll_port}"
        expected = "must be https://"

    def attempt(url: str, trust: Path, key: Path) -> str:
        return enroll(
            control_plane=url,
            token=token,
            trust=trust,
            client_key=key,
            client_cert=cp.client_cert,
            ca_bundle=cp.ca_bundle,
        ).agent_id

    with pytest.raises(EnrollmentFailed, match=expected) as failed:
        await asyncio.to_thread(attempt, url, trust, key)
    assert "\n" not in str(failed.value)
    assert not cp.client_cert.exists()
    assert (
        await asyncio.to_thread(
            attempt, f"https://localhost:{ca_stub.enroll_port}", pki.server_ca_cert, cp.client_key
        )
        == "agent-4"
    )


def _csr() -> str:
    return new_key_and_csr("agent-1")[1]


async def test_an_expired_token_is_refused(ca_stub: StubServer) -> None:
    ca = ca_stub.ca
    assert ca is not None
    now = time.time()
    token = ca.make_token("agent-5", ttl=60, now=now)
    with pytest.raises(EnrollmentRefused, match="expired"):
        ca.enroll(token, _csr(), now=now + 61)
    issued = ca.enroll(token, _csr(), now=now + 59)  # the refusal did not spend it
    assert issued.agent_id == "agent-5"  # the token decides, not the CSR's "agent-1"


async def test_the_agent_renews_before_expiry_and_uses_the_new_certificate_next_time(
    ca_stub: StubServer, ca_api: StubClient, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = await enrolled(ca_stub, ca_api, pki, tmp_path, short_tmp, "agent-6")
    cp = load_config(paths.config).control_plane
    old_cert, old_key = cp.client_cert.read_bytes(), cp.client_key.read_bytes()
    async with running_agent(paths) as (agent, audit):
        renewed = await audit.wait_for("certificate_renewed", within=LIFETIME * 2)
        new_cert = cp.client_cert.read_bytes()
        assert new_cert != old_cert
        assert cp.client_key.read_bytes() != old_key  # a new key, made here
        assert stat.S_IMODE(cp.client_key.stat().st_mode) == 0o600
        assert renewed["serial"] == format(
            x509.load_pem_x509_certificate(new_cert).serial_number, "x"
        )
        assert agent.parts.link.ready.is_set()  # no gap: the session carried on

        ca_stub.hub.disconnect("agent-6", 4001, "test: reconnect")  # the next connection ...
        await audit.wait_for("connection_up", count=2)
        await asyncio.wait_for(agent.parts.link.ready.wait(), scaled(10))
        presented = ca_stub.hub.links["agent-6"].cert_sha256
        assert presented == fingerprint(x509.load_pem_x509_certificate(new_cert))  # the new one


async def test_a_revoked_certificate_is_disconnected_and_refused(
    ca_stub: StubServer, ca_api: StubClient, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = await enrolled(ca_stub, ca_api, pki, tmp_path, short_tmp, "agent-4")
    async with running_agent(paths) as (agent, audit):
        answer = await ca_api.revoke("agent-4")
        assert answer == {"revoked": 1, "disconnected": True}
        down = await audit.wait_for("connection_down")
        assert "4006" in str(down["reason"])
        refused = await audit.wait_for("connection_failed", reason="http_refused", within=20)
        assert refused["status"] == 403
        assert not agent.parts.link.ready.is_set()
        assert "agent-4" not in ca_stub.hub.links


@pytest.mark.parametrize("skew", [-7200.0, -30.0, 0.0, 30.0, 7200.0])
def test_renewal_is_judged_on_the_control_planes_clock(skew: float) -> None:
    """A host clock off by ``skew`` seconds: the offset measured at ``welcome`` corrects it,
    so the agent renews at the same moment of the control plane's time, neither in a loop
    (clock ahead) nor after expiry (clock behind)."""
    validity = Validity(not_before=1_000_000.0, not_after=1_000_000.0 + 86_400)
    control_plane_now = 1_000_000.0 + 3_600
    wait = renewal_due(validity, local_now=control_plane_now + skew, clock_offset=-skew)
    assert wait == pytest.approx(2 / 3 * 86_400 - 3_600)
    late = renewal_due(validity, local_now=control_plane_now + 60_000 + skew, clock_offset=-skew)
    assert late == 0.0


async def test_an_expired_certificate_is_refused_at_the_tls_handshake(
    ca_stub: StubServer, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    """Issued by the right CA, for the right agent, but its validity ended: TLS refuses it."""
    paths = agent_files(tmp_path, short_tmp, pki, ca_stub, "agent-3x")
    cp = load_config(paths.config).control_plane
    key, csr = new_key_and_csr("agent-3x")
    expired = issue_from_csr(
        pki,
        "agent-3x",
        parse_csr(csr),
        valid_for=timedelta(hours=1),
        now=datetime.now(UTC) - timedelta(days=2),
    )
    cp.client_key.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cp.client_key, private_key_pem(key), 0o600)
    cp.client_cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    cp.ca_bundle.write_bytes(pki.server_ca_cert.read_bytes())
    async with running_agent(paths, ready=False) as (_, audit):
        failed = await audit.wait_for("connection_failed", reason="tls_rejected", within=30)
        assert failed["side"] == "control_plane_refused_agent"
        assert "agent-3x" not in ca_stub.hub.links


@pytest.mark.parametrize("skew", [-7200.0, 7200.0], ids=["clock-behind", "clock-ahead"])
async def test_a_skewed_agent_renews_on_the_control_planes_time(
    ca_stub: StubServer,
    ca_api: StubClient,
    pki: PKIPaths,
    tmp_path: Path,
    short_tmp: Path,
    skew: float,
) -> None:
    """The host clock is two hours off. Judged on it, a clock behind would renew long after the
    certificate expired and a clock ahead at once and for ever; corrected by the offset
    measured at ``welcome``, the agent renews once, on time."""
    name = "agent-5b" if skew < 0 else "agent-5a"
    paths = await enrolled(ca_stub, ca_api, pki, tmp_path, short_tmp, name)
    async with running_agent(paths, clock=OffsetClock(skew)) as (agent, audit):
        assert agent.parts.link.clock_offset == pytest.approx(-skew, abs=5)
        await audit.wait_for("certificate_renewed", within=LIFETIME * 2)
        renewed = x509.load_pem_x509_certificate(
            load_config(paths.config).control_plane.client_cert.read_bytes()
        )
        remaining = renewed.not_valid_after_utc.timestamp() - time.time()
        assert remaining > LIFETIME / 2  # a fresh certificate, not one renewed in a loop
        assert audit.count("certificate_renewed") == 1


async def test_enroll_never_replaces_an_identity_unless_forced(
    ca_stub: StubServer,
    ca_api: StubClient,
    pki: PKIPaths,
    tmp_path: Path,
    short_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``byoc-agent enroll`` on a host that has a key and certificate stops before the token is
    spent and says what would be lost; ``--force`` replaces them, and says so aloud when the
    new certificate is for another agent id."""
    paths = agent_files(tmp_path, short_tmp, pki, ca_stub, "agent-9")
    text = paths.config.read_text()  # no [agent] id: the token decides who this host is
    paths.config.write_text(text.replace('id = "agent-9"\n', ""))
    url = f"https://localhost:{ca_stub.enroll_port}"

    async def cli(token: str, *extra: str) -> int:
        argv = ["enroll", "--config", str(paths.config), "--control-plane", url]
        argv += ["--ca-bundle", str(pki.server_ca_cert), f"--token={token}", *extra]
        return await asyncio.to_thread(agent_cli, argv)

    assert await cli((await ca_api.enroll_token("agent-9", ttl=60))["token"]) == 0
    assert "\nenrolled as agent-9;" in "\n" + capsys.readouterr().out  # after the stub's logs
    cp = load_config(paths.config).control_plane
    first = cp.client_cert.read_bytes(), cp.client_key.read_bytes()

    other = (await ca_api.enroll_token("agent-10", ttl=60))["token"]
    assert await cli(other) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{cp.client_cert} is the certificate of agent-9 (valid until" in err
    assert "run enroll again with --force (the token was not used)" in err
    assert (cp.client_cert.read_bytes(), cp.client_key.read_bytes()) == first

    assert await cli(other, "--force") == 0  # the same token: it was not spent
    captured = capsys.readouterr()
    assert captured.err == (
        "byoc-agent: this host was agent-9 and is now agent-10: agent-9's key and "
        "certificate were replaced (--force)\n"
    )
    assert "\nenrolled as agent-10;" in "\n" + captured.out
    assert cp.client_key.read_bytes() != first[1]

    cp.client_cert.unlink()  # a key left without its certificate is not an identity either
    again = (await ca_api.enroll_token("agent-10", ttl=60))["token"]
    assert await cli(again) == 1
    assert "exists already (without a usable certificate" in capsys.readouterr().err
