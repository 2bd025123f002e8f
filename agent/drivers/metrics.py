"""Metrics as structured samples: parse Prometheus text, scrape an endpoint, read the host.

Shared by drivers: the ``process`` driver scrapes each replica's ``/metrics`` and reads host
metrics with psutil; a systemd or Kubernetes driver reuses the same pieces. Parsing is pure;
:func:`scrape` is the only function here that does I/O over the network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from agent.core.errors import DriverError

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Sample:
    """One value of one time series, as sent to the control plane."""

    target: str
    """What was measured: ``"workload"``, ``"host"``, ..."""
    name: str
    labels: Mapping[str, str]
    value: float

    def to_json(self) -> dict[str, object]:
        """A JSON-safe dict; NaN and infinities become ``"NaN"``, ``"+Inf"``, ``"-Inf"``."""
        return {
            "target": self.target,
            "name": self.name,
            "labels": dict(self.labels),
            "value": _json_number(self.value),
        }


def _json_number(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return value


def _merge_labels(scraped: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """Add ``extra`` to ``scraped``; a scraped label that clashes becomes ``exported_<name>``.

    This is what Prometheus does with target labels (``honor_labels: false``).
    """
    merged = dict(scraped)
    for key, value in extra.items():
        if key in merged:
            merged[f"exported_{key}"] = merged.pop(key)
        merged[key] = value
    return merged


def parse_prometheus_text(
    text: str, *, target: str, extra_labels: Mapping[str, str] = _NO_LABELS
) -> list[Sample]:
    """Parse the Prometheus text exposition format into samples.

    Raises :class:`DriverError` (``metrics_parse_error``) when ``text`` is not valid.
    """
    try:
        return [
            Sample(
                target=target,
                name=sample.name,
                labels=_merge_labels(sample.labels, extra_labels),
                value=float(sample.value),
            )
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
    except (ValueError, TypeError, IndexError) as exc:
        raise DriverError("metrics_parse_error", f"{target}: {exc}") from exc


async def scrape(
    client: httpx.AsyncClient,
    url: str,
    *,
    target: str,
    extra_labels: Mapping[str, str] = _NO_LABELS,
) -> list[Sample]:
    """GET ``url`` (with the client's timeout) and parse the exposition it returns.

    Raises :class:`DriverError`: ``scrape_failed`` when the request fails or the status is not
    200, ``metrics_parse_error`` when the body is not valid exposition text.
    """
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise DriverError("scrape_failed", f"{url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != httpx.codes.OK:
        raise DriverError("scrape_failed", f"{url}: HTTP {response.status_code}")
    return parse_prometheus_text(response.text, target=target, extra_labels=extra_labels)


def start_cpu_measurement() -> None:
    """Start the CPU utilisation window that the first :func:`host_metrics` call reports on.

    psutil measures CPU utilisation between two calls; without this, the first report is 0.0."""
    psutil.cpu_percent(interval=None)


def host_metrics(disk_path: Path) -> list[Sample]:
    """CPU, load, memory and disk usage of the host (``target="host"``).

    ``host_cpu_percent`` is the utilisation since the previous call in this process (or since
    :func:`start_cpu_measurement`). Disk samples carry ``{"path": str(disk_path)}``.
    """
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    load1, load5, load15 = os.getloadavg()
    disk_labels = {"path": str(disk_path)}
    values: list[tuple[str, Mapping[str, str], float]] = [
        ("host_cpu_percent", _NO_LABELS, psutil.cpu_percent(interval=None)),
        ("host_cpu_count", _NO_LABELS, psutil.cpu_count() or os.cpu_count() or 0),
        ("host_load1", _NO_LABELS, load1),
        ("host_load5", _NO_LABELS, load5),
        ("host_load15", _NO_LABELS, load15),
        ("host_memory_total_bytes", _NO_LABELS, memory.total),
        ("host_memory_available_bytes", _NO_LABELS, memory.available),
        ("host_memory_used_percent", _NO_LABELS, memory.percent),
        ("host_disk_total_bytes", disk_labels, disk.total),
        ("host_disk_free_bytes", disk_labels, disk.free),
        ("host_disk_used_percent", disk_labels, disk.percent),
    ]
    return [
        Sample(target="host", name=name, labels=dict(labels), value=float(value))
        for name, labels, value in values
    ]
