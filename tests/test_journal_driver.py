"""The journal driver: every line on disk before the command goes on, with one fsync for all
the lines written while the previous one ran (group commit)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest
import structlog

from agent.drivers.base import DriverEnvironment, ExecContext
from agent.drivers.journal import JournalDriver

COMMANDS = 40


async def _ignore(_event: str, /, **_fields: object) -> None:
    return None


def context(jti: str) -> ExecContext:
    return ExecContext(jti=jti, audit=_ignore, log=structlog.get_logger("test"))


async def test_each_line_is_synced_before_its_command_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = DriverEnvironment(state_dir=tmp_path, audit=_ignore, log=structlog.get_logger("test"))
    driver = JournalDriver({}, env)
    await driver.start()
    synced_lines = [0]  # lines of the file that the last finished fsync covered
    gate = threading.Event()  # holds the first fsync so that lines pile up behind it
    real_fsync = os.fsync
    syncs = 0

    def fsync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        lines = driver.path.read_bytes().count(b"\n")
        gate.wait(timeout=10)
        real_fsync(fd)
        synced_lines[0] = max(synced_lines[0], lines)

    monkeypatch.setattr(os, "fsync", fsync)
    on_disk_when_done: dict[str, tuple[int, int]] = {}

    async def one(n: int) -> None:
        jti = f"j-{n}"
        await driver.collect_metrics(["workload"], context(jti))
        lines = driver.path.read_text().splitlines()
        end = max(i for i, line in enumerate(lines, 1) if json.loads(line)["jti"] == jti)
        on_disk_when_done[jti] = (end, synced_lines[0])

    tasks = [asyncio.create_task(one(n)) for n in range(COMMANDS)]
    await asyncio.sleep(0)  # every command writes its start line behind the held fsync
    gate.set()
    await asyncio.gather(*tasks)
    await driver.close()

    assert len(on_disk_when_done) == COMMANDS
    for jti, (end_line, synced) in on_disk_when_done.items():
        assert end_line <= synced, jti  # its end line was covered by a finished fsync
    assert len(driver.path.read_text().splitlines()) == 2 * COMMANDS
    assert syncs <= 4, syncs  # start lines share one sync, end lines one or two more


async def test_a_failed_fsync_fails_every_command_waiting_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = DriverEnvironment(state_dir=tmp_path, audit=_ignore, log=structlog.get_logger("test"))
    driver = JournalDriver({}, env)
    await driver.start()

    def fsync(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    results = await asyncio.gather(
        *(driver.collect_metrics(["workload"], context(f"j-{n}")) for n in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(r, OSError) for r in results), results
    await driver.close()
