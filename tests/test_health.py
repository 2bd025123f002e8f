"""The health and metrics endpoint (agent/io/health.py, agent/io/metrics.py), on a real socket."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.ci import tool
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver
from tests.processes import free_port


def url(running: RunningAgent, path: str) -> str:
    health = running.agent.health
    assert health is not None
    return health.url + path


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_health_ready_and_metrics_describe_a_working_agent(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    sent = await api.send("agent-1", "scale", {"replicas": 2})
    await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    bad = await api.send_signed("agent-1", "not.a.token")
    await running.audit.wait_for("command_verification", ref=bad["ref"], result="rejected")

    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        health = await http.get(url(running, "/healthz"))
        ready = await http.get(url(running, "/readyz"))
        metrics = await http.get(url(running, "/metrics"))

    assert (health.status_code, health.text) == (200, "ok\n")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    found = samples(metrics.text)
    assert found[("byoc_agent_connected", ())] == 1
    assert found[("byoc_agent_commands_total", (("outcome", "succeeded"), ("type", "scale")))] == 1
    assert found[("byoc_agent_verification_failures_total", (("reason", "malformed_token"),))] == 1
    assert found[("byoc_agent_audit_records_total", ())] == running.agent.audit.head.seq
    assert found[("byoc_agent_certificate_expiry_seconds", ())] > 86400
    assert found[("byoc_agent_info", (("agent_id", "agent-1"), ("version", "0.1.0")))] == 1
    assert running.audit.count("health_listening", loopback=True) == 1


async def test_readyz_says_why_while_the_tunnel_is_down(start_agent: AgentStarter) -> None:
    running = await start_agent(port=free_port(), driver=RecordingDriver(), wait=False)
    await asyncio.wait_for(running.agent.started.wait(), scaled(30))
    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        ready = await http.get(url(running, "/readyz"))
        alive = await http.get(url(running, "/healthz"))
        metrics = await http.get(url(running, "/metrics"))
    assert ready.status_code == 503
    assert ready.text.startswith("tunnel down")
    assert alive.status_code == 200
    assert samples(metrics.text)[("byoc_agent_connected", ())] == 0


async def test_the_endpoint_answers_only_what_it_serves(
    stub: StubServer, start_agent: AgentStarter
) -> None:
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        assert (await http.post(url(running, "/metrics"), content=b"x")).status_code == 405
        assert (await http.get(url(running, "/admin"))).status_code == 404
        head = await http.head(url(running, "/healthz"))
    assert head.status_code == 200
    assert head.content == b""
    health = running.agent.health
    assert health is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
    writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")  # over the request limit
    async with asyncio.timeout(scaled(10)):
        answer = await reader.read()
    assert not answer.startswith(b"HTTP/1.1 200")
    writer.close()
    async with httpx.AsyncClient(timeout=scaled(10)) as http:  # and it still serves
        assert (await http.get(url(running, "/healthz"))).status_code == 200


async def test_promtool_accepts_the_metrics(stub: StubServer, start_agent: AgentStarter) -> None:
    promtool_path = tool("promtool", "apt-get install prometheus")
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        text = (await http.get(url(running, "/metrics"))).text
    promtool = await asyncio.create_subprocess_exec(
        promtool_path,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await promtool.communicate(text.encode())
    assert promtool.returncode == 0, out.decode()
