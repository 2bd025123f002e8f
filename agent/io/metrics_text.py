"""The Prometheus text exposition of a :class:`~agent.io.metrics.Snapshot`, made by
prometheus_client (imported only when ``/metrics`` is first scraped)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agent.io.metrics import Snapshot

PREFIX = "byoc_agent"


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._s = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._s
        info = InfoMetricFamily(f"{PREFIX}", "The agent's identity and version.")
        info.add_metric([], {"agent_id": s.agent_id, "version": s.version})
        yield info
        yield GaugeMetricFamily(
            f"{PREFIX}_connected", "1 while the tunnel session is up.", value=int(s.connected)
        )
        yield CounterMetricFamily(
            f"{PREFIX}_reconnects", "Connection attempts after the first.", value=s.reconnects
        )
        commands = CounterMetricFamily(
            f"{PREFIX}_commands",
            "Commands that reached a final state, by type and outcome.",
            labels=["type", "outcome"],
        )
        for (kind, outcome), count in sorted(s.commands.items()):
            commands.add_metric([kind, outcome], count)
        yield commands
        refusals = CounterMetricFamily(
            f"{PREFIX}_verification_failures",
            "Deliveries refused before anything ran, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(s.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        yield CounterMetricFamily(
            f"{PREFIX}_audit_records", "Records in the audit chain.", value=s.audit_records
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_pending_approvals",
            "Commands waiting for a person on the host.",
            value=s.pending_approvals,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_unsent_frames",
            "Reports not yet acknowledged by the control plane.",
            value=s.unsent_frames,
        )
        yield GaugeMetricFamily(f"{PREFIX}_streams_open", "Streams open now.", value=s.streams_open)
        stream_bytes = CounterMetricFamily(
            f"{PREFIX}_stream_bytes",
            "Bytes carried by streams that have ended, by direction.",
            labels=["direction"],
        )
        stream_bytes.add_metric(["to_target"], s.stream_bytes_to_target)
        stream_bytes.add_metric(["from_target"], s.stream_bytes_from_target)
        yield stream_bytes
        if s.certificate_expiry_seconds is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_certificate_expiry_seconds",
                "Seconds until the client certificate expires (negative: expired).",
                value=s.certificate_expiry_seconds,
            )


def render_text(snapshot: Snapshot) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST
