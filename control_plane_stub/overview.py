"""What an operator sees about agents and commands, computed from what the stub stores:
certificate expiry, clock offset, command timelines, receipts, refusals, streams, and metrics
per replica.

Plain functions of records and ``now``: no I/O, no clock. The operator API (:mod:`.api`)
returns their results as JSON, and the console (:mod:`.console`) renders the same results as
HTML, so both always say the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from cryptography import x509

from agent.core.frames import FINAL_STATES
from control_plane_stub.store import CommandRecord

CLOCK_SAMPLES: Final = 20
"""Reports (of each kind) the clock offset is estimated from."""
METRIC_COLLECTIONS: Final = 20
"""``collect_metrics`` results a replica's chart goes back over."""


def certificate_not_after(der: bytes) -> float | None:
    """When a certificate (DER) expires, as a Unix time; None if it cannot be read."""
    try:
        return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def clock_offset(samples: Iterable[float]) -> float | None:
    """The agent's clock minus this stub's, estimated from reports: each sample is the agent's
    time when it wrote a report minus the stub's time when the report was stored, i.e. the
    offset minus that report's delay on the way (never negative). The largest sample has the
    smallest delay, so it is the best estimate (an NTP-style minimum-delay filter), too low by
    at most that report's delay. None without samples."""
    return max(samples, default=None)


def last_anchor(anchors: Sequence[Mapping[str, Any]], now: float) -> dict[str, object] | None:
    """The highest audit chain head held (the first of :meth:`StubStore.anchors`), with its
    age on this stub's clock."""
    if not anchors:
        return None
    top = anchors[0]
    return {
        "audit_seq": top["audit_seq"],
        "audit_hash": top["audit_hash"],
        "recorded_at": top["recorded_at"],
        "age": max(0.0, now - float(top["recorded_at"])),
        "conflict": top["conflict"],
        "conflict_reason": top.get("conflict_reason"),
    }


def agent_view(
    agent: Mapping[str, Any],
    *,
    live: bool,
    last_heard: float | None,
    certificate_der: bytes | None,
    anchors: Sequence[Mapping[str, Any]],
    clock_samples: Iterable[float],
    now: float,
) -> dict[str, object]:
    """An agent's registry row (:meth:`StubStore.agents`) with what the fleet view adds.

    ``live``: whether it has a session with this stub right now. ``last_heard``: when its last
    frame arrived (any frame: pings included), on this stub's clock; for an agent not connected,
    when its last session ended."""
    heard = last_heard if live and last_heard is not None else agent.get("last_seen")
    not_after = certificate_not_after(certificate_der) if certificate_der is not None else None
    return {
        **agent,
        "connected": live,
        "last_heard": heard,
        "last_heard_age": None if heard is None else max(0.0, now - float(heard)),
        "certificate_not_after": not_after,
        "certificate_expires_in": None if not_after is None else not_after - now,
        "last_anchor": last_anchor(anchors, now),
        "clock_offset": clock_offset(clock_samples),
    }


def timeline(
    record: CommandRecord, history: Sequence[Mapping[str, Any]]
) -> list[dict[str, object]]:
    """Every step of a command, in order: ``queued`` and ``delivered`` (the stub's own steps),
    then what the agent reported (``received``, ``pending_approval``, ``running``, the final
    state; ``delivery_rejected`` for a delivery refused before it was accepted). ``at`` is this
    stub's clock (when it queued, sent or stored the report); ``agent_at`` the agent's clock
    when it wrote the report."""
    steps: list[dict[str, object]] = [
        {"state": "queued", "at": record.created_at, "by": "stub", "reason": None, "detail": None}
    ]
    if record.sent_at is not None:
        steps.append(
            {
                "state": "delivered",
                "at": record.sent_at,
                "by": "stub",
                "reason": None,
                "detail": None,
            }
        )
    for event in history:
        steps.append(
            {
                "state": event["state"],
                "at": event.get("recorded_at", event["at"]),
                "agent_at": event["at"],
                "by": "agent",
                "reason": event.get("reason"),
                "detail": event.get("detail"),
            }
        )
    return steps


def receipt_view(receipt: Mapping[str, Any] | None, state: str) -> dict[str, object]:
    """Whether the command's final report came with a receipt that verifies.

    ``verified``: True (it verifies with one of the agent's certificates and says what the
    report says), False (it does not: ``status`` says why), None (no receipt, or none yet)."""
    if receipt is not None:
        status = str(receipt["status"])
        return {"verified": status == "valid", "status": status}
    if state in FINAL_STATES:
        return {"verified": None, "status": "no receipt came with the final report"}
    return {"verified": None, "status": "not yet: a receipt comes with the final state"}


def command_view(
    record: CommandRecord,
    history: Sequence[Mapping[str, Any]],
    receipt: Mapping[str, Any] | None,
) -> dict[str, object]:
    """A command with its timeline and what its receipt proves."""
    return {
        **record.to_json(),
        "final": record.final,
        "timeline": timeline(record, history),
        "receipt": receipt_view(receipt, record.state),
    }


def refusals(commands: Iterable[Mapping[str, Any]]) -> list[dict[str, object]]:
    """The commands the agent refused (state ``rejected``: its policy, a signature, a replay,
    a person on the host who denied it), with the reason and the agent's explanation."""
    return [
        {
            "ref": c["ref"],
            "type": c["type"],
            "params": c["params"],
            "reason": c["reason"],
            "detail": c["detail"],
            "at": c["updated_at"],
        }
        for c in commands
        if c["state"] == "rejected"
    ]


def pending_approvals(commands: Iterable[Mapping[str, Any]]) -> list[dict[str, object]]:
    """Commands waiting for a person on the agent's host to approve or deny them."""
    return [
        {"ref": c["ref"], "jti": c["jti"], "type": c["type"], "params": c["params"]}
        for c in commands
        if c["state"] == "pending_approval"
    ]


def stream_grants(records: Iterable[CommandRecord]) -> list[dict[str, object]]:
    """``open_stream`` grants and, once final, what each stream carried (bytes each way, as the
    agent reports them: to and from the target in its network)."""
    out: list[dict[str, object]] = []
    for record in records:
        params = record.params or {}
        result = record.result or {}
        out.append(
            {
                "ref": record.ref,
                "target": params.get("target"),
                "state": record.state,
                "reason": record.reason,
                "detail": record.detail,
                "address": result.get("address"),
                "bytes_to_target": result.get("bytes_to_target"),
                "bytes_from_target": result.get("bytes_from_target"),
                "ended_by": result.get("ended_by"),
                "duration_ms": result.get("duration_ms"),
                "created_at": record.created_at,
            }
        )
    return out


_REPLICA_FIGURES: Final = {
    "process_resident_memory_bytes": "memory_bytes",
    "process_cpu_seconds_total": "cpu_seconds",
    "demo_workload_uptime_seconds": "uptime_seconds",
    "demo_workload_healthy": "healthy",
}
_HOST_FIGURES: Final = (
    "host_cpu_percent",
    "host_load1",
    "host_memory_used_percent",
    "host_disk_used_percent",
)


def _replica_of(sample: Mapping[str, Any]) -> str | None:
    labels = sample.get("labels")
    if sample.get("target") != "workload" or not isinstance(labels, Mapping):
        return None
    replica = labels.get("replica")
    return str(replica) if replica is not None else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def replica_metrics(collections: Sequence[tuple[float, Sequence[Any]]]) -> dict[str, object]:
    """Per replica, from ``collect_metrics`` results ``(when, samples)`` (any order): a series
    of resident memory over time (for a chart) and the latest figures (version, health, uptime,
    CPU seconds, requests served); and the host's latest figures.

    Samples that are not what the agent's drivers produce (no ``replica`` label, a value that is
    not a number) are skipped: a result is the agent's word, not trusted structure."""
    replicas: dict[str, dict[str, Any]] = {}
    host: dict[str, float] = {}
    host_at: float | None = None
    for at, samples in sorted(collections, key=lambda item: item[0]):
        seen: dict[str, dict[str, Any]] = {}
        for sample in samples:
            if not isinstance(sample, Mapping):
                continue
            name = sample.get("name")
            value = _number(sample.get("value"))
            if sample.get("target") == "host" and name in _HOST_FIGURES and value is not None:
                host[str(name)] = value
                host_at = at
                continue
            replica = _replica_of(sample)
            if replica is None:
                continue
            figures = seen.setdefault(replica, {"requests": 0.0})
            labels = sample["labels"]
            if name == "demo_workload_info":
                figures["version"] = str(labels.get("version"))
            elif name == "demo_workload_requests_total" and value is not None:
                figures["requests"] += value
            elif name in _REPLICA_FIGURES and value is not None:
                figures[_REPLICA_FIGURES[str(name)]] = value
        for replica, figures in seen.items():
            entry = replicas.setdefault(replica, {"replica": replica, "memory_series": []})
            entry["latest"] = {"at": at, **figures}
            if "memory_bytes" in figures:
                entry["memory_series"].append([at, figures["memory_bytes"]])
    newest = max((at for at, _ in collections), default=None)
    for entry in replicas.values():
        entry["current"] = entry["latest"]["at"] == newest  # in the latest collection
    ordered = sorted(replicas.values(), key=lambda r: (len(r["replica"]), r["replica"]))
    return {"replicas": ordered, "host": {"at": host_at, **host} if host_at is not None else None}


Snapshot = dict[str, dict[str, tuple[object, ...]]]
"""What a watcher compares to find changes: ``{"agents": {id: ...}, "commands": {ref: ...}}``."""


def snapshot(
    agents: Iterable[Mapping[str, Any]],
    live: Iterable[str],
    anchor_heads: Mapping[str, int],
    commands: Iterable[CommandRecord],
) -> Snapshot:
    connected = set(live)
    return {
        "agents": {
            str(a["agent_id"]): (
                a["agent_id"] in connected,
                a["agent_version"],
                anchor_heads.get(str(a["agent_id"])),
            )
            for a in agents
        },
        "commands": {c.ref: (c.agent_id, c.type, c.state, c.reason) for c in commands},
    }


def changes(before: Snapshot, after: Snapshot) -> list[tuple[str, dict[str, object]]]:
    """The events between two snapshots: ``agent`` (connected or not, version, audit head)
    and ``command`` (new, or in another state: ``state`` as the store names it, ``sent`` for
    delivered), in a stable order."""
    events: list[tuple[str, dict[str, object]]] = []
    for agent_id, now in sorted(after["agents"].items()):
        if before["agents"].get(agent_id) != now:
            connected, version, head = now
            events.append(
                (
                    "agent",
                    {
                        "agent_id": agent_id,
                        "connected": connected,
                        "agent_version": version,
                        "audit_seq": head,
                    },
                )
            )
    for ref, now in after["commands"].items():
        if before["commands"].get(ref) != now:
            owner, command_type, state, reason = now
            events.append(
                (
                    "command",
                    {
                        "ref": ref,
                        "agent_id": owner,
                        "type": command_type,
                        "state": state,
                        "reason": reason,
                    },
                )
            )
    return events
