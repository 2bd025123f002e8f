"""The ``journal`` driver: changes no workload, records every command it executes.

Each execution appends a ``start`` line before it does anything and an ``end`` line after, to
an append-only JSON Lines file, fsync'd. It is for dry runs (see what a control plane would do
to a host, with the agent's whole verification, policy and audit path in front of it), for crash
tests (count ``start`` lines per ``jti`` to prove nothing ran twice, from outside the agent) and
for benchmarks (a cheap command).

Settings (``[driver.journal]``): ``path`` (default ``<state_dir>/journal.jsonl``), ``delay``
(seconds each command takes, default 0), ``initial_replicas`` (1), ``initial_version``
("1.0.0"). The simulated replica count and version survive restarts: they are replayed from the
journal.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.core.errors import ConfigError
from agent.core.toml_tables import Table
from agent.drivers.base import DriverEnvironment, ExecContext


class JournalDriver:
    kind = "journal"

    def __init__(self, settings: Mapping[str, object], env: DriverEnvironment) -> None:
        table = Table(
            "driver.journal",
            dict(settings),
            {"path", "delay", "initial_replicas", "initial_version"},
            ConfigError,
        )
        raw_path = table.optional_string("path")
        self.path = Path(raw_path) if raw_path else env.state_dir / "journal.jsonl"
        self.delay = table.number("delay", 0.0, low=0.0, high=3600.0)
        self.replicas = table.integer("initial_replicas", 1, low=0, high=1000)
        self.version = table.string("initial_version", "1.0.0")
        self._fd: int | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash: that command never ended
                if entry.get("event") == "end":
                    self.replicas = int(entry.get("replicas", self.replicas))
                    self.version = str(entry.get("version", self.version))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _append(self, **entry: object) -> None:
        """One line, on disk before this returns (synced in a thread: the event loop goes on)."""
        if self._fd is None:
            raise RuntimeError("journal driver is not started")
        line = json.dumps({"at": time.time(), **entry}, sort_keys=True) + "\n"
        fd = self._fd
        os.write(fd, line.encode())
        await asyncio.to_thread(os.fsync, fd)

    async def _run(self, ctx: ExecContext, command: str, **params: object) -> None:
        await ctx.audit("journal_entry", command=command)
        await self._append(event="start", jti=ctx.jti, command=command, **params)
        if self.delay:
            await asyncio.sleep(self.delay)

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        await self._run(ctx, "scale", replicas=replicas)
        previous, self.replicas = self.replicas, replicas
        await self._append(event="end", jti=ctx.jti, replicas=self.replicas, version=self.version)
        return {"replicas": replicas, "previous_replicas": previous, "version": self.version}

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        await self._run(ctx, "upgrade", version=version)
        previous, self.version = self.version, version
        await self._append(event="end", jti=ctx.jti, replicas=self.replicas, version=self.version)
        return {"version": version, "previous_version": previous, "changed": previous != version}

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        await self._run(ctx, "collect_metrics", targets=list(targets))
        await self._append(event="end", jti=ctx.jti, replicas=self.replicas, version=self.version)
        return {
            "samples": [
                {
                    "target": "workload",
                    "name": "journal_replicas",
                    "labels": {"version": self.version},
                    "value": self.replicas,
                }
            ],
            "errors": [],
            "replicas": self.replicas,
            "version": self.version,
        }

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "replicas": self.replicas, "version": self.version}
