"""Certificate refusals on the tunnel, with real mutual TLS on loopback.

Either side refusing the other's certificate is not something a quick retry fixes: the agent
audits ``connection_failed`` (reason ``tls_rejected``, with the side that refused), logs
``tls_certificate_rejected`` at error level and waits the slow ``tls_rejected_retry`` delay
before it dials again. The positive control checks what a good connection records.

Tests wait for audit records through the agent's audit watcher (``RunningAgent.audit`` from
conftest, woken by every record the agent writes); nothing here sleeps to synchronise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.io.audit_file import verify_file
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, RunningAgent, scaled, stub_config
from tests.fakes import RecordingDriver

AGENT_ID = "agent-1"
TLS_REJECTED_RETRY = 300.0
"""Large, so a second attempt inside a test can only mean the slow delay was not used."""

LogEntries = list[MutableMapping[str, Any]]
Record = dict[str, Any]


def find(records: list[Record], event: str, **fields: object) -> list[Record]:
    return [
        r
        for r in records
        if r["event"] == event and all(r.get(key) == value for key, value in fields.items())
    ]


def audit_records(path: Path) -> list[Record]:
    """Every record of an audit log, after checking its whole hash chain."""
    verify_file(path)  # raises AuditIntegrityError at the first bad record
    return [json.loads(line) for line in path.read_text().splitlines()]


def der_sha256(pem_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def mixed_pki(root: Path, *, trust_from: PKIPaths, identity_from: PKIPaths) -> Path:
    """A PKI directory as the agent layout expects it: server CA and command-signing key from
    ``trust_from``, the agent's client certificate and key from ``identity_from``."""
    (root / "agents").mkdir(parents=True, mode=0o700)
    shutil.copy2(trust_from.server_ca_cert, root / "server-ca.pem")
    shutil.copy2(trust_from.signing_pub, root / "command-signing.pub")
    shutil.copy2(identity_from.agent_cert(AGENT_ID), root / "agents" / f"{AGENT_ID}.pem")
    shutil.copy2(identity_from.agent_key(AGENT_ID), root / "agents" / f"{AGENT_ID}.key")
    (root / "agents" / f"{AGENT_ID}.key").chmod(0o600)
    return root


@pytest.fixture
def op_logs() -> Iterator[LogEntries]:
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
def foreign_identity(pki: PKIPaths, foreign_pki: PKIPaths, tmp_path: Path) -> Path:
    """A PKI root whose agent certificate comes from the foreign (unknown) agent CA."""
    return mixed_pki(tmp_path / "mixed-pki", trust_from=pki, identity_from=foreign_pki)


def _summary(logs: LogEntries) -> list[str]:
    keep = ("connect_failed", "reconnect_scheduled", "tls_certificate_rejected", "connected")
    return [
        f"{e['event']}: " + ", ".join(f"{k}={e[k]}" for k in ("error", "side", "delay_s") if k in e)
        for e in logs
        if e.get("event") in keep
    ][:6]


@dataclass
class Refusals:
    """Starts an agent that is expected to be refused, and checks how it takes it."""

    start_agent: AgentStarter
    logs: LogEntries

    async def start(self, *, port: int, **layout: Any) -> RunningAgent:
        return await self.start_agent(
            port=port,
            driver=RecordingDriver(),
            wait=False,
            tls_rejected_retry=TLS_REJECTED_RETRY,
            **layout,
        )

    async def assert_refused_once(
        self, running: RunningAgent, *, side: str, attempts: int = 1
    ) -> Record:
        """A refusal, audited and logged once, then the slow delay: no further attempt.

        ``attempts`` is how many connection attempts that takes: 1 when the refusal is seen as
        a TLS alert, 2 when the server closes without the alert reaching the agent (TLS 1.3
        with Python's asyncio server: the agent allows one ordinary retry, docs/PROTOCOL.md
        §4.4)."""
        try:
            await running.audit.wait_for("connection_failed", within=5)
        except TimeoutError:
            refused = False
        else:
            refused = True
        if not refused:
            pytest.fail(
                f"no connection_failed audit record within {scaled(5)}s (expected side={side});"
                f" the agent logged {_summary(self.logs)}"
            )
        # A bounded window in which an ordinary backoff (base 0.05 s, cap 0.5 s) would have
        # dialled several more times; the slow delay must not.
        with pytest.raises(TimeoutError):
            await running.audit.wait_for("connection_failed", count=2, within=1.5)
        assert running.audit.count("connection_up") == 0
        assert not running.task.done(), "the agent task ended"

        records = audit_records(running.paths.audit_log)
        [failed] = find(records, "connection_failed")
        assert failed["reason"] == "tls_rejected", failed
        assert failed["side"] == side, failed
        assert failed["url"] == running.config.control_plane.url
        assert failed["detail"]
        assert find(records, "connection_up") == []

        link = running.agent.parts.link
        assert link.reconnects == attempts, _summary(self.logs)
        assert not link.ready.is_set()
        assert link.connection is None
        assert link.last_error == failed["detail"]

        rejected = [e for e in self.logs if e["event"] == "tls_certificate_rejected"]
        assert len(rejected) == 1, rejected
        assert rejected[0]["log_level"] == "error"
        assert rejected[0]["side"] == side
        assert TLS_REJECTED_RETRY / 2 <= rejected[0]["retry_in_s"] <= TLS_REJECTED_RETRY
        scheduled = [e for e in self.logs if e["event"] == "reconnect_scheduled"]
        assert len(scheduled) == attempts, scheduled
        assert TLS_REJECTED_RETRY / 2 <= scheduled[-1]["delay_s"] <= TLS_REJECTED_RETRY
        return failed


@pytest.fixture
def refusals(start_agent: AgentStarter, op_logs: LogEntries) -> Refusals:
    return Refusals(start_agent, op_logs)


async def test_control_plane_refuses_agent_certificate_from_unknown_ca(
    stub: StubServer, api: StubClient, foreign_identity: Path, refusals: Refusals
) -> None:
    running = await refusals.start(port=stub.agent_port, pki_root=foreign_identity)
    await refusals.assert_refused_once(running, side="control_plane_refused_agent", attempts=2)
    assert await api.agents() == []
    assert stub.hub.links == {}


async def test_agent_refuses_server_certificate_from_unknown_ca(
    pki: PKIPaths, foreign_pki: PKIPaths, tmp_path: Path, refusals: Refusals
) -> None:
    # The foreign stub would accept the agent's certificate (it trusts the real agent CA):
    # only the agent's own check of the server certificate can keep them apart.
    config = dataclasses.replace(
        stub_config(foreign_pki, tmp_path / "foreign-stub.db"), agent_ca=pki.agent_ca_cert
    )
    foreign = StubServer(config)
    await foreign.start()
    try:
        running = await refusals.start(port=foreign.agent_port)
        failed = await refusals.assert_refused_once(running, side="agent_refused_control_plane")
        assert "certificate" in failed["detail"]
        async with StubClient(f"http://127.0.0.1:{foreign.api_port}", timeout=scaled(10)) as api:
            assert await api.agents() == []
        assert foreign.hub.links == {}
        await running.stop()
    finally:
        await foreign.close()


async def test_agent_refuses_server_certificate_for_another_name(
    stub: StubServer, api: StubClient, refusals: Refusals
) -> None:
    running = await refusals.start(port=stub.agent_port, server_name="not-the-server.example")
    failed = await refusals.assert_refused_once(running, side="agent_refused_control_plane")
    assert "not-the-server.example" in failed["detail"], failed
    assert await api.agents() == []
    assert stub.hub.links == {}


async def test_good_pair_connects_and_audits_the_server_certificate(
    stub: StubServer, api: StubClient, pki: PKIPaths, start_agent: AgentStarter
) -> None:
    running = await start_agent(
        port=stub.agent_port, driver=RecordingDriver(), tls_rejected_retry=TLS_REJECTED_RETRY
    )
    agent = await api.agent(AGENT_ID, wait_connected=scaled(10))
    assert agent["connected"] is True
    assert agent["cert_sha256"] == der_sha256(pki.agent_cert(AGENT_ID))

    records = audit_records(running.paths.audit_log)
    [up] = find(records, "connection_up")
    assert up["peer_cert_sha256"] == der_sha256(pki.server_cert)
    assert up["tls_version"] == "TLSv1.3"
    assert up["url"] == running.config.control_plane.url
    assert find(records, "connection_failed") == []
    connection = running.agent.parts.link.connection
    assert connection is not None
    assert connection.peer_sha256 == der_sha256(pki.server_cert)
    assert connection.agent_id_seen == AGENT_ID
