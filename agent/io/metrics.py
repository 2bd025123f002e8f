"""The agent's Prometheus metrics, rendered from a snapshot when ``/metrics`` is scraped.

Sans-I/O: :func:`render` takes a :class:`Snapshot` (plain numbers the daemon gathers) and
returns the text exposition made by prometheus_client (agent/io/metrics_text.py, imported at
the first scrape: an agent nobody scrapes does not carry it). Names (all prefixed ``byoc_agent_``):

- ``info{agent_id, version}`` (1), ``connected`` (0/1), ``reconnects_total``
- ``commands_total{type, outcome}`` final outcomes since start, ``verification_failures_total
  {reason}`` refused deliveries by reason, ``pending_approvals``, ``unsent_frames``
- ``audit_records_total`` (the audit chain's head sequence number)
- ``streams_open``, ``stream_bytes_total{direction="to_target"|"from_target"}``
- ``certificate_expiry_seconds`` (seconds until the client certificate's notAfter; negative
  once expired; absent when it cannot be read)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    agent_id: str
    version: str
    connected: bool
    reconnects: int
    commands: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(type, outcome) -> count of commands that reached that final outcome."""
    refusals: Mapping[str, int] = field(default_factory=dict)
    audit_records: int = 0
    pending_approvals: int = 0
    unsent_frames: int = 0
    streams_open: int = 0
    stream_bytes_to_target: int = 0
    stream_bytes_from_target: int = 0
    certificate_expiry_seconds: float | None = None


def render(snapshot: Snapshot) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    from agent.io.metrics_text import render_text  # noqa: PLC0415  # at the first scrape

    return render_text(snapshot)
