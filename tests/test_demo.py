"""``make demo`` runs ``python -m byoc_demo``: run exactly that, end to end, as real processes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent.io.audit_file import verify_file
from tests.conftest import scaled


async def test_demo_scenario_passes_every_step(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "byoc_demo",
        str(demo),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), scaled(240))
    text = output.decode()
    assert process.returncode == 0, text
    steps = [line for line in text.splitlines() if line.startswith("[")]
    assert len(steps) == 9, text
    assert all(line.startswith("[ok  ]") for line in steps), text
    assert "Demo complete" in text
    summary = verify_file(demo / "agent" / "audit" / "audit.jsonl").summary
    assert summary.events["approval_granted"] == 1
    assert summary.events["rollback_started"] == 1
    assert summary.events["agent_stopped"] == 1

    # Re-running works (fresh state, new ports, same directory).
    again = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "byoc_demo", str(demo), stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(again.wait(), scaled(240)) == 0
