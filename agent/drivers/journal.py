"""The ``journal`` driver: changes no workload, records every command it executes.

Each execution appends a ``start`` line before it does anything and an ``end`` line after, to
an append-only JSON Lines file, fsync'd before it goes on (lines written while an fsync runs
share the next one). It is for dry runs (see what a control plane would do
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
import contextlib
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
        self._written = 0
        """Lines written so far (counted from 1)."""
        self._synced = 0
        """Lines known to be on disk."""
        self._sync: asyncio.Task[None] | None = None
        """The fsync under way, if any: lines written meanwhile wait for the next one."""

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
        if self._sync is not None:  # an fsync in its thread still uses the descriptor
            with contextlib.suppress(OSError):
                await asyncio.shield(self._sync)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _append(self, **entry: object) -> None:
        """One line, on disk before this returns. Synced in a thread (the event loop goes on),
        one fsync for every line written while the previous one ran (group commit)."""
        if self._fd is None:
            raise RuntimeError("journal driver is not started")
        line = json.dumps({"at": time.time(), **entry}, sort_keys=True) + "\n"
        os.write(self._fd, line.encode())
        self._written += 1
        mine = self._written
        while self._synced < mine:
            if self._sync is None:
                self._sync = asyncio.get_running_loop().create_task(self._fsync(self._fd))
            await asyncio.shield(self._sync)

    async def _fsync(self, fd: int) -> None:
        upto = self._written
        try:
            await asyncio.to_thread(os.fsync, fd)
        finally:
            self._sync = None
        self._synced = max(self._synced, upto)

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
