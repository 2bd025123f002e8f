"""The demo workload, run as a real process on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from agent.drivers.metrics import parse_prometheus_text
from tests.conftest import scaled

START_TIMEOUT = scaled(15.0)


class Workload:
    """A ``python -m byoc_demo.workload`` process listening on a port it chose itself."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "byoc_demo.workload", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        # The workload prints one line once it is bound: the only synchronisation needed.
        self.listening = json.loads(self.process.stdout.readline())
        self.url = f"http://127.0.0.1:{self.listening['port']}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0, trust_env=False)

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=START_TIMEOUT)
        return self.process.returncode, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=START_TIMEOUT)


@pytest.fixture
def workload() -> Iterator[Workload]:
    started = Workload("--version", "1.2.3")
    try:
        yield started
    finally:
        started.kill()


def test_announces_where_it_listens(workload: Workload) -> None:
    assert workload.listening["event"] == "listening"
    assert workload.listening["host"] == "127.0.0.1"
    assert workload.listening["version"] == "1.2.3"
    assert isinstance(workload.listening["port"], int)
    assert workload.listening["port"] > 0


def test_healthz_version_and_404(workload: Workload) -> None:
    health = workload.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok")
    assert workload.get("/version").json() == {"version": "1.2.3"}
    assert workload.get("/nope").status_code == 404


def test_metrics_exposition(workload: Workload) -> None:
    workload.get("/healthz")
    response = workload.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in parse_prometheus_text(response.text, target="workload")
    }
    assert samples[("demo_workload_info", (("version", "1.2.3"),))] == 1.0
    assert samples[("demo_workload_requests_total", (("path", "/healthz"),))] >= 1.0
    assert samples[("demo_workload_healthy", ())] == 1.0
    assert samples[("demo_workload_uptime_seconds", ())] >= 0.0
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_sigterm_exits_zero_quietly(workload: Workload) -> None:
    workload.get("/healthz")
    returncode, stderr = workload.stop()
    assert returncode == 0
    assert stderr == ""  # no request logging


def test_sigint_exits_zero() -> None:
    started = Workload("--version", "1.2.3")
    try:
        started.process.send_signal(signal.SIGINT)
        assert started.process.wait(timeout=START_TIMEOUT) == 0
    finally:
        started.kill()


def test_fail_health_reports_unhealthy() -> None:
    started = Workload("--version", "9.9.9", "--fail-health", "schema migration failed")
    try:
        health = started.get("/healthz")
        assert (health.status_code, health.text) == (503, "unhealthy: schema migration failed")
        samples = parse_prometheus_text(started.get("/metrics").text, target="workload")
        assert [s.value for s in samples if s.name == "demo_workload_healthy"] == [0.0]
        assert started.get("/version").json() == {"version": "9.9.9"}
    finally:
        started.kill()


def test_main_rejects_missing_arguments() -> None:
    from byoc_demo.workload import main

    with pytest.raises(SystemExit) as exited:
        main(["--port", "0"])
    assert exited.value.code == 2
