"""The driver interface.

The executor calls a driver with typed, verified, policy-approved parameters. A driver:

- raises :class:`agent.core.errors.DriverError` with a short ``code`` when a command fails (its
  ``result`` travels to the control plane with the ``failed`` status);
- returns a JSON-serialisable ``dict`` describing what it did on success;
- writes an audit record *before* each action it takes on the workload (start or stop a replica,
  begin a rollback) through ``ctx.audit`` (during a command) or ``env.audit`` (supervision);
- is cancellable: when the agent stops, a running call may be cancelled and must leave the
  workload in a state that ``start()`` on the next run can adopt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import structlog


class AuditSink(Protocol):
    """Writes one audit record; returns once it is on disk (the action it describes may then
    be taken). Records from every command that is ready in the same turn share one disk write
    (agent/io/journal.py)."""

    async def __call__(self, event: str, /, **fields: object) -> None: ...


@dataclass(frozen=True, kw_only=True)
class DriverEnvironment:
    """What the agent gives a driver when it builds it."""

    state_dir: Path
    """A directory the driver owns for its state (created, mode 0700)."""
    audit: AuditSink
    """For actions the driver takes on its own initiative (e.g. restarting a crashed replica)."""
    log: structlog.typing.FilteringBoundLogger


@dataclass(frozen=True, kw_only=True)
class ExecContext:
    """What a driver gets with each command."""

    jti: str
    audit: AuditSink
    """Audit records written through this sink carry the command's jti."""
    log: structlog.typing.FilteringBoundLogger


@runtime_checkable
class Driver(Protocol):
    kind: str

    async def start(self) -> None:
        """Adopt the workload left by a previous run, or set up a fresh one."""

    async def close(self) -> None:
        """Release resources. Whether the workload keeps running is the driver's setting."""

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        """Bring the workload to ``replicas`` healthy replicas."""

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        """Move every replica to ``version``, one by one; roll back if it is unhealthy."""

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        """Return structured samples for the requested targets (e.g. ``workload``, ``host``)."""

    def describe(self) -> dict[str, object]:
        """A short JSON-serialisable description of the workload (replicas, version)."""


class DriverFactory(Protocol):
    """Builds a driver from its ``[driver.<kind>]`` settings table.

    Raises :class:`agent.core.errors.ConfigError` naming the key when a setting is invalid.
    """

    def __call__(self, settings: Mapping[str, object], env: DriverEnvironment) -> Driver: ...
