"""Outbound-only, proved with a real firewall: the agent runs in a network namespace that drops
every new inbound connection, and the whole demo still passes against a control plane in
another namespace.

Layout (both namespaces are made for this test, with unique names, and removed after it)::

    byoc-cp-<hex>                          byoc-ag-<hex>
      cp-stub serve on 10.213.x.1            nftables input: policy drop,
      operator API on 127.0.0.1              accept established/related, accept iif lo
      the scenario (python -m byoc_demo)     byoc-agent run / approve / audit verify
                 veth-cp 10.213.x.1/30 <--> veth-ag 10.213.x.2/30

Before relying on the firewall the test shows it works: a listener in the agent's namespace is
reachable from the control plane's namespace without it and not with it, while the agent's
namespace still reaches it, and still dials out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.io.audit_file import verify_file
from byoc_demo.scenario import listening_sockets
from tests.conftest import scaled
from tests.netns import (
    AGENT_VETH,
    CP_VETH,
    FIREWALL_TABLE,
    NetnsPair,
    Unavailable,
    apply_agent_firewall,
    create_pair,
    remove_namespaces,
    ruleset,
    unavailable_reason,
)

REPO = Path(__file__).resolve().parent.parent
LISTENER_PORT = 18080
PROBE_TIMEOUT = 3.0
"""How long a connection attempt through the firewall may take before it counts as blocked."""


@pytest.fixture
def namespaces() -> Iterator[NetnsPair]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot build network namespaces here: {reason}")
    try:
        pair = create_pair()
    except Unavailable as exc:
        pytest.skip(f"this machine does not allow network namespaces: {exc}")
    try:
        yield pair
    finally:
        remove_namespaces([pair.agent, pair.cp])


def in_netns(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


async def probe(namespace: str, host: str, port: int) -> str:
    """Try one TCP connection to host:port from inside ``namespace``."""
    process = await asyncio.create_subprocess_exec(
        *in_netns(
            namespace,
            sys.executable,
            "-m",
            "tests.netns",
            "probe",
            host,
            str(port),
            str(PROBE_TIMEOUT),
        ),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), scaled(PROBE_TIMEOUT + 20))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()
    return output.decode().strip()


@contextlib.asynccontextmanager
async def http_listener(
    namespace: str, host: str, port: int, directory: Path
) -> AsyncIterator[int]:
    """``python -m http.server`` bound to host:port inside ``namespace``; yields its pid once it
    is listening (it prints its banner after ``listen()``)."""
    process = await asyncio.create_subprocess_exec(
        *in_netns(
            namespace,
            sys.executable,
            "-u",
            "-m",
            "http.server",
            "--bind",
            host,
            "--directory",
            str(directory),
            str(port),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        banner = await asyncio.wait_for(process.stdout.readline(), scaled(20))
        assert banner.startswith(b"Serving HTTP on"), banner
        yield process.pid  # `ip netns exec` execs in place: this is the server's pid
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.communicate(), scaled(20))


async def test_firewall_blocks_inbound_and_the_demo_still_passes(
    namespaces: NetnsPair, tmp_path: Path
) -> None:
    pair = namespaces
    host_interfaces = await asyncio.to_thread(_host_interfaces)
    assert not {CP_VETH, AGENT_VETH} & set(host_interfaces), "the veth pair leaked to the host"
    assert not any(
        address in (pair.cp_addr, pair.agent_addr)
        for addrs in host_interfaces.values()
        for address in addrs
    ), "an address of this test is configured on the host"

    # 1. The path works: without the firewall the control plane's side can connect in.
    target = f"{pair.agent_addr}:{LISTENER_PORT}"
    async with http_listener(pair.agent, pair.agent_addr, LISTENER_PORT, tmp_path) as server_pid:
        # The measurement the demo's step 0 relies on sees a listener in another namespace.
        assert target in listening_sockets(server_pid)
        assert await probe(pair.cp, pair.agent_addr, LISTENER_PORT) == "connected"

        # 2. With the firewall, it cannot; the agent's own namespace still can.
        try:
            loaded = await asyncio.to_thread(apply_agent_firewall, pair.agent)
        except Unavailable as exc:
            pytest.skip(f"this machine does not allow nftables in a namespace: {exc}")
        assert "policy drop" in loaded
        assert await probe(pair.cp, pair.agent_addr, LISTENER_PORT) in ("timeout", "refused")
        assert await probe(pair.agent, pair.agent_addr, LISTENER_PORT) == "connected"

    # 3. Outbound is not filtered: the agent's namespace connects to the control plane's.
    async with http_listener(pair.cp, pair.cp_addr, LISTENER_PORT, tmp_path):
        assert await probe(pair.agent, pair.cp_addr, LISTENER_PORT) == "connected"

    # 4. The whole demo across the namespaces: the scenario and the stub in the control plane's
    #    namespace, every agent-side command in the agent's, behind the firewall.
    demo = tmp_path / "demo"
    process = await asyncio.create_subprocess_exec(
        *in_netns(
            pair.cp,
            sys.executable,
            "-m",
            "byoc_demo",
            str(demo),
            "--agent-netns",
            pair.agent,
            "--stub-host",
            pair.cp_addr,
            "--server-name",
            "localhost",
        ),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), scaled(180))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    steps = [line for line in text.splitlines() if line.startswith("[")]
    assert len(steps) == 9, text
    assert all(line.startswith("[ok  ]") for line in steps), text
    assert "Demo complete" in text
    url_prefix = f"wss://{pair.cp_addr}:"
    assert f"control plane stub: {url_prefix}" in text, text
    assert f"agent in network namespace {pair.agent}" in text, text
    # Measured in the agent's namespace: it listens on nothing but its loopback health endpoint,
    # and the stub saw the connection arrive from the agent's veth address, i.e. across the
    # namespaces.
    assert re.search(r"listening sockets: (none|127\.0\.0\.1:\d+) \(loopback only", steps[0]), (
        steps[0]
    )
    assert f"the stub sees it at {pair.agent_addr}:" in steps[0], steps[0]

    audit = demo / "agent" / "audit" / "audit.jsonl"
    summary = verify_file(audit).summary
    assert summary.events["approval_granted"] == 1
    assert summary.events["rollback_started"] == 1
    assert summary.events["agent_stopped"] == 1
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    connections = [r for r in records if r["event"] == "connection_up"]
    assert connections, "no connection_up record"
    assert all(str(r["url"]).startswith(url_prefix) for r in connections), connections
    assert all(r["peer_subject"] == "localhost" for r in connections), connections

    # The firewall stayed exactly as loaded for the whole run.
    assert await asyncio.to_thread(ruleset, pair.agent) == loaded
    assert FIREWALL_TABLE in loaded


def _host_interfaces() -> dict[str, list[str]]:
    """The host namespace's interfaces and their addresses (read only)."""
    result = subprocess.run(
        ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=20, check=True
    )
    return {
        str(link["ifname"]): [str(a["local"]) for a in link.get("addr_info", [])]
        for link in json.loads(result.stdout)
    }
