"""Failure modes found in review, each reproduced for real and shown to be handled: results too
big or not strict JSON, a peer that drops every connection, a policy tightened while a command
waits, work started during shutdown, an audit log that cannot be written, unauthenticated junk
filling the audit log, early acknowledgements, a world-readable key."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.core.errors import ConfigError
from agent.core.frames import Ack, DeliveryRejected, ErrorFrame, Status
from agent.daemon import Agent
from agent.drivers.base import ExecContext
from agent.drivers.process_control import workload_environment
from agent.io.audit_file import verify_file
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from control_plane_stub.signer import CommandSigner
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver
from tests.hostile_cp import HostileControlPlane


@dataclass
class MetricsFlood(RecordingDriver):
    """Returns whatever ``samples`` it is given, e.g. more than one frame can carry."""

    samples: list[dict[str, object]] | None = None

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        self.calls.append(("collect_metrics", tuple(targets), ctx.jti))
        return {"samples": self.samples or [], "replicas": 6}


@pytest.fixture
def signer(pki: PKIPaths) -> CommandSigner:
    return CommandSigner.from_file(pki.signing_key, issuer="cp-stub")


@pytest.fixture
async def hostile(pki: PKIPaths) -> AsyncIterator[HostileControlPlane]:
    async with HostileControlPlane(pki, timeout=scaled(10)) as cp:
        yield cp


def token(signer: CommandSigner, command_type: str, params: dict[str, Any]) -> tuple[str, str]:
    signed = signer.sign(
        agent_id="agent-1", command_type=command_type, params=params, now=time.time()
    )
    return signed.jti, signed.token


async def test_an_oversized_result_is_truncated_and_blocks_nothing(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    samples = [
        {
            "target": "workload",
            "name": f"exporter_metric_{i}",
            "labels": {"replica": "0"},
            "value": i,
        }
        for i in range(20_000)
    ]
    running = await start_agent(port=stub.agent_port, driver=MetricsFlood(samples=samples))
    big = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    final = await api.command(big["ref"], wait_for="final", wait_seconds=scaled(15))
    result = final["command"]["result"]
    assert final["command"]["state"] == "succeeded"
    assert result["truncated"] is True
    assert result["samples_total"] == 20_000
    assert 0 < len(result["samples"]) < 20_000
    # The next result gets through on the same connection: nothing is stuck behind the big one.
    after = await api.send("agent-1", "scale", {"replicas": 2})
    done = await api.command(after["ref"], wait_for="final", wait_seconds=scaled(15))
    assert done["command"]["state"] == "succeeded"
    assert running.audit.count("connection_up") == 1
    assert running.audit.matching("execution_finished", result_truncated=True)


async def test_a_nan_in_a_result_is_sent_as_a_string(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = MetricsFlood(samples=[{"name": "ratio", "labels": {}, "value": math.nan}])
    await start_agent(port=stub.agent_port, driver=driver)
    sent = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(15))
    assert final["command"]["state"] == "succeeded"
    assert final["command"]["result"]["samples"][0]["value"] == "NaN"


async def test_a_lone_surrogate_in_a_result_is_replaced_and_the_command_finishes(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """/tmp/review3/surrogate_result.py: a label holding a lone surrogate (a workload's
    /metrics decoded loosely) made finishing raise, and the command stayed ``running``."""
    sample = {"target": "workload", "name": "m", "labels": {"l\udfff": "x\ud800"}, "value": 1.0}
    await start_agent(port=stub.agent_port, driver=MetricsFlood(samples=[sample]))
    sent = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(15))
    assert final["command"]["state"] == "succeeded"
    assert final["command"]["result"]["samples"][0]["labels"] == {"l\ufffd": "x\ufffd"}
    assert final["receipt"]["status"] == "valid"  # signed over the repaired result


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


@dataclass
class UnrecordableResult(RecordingDriver):
    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        return {"samples": [], "oddity": Unprintable()}


async def test_a_result_that_cannot_be_recorded_still_finishes_the_command(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    """Whatever goes wrong while recording an outcome, the command does not stay ``running``:
    it ends ``failed`` (``internal_error``), audited, and the agent carries on."""
    running = await start_agent(port=stub.agent_port, driver=UnrecordableResult())
    sent = await api.send("agent-1", "collect_metrics", {"targets": ["workload"]})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(15))
    assert (final["command"]["state"], final["command"]["reason"]) == ("failed", "internal_error")
    assert "could not be recorded: RuntimeError" in final["command"]["detail"]
    (finished,) = running.audit.matching("execution_finished")
    assert (finished["outcome"], finished["reason"]) == ("failed", "internal_error")
    after = await api.send("agent-1", "scale", {"replicas": 2})
    done = await api.command(after["ref"], wait_for="final", wait_seconds=scaled(15))
    assert done["command"]["state"] == "succeeded"


async def test_a_peer_that_drops_every_connection_gets_a_growing_backoff(
    hostile: HostileControlPlane, start_agent: AgentStarter
) -> None:
    running = await start_agent(
        port=hostile.port, driver=RecordingDriver(), backoff_base=0.01, backoff_cap=10.0
    )
    for number in range(1, 6):
        connection = await hostile.connection(number)
        await connection.websocket.close(1011, "go away")
    # Five connections reached READY and were dropped at once: none counted as stable.
    assert running.agent.parts.link.consecutive_failures >= 4


async def test_a_policy_tightened_while_a_command_waits_is_obeyed(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver(hold=asyncio.Event())
    running = await start_agent(port=stub.agent_port, driver=driver)
    first = await api.send("agent-1", "upgrade", {"version": "2.0.0"})
    await api.command(first["ref"], wait_for="running", wait_seconds=scaled(10))
    queued = await api.send("agent-1", "scale", {"replicas": 3})  # allowed when it arrived
    await api.command(queued["ref"], wait_for="received", wait_seconds=scaled(10))

    policy = running.paths.policy
    policy.write_text(
        policy.read_text().replace(
            "approval_above = 4", "approval_above = 4\nrequire_approval = true"
        )
    )
    assert driver.hold is not None
    driver.hold.set()
    final = await api.command(queued["ref"], wait_for="pending_approval", wait_seconds=scaled(10))
    assert final["command"]["state"] == "pending_approval"
    assert driver.executed(queued["jti"]) == 0
    recheck = running.audit.matching("policy_decision", jti=queued["jti"], stage="before_start")
    assert recheck[0]["verdict"] == "require_approval"


async def test_stopping_starts_nothing_new(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver(hold=asyncio.Event())
    first = await start_agent(port=stub.agent_port, driver=driver)
    running_cmd = await api.send("agent-1", "upgrade", {"version": "2.0.0"})
    await api.command(running_cmd["ref"], wait_for="running", wait_seconds=scaled(10))
    queued = await api.send("agent-1", "scale", {"replicas": 2})
    await api.command(queued["ref"], wait_for="received", wait_seconds=scaled(10))

    first.agent.request_stop("SIGTERM")
    await first.audit.wait_for("agent_stopping")
    assert driver.hold is not None
    driver.hold.set()  # the running command finishes within the grace period
    await asyncio.wait_for(first.task, scaled(30))
    assert (await api.command(running_cmd["ref"]))["command"]["state"] == "succeeded"
    assert (await api.command(queued["ref"]))["command"]["state"] == "received"
    assert driver.executed(queued["jti"]) == 0  # not started after agent_stopping

    second_driver = RecordingDriver()
    await start_agent(port=stub.agent_port, driver=second_driver)
    final = await api.command(queued["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "succeeded"
    assert second_driver.executed(queued["jti"]) == 1


async def test_an_audit_log_that_cannot_be_written_stops_the_agent_before_acting(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver()
    running = await start_agent(port=stub.agent_port, driver=driver)
    head = running.agent.audit.head
    # A real write failure: the audit descriptor now points at /dev/full (ENOSPC).
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, running.agent.audit.audit.fd)
    finally:
        os.close(full)
    await api.send("agent-1", "scale", {"replicas": 3})
    await asyncio.wait_for(running.task, scaled(30))
    assert running.agent.exit_code == 1
    assert driver.calls == []  # nothing ran unaudited
    assert "audit log failure" in running.agent._stop_reason
    assert running.agent.audit.head == head


async def test_unauthenticated_junk_cannot_flood_the_audit_log(
    hostile: HostileControlPlane, start_agent: AgentStarter
) -> None:
    running = await start_agent(port=hostile.port, driver=RecordingDriver())
    await hostile.connection(1)
    header = "eyJhbGciOiJFZERTQSIsInR5cCI6ImJ5b2MtY29tbWFuZCtqd3QiLCJraWQiOiJub3BlIn0"
    params = {"blob": "x" * 9_000}  # under the token limit: it reaches the verifier
    payload = json.dumps({"jti": "junk", "cmd": {"type": "scale", "params": params}})
    body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    await hostile.send_command("junk-1", f"{header}.{body}.c2ln")
    rejected = await hostile.next_frame(type=DeliveryRejected)
    assert rejected.reason == "unknown_kid"
    digest = running.audit.matching("command_received", ref="junk-1")[0]["params"]
    assert isinstance(digest, dict)
    assert set(digest) == {"sha256", "bytes"}  # the 9 kB of claimed params are not recorded
    assert digest["bytes"] == len(json.dumps(params, sort_keys=True, separators=(",", ":")))
    assert verify_file(running.paths.audit_log).summary.records > 0
    lines = running.paths.audit_log.read_text().splitlines()
    assert max(len(line) for line in lines) < 4_000


async def test_an_ack_for_a_frame_not_sent_yet_is_ignored(
    pki: PKIPaths, signer: CommandSigner, start_agent: AgentStarter
) -> None:
    async with HostileControlPlane(pki, auto_ack=False, timeout=scaled(10)) as cp:
        running = await start_agent(port=cp.port, driver=RecordingDriver())
        await cp.connection(1)
        jti, signed = token(signer, "scale", {"replicas": 2})
        await cp.send_command("r-1", signed)
        received = await cp.next_frame(type=Status, where=lambda f: f.state == "received")
        await cp.send_raw(json.dumps({"type": "ack", "seq": received.seq + 100}))
        final = await cp.next_frame(type=Status, where=lambda f: f.state == "succeeded")
        assert len(running.agent.parts.outbox) >= 3  # the early ack deleted nothing
        for frame in (received, final):
            await cp.send_raw(json.dumps(Ack(seq=frame.seq).to_json()))
        await running.audit.wait_for("result_delivered", jti=jti)
        assert running.audit.count("result_delivered") == 1


async def test_a_key_readable_by_others_is_refused_at_start(
    stub: StubServer, start_agent: AgentStarter, tmp_path: Path, pki: PKIPaths
) -> None:
    running: RunningAgent = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    await running.stop()
    config = load_config(running.paths.config)
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.agent_key("agent-1").read_bytes())
    loose.chmod(0o644)
    bad = dataclasses.replace(
        config, control_plane=dataclasses.replace(config.control_plane, client_key=loose)
    )
    with pytest.raises(ConfigError, match="chmod 600"):
        await Agent(bad, driver=RecordingDriver()).run(install_signal_handlers=False)


def test_replicas_do_not_inherit_the_agents_systemd_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/byoc-agent.service")
    env = workload_environment()
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "CREDENTIALS_DIRECTORY"} & set(env)
    assert env["PATH"] == os.environ["PATH"]


async def test_a_ref_reused_for_another_token_is_refused(
    hostile: HostileControlPlane, signer: CommandSigner, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver()
    await start_agent(port=hostile.port, driver=driver)
    await hostile.connection(1)
    first_jti, first = token(signer, "scale", {"replicas": 2})
    await hostile.send_command("same-ref", first)
    await hostile.next_frame(type=Status, where=lambda f: f.state == "succeeded")
    second_jti, second = token(signer, "scale", {"replicas": 3})
    await hostile.send_command("same-ref", second)
    refused = await hostile.next_frame(type=DeliveryRejected)
    assert (refused.ref, refused.reason, refused.jti) == ("same-ref", "ref_reused", second_jti)
    assert driver.executed(second_jti) == 0
    assert driver.executed(first_jti) == 1


async def test_an_error_frame_names_the_ref_of_a_broken_command_frame(
    hostile: HostileControlPlane, start_agent: AgentStarter
) -> None:
    await start_agent(port=hostile.port, driver=RecordingDriver())
    await hostile.connection(1)
    await hostile.send_raw(json.dumps({"type": "command", "ref": "r-broken", "token": 42}))
    error = await hostile.next_frame(type=ErrorFrame)
    assert (error.code, error.ref) == ("malformed_frame", "r-broken")


async def test_the_agent_announces_its_heartbeat_interval(
    hostile: HostileControlPlane, start_agent: AgentStarter
) -> None:
    await start_agent(port=hostile.port, driver=RecordingDriver(), heartbeat_interval=0.7)
    connection = await hostile.connection(1)
    assert connection.hello is not None
    assert connection.hello.heartbeat_interval == 0.7
    assert connection.hello.capabilities["driver"] == "recording"
