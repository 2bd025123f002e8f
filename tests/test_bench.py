"""The benchmark suite still runs (bench/, docs/BENCHMARKS.md): a quick pass with small sizes.

This checks that every peer carries the bytes it is given and that the figures are produced;
it asserts no speed (speed targets live in the benchmark's own report, not in tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO

pytestmark = pytest.mark.skipif(
    not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None,
    reason="ssh -R is one of the peers: needs openssh-server and openssh-client (.ci/run)",
)


def test_the_quick_benchmarks_run_and_report(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick",
            "--only", "throughput,rtt,commands,fleet", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = report["figures"]
    for peer in ("direct", "ssh", "tunnel"):
        assert figures[f"throughput_{peer}_mib_s"] > 0  # the sink counted every byte
        assert 0 < figures[f"rtt_{peer}_p50_us"] <= figures[f"rtt_{peer}_p99_us"]
    assert 0 < figures["command_rtt_p50_ms"] <= figures["command_rtt_p99_ms"]
    assert figures["commands_per_s"] > 0
    assert figures["fleet_reconnected"] == figures["fleet_agents"] == 50
    assert {t["figure"] for t in report["targets"]} >= {
        "throughput_ratio_vs_ssh",
        "rtt_p50_ratio_vs_ssh",
        "command_rtt_p50_ms",
        "fleet_reconnect_s",
    }
    assert "written:" in done.stdout
