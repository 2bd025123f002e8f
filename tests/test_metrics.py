"""agent.drivers.metrics: parsing exposition text, scraping, host metrics."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.core.errors import DriverError
from agent.drivers.metrics import Sample, host_metrics, parse_prometheus_text, scrape


def exposition() -> str:
    """Real exposition text from prometheus_client: counter, histogram, NaN and infinities."""
    registry = CollectorRegistry()
    Counter("jobs", "Jobs done.", ["queue"], registry=registry).labels(queue="a").inc(3)
    latency = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    for value in (0.05, 0.5, 5.0):
        latency.observe(value)
    Gauge("ratio", "Not a number yet.", registry=registry).set(math.nan)
    Gauge("ceiling", "Unbounded.", registry=registry).set(math.inf)
    Gauge("floor", "Unbounded below.", registry=registry).set(-math.inf)
    return generate_latest(registry).decode()


def by_key(samples: list[Sample]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}


def test_parses_counters_and_histograms() -> None:
    samples = parse_prometheus_text(exposition(), target="workload")
    assert {s.target for s in samples} == {"workload"}
    values = by_key(samples)
    assert values[("jobs_total", (("queue", "a"),))] == 3.0
    assert values[("latency_seconds_bucket", (("le", "0.1"),))] == 1.0
    assert values[("latency_seconds_bucket", (("le", "1.0"),))] == 2.0
    assert values[("latency_seconds_bucket", (("le", "+Inf"),))] == 3.0
    assert values[("latency_seconds_count", ())] == 3.0
    assert values[("latency_seconds_sum", ())] == pytest.approx(5.55)
    assert math.isnan(values[("ratio", ())])
    assert values[("ceiling", ())] == math.inf
    assert values[("floor", ())] == -math.inf


def test_to_json_is_strict_json() -> None:
    samples = parse_prometheus_text(exposition(), target="workload")
    encoded = {s.name: s.to_json() for s in samples}
    assert encoded["ratio"]["value"] == "NaN"
    assert encoded["ceiling"]["value"] == "+Inf"
    assert encoded["floor"]["value"] == "-Inf"
    assert encoded["jobs_total"] == {
        "target": "workload",
        "name": "jobs_total",
        "labels": {"queue": "a"},
        "value": 3.0,
    }
    json.dumps([s.to_json() for s in samples], allow_nan=False)


def test_extra_labels_are_added_and_clashes_kept_as_exported() -> None:
    text = 'up{replica="inner",zone="a"} 1\n'
    (sample,) = parse_prometheus_text(text, target="workload", extra_labels={"replica": "0"})
    assert sample.labels == {"zone": "a", "exported_replica": "inner", "replica": "0"}


@pytest.mark.parametrize(
    "text",
    [
        "this is not exposition text\n",
        'metric{label="unterminated} 1\n',
        "metric not-a-number\n",
        "# TYPE metric nonsense\nmetric 1\n",
        'metric{a="1",a="2"} 1\n',
    ],
)
def test_bad_text_raises_driver_error(text: str) -> None:
    with pytest.raises(DriverError) as raised:
        parse_prometheus_text(text, target="workload")
    assert raised.value.code == "metrics_parse_error"


def test_empty_text_has_no_samples() -> None:
    assert parse_prometheus_text("", target="workload") == []


class MetricsServer(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that answers ``status`` and ``body`` on /metrics."""

    status = 200
    body = ""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/metrics"

    def answer(self, status: int, body: str) -> str:
        self.status, self.body = status, body
        return self.url


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        found = self.path == "/metrics"
        status, data = (self.server.status, self.server.body.encode()) if found else (404, b"")
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    started = MetricsServer()
    thread = threading.Thread(
        target=started.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield started
    finally:
        started.shutdown()
        started.server_close()
        thread.join()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as opened:
        yield opened


async def test_scrape_parses_a_200_answer(client: httpx.AsyncClient, server: MetricsServer) -> None:
    url = server.answer(200, exposition())
    samples = await scrape(client, url, target="workload", extra_labels={"replica": "3"})
    assert by_key(samples)[("jobs_total", (("queue", "a"), ("replica", "3")))] == 3.0


async def test_scrape_rejects_other_statuses(
    client: httpx.AsyncClient, server: MetricsServer
) -> None:
    url = server.answer(503, "busy")
    with pytest.raises(DriverError) as raised:
        await scrape(client, url, target="workload")
    assert raised.value.code == "scrape_failed"
    assert raised.value.detail == f"{url}: HTTP 503"


async def test_scrape_reports_transport_errors(client: httpx.AsyncClient) -> None:
    # Port 1 on loopback: nothing listens, a real connection failure.
    with pytest.raises(DriverError) as raised:
        await scrape(client, "http://127.0.0.1:1/metrics", target="workload")
    assert raised.value.code == "scrape_failed"
    assert "ConnectError" in raised.value.detail
    assert isinstance(raised.value.__cause__, httpx.HTTPError)


async def test_scrape_reports_bad_bodies(client: httpx.AsyncClient, server: MetricsServer) -> None:
    url = server.answer(200, "<html>not metrics</html>\n")
    with pytest.raises(DriverError) as raised:
        await scrape(client, url, target="workload")
    assert raised.value.code == "metrics_parse_error"


def test_host_metrics(tmp_path: Path) -> None:
    samples = host_metrics(tmp_path)
    assert {s.target for s in samples} == {"host"}
    values = {s.name: s for s in samples}
    assert set(values) == {
        "host_cpu_percent",
        "host_cpu_count",
        "host_load1",
        "host_load5",
        "host_load15",
        "host_memory_total_bytes",
        "host_memory_available_bytes",
        "host_memory_used_percent",
        "host_disk_total_bytes",
        "host_disk_free_bytes",
        "host_disk_used_percent",
    }
    assert 0.0 <= values["host_cpu_percent"].value <= 100.0
    assert values["host_cpu_count"].value >= 1
    assert values["host_load1"].value >= 0.0
    memory_total = values["host_memory_total_bytes"].value
    assert 0 < values["host_memory_available_bytes"].value <= memory_total
    assert 0.0 <= values["host_memory_used_percent"].value <= 100.0
    disk_total = values["host_disk_total_bytes"].value
    assert 0 <= values["host_disk_free_bytes"].value <= disk_total
    assert 0.0 <= values["host_disk_used_percent"].value <= 100.0
    for name in ("host_disk_total_bytes", "host_disk_free_bytes", "host_disk_used_percent"):
        assert values[name].labels == {"path": str(tmp_path)}
    assert values["host_cpu_count"].labels == {}
    statvfs = os.statvfs(tmp_path)
    assert disk_total == statvfs.f_blocks * statvfs.f_frsize
