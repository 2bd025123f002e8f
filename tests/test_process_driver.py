"""The ``process`` driver against real workload processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import structlog

from agent.core.errors import ConfigError, DriverError
from agent.drivers.base import Driver, DriverEnvironment, DriverFactory, ExecContext
from agent.drivers.process import (
    STATE_FILE,
    ProcessDriver,
    ProcessDriverSettings,
    load_state,
    render_argv,
)
from agent.drivers.process_control import MARKER_ENV
from byoc_demo.layout import workload_argv
from tests.conftest import scaled

WORKLOAD = workload_argv()
BAD = [*WORKLOAD, "--fail-health", "schema migration failed"]
# Healthy as replica 0 only: an upgrade to it fails on replica 1, after replica 0 was upgraded.
FLAKY = [
    "{python}",
    "-c",
    "import sys; from byoc_demo.workload import main; args = sys.argv[1:]; "
    "sys.exit(main(args if '{replica}' == '0' else [*args, '--fail-health', 'replica broke']))",
    *WORKLOAD[3:],
]
VERSIONS = {
    "1.0.0": {"argv": WORKLOAD},
    "2.0.0": {"argv": WORKLOAD},
    "9.9.9-bad": {"argv": BAD},
    "3.0.0-flaky": {"argv": FLAKY},
}
WAIT = scaled(20.0)
"""Upper bound for waiting on an event; generous for a loaded CI machine."""


class AuditRecorder:
    """An AuditSink that keeps records and checks that each one precedes its action."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self._arrived = asyncio.Event()

    async def __call__(self, event: str, /, **fields: object) -> None:
        pid, port = fields.get("pid"), fields.get("port")
        if event == "replica_stopping" and isinstance(pid, int) and not is_running(pid):
            self.violations.append(f"{event} {fields}: the process had already exited")
        if event == "replica_starting" and isinstance(port, int) and is_listening(port):
            self.violations.append(f"{event} {fields}: the port was already in use")
        self.records.append({"event": event, **fields})
        self._arrived.set()

    def events(self, name: str, *, after: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.records[after:] if r["event"] == name]

    async def wait_for(self, name: str, *, after: int = 0, **match: object) -> dict[str, Any]:
        """The first record ``name`` (at or after position ``after``) with the given fields."""
        async with asyncio.timeout(WAIT):
            while True:
                for record in self.records[after:]:
                    if record["event"] == name and all(
                        record.get(k) == v for k, v in match.items()
                    ):
                        return record
                self._arrived.clear()
                await self._arrived.wait()


class Harness:
    """Builds drivers on a tmp state dir and a port window of their own; cleans up after."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.audit = AuditRecorder()
        first = random.randrange(21000, 29800)
        self.port_range = [first, first + 199]
        self.drivers: list[ProcessDriver] = []
        self.ctx = ExecContext(jti="test-jti", audit=self.audit, log=structlog.get_logger())

    def state_dir(self, name: str = "state") -> Path:
        path = self.tmp_path / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def driver(self, state_dir: Path | None = None, **overrides: object) -> ProcessDriver:
        settings: dict[str, object] = {
            "versions": VERSIONS,
            "initial_version": "1.0.0",
            "port_range": self.port_range,
            "start_timeout": scaled(10.0),
            "health_poll_interval": 0.05,
            "stop_timeout": scaled(3.0),
            "supervise_interval": 60.0,
            "stop_on_close": True,
            **overrides,
        }
        env = DriverEnvironment(
            state_dir=state_dir or self.state_dir(), audit=self.audit, log=structlog.get_logger()
        )
        driver = ProcessDriver(settings, env)
        self.drivers.append(driver)
        return driver

    async def started(self, state_dir: Path | None = None, **overrides: object) -> ProcessDriver:
        driver = self.driver(state_dir, **overrides)
        await driver.start()
        return driver

    async def cleanup(self) -> None:
        for driver in self.drivers:
            with contextlib.suppress(Exception):
                await driver.close()
        # Safety net: nothing this test started may outlive it, whatever went wrong.
        leaked = [p for p in psutil.Process().children(recursive=True) if is_workload(p)]
        leaked = [p for p in leaked if is_running(p.pid)]
        for process in leaked:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        for process in leaked:
            await wait_exited(process.pid)
        assert not leaked, f"workload processes left running: {[p.pid for p in leaked]}"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    built = Harness(tmp_path)
    try:
        yield built
    finally:
        await built.cleanup()


def is_workload(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("byoc_demo.workload" in part for part in process.cmdline())
    return False


def is_running(pid: int) -> bool:
    """True while ``pid`` is alive (a zombie has exited, even if not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def wait_exited(pid: int) -> None:
    """Wait for a process we signalled to exit: its pidfd becomes readable when it does."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(WAIT):
            await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def versions_served(ports: list[int]) -> list[str]:
    answers = [await get(port, "/version") for port in ports]
    return [str(answer.json()["version"]) for answer in answers]


async def all_healthy(ports: list[int]) -> bool:
    answers = [await get(port, "/healthz") for port in ports]
    return all(answer.status_code == 200 for answer in answers)


def described(driver: ProcessDriver) -> tuple[list[int], list[int]]:
    info = driver.describe()
    return list(info["pids"]), list(info["ports"])  # type: ignore[call-overload]


def state_pids(state_dir: Path) -> set[int]:
    state = load_state(state_dir / STATE_FILE)
    assert state is not None
    return {p.pid for p in state.processes}


# -- settings (pure) ---------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = ProcessDriverSettings.from_mapping(
        {"versions": {"1.0.0": {"argv": WORKLOAD}}, "initial_version": "1.0.0"}
    )
    assert settings.versions == {"1.0.0": tuple(WORKLOAD)}
    assert settings.host == "127.0.0.1"
    assert settings.port_range == (20000, 20999)
    assert (settings.health_path, settings.metrics_path) == ("/healthz", "/metrics")
    assert (settings.start_timeout, settings.health_poll_interval) == (15.0, 0.1)
    assert (settings.stop_timeout, settings.supervise_interval) == (10.0, 2.0)
    assert settings.stop_on_close is False


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"bogus": 1}, "driver.process.bogus"),
        ({"versions": None}, "driver.process.versions"),
        ({"versions": {}}, "driver.process.versions"),
        ({"versions": {"1.0.0": {"argv": []}}}, 'driver.process.versions."1.0.0".argv'),
        ({"versions": {"1.0.0": {"argv": "python"}}}, 'driver.process.versions."1.0.0".argv'),
        ({"versions": {"1.0.0": {"argv": ["{nope}"]}}}, 'driver.process.versions."1.0.0".argv'),
        ({"versions": {"1.0.0": {"argv": ["{port"]}}}, 'driver.process.versions."1.0.0".argv'),
        ({"versions": {"1.0.0": {"argv": ["x"], "env": {}}}}, '"1.0.0".env'),
        ({"initial_version": "2.0.0"}, "driver.process.initial_version"),
        ({"initial_version": 1}, "driver.process.initial_version"),
        ({"host": ""}, "driver.process.host"),
        ({"port_range": [2000]}, "driver.process.port_range"),
        ({"port_range": [2001, 2000]}, "driver.process.port_range"),
        ({"port_range": [0, 10]}, "driver.process.port_range"),
        ({"port_range": ["1", "2"]}, "driver.process.port_range"),
        ({"health_path": "healthz"}, "driver.process.health_path"),
        ({"metrics_path": 3}, "driver.process.metrics_path"),
        ({"start_timeout": "15"}, "driver.process.start_timeout"),
        ({"start_timeout": 0}, "driver.process.start_timeout"),
        ({"stop_timeout": True}, "driver.process.stop_timeout"),
        ({"health_poll_interval": float("nan")}, "driver.process.health_poll_interval"),
        ({"supervise_interval": -1}, "driver.process.supervise_interval"),
        ({"stop_on_close": "yes"}, "driver.process.stop_on_close"),
    ],
)
def test_settings_reject(change: Mapping[str, object], key: str) -> None:
    raw: dict[str, object] = {"versions": {"1.0.0": {"argv": WORKLOAD}}, "initial_version": "1.0.0"}
    raw.update(change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ProcessDriverSettings.from_mapping(raw)


def test_settings_require_versions_and_initial_version() -> None:
    with pytest.raises(ConfigError, match=r"driver\.process\.versions: required"):
        ProcessDriverSettings.from_mapping({"initial_version": "1"})
    with pytest.raises(ConfigError, match=r"driver\.process\.initial_version: required"):
        ProcessDriverSettings.from_mapping({"versions": {"1": {"argv": ["x"]}}})


def test_render_argv() -> None:
    argv = render_argv(
        [*WORKLOAD, "--data", "{state_dir}/r{replica}", "{{literal}}"],
        python="/usr/bin/python3",
        host="127.0.0.1",
        port=20001,
        version="1.0.0",
        replica=2,
        state_dir=Path("/var/lib/agent"),
    )
    assert argv == [
        "/usr/bin/python3",
        "-m",
        "byoc_demo.workload",
        "--host",
        "127.0.0.1",
        "--port",
        "20001",
        "--version",
        "1.0.0",
        "--data",
        "/var/lib/agent/r2",
        "{literal}",
    ]


async def test_driver_is_its_own_factory(tmp_path: Path) -> None:
    factory: DriverFactory = ProcessDriver
    env = DriverEnvironment(state_dir=tmp_path, audit=AuditRecorder(), log=structlog.get_logger())
    driver = factory({"versions": VERSIONS, "initial_version": "1.0.0"}, env)
    assert isinstance(driver, Driver)
    assert driver.kind == "process"
    assert driver.describe() == {
        "kind": "process",
        "version": "1.0.0",
        "replicas": 0,
        "running": 0,
        "ports": [],
        "pids": [],
    }
    await driver.close()


async def test_an_unreadable_state_file_stops_the_start(harness: Harness) -> None:
    (harness.state_dir() / STATE_FILE).write_text('{"format": 1, "version": 7}')
    with pytest.raises(DriverError) as raised:
        await harness.driver().start()
    assert raised.value.code == "state_unreadable"
    assert STATE_FILE in raised.value.detail


# -- real processes ----------------------------------------------------------------------------


async def test_scale_up_and_down(harness: Harness) -> None:
    driver = await harness.started()
    state_dir = harness.state_dir()

    result = await driver.scale(3, harness.ctx)
    pids, ports = described(driver)
    assert result == {"replicas": 3, "previous_replicas": 0, "version": "1.0.0", "ports": ports}
    assert len(set(pids)) == len(set(ports)) == 3
    assert all(harness.port_range[0] <= port <= harness.port_range[1] for port in ports)
    assert all(is_running(pid) for pid in pids)
    assert await all_healthy(ports)
    assert await versions_served(ports) == ["1.0.0"] * 3
    assert state_pids(state_dir) == set(pids)
    starting = harness.audit.events("replica_starting")
    assert sorted((r["replica"], r["port"], r["version"]) for r in starting) == [
        (i, port, "1.0.0") for i, port in enumerate(ports)
    ]
    assert '"event": "listening"' in (state_dir / "replica-0.log").read_text()

    mark = len(harness.audit.records)
    result = await driver.scale(1, harness.ctx)
    assert result == {"replicas": 1, "previous_replicas": 3, "version": "1.0.0", "ports": ports[:1]}
    assert [is_running(pid) for pid in pids] == [True, False, False]
    stopping = harness.audit.events("replica_stopping", after=mark)
    assert sorted((r["replica"], r["pid"]) for r in stopping) == [(1, pids[1]), (2, pids[2])]
    assert all("scale down" in r["reason"] for r in stopping)
    assert state_pids(state_dir) == {pids[0]}

    mark = len(harness.audit.records)
    assert (await driver.scale(1, harness.ctx))["previous_replicas"] == 1
    assert harness.audit.records[mark:] == []
    assert harness.audit.violations == []

    with pytest.raises(DriverError) as raised:
        await driver.scale(-1, harness.ctx)
    assert raised.value.code == "invalid_replicas"

    await driver.close()
    assert not is_running(pids[0])
    # Stopping the agent is not a command: the state keeps the replica for the next start.
    state = load_state(state_dir / STATE_FILE)
    assert state is not None
    assert [(p.index, p.pid, p.role) for p in state.processes] == [(0, pids[0], "serving")]


async def test_upgrade_replaces_every_replica_one_by_one(harness: Harness) -> None:
    driver = await harness.started()
    await driver.scale(2, harness.ctx)
    old_pids, _ = described(driver)

    mark = len(harness.audit.records)
    result = await driver.upgrade("2.0.0", harness.ctx)
    assert result == {
        "version": "2.0.0",
        "previous_version": "1.0.0",
        "replicas": 2,
        "changed": True,
    }
    new_pids, ports = described(driver)
    assert await versions_served(ports) == ["2.0.0", "2.0.0"]
    assert not any(is_running(pid) for pid in old_pids)
    assert all(is_running(pid) for pid in new_pids)
    # Surge, in index order: start the new replica, see it healthy, then stop the old one.
    sequence = [
        (r["event"], r["replica"])
        for r in harness.audit.records[mark:]
        if r["event"] in {"replica_starting", "replica_healthy", "replica_stopping"}
    ]
    assert sequence == [
        ("replica_starting", 0),
        ("replica_healthy", 0),
        ("replica_stopping", 0),
        ("replica_starting", 1),
        ("replica_healthy", 1),
        ("replica_stopping", 1),
    ]
    assert harness.audit.violations == []
    assert driver.describe()["version"] == "2.0.0"

    mark = len(harness.audit.records)
    again = await driver.upgrade("2.0.0", harness.ctx)
    assert again["changed"] is False
    assert harness.audit.records[mark:] == []


async def test_upgrade_to_a_bad_version_rolls_back(harness: Harness) -> None:
    driver = await harness.started(start_timeout=scaled(5.0))
    await driver.scale(2, harness.ctx)
    pids, ports = described(driver)

    with pytest.raises(DriverError) as raised:
        await driver.upgrade("9.9.9-bad", harness.ctx)
    error = raised.value
    assert error.code == "unhealthy_rolled_back"
    assert error.detail.startswith("replica 0 of 9.9.9-bad failed its health check: ")
    assert error.detail.endswith("; rolled back to 1.0.0")
    assert "503 unhealthy: schema migration failed" in error.detail
    assert error.result["rolled_back"] is True
    assert error.result["version"] == "1.0.0"
    assert error.result["failed_replica"] == 0
    assert "schema migration failed" in str(error.result["health"])
    json.dumps(error.result)

    assert described(driver) == (pids, ports)
    assert await all_healthy(ports)
    assert await versions_served(ports) == ["1.0.0", "1.0.0"]
    assert driver.describe()["version"] == "1.0.0"
    (rollback,) = harness.audit.events("rollback_started")
    assert (rollback["from_version"], rollback["to_version"]) == ("9.9.9-bad", "1.0.0")
    (bad,) = harness.audit.events("replica_starting", after=0)[2:]
    assert bad["version"] == "9.9.9-bad"
    assert not is_listening(bad["port"])
    assert state_pids(harness.state_dir()) == set(pids)
    assert harness.audit.violations == []


async def test_rollback_restores_replicas_already_upgraded(harness: Harness) -> None:
    driver = await harness.started(start_timeout=scaled(5.0))
    await driver.scale(2, harness.ctx)
    pids, _ = described(driver)

    with pytest.raises(DriverError) as raised:
        await driver.upgrade("3.0.0-flaky", harness.ctx)
    assert raised.value.code == "unhealthy_rolled_back"
    assert raised.value.result["failed_replica"] == 1

    new_pids, ports = described(driver)
    assert new_pids[1] == pids[1]  # never replaced
    assert new_pids[0] != pids[0]  # upgraded, then rolled back on a fresh process
    assert await all_healthy(ports)
    assert await versions_served(ports) == ["1.0.0", "1.0.0"]
    rollback = await harness.audit.wait_for("rollback_started")
    after = harness.audit.records.index(rollback)
    restored = harness.audit.events("replica_healthy", after=after)
    assert [(r["replica"], r["version"]) for r in restored] == [(0, "1.0.0")]
    stopped = harness.audit.events("replica_stopping", after=after)
    assert [(r["replica"], r["version"]) for r in stopped] == [(0, "3.0.0-flaky")]
    assert harness.audit.violations == []


async def test_upgrade_to_an_unknown_version(harness: Harness) -> None:
    driver = await harness.started()
    with pytest.raises(DriverError) as raised:
        await driver.upgrade("4.0.0", harness.ctx)
    assert raised.value.code == "unknown_version"
    assert harness.audit.records == []


async def test_upgrade_with_no_replicas_changes_the_version(harness: Harness) -> None:
    driver = await harness.started()
    result = await driver.upgrade("2.0.0", harness.ctx)
    assert result == {
        "version": "2.0.0",
        "previous_version": "1.0.0",
        "replicas": 0,
        "changed": True,
    }
    assert harness.audit.records == []
    await driver.scale(1, harness.ctx)
    _, ports = described(driver)
    assert await versions_served(ports) == ["2.0.0"]


async def test_scale_up_with_an_unhealthy_version_fails_cleanly(harness: Harness) -> None:
    driver = await harness.started(start_timeout=scaled(1.0), initial_version="9.9.9-bad")
    with pytest.raises(DriverError) as raised:
        await driver.scale(1, harness.ctx)
    assert raised.value.code == "unhealthy"
    assert raised.value.result["replicas"] == 0
    assert driver.describe()["replicas"] == 0
    (started,) = harness.audit.events("replica_starting")
    assert not is_listening(started["port"])


async def test_collect_metrics(harness: Harness) -> None:
    driver = await harness.started()
    await driver.scale(2, harness.ctx)
    pids, ports = described(driver)

    result = await driver.collect_metrics(["workload", "host"], harness.ctx)
    json.dumps(result, allow_nan=False)
    assert (result["replicas"], result["version"], result["errors"]) == (2, "1.0.0", [])
    samples: list[dict[str, Any]] = result["samples"]  # type: ignore[assignment]
    info = sorted(
        (s["labels"]["replica"], s["labels"]["port"], s["labels"]["version"])
        for s in samples
        if s["name"] == "demo_workload_info"
    )
    assert info == [("0", str(ports[0]), "1.0.0"), ("1", str(ports[1]), "1.0.0")]
    host = {s["name"] for s in samples if s["target"] == "host"}
    assert {"host_cpu_percent", "host_memory_total_bytes", "host_disk_free_bytes"} <= host

    # A replica that does not answer is reported, not a failure of the command.
    os.kill(pids[1], signal.SIGKILL)
    await wait_exited(pids[1])
    result = await driver.collect_metrics(["workload"], harness.ctx)
    errors: list[dict[str, Any]] = result["errors"]  # type: ignore[assignment]
    assert [(e["replica"], e["port"], e["code"]) for e in errors] == [
        (1, ports[1], "scrape_failed")
    ]
    samples = result["samples"]  # type: ignore[assignment]
    assert {s["labels"]["replica"] for s in samples} == {"0"}

    with pytest.raises(DriverError) as raised:
        await driver.collect_metrics(["database"], harness.ctx)
    assert raised.value.code == "unknown_target"


async def test_collect_metrics_fails_when_no_replica_answers(harness: Harness) -> None:
    driver = await harness.started()
    await driver.scale(1, harness.ctx)
    (pid,), _ = described(driver)
    os.kill(pid, signal.SIGKILL)
    await wait_exited(pid)
    with pytest.raises(DriverError) as raised:
        await driver.collect_metrics(["workload"], harness.ctx)
    assert raised.value.code == "scrape_failed"
    # With host metrics requested too, the command still succeeds.
    result = await driver.collect_metrics(["workload", "host"], harness.ctx)
    assert len(result["errors"]) == 1  # type: ignore[arg-type]


async def test_supervisor_restarts_a_killed_replica(harness: Harness) -> None:
    driver = await harness.started(supervise_interval=0.1)
    await driver.scale(1, harness.ctx)
    (pid,), _ = described(driver)

    mark = len(harness.audit.records)
    os.kill(pid, signal.SIGKILL)
    restarting = await harness.audit.wait_for("replica_restarting", after=mark, replica=0)
    assert restarting["pid"] == pid
    assert restarting["exit_status"] == -signal.SIGKILL
    assert restarting["version"] == "1.0.0"
    after = harness.audit.records.index(restarting)
    healthy = await harness.audit.wait_for("replica_healthy", after=after, replica=0)
    assert healthy["pid"] != pid

    (new_pid,), ports = described(driver)
    assert new_pid == healthy["pid"]
    assert await all_healthy(ports)
    assert state_pids(harness.state_dir()) == {new_pid}
    assert harness.audit.violations == []


async def test_a_new_driver_adopts_the_replicas(harness: Harness) -> None:
    state_dir = harness.state_dir()
    first = await harness.started(state_dir, stop_on_close=False)
    await first.scale(3, harness.ctx)
    pids, ports = described(first)
    await first.close()
    assert all(is_running(pid) for pid in pids)  # the workload survives the agent
    assert await all_healthy(ports)
    # One replica dies while no agent runs.
    os.kill(pids[2], signal.SIGKILL)
    await wait_exited(pids[2])

    mark = len(harness.audit.records)
    second = await harness.started(state_dir, supervise_interval=0.1)
    adopted_pids, adopted_ports = described(second)
    assert adopted_pids[:2] == pids[:2]
    assert adopted_ports == ports
    restarting = await harness.audit.wait_for("replica_restarting", after=mark)
    assert (restarting["replica"], restarting["pid"]) == (2, pids[2])
    await harness.audit.wait_for("replica_healthy", after=mark, replica=2)

    result = await second.scale(1, harness.ctx)
    assert result["previous_replicas"] == 3
    assert not is_running(pids[1])
    assert is_running(pids[0])
    stopping = harness.audit.events("replica_stopping", after=mark)
    assert sorted(r["replica"] for r in stopping) == [1, 2]
    assert harness.audit.violations == []

    await second.scale(0, harness.ctx)
    assert not is_running(pids[0])
    assert state_pids(state_dir) == set()


@pytest.mark.parametrize(
    ("event", "replica"),
    [("replica_starting", 1), ("replica_healthy", 0)],
    ids=["while-spawning", "while-health-checking"],
)
async def test_a_cancelled_scale_leaves_no_unknown_process(
    harness: Harness, event: str, replica: int
) -> None:
    state_dir = harness.state_dir()
    driver = await harness.started(state_dir, stop_on_close=False)
    scaling = asyncio.create_task(driver.scale(2, harness.ctx))
    await harness.audit.wait_for(event, replica=replica)
    scaling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await scaling

    children = [p for p in psutil.Process().children(recursive=True) if is_workload(p)]
    alive = {p.pid for p in children if is_running(p.pid)}
    assert alive <= state_pids(state_dir)
    assert driver.describe()["replicas"] == 0
    await driver.close()

    # The next run stops what the cancelled command left half-started.
    mark = len(harness.audit.records)
    successor = await harness.started(state_dir)
    for pid in alive:
        await wait_exited(pid)
    stopped = harness.audit.events("replica_stopping", after=mark)
    assert {r["pid"] for r in stopped} == alive
    assert all(r["reason"] == "left over from an interrupted operation" for r in stopped)
    assert successor.describe()["replicas"] == 0
    assert state_pids(state_dir) == set()
    assert harness.audit.violations == []


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Another program that happens to grab the replica's port and answers every health check."""

    def do_GET(self) -> None:  # the stdlib's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_a_port_taken_by_another_program_is_not_mistaken_for_the_replica(
    harness: Harness,
) -> None:
    """The race: between choosing a free port and the replica binding it (about half a second of
    interpreter start-up), another program takes the port. Its answers must not count as our
    replica being healthy, and the driver must start the replica on another port."""
    servers: list[http.server.ThreadingHTTPServer] = []
    grabbing = True

    async def grab_the_port(event: str, /, **fields: object) -> None:
        nonlocal grabbing
        await harness.audit(event, **fields)
        port = fields.get("port")
        if grabbing and event == "replica_starting" and isinstance(port, int):
            grabbing = False  # written before the spawn: the impostor wins the race
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Impostor)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)

    ctx = ExecContext(jti="race", audit=grab_the_port, log=structlog.get_logger())
    driver = await harness.started()
    try:
        result = await driver.scale(1, ctx)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    (impostor_port,) = [s.server_address[1] for s in servers]
    ports = result["ports"]
    assert isinstance(ports, list)
    (port,) = ports
    assert port != impostor_port
    assert await all_healthy([port])
    assert await versions_served([port]) == ["1.0.0"]
    starting = harness.audit.events("replica_starting")
    assert [r["port"] for r in starting][:1] == [impostor_port]
    assert len(starting) == 2  # one retry, on another port
    stopped = harness.audit.events("replica_stopping")
    assert "another process" in str(stopped[0]["reason"])


async def test_a_replica_started_but_never_recorded_is_stopped_at_start(harness: Harness) -> None:
    """The agent killed between spawning a replica and writing the state file leaves an
    orphan nobody recorded; it carries the driver's marker, and the next start stops it."""
    state_dir = harness.state_dir()
    first = harness.driver(state_dir)
    marker = first._marker
    port = harness.port_range[0] + 150
    argv = render_argv(
        WORKLOAD, python=sys.executable, host="127.0.0.1", port=port, version="1.0.0",
        replica=0, state_dir=state_dir,
    )  # fmt: skip
    orphan = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, MARKER_ENV: marker}, start_new_session=True
    )
    try:
        await first.start()
        stopping = await harness.audit.wait_for("replica_orphan_stopping", pid=orphan.pid)
        assert stopping["pid"] == orphan.pid
        async with asyncio.timeout(WAIT):
            assert await orphan.wait() is not None
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()
