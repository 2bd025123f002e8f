"""Self-enrollment at first start (agent/bootstrap.py), in-process against the real stub's
HTTPS enrollment listener: every local precondition is checked before the one-time token is
sent, a refused token is not sent again, and nothing here ever exits while waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from agent.bootstrap import Bootstrap, ensure_enrolled, local_problems
from agent.config import AgentConfig, EnrollConfig, load_config
from agent.core.errors import ConfigError
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import scaled, stub_config

POLICY = "version = 1\n[scale]\nallow = true\nmin_replicas = 1\nmax_replicas = 3\n"


class Events:
    """An EventSink that keeps what it is told (PodEvents in a pod)."""

    def __init__(self) -> None:
        self.posted: list[tuple[bool, str, str]] = []
        self.changed = asyncio.Event()

    async def post(self, *, warning: bool, reason: str, message: str) -> str | None:
        self.posted.append((warning, reason, message))
        self.changed.set()
        return None

    async def close(self) -> None:
        return None

    async def until(self, reason: str) -> None:
        async with asyncio.timeout(scaled(20)):
            while not any(r == reason for _, r, _ in self.posted):
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def stub(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[tuple[StubServer, StubClient]]:
    config = dataclasses.replace(stub_config(pki, tmp_path / "stub.db"), pki=pki.root,
                                 enroll_port=0)  # fmt: skip
    server = StubServer(config)
    await server.start()
    try:
        async with StubClient(f"http://127.0.0.1:{server.api_port}", timeout=scaled(10)) as c:
            yield server, c
    finally:
        await server.close()


def start(config: AgentConfig) -> tuple[Bootstrap, Events, asyncio.Event, asyncio.Task[bool]]:
    events = Events()
    bootstrap = Bootstrap(config, log=structlog.get_logger(), events=events)
    stop = asyncio.Event()
    return bootstrap, events, stop, asyncio.create_task(bootstrap.run(stop))


def write_config(root: Path, pki: PKIPaths, server: StubServer) -> AgentConfig:
    shutil.copy(pki.signing_pub, root / "signing.pub")
    (root / "policy.toml").write_text(POLICY)
    (root / "agent.toml").write_text(f"""
[agent]
state_dir = "state"
audit_log = "audit/audit.jsonl"
policy = "policy.toml"
control_socket = "run/control.sock"
[control_plane]
url = "wss://localhost:{server.agent_port}/v1/agent"
ca_bundle = "tls/ca.pem"
client_cert = "tls/agent.pem"
client_key = "tls/agent.key"
[enroll]
url = "https://localhost:{server.enroll_port}"
token_file = "token"
ca_bundle = "{pki.server_ca_cert}"
check_interval = 0.05
[commands]
trusted_keys = ["signing.pub"]
issuers = ["cp-stub"]
[health]
listen = ""
[driver]
kind = "process"
""")
    return load_config(root / "agent.toml")


async def test_without_enroll_settings_the_error_names_both_ways(
    tmp_path: Path, pki: PKIPaths, stub: tuple[StubServer, StubClient]
) -> None:
    config = dataclasses.replace(write_config(tmp_path, pki, stub[0]), enroll=None)
    with pytest.raises(ConfigError, match=r"byoc-agent enroll.*\[enroll\] token_file"):
        await ensure_enrolled(config, install_signal_handlers=False)


async def test_a_local_problem_is_reported_before_the_token_is_sent(
    tmp_path: Path, pki: PKIPaths, stub: tuple[StubServer, StubClient]
) -> None:
    server, client = stub
    config = write_config(tmp_path, pki, server)
    (tmp_path / "policy.toml").write_text("version = 1\n[scale]\nsurprise = 1\n")
    token = (await client.enroll_token("agent-9", ttl=600))["token"]
    (tmp_path / "token").write_text(token)
    bootstrap, events, _stop, running = start(config)
    await events.until("EnrollmentBlocked")
    assert bootstrap.state.state == "blocked"
    assert "policy" in bootstrap.state.message
    assert bootstrap.state.attempts == 0  # the token was never sent
    (tmp_path / "policy.toml").write_text(POLICY)  # fixed: it goes on by itself
    assert await asyncio.wait_for(running, scaled(20)) is True
    assert (tmp_path / "tls" / "agent.pem").exists()
    assert [r for _, r, _ in events.posted] == ["EnrollmentBlocked", "Enrolled"]
    assert config.control_plane.client_key.stat().st_mode & 0o777 == 0o600


async def test_a_refused_token_is_not_sent_again_and_a_new_one_is_used(
    tmp_path: Path, pki: PKIPaths, stub: tuple[StubServer, StubClient]
) -> None:
    server, client = stub
    config = write_config(tmp_path, pki, server)
    (tmp_path / "token").write_text("not-a-token-the-vendor-made")
    bootstrap, events, _stop, running = start(config)
    await events.until("EnrollmentTokenRefused")
    assert bootstrap.state.state == "token_refused"
    assert "kubectl" in bootstrap.state.action
    ready, why = bootstrap._ready()
    assert not ready
    assert "token_refused" in why
    answer = await bootstrap._control({"op": "status"}, operator=None)  # type: ignore[arg-type]
    assert answer["status"]["enrollment"]["state"] == "token_refused"  # type: ignore[index]
    for _ in range(5):  # an absence over time: five check intervals, the token not sent again
        await asyncio.sleep(config.enroll.check_interval if config.enroll else 0)
    assert bootstrap.state.attempts == 1
    (tmp_path / "token").write_text((await client.enroll_token("agent-9", ttl=600))["token"])
    assert await asyncio.wait_for(running, scaled(20)) is True
    assert bootstrap.state.attempts == 2
    assert [r for _, r, _ in events.posted] == ["EnrollmentTokenRefused", "Enrolled"]


async def test_no_token_waits_and_stop_ends_the_wait(
    tmp_path: Path, pki: PKIPaths, stub: tuple[StubServer, StubClient]
) -> None:
    config = write_config(tmp_path, pki, stub[0])
    _bootstrap, events, stop, running = start(config)
    await events.until("EnrollmentTokenMissing")
    stop.set()
    assert await asyncio.wait_for(running, scaled(10)) is False
    assert not config.control_plane.client_cert.exists()


def test_every_precondition_names_its_fix(tmp_path: Path, pki: PKIPaths) -> None:
    config = load_config_for_problems(tmp_path, pki)
    problems = local_problems(config)
    text = "\n".join(problems)
    assert "enrollment CA bundle" in text
    assert "command-signing" in text or "trusted_keys" in text
    assert "policy" in text
    assert "not writable" in text


def load_config_for_problems(tmp_path: Path, pki: PKIPaths) -> AgentConfig:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    (tmp_path / "agent.toml").write_text(f"""
[agent]
state_dir = "/proc/state"
policy = "missing-policy.toml"
[control_plane]
url = "wss://localhost:1/v1/agent"
ca_bundle = "/proc/tls/ca.pem"
client_cert = "/proc/tls/agent.pem"
client_key = "/proc/tls/agent.key"
[enroll]
url = "https://localhost:1"
token_file = "token"
ca_bundle = "{tmp_path / "no-ca.pem"}"
[commands]
trusted_keys = ["no-key.pub"]
issuers = ["cp-stub"]
""")
    config = load_config(tmp_path / "agent.toml")
    assert isinstance(config.enroll, EnrollConfig)
    return config


async def test_a_certificate_issued_but_not_usable_here_is_not_retried_with_the_spent_token(
    tmp_path: Path, pki: PKIPaths, stub: tuple[StubServer, StubClient]
) -> None:
    """The control plane issued a certificate for another agent id than the configuration's:
    the token is used up, so the agent says so and waits for a new one instead of calling the
    network unreachable and sending the spent token again and again."""
    server, client = stub
    config = dataclasses.replace(write_config(tmp_path, pki, server), agent_id="agent-7")
    (tmp_path / "token").write_text((await client.enroll_token("agent-9", ttl=600))["token"])
    bootstrap, events, stop, running = start(config)
    await events.until("EnrollmentBlocked")
    assert bootstrap.state.state == "blocked"
    assert "'agent-9'" in bootstrap.state.message
    assert "spent" in bootstrap.state.action
    for _ in range(5):  # five check intervals: the spent token is not sent again
        await asyncio.sleep(config.enroll.check_interval if config.enroll else 0)
    assert bootstrap.state.attempts == 1
    stop.set()
    assert await asyncio.wait_for(running, scaled(20)) is False
