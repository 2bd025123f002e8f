"""The ``make demo`` scenario: a stub control plane drives a real agent over mutual TLS.

Everything runs as separate processes on loopback, exactly as a user would start them:
``byoc-certs init``, ``cp-stub serve``, ``byoc-agent run`` (which supervises the demo workload
replicas), ``byoc-agent approve`` and ``byoc-agent audit verify``. Each step prints one line; the
exit status is 0 only if every step ended as expected.

Options (all optional; without them, the behaviour above) move the pair apart, e.g. into two
network namespaces with a firewall between them (``tests/test_outbound_netns.py``)::

    ip netns exec CP_NS python -m byoc_demo DIR \
        --agent-netns AGENT_NS --stub-host 10.213.0.1 --server-name localhost

``--keep`` leaves the pair running after the scenario, with the web console enabled (its
address and token are printed), so a person can look; ``--stop`` (``make demo-stop``) stops a
pair left running in that directory.

``--agent-netns`` runs every agent-side command (``byoc-agent run``, ``approve``, ``audit
verify``) under ``ip netns exec``; the stub and the scenario itself (which talks to the stub's
operator API on loopback) stay where this process runs. ``--stub-host`` is the address the stub
listens on for agents and the agent dials; ``--server-name`` the name the agent verifies the
stub's certificate for (the development certificate is for localhost, 127.0.0.1 and ::1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
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

from agent.config import load_config
from agent.core.targets import TargetError, is_loopback_host, parse_listen
from byoc_demo.layout import BROKEN_VERSION, DEMO_AGENT_ID, DemoPaths, write_agent_files
from control_plane_stub.client import StubClient
from control_plane_stub.errors import ApiError

STEP_TIMEOUT = 90.0
KEPT_FILE = "kept.json"
"""In the demo directory: the processes ``--keep`` left running, for ``--stop``."""
ENV_FILE = "env"
"""In the demo directory, with ``--keep``: ``. .demo/env`` points a shell at the pair."""
HEALTH_DEFAULT = "127.0.0.1:9464"
"""The agent's default health address: the pair left running uses it when it is free, so
that README's ``curl 127.0.0.1:9464/healthz`` reaches it."""
CONSOLE_TOKEN_FILE = "console.token"  # noqa: S105  # a file name, not a secret


class ScenarioFailed(Exception):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host


_TCP_LISTEN = "0A"  # include/net/tcp_states.h, as /proc/net/tcp prints it


def listening_sockets(pid: int) -> list[str]:
    """Measured, not claimed: the TCP sockets process ``pid`` listens on, and its UDP sockets
    that accept datagrams from anyone (bound, not connected), as ``ip:port``.

    Read from ``/proc/PID/net/*``, which list the sockets of *that process's* network namespace.
    (psutil's ``net_connections`` reads ``/proc/net/*``, the namespace of the process asking, so
    for a process in another namespace it finds none of its sockets: a false "none".) Raises
    ``OSError`` when the process cannot be inspected; that is never reported as "none"."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            target = os.readlink(fd_dir / fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found: list[str] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode not in inodes:
                continue
            listening = (
                state == _TCP_LISTEN if proto.startswith("tcp") else remote.endswith(":0000")
            )
            if listening:
                ip, port = _proc_net_address(local)
                shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
                found.append(shown if proto.startswith("tcp") else f"udp {shown}")
    return sorted(found)


def _proc_net_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` -> (127.0.0.1, 8080): the address is printed as native-endian 32-bit
    words, the port as a number."""
    hex_ip, hex_port = text.split(":")
    packed = b"".join(
        int(hex_ip[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_ip), 8)
    )
    return ipaddress.ip_address(packed), int(hex_port, 16)


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _on_loopback(address: str) -> bool:
    """``127.0.0.1:9464`` / ``[::1]:9464``: a listening address on loopback?"""
    try:
        return is_loopback_host(parse_listen(address)[0])
    except TargetError:
        return False


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


def start_process(name: str, argv: Sequence[str], log: Path, *, detach: bool = False) -> Process:
    """``detach``: in a session of its own, so that it outlives the terminal that started it
    (a pair left running with ``--keep``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        popen = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=detach
        )
    return Process(name, popen, log)


def remember_kept(root: Path, processes: Sequence[Process]) -> None:
    """Note the processes left running (pid and start time: a reused pid is not ours)."""
    kept = [
        {"name": p.name, "pid": p.popen.pid, "started": psutil.Process(p.popen.pid).create_time()}
        for p in processes
    ]
    (root / KEPT_FILE).write_text(json.dumps(kept, indent=2) + "\n")


def stop_kept(root: Path, timeout: float = 60.0) -> list[str]:
    """Stop what ``--keep`` left running in ``root`` (SIGTERM, then SIGKILL after
    ``timeout``); one line for each process, none if nothing was kept."""
    path = root / KEPT_FILE
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ScenarioFailed(f"cannot read {path}: {exc}") from exc
    said: list[str] = []
    for entry in reversed(kept):  # the agent first, as a normal shutdown does
        name, pid = str(entry["name"]), int(entry["pid"])
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - float(entry["started"])) > 1.0:
                raise psutil.NoSuchProcess(pid)  # the pid was reused: not ours
            process.terminate()
            try:
                code = process.wait(timeout)
            except psutil.TimeoutExpired:
                process.kill()
                code = process.wait(timeout)
            status = f", exit status {code}" if code is not None else ""  # None: not our child
            said.append(f"stopped {name} (pid {pid}{status})")
        except psutil.NoSuchProcess:
            said.append(f"{name} (pid {pid}) had already stopped")
    path.unlink()
    return said


class Scenario:
    def __init__(
        self,
        root: Path,
        out: TextIO,
        *,
        agent_netns: str | None = None,
        stub_host: str | None = None,
        server_name: str | None = None,
        keep: bool = False,
    ) -> None:
        """``keep``: start the stub with its console, detached, to be left running.
        ``agent_netns``: run the agent-side commands in this network namespace.
        ``stub_host``: the address the stub listens on and the agent dials (default: the stub
        on 127.0.0.1, the agent dialling ``localhost``). ``server_name``: the name the agent
        verifies the stub's certificate for (default: the URL's host)."""
        self.root = root
        self.out = out
        self.agent_netns = agent_netns
        self.stub_host = stub_host
        self.server_name = server_name
        self.keep = keep
        self.console_url = ""
        self.processes: list[Process] = []
        self.failures: list[str] = []
        self.paths: DemoPaths | None = None
        self.api_url = ""
        self.agent_url = ""
        self.health = ""
        self.workload_ports: list[int] = []
        """The workload's ports after the last command that reported them."""

    @property
    def apart(self) -> bool:
        """Whether the pair is not simply on this host's loopback (any option given)."""
        return self.agent_netns is not None or self.stub_host is not None

    def agent_side(self, argv: Sequence[str]) -> list[str]:
        """A command the customer runs on the agent's host (in the agent's namespace, if any)."""
        prefix = ["ip", "netns", "exec", self.agent_netns] if self.agent_netns else []
        return [*prefix, *argv]

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
            for line in stop_kept(self.root):  # a pair an earlier `make demo KEEP=1` left
                self.say(f"  earlier demo: {line}")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        pki = self.root / "pki"
        subprocess.run(
            _module_cmd("certs.cli", "init", str(pki), "--agent", DEMO_AGENT_ID),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        listen_host = self.stub_host or "127.0.0.1"
        agent_port, api_port = free_port(listen_host), free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        console: list[str] = []
        if self.keep:
            console_port = free_port()
            self.console_url = f"http://127.0.0.1:{console_port}/"
            console = [
                "--console",
                f"127.0.0.1:{console_port}",
                "--console-token-file",
                str(self.root / CONSOLE_TOKEN_FILE),
            ]
        self.processes.append(
            start_process(
                "cp-stub",
                _module_cmd(
                    "control_plane_stub.cli",
                    "serve",
                    "--pki",
                    str(pki),
                    "--agents",
                    f"{_host_in_url(listen_host)}:{agent_port}",
                    "--api",
                    f"127.0.0.1:{api_port}",
                    "--db",
                    str(self.root / "cp-stub.db"),
                    *console,
                ),
                self.root / "logs" / "cp-stub.log",
                detach=self.keep,
            )
        )
        base = 21000 + (os.getpid() % 80) * 100
        host, port = HEALTH_DEFAULT.split(":")
        self.health = HEALTH_DEFAULT if self.keep and _free(host, int(port)) else "127.0.0.1:0"
        self.paths = write_agent_files(
            self.root / "agent",
            pki=pki,
            control_plane_port=agent_port,
            control_plane_host=self.stub_host or "localhost",
            port_range=(base, base + 99),
            server_name=self.server_name,
            health_listen=self.health,
        )
        self.agent_url = load_config(self.paths.config).control_plane.url
        self.processes.append(
            start_process(
                "byoc-agent",
                self.agent_side(
                    _module_cmd("agent.cli", "run", "--config", str(self.paths.config))
                ),
                self.root / "logs" / "agent.log",
                detach=self.keep,
            )
        )
        if self.keep:
            remember_kept(self.root, self.processes)
        return agent_port

    def agent_listening_sockets(self) -> list[str]:
        """Measured, not claimed: the agent process's listening sockets (see
        :func:`listening_sockets`), in whatever network namespace it runs."""
        agent = next(p for p in self.processes if p.name == "byoc-agent")
        # `ip netns exec` execs the command in place, so the pid is the agent's; make sure.
        cmdline = psutil.Process(agent.popen.pid).cmdline()
        if "agent.cli" not in cmdline:
            raise ScenarioFailed(f"pid {agent.popen.pid} is not the agent: {cmdline}")
        return listening_sockets(agent.popen.pid)

    def run_cli(self, module: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of the agent's CLI commands, as the operator on the agent's host would."""
        return subprocess.run(
            self.agent_side(_module_cmd(module, *args)),
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
        ports = (answer["command"].get("result") or {}).get("ports")
        if answer["command"]["state"] == "succeeded" and isinstance(ports, list) and ports:
            self.workload_ports = [int(port) for port in ports]
        return dict(answer["command"])

    def write_env(self) -> Path:
        """``. .demo/env``: the pair's operator API for ``cp-stub``, the agent's configuration
        for ``byoc-agent``, one of the workload's replicas (a stream target the policy
        allows), and the venv's commands on PATH."""
        assert self.paths is not None  # noqa: S101  # set by setup()
        replica = self.workload_ports[0] if self.workload_ports else 0  # replica 0: always there
        venv_bin = Path(sys.executable).parent
        lines = [
            "# . this file: point a shell at the demo pair `make demo KEEP=1` left running",
            f'export PATH="{venv_bin}:$PATH"',
            f"export CP_STUB_API={self.api_url}",
            f"export BYOC_AGENT_CONFIG={self.paths.config}",
            f"export WORKLOAD=127.0.0.1:{replica}  # the demo workload's replica 0",
        ]
        path = self.root / ENV_FILE
        path.write_text("\n".join(lines) + "\n")
        return path

    async def run_steps(self, api: StubClient) -> None:
        assert self.paths is not None  # noqa: S101  # set by setup()
        await api.wait_ready(30)
        agent = await api.agent(DEMO_AGENT_ID, wait_connected=30)
        listening = self.agent_listening_sockets()
        seen_from = f"; the stub sees it at {agent.get('peer')}" if self.apart else ""
        self.step(
            0,
            "agent dials out, mutual TLS",
            f"{'connected' if agent['connected'] else 'NOT connected'}; agent cert sha256 "
            f"{str(agent['cert_sha256'])[:16]}…; agent's listening sockets: "
            f"{', '.join(listening) or 'none'} (loopback only: its health endpoint){seen_from}",
            bool(agent["connected"]) and all(_on_loopback(address) for address in listening),
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

    def console_token(self) -> str:
        """The console's token, which the stub wrote to a 0600 file when it started."""
        return (self.root / CONSOLE_TOKEN_FILE).read_text().strip()

    async def wait_console(self, api: StubClient) -> None:
        """Until the stub has written the console token (it does once the console listens)."""
        await api.wait_ready(30)
        deadline = time.monotonic() + 30
        while not (self.root / CONSOLE_TOKEN_FILE).exists():
            if time.monotonic() > deadline:
                raise ScenarioFailed("the stub did not start its console")
            await asyncio.sleep(0.05)

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


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m byoc_demo",
        description="Run the demo: a stub control plane drives an agent over mutual TLS.",
    )
    parser.add_argument(
        "dir",
        nargs="?",
        default=os.environ.get("BYOC_DEMO_DIR", ".demo"),
        help="where the demo keeps its state and logs, emptied first (default: $BYOC_DEMO_DIR "
        "or .demo)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the pair running after the scenario, with the web console on loopback "
        "(its address and token are printed); `--stop` (make demo-stop) stops it",
    )
    parser.add_argument(
        "--stop",
        action="store_true",
        help="stop a pair that --keep left running in DIR, and exit",
    )
    parser.add_argument(
        "--agent-netns",
        metavar="NAME",
        help="run the agent-side commands (byoc-agent run, approve, audit verify) in this "
        "network namespace, under `ip netns exec NAME`; the stub and this scenario (which uses "
        "the stub's operator API on loopback) stay in this process's namespace",
    )
    parser.add_argument(
        "--stub-host",
        metavar="ADDR",
        type=_ip_address,
        help="the IP address the stub listens on for agents and the agent dials (default: the "
        "stub on 127.0.0.1, the agent dialling localhost)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the agent verifies the stub's certificate for, [control_plane] "
        "server_name (default: the host it dials; the development certificate is for "
        "localhost, 127.0.0.1 and ::1)",
    )
    return parser.parse_args(argv)


def stop_main(root: Path) -> int:
    try:
        said = stop_kept(root)
    except (ScenarioFailed, psutil.Error) as exc:
        print(f"demo-stop: {exc}", file=sys.stderr)
        return 1
    for line in said or [f"nothing to stop: no demo pair was left running in {root}"]:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.dir).resolve()
    if args.stop:
        return stop_main(root)
    scenario = Scenario(
        root,
        sys.stdout,
        agent_netns=args.agent_netns,
        stub_host=args.stub_host,
        server_name=args.server_name,
        keep=args.keep,
    )
    scenario.say("BYOC agent demo: stub control plane -> outbound mTLS tunnel -> agent -> workload")
    started = time.monotonic()
    try:
        scenario.setup()
        tls_name = f" (certificate checked for {args.server_name})" if args.server_name else ""
        where = f"; agent in network namespace {args.agent_netns}" if args.agent_netns else ""
        scenario.say(
            f"  control plane stub: {scenario.agent_url}{tls_name}, "
            f"operator API {scenario.api_url}{where}"
        )
        asyncio.run(_with_client(scenario.api_url, scenario.run_steps))
        if args.keep:
            asyncio.run(_with_client(scenario.api_url, scenario.wait_console))
            scenario.write_env()
        else:
            scenario.shutdown()  # the agent's last audit record is written when it stops
        scenario.verify_audit()
    except (ScenarioFailed, ApiError, OSError, subprocess.SubprocessError, psutil.Error) as exc:
        scenario.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if scenario.failures or not args.keep:
            with contextlib.suppress(Exception):
                scenario.shutdown()
                stop_kept(root)
    elapsed = time.monotonic() - started
    logs = root / "logs"
    if scenario.failures:
        scenario.say(f"\nDEMO FAILED after {elapsed:.1f}s:")
        for failure in scenario.failures:
            scenario.say(f"  - {failure}")
        scenario.say(f"  logs: {logs}/agent.log, {logs}/cp-stub.log")
        return 1
    assert scenario.paths is not None  # noqa: S101
    if args.keep:
        health = (
            f"http://{HEALTH_DEFAULT}/healthz"
            if scenario.health == HEALTH_DEFAULT
            else f"{HEALTH_DEFAULT} was taken: the URL is in the agent log (health_listening)"
        )
        scenario.say(
            f"\nDemo complete in {elapsed:.1f}s; the pair is still running.\n"
            f"  console:      {scenario.console_url}\n"
            f"  token:        {scenario.console_token()}\n"
            f"                (sign in with it; it is also in {root / CONSOLE_TOKEN_FILE}, "
            f"mode 0600)\n"
            f"  operator API: {scenario.api_url}\n"
            f"  health:       {health}\n"
            f"  use it:       . {root / ENV_FILE}   (then cp-stub agents, byoc-agent status)\n"
            f"  logs:         {logs}/agent.log, {logs}/cp-stub.log\n"
            f"  stop it:      make demo-stop"
        )
        return 0
    scenario.say(
        f"\nDemo complete in {elapsed:.1f}s; everything was shut down cleanly.\n"
        f"  audit log:   {scenario.paths.audit_log}\n"
        f"  agent log:   {logs / 'agent.log'} (operational, JSON)\n"
        f"  stub log:    {logs / 'cp-stub.log'}\n"
        f"  try:         .venv/bin/byoc-agent audit verify {scenario.paths.audit_log}"
    )
    return 0
