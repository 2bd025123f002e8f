"""The benchmarks. Each returns a flat dict of figures (names in docs/BENCHMARKS.md); each figure
is the median of ``runs`` runs, peers interleaved run by run so that a noisy machine affects
them alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psutil

from bench.harness import (
    AGENT_ID,
    Child,
    Workspace,
    cpu_seconds,
    median,
    percentile,
    python_child,
    rss_bytes,
    running_agent,
    running_stub,
)
from bench.net import SSH_AES, free_port, ssh_reverse_forward, wait_port
from control_plane_stub.server import StubServer

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    transfer_bytes: int = 1024 * MIB
    round_trips: int = 2000
    commands: int = 500
    burst_commands: int = 3000
    footprint_seconds: float = 60.0
    footprint_commands: int = 10_000
    fleet_agents: int = 10_000
    event_loop: str = "uvloop"

    @classmethod
    def quick(cls) -> Settings:
        """Small sizes: to check that the benchmarks work, not to quote figures."""
        return cls(
            runs=1,
            transfer_bytes=64 * MIB,
            round_trips=200,
            commands=50,
            burst_commands=200,
            footprint_seconds=3.0,
            footprint_commands=400,
            fleet_agents=50,
        )


async def _child_json(*args: str) -> Any:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.net", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench.net {args[0]} failed ({process.returncode})")
    return json.loads(out)


async def _forward(stub: StubServer, target_port: int) -> int:
    forward = await stub.streams.start_forward(
        AGENT_ID, f"127.0.0.1:{target_port}", "127.0.0.1:0", 3600
    )
    return int(forward.listen.rsplit(":", 1)[1])


# -- streams against ssh -R and plain TCP -------------------------------------------------------


@contextlib.asynccontextmanager
async def the_paths(
    ws: Workspace, s: Settings, peer: str
) -> AsyncIterator[tuple[Child, tuple[tuple[str, int], ...]]]:
    """A ``peer`` server (``sink`` or ``echo``) and the ways to reach it: directly, through
    ``ssh -R`` with OpenSSH's default cipher (``ssh``) and with AES-128-GCM (``ssh_aes``), and
    through a stream (stub forward -> agent: ``tunnel``). Yields the agent and (name, port)s."""
    peer_port = free_port()
    server = python_child(ws, "bench.net", peer, str(peer_port), name=peer)
    try:
        await asyncio.to_thread(wait_port, peer_port)
        async with (
            running_stub(ws) as stub,
            running_agent(ws, stub, event_loop=s.event_loop) as agent,
        ):
            tunnel_port = await _forward(stub, peer_port)
            with (
                ssh_reverse_forward(ws.root / "ssh", peer_port) as ssh_port,
                ssh_reverse_forward(ws.root / "ssh-aes", peer_port, SSH_AES) as aes_port,
            ):
                yield (
                    agent,
                    (
                        ("direct", peer_port),
                        ("ssh", ssh_port),
                        ("ssh_aes", aes_port),
                        ("tunnel", tunnel_port),
                    ),
                )
    finally:
        server.stop()


def own_cpu_seconds() -> float:
    """This process's CPU time: the stub's side of a stream runs here."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


async def stream_throughput(ws: Workspace, s: Settings) -> dict[str, float]:
    """MiB/s for one ``transfer_bytes`` transfer: direct loopback TCP, ssh -R (two ciphers),
    the tunnel; the CPU seconds per GiB the agent and the stub spent on the tunnel's."""
    rates: dict[str, list[float]] = defaultdict(list)
    agent_cpu: list[float] = []
    stub_cpu: list[float] = []
    async with the_paths(ws, s, "sink") as (agent, paths):
        for _ in range(s.runs):
            for name, port in paths:
                agent_before, stub_before = cpu_seconds(agent.pid), own_cpu_seconds()
                result = await _child_json("source", str(port), str(s.transfer_bytes))
                if result["answer"] != str(s.transfer_bytes):
                    raise RuntimeError(f"{name}: the sink counted {result['answer']}")
                rates[name].append(s.transfer_bytes / result["seconds"] / MIB)
                if name == "tunnel":
                    agent_cpu.append(cpu_seconds(agent.pid) - agent_before)
                    stub_cpu.append(own_cpu_seconds() - stub_before)
    out = {f"throughput_{name}_mib_s": median(v) for name, v in rates.items()}
    tunnel = out["throughput_tunnel_mib_s"]
    out["throughput_ratio_vs_ssh"] = tunnel / out["throughput_ssh_mib_s"]
    out["throughput_ratio_vs_ssh_aes"] = tunnel / out["throughput_ssh_aes_mib_s"]
    gib = s.transfer_bytes / (1024 * MIB)
    out["agent_cpu_s_per_gib"] = median(agent_cpu) / gib
    out["stub_cpu_s_per_gib"] = median(stub_cpu) / gib
    return out


async def stream_round_trip(ws: Workspace, s: Settings) -> dict[str, float]:
    """Small-message (64 B) round trips through a stream: p50/p99 in µs, next to ssh -R."""
    p50: dict[str, list[float]] = defaultdict(list)
    p99: dict[str, list[float]] = defaultdict(list)
    async with the_paths(ws, s, "echo") as (_, paths):
        for _ in range(s.runs):
            for name, port in paths:
                samples = await _child_json("rtt", str(port), str(s.round_trips), "64")
                warm = samples[min(20, len(samples) // 10) :]
                p50[name].append(percentile(warm, 50))
                p99[name].append(percentile(warm, 99))
    out: dict[str, float] = {}
    for name, values in p50.items():
        out[f"rtt_{name}_p50_us"] = median(values)
        out[f"rtt_{name}_p99_us"] = median(p99[name])
    out["rtt_p50_ratio_vs_ssh"] = out["rtt_tunnel_p50_us"] / out["rtt_ssh_p50_us"]
    out["rtt_p99_ratio_vs_ssh"] = out["rtt_tunnel_p99_us"] / out["rtt_ssh_p99_us"]
    return out


# -- signed commands ---------------------------------------------------------------------------


async def _submit(
    stub: StubServer, tokens: list[tuple[str, str]], params: dict[str, object]
) -> None:
    for jti, token in tokens:
        stub.store.add_command(
            ref=jti,
            agent_id=AGENT_ID,
            token=token,
            origin="signed",
            jti=jti,
            command_type="collect_metrics",
            params=params,
        )
    await stub.store.wait_durable()  # a control plane delivers only what it has on disk
    stub.hub.kick(AGENT_ID)


def _sign(stub: StubServer, count: int, params: dict[str, object]) -> list[tuple[str, str]]:
    out = []
    for _ in range(count):
        signed = stub.signer.sign(
            agent_id=AGENT_ID,
            command_type="collect_metrics",
            params=params,
            now=time.time(),
            ttl=600,
        )
        out.append((signed.jti, signed.token))
    return out


async def _all_final(stub: StubServer, refs: list[str], within: float) -> None:
    """Wait until every ref is final. Checks the oldest unfinished one first and stops there
    (commands finish roughly in order), so a notification costs O(1) queries, not O(n)."""
    pending = list(reversed(refs))

    def done() -> bool:
        while pending and stub.store.get(pending[-1]).final:
            pending.pop()
        return not pending

    async with asyncio.timeout(within), stub.hub.changed:
        await stub.hub.changed.wait_for(done)


async def command_round_trips(stub: StubServer, count: int) -> list[float]:
    """Sequential round trips in ms: sign at the stub -> delivered -> verified, policy, audit
    (fsync'd), run (journal driver, fsync'd) -> final status stored at the stub."""
    params: dict[str, object] = {"targets": ["workload"]}
    out = []
    for _ in range(count):
        started = time.perf_counter()
        (token,) = _sign(stub, 1, params)
        await _submit(stub, [token], params)
        await _all_final(stub, [token[0]], 30)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def commands(ws: Workspace, s: Settings) -> dict[str, float]:
    async with running_stub(ws) as stub, running_agent(ws, stub, event_loop=s.event_loop):
        p50s, p99s, rates = [], [], []
        params: dict[str, object] = {"targets": ["workload"]}
        await command_round_trips(stub, 20)  # warm-up
        for _ in range(s.runs):
            samples = await command_round_trips(stub, s.commands)
            p50s.append(percentile(samples, 50))
            p99s.append(percentile(samples, 99))
            tokens = _sign(stub, s.burst_commands, params)
            started = time.perf_counter()
            await _submit(stub, tokens, params)
            await _all_final(stub, [jti for jti, _ in tokens], 600)
            rates.append(s.burst_commands / (time.perf_counter() - started))
    return {
        "command_rtt_p50_ms": median(p50s),
        "command_rtt_p99_ms": median(p99s),
        "commands_per_s": median(rates),
    }


async def control_pings(stub: StubServer, count: int) -> list[float]:
    """Round trips in ms of WebSocket pings on the tunnel: the agent's event loop answers them
    as soon as it reads them, with no command work, so they time how long a control frame
    waits in the event loops and the sockets (behind stream bytes, when a stream is busy)."""
    out = []
    for _ in range(count):
        started = time.perf_counter()  # the pong's own latency is on the loop's clock (ms)
        await (await stub.hub.links[AGENT_ID].websocket.ping())
        out.append((time.perf_counter() - started) * 1000)
    return out


async def control_latency_under_load(ws: Workspace, s: Settings) -> dict[str, float]:
    """Control round trips (tunnel pings, signed commands) idle, then while a stream carries
    bulk data as fast as it can (checked: bytes kept moving during the measurement)."""
    sink_port = free_port()
    sink = python_child(ws, "bench.net", "sink", str(sink_port), name="sink-load")
    try:
        await asyncio.to_thread(wait_port, sink_port)
        async with running_stub(ws) as stub, running_agent(ws, stub, event_loop=s.event_loop):
            tunnel_port = await _forward(stub, sink_port)
            await command_round_trips(stub, 20)
            idle_pings = await control_pings(stub, s.commands)
            idle = await command_round_trips(stub, s.commands)
            figures: dict[str, list[float]] = defaultdict(list)
            for _ in range(s.runs):
                load = python_child(
                    ws, "bench.net", "source", str(tunnel_port), str(1 << 40), name="load"
                )
                await asyncio.sleep(1.0)  # let the transfer reach full speed (not a sync point)
                before = sum(f.sent for f in stub.streams.forwards.values())
                started = time.perf_counter()
                pings = await control_pings(stub, s.commands)
                samples = await command_round_trips(stub, s.commands)
                moved = sum(f.sent for f in stub.streams.forwards.values()) - before
                if load.process.poll() is not None or moved == 0:
                    raise RuntimeError("the stream was not saturated during the measurement")
                figures["stream"].append(moved / (time.perf_counter() - started) / MIB)
                load.stop()
                for forward in list(stub.streams.forwards.values()):  # end the transfer
                    for task in list(forward.tasks):
                        task.cancel()
                for name, values in (("ping", pings), ("command", samples)):
                    figures[f"{name}_p50"].append(percentile(values, 50))
                    figures[f"{name}_p99"].append(percentile(values, 99))
            return {
                "idle_control_ping_p50_ms": percentile(idle_pings, 50),
                "idle_control_ping_p99_ms": percentile(idle_pings, 99),
                "loaded_control_ping_p50_ms": median(figures["ping_p50"]),
                "loaded_control_ping_p99_ms": median(figures["ping_p99"]),
                "idle_command_rtt_p99_ms": percentile(idle, 99),
                "loaded_command_rtt_p50_ms": median(figures["command_p50"]),
                "loaded_command_rtt_p99_ms": median(figures["command_p99"]),
                "loaded_stream_mib_s": median(figures["stream"]),
            }
    finally:
        sink.stop()


# -- footprint ---------------------------------------------------------------------------------


async def footprint(ws: Workspace, s: Settings) -> dict[str, float]:
    """Idle RSS and CPU with the default heartbeat; RSS as commands accumulate."""
    async with running_stub(ws) as stub, running_agent(ws, stub, event_loop=s.event_loop) as agent:
        await asyncio.sleep(2.0)  # start-up work settles (not a sync point: a measurement window)
        cpu_before = cpu_seconds(agent.pid)
        await asyncio.sleep(s.footprint_seconds)
        idle_cpu = (cpu_seconds(agent.pid) - cpu_before) / s.footprint_seconds * 100
        idle_rss = rss_bytes(agent.pid)
        params: dict[str, object] = {"targets": ["workload"]}
        batch = max(1, s.footprint_commands // 10)
        rss: list[int] = []
        for _ in range(s.footprint_commands // batch):
            tokens = _sign(stub, batch, params)
            await _submit(stub, tokens, params)
            await _all_final(stub, [jti for jti, _ in tokens], 600)
            rss.append(rss_bytes(agent.pid))
    return {
        "idle_rss_mb": idle_rss / 1e6,
        "idle_cpu_percent": idle_cpu,
        "rss_after_commands_mb": rss[-1] / 1e6,
        "rss_growth_second_to_last_tenth_mb": (rss[-1] - rss[1]) / 1e6 if len(rss) > 1 else 0.0,
    }


# -- fleet -------------------------------------------------------------------------------------


class _Fleet:
    """Reads the workers' JSON lines and keeps the total connected."""

    def __init__(self, workers: int) -> None:
        self.connected = [0] * workers
        self.dialing: list[float | None] = [None] * workers
        self.changed = asyncio.Event()

    @property
    def total(self) -> int:
        return sum(self.connected)

    async def follow(self, index: int, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            report = json.loads(line)
            if "dialing" in report:
                self.dialing[index] = float(report["dialing"])
            else:
                self.connected[index] = int(report["connected"])
            self.changed.set()

    async def until(self, condition: Any, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True


def _stub_child(ws: Workspace, agent_port: int, api_port: int, name: str, loop: str) -> Child:
    return Child(
        [
            sys.executable,
            "-m",
            "control_plane_stub.cli",
            "serve",
            "--pki",
            str(ws.pki.root),
            "--agents",
            f"127.0.0.1:{agent_port}",
            "--api",
            f"127.0.0.1:{api_port}",
            "--db",
            str(ws.root / "fleet.db"),
            "--log-level",
            "warning",
            "--event-loop",
            loop,
        ],
        ws.root / f"{name}.log",
    )


async def fleet(ws: Workspace, s: Settings) -> dict[str, float]:
    """Connect ``fleet_agents`` agents to one stub process; then kill and restart the stub and
    time the whole fleet's return."""
    agents, workers = s.fleet_agents, 2
    agent_port, api_port = free_port(), free_port()
    stub = _stub_child(ws, agent_port, api_port, "fleet-stub", s.event_loop)
    processes: list[asyncio.subprocess.Process] = []
    readers: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(wait_port, agent_port)
        base_rss = rss_bytes(stub.pid)
        state = _Fleet(workers)
        share = agents // workers
        for index in range(workers):
            count = share if index < workers - 1 else agents - share * (workers - 1)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.fleet", "worker",
                "--pki", str(ws.pki.root), "--port", str(agent_port),
                "--first", str(index * share), "--count", str(count),
                "--event-loop", s.event_loop,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert process.stdout is not None
            processes.append(process)
            readers.append(asyncio.create_task(state.follow(index, process.stdout)))
        await state.until(lambda: all(d is not None for d in state.dialing), 600)
        dialing = max(d for d in state.dialing if d is not None)
        if not await state.until(lambda: state.total >= agents, 900):
            raise RuntimeError(f"only {state.total} of {agents} agents connected")
        connect_s = time.time() - dialing
        await asyncio.sleep(5.0)  # let the stub's allocations settle before reading RSS
        connected_rss = rss_bytes(stub.pid)
        stub.process.send_signal(signal.SIGKILL)  # a crash: every connection drops at once
        await asyncio.to_thread(stub.process.wait)
        stub.stop()
        await state.until(lambda: state.total == 0, 120)
        restarted = time.time()
        stub = _stub_child(ws, agent_port, api_port, "fleet-stub-2", s.event_loop)
        back = await state.until(lambda: state.total >= agents, 900)
        reconnect_s = time.time() - restarted
        return {
            "fleet_agents": float(agents),
            "fleet_connect_s": connect_s,
            "fleet_stub_rss_mb": connected_rss / 1e6,
            "fleet_stub_kb_per_agent": (connected_rss - base_rss) / agents / 1e3,
            "fleet_reconnect_s": reconnect_s if back else float("inf"),
            "fleet_reconnected": float(state.total),
        }
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        for reader in readers:
            reader.cancel()
        stub.stop()
