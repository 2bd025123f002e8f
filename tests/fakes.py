"""An in-memory driver for protocol and executor tests.

It implements the real :class:`agent.drivers.base.Driver` interface without processes, so that
tests about verification, policy, delivery and restarts run fast. The real ``process`` driver is
tested in tests/test_process_driver.py and runs in the end-to-end tests (tests/test_e2e_*.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.core.errors import DriverError
from agent.drivers.base import ExecContext


@dataclass
class RecordingDriver:
    kind: str = "recording"
    replicas: int = 1
    version: str = "1.0.0"
    broken_versions: frozenset[str] = frozenset({"2.1.0"})
    calls: list[tuple[str, object, str]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    """When set to an Event, every command waits for it (to observe ``running``)."""
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    closed: bool = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def _maybe_hold(self) -> None:
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        self.calls.append(("scale", replicas, ctx.jti))
        await ctx.audit("replica_change", replicas=replicas)
        await self._maybe_hold()
        previous, self.replicas = self.replicas, replicas
        return {"replicas": replicas, "previous_replicas": previous, "version": self.version}

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        self.calls.append(("upgrade", version, ctx.jti))
        await self._maybe_hold()
        if version in self.broken_versions:
            raise DriverError(
                "unhealthy_rolled_back",
                f"{version} failed its health check; rolled back to {self.version}",
                result={"rolled_back": True, "version": self.version},
            )
        previous, self.version = self.version, version
        return {"version": version, "previous_version": previous, "changed": True}

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        self.calls.append(("collect_metrics", tuple(targets), ctx.jti))
        await self._maybe_hold()
        return {
            "samples": [
                {
                    "target": "workload",
                    "name": "demo_workload_info",
                    "labels": {"version": self.version},
                    "value": 1.0,
                }
            ],
            "errors": [],
        }

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "replicas": self.replicas, "version": self.version}

    def executed(self, jti: str) -> int:
        return sum(1 for call in self.calls if call[2] == jti)
