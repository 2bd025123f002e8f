"""The ``make demo`` scenario: a stub control plane drives a real agent over mutual TLS.

Everything runs as separate processes on loopback, exactly as a user would start them:
``byoc-certs init``, ``cp-stub serve``, ``byoc-agent run`` (which supervises the demo workload
replicas), ``byoc-agent approve`` and ``byoc-agent audit verify``. Each step prints one line; the
exit status is 0 only if every step ended as expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psutil

from byoc_demo.layout import BROKEN_VERSION, DEMO_AGENT_ID, DemoPaths, write_agent_files
from control_plane_stub.client import StubClient
from control_plane_stub.errors import ApiError

STEP_TIMEOUT = 90.0


class ScenarioFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 60.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def start_process(name: str, argv: Sequence[str], log: Path) -> Process:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
    return Process(name, popen, log)


class Scenario:
    def __init__(self, root: Path, out: TextIO) -> None:
        self.root = root
        self.out = out
        self.processes: list[Process] = []
        self.failures: list[str] = []
        self.paths: DemoPaths | None = None
        self.api_url = ""

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, number: int, title: str, outcome: str, ok: bool) -> None:
        mark = "ok  " if ok else "FAIL"
        self.say(f"[{mark}] {number}. {title:<44} {outcome}")
        if not ok:
            self.failures.append(f"{number}. {title}: {outcome}")

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> int:
        """Make the PKI, start the stub and the agent; return the stub's agent port."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        pki = self.root / "pki"
        subprocess.run(
            _module_cmd("certs.cli", "init", str(pki), "--agent", DEMO_AGENT_ID),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        agent_port, api_port = free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.processes.append(
            start_process(
                "cp-stub",
                _module_cmd(
                    "control_plane_stub.cli",
                    "serve",
                    "--pki",
                    str(pki),
                    "--agents",
                    f"127.0.0.1:{agent_port}",
                    "--api",
                    f"127.0.0.1:{api_port}",
                    "--db",
                    str(self.root / "cp-stub.db"),
                ),
                self.root / "logs" / "cp-stub.log",
            )
        )
        base = 21000 + (os.getpid() % 80) * 100
        self.paths = write_agent_files(
            self.root / "agent",
            pki=pki,
            control_plane_port=agent_port,
            port_range=(base, base + 99),
        )
        self.processes.append(
            start_process(
                "byoc-agent",
                _module_cmd("agent.cli", "run", "--config", str(self.paths.config)),
                self.root / "logs" / "agent.log",
            )
        )
        return agent_port

    def agent_listening_sockets(self) -> list[str]:
        """Measured, not claimed: the agent process's listening TCP/UDP sockets."""
        agent = next(p for p in self.processes if p.name == "byoc-agent")
        connections = psutil.Process(agent.popen.pid).net_connections(kind="inet")
        return [
            f"{c.laddr.ip}:{c.laddr.port}" for c in connections if c.status == psutil.CONN_LISTEN
        ]

    def run_cli(self, module: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _module_cmd(module, *args),
            check=False,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
        )

    # -- the steps ------------------------------------------------------------------------

    async def final(self, api: StubClient, command: dict[str, Any]) -> dict[str, Any]:
        answer = await api.command(command["ref"], wait_for="final", wait_seconds=STEP_TIMEOUT)
        if answer["timed_out"]:
            raise ScenarioFailed(f"command {command['ref']} did not finish in {STEP_TIMEOUT}s")
        return dict(answer["command"])

    async def run_steps(self, api: StubClient) -> None:
        assert self.paths is not None  # noqa: S101  # set by setup()
        await api.wait_ready(30)
        agent = await api.agent(DEMO_AGENT_ID, wait_connected=30)
        listening = self.agent_listening_sockets()
        self.step(
            0,
            "agent dials out, mutual TLS",
            f"{'connected' if agent['connected'] else 'NOT connected'}; agent cert sha256 "
            f"{str(agent['cert_sha256'])[:16]}…; agent's listening sockets: "
            f"{', '.join(listening) or 'none'}",
            bool(agent["connected"]) and not listening,
        )
        first = await self.final(api, await api.send(DEMO_AGENT_ID, "scale", {"replicas": 3}))
        result = first.get("result") or {}
        self.step(
            1,
            "scale to 3 replicas",
            f"{first['state']}: {result.get('replicas')} replicas on ports {result.get('ports')}",
            first["state"] == "succeeded" and result.get("replicas") == 3,
        )
        metrics = await self.final(
            api, await api.send(DEMO_AGENT_ID, "collect_metrics", {"targets": ["workload", "host"]})
        )
        samples = (metrics.get("result") or {}).get("samples") or []
        self.step(
            2,
            "collect metrics",
            summarize_metrics(metrics["state"], samples),
            metrics["state"] == "succeeded" and bool(samples),
        )
        upgrade = await self.final(
            api, await api.send(DEMO_AGENT_ID, "upgrade", {"version": "2.0.0"})
        )
        self.step(
            3,
            "upgrade to 2.0.0 (rolling, health-checked)",
            f"{upgrade['state']}: now {(upgrade.get('result') or {}).get('version')}",
            upgrade["state"] == "succeeded",
        )
        broken = await self.final(
            api, await api.send(DEMO_AGENT_ID, "upgrade", {"version": BROKEN_VERSION})
        )
        rolled = (broken.get("result") or {}).get("version")
        self.step(
            4,
            f"upgrade to {BROKEN_VERSION} (a broken release)",
            f"{broken['state']}: {broken.get('reason')}; back on {rolled}",
            broken["state"] == "failed" and broken.get("reason") == "unhealthy_rolled_back",
        )
        refused = await self.final(api, await api.send(DEMO_AGENT_ID, "scale", {"replicas": 10}))
        self.step(
            5,
            "scale to 10 (outside the customer's policy)",
            f"{refused['state']}: {refused.get('detail')}",
            refused["state"] == "rejected" and refused.get("reason") == "policy_denied",
        )
        await self.approval_step(api)
        token = (await api.command(first["ref"], with_token=True))["command"]["token"]
        replay = await self.final(api, await api.send_signed(DEMO_AGENT_ID, token))
        self.step(
            7,
            "replay step 1's signed command",
            f"{replay['state']}: {replay.get('reason')}",
            replay["state"] == "rejected" and replay.get("reason") == "replayed",
        )

    async def approval_step(self, api: StubClient) -> None:
        assert self.paths is not None  # noqa: S101
        sent = await api.send(DEMO_AGENT_ID, "scale", {"replicas": 5})
        pending = await api.command(
            sent["ref"], wait_for="pending_approval", wait_seconds=STEP_TIMEOUT
        )
        state = pending["command"]["state"]
        if state != "pending_approval":
            self.step(6, "scale to 5 (needs local approval)", f"{state}, not pending", False)
            return
        approve = self.run_cli(
            "agent.cli",
            "approve",
            str(pending["command"]["jti"]),
            "--config",
            str(self.paths.config),
            "--note",
            "demo: change window open",
        )
        done = await self.final(api, sent)
        who = "approved on the host" if approve.returncode == 0 else approve.stderr.strip()
        self.step(
            6,
            "scale to 5 (needs local approval)",
            f"pending_approval -> byoc-agent approve ({who}) -> {done['state']}",
            approve.returncode == 0 and done["state"] == "succeeded",
        )

    def verify_audit(self) -> None:
        assert self.paths is not None  # noqa: S101
        verify = self.run_cli("agent.cli", "audit", "verify", str(self.paths.audit_log))
        first_line = (verify.stdout or verify.stderr).strip().splitlines()[0]
        self.step(
            8, "audit verify (hash chain)", first_line.split(": ", 1)[-1], verify.returncode == 0
        )

    # -- tear-down ------------------------------------------------------------------------

    def shutdown(self) -> None:
        for process in reversed(self.processes):
            code = process.stop()
            if code != 0:
                self.failures.append(
                    f"{process.name} exited with status {code} (see {process.log})"
                )
        self.processes.clear()


def summarize_metrics(state: str, samples: list[dict[str, Any]]) -> str:
    """One line: the version each replica reports, and the host's load."""
    versions = sorted(
        {
            f"replica {s['labels'].get('replica')}: {s['labels'].get('version')}"
            for s in samples
            if s.get("name") == "demo_workload_info"
        }
    )
    host = {s["name"]: s["value"] for s in samples if s.get("target") == "host"}

    def pct(name: str) -> str:
        value = host.get(name)
        return f"{value:.0f}%" if isinstance(value, int | float) else "?"

    return (
        f"{state}: {len(samples)} samples; {', '.join(versions)}; host cpu "
        f"{pct('host_cpu_percent')}, memory {pct('host_memory_used_percent')}, "
        f"disk {pct('host_disk_used_percent')}"
    )


async def _with_client(url: str, body: Callable[[StubClient], Awaitable[None]]) -> None:
    async with StubClient(url, timeout=30) as api:
        await body(api)


def main(argv: Sequence[str] | None = None) -> int:
    root = Path(argv[0] if argv else os.environ.get("BYOC_DEMO_DIR", ".demo")).resolve()
    scenario = Scenario(root, sys.stdout)
    scenario.say("BYOC agent demo: stub control plane -> outbound mTLS tunnel -> agent -> workload")
    started = time.monotonic()
    try:
        agent_port = scenario.setup()
        scenario.say(
            f"  control plane stub: wss://localhost:{agent_port}/v1/agent, "
            f"operator API {scenario.api_url}"
        )
        asyncio.run(_with_client(scenario.api_url, scenario.run_steps))
        scenario.shutdown()  # the agent's last audit record is written when it stops
        scenario.verify_audit()
    except (ScenarioFailed, ApiError, OSError, subprocess.SubprocessError) as exc:
        scenario.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            scenario.shutdown()
    elapsed = time.monotonic() - started
    logs = root / "logs"
    if scenario.failures:
        scenario.say(f"\nDEMO FAILED after {elapsed:.1f}s:")
        for failure in scenario.failures:
            scenario.say(f"  - {failure}")
        scenario.say(f"  logs: {logs}/agent.log, {logs}/cp-stub.log")
        return 1
    assert scenario.paths is not None  # noqa: S101
    scenario.say(
        f"\nDemo complete in {elapsed:.1f}s; everything was shut down cleanly.\n"
        f"  audit log:   {scenario.paths.audit_log}\n"
        f"  agent log:   {logs / 'agent.log'} (operational, JSON)\n"
        f"  stub log:    {logs / 'cp-stub.log'}\n"
        f"  try:         .venv/bin/byoc-agent audit verify {scenario.paths.audit_log}"
    )
    return 0
