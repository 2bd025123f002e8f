"""The benchmark suite still runs (bench/, docs/BENCHMARKS.md): a quick pass with small sizes.

This checks that every peer carries the bytes it is given and that the figures are produced;
it asserts no speed (speed targets live in the benchmark's own report, not in tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import report as report_module
from bench.__main__ import TARGETS
from tests.ci import unavailable
from tests.processes import REPO


def test_the_quick_benchmarks_run_and_report(tmp_path: Path) -> None:
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
        unavailable("ssh -R is one of the peers: needs openssh-server and openssh-client")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick",
            "--only", "throughput,rtt,commands,loaded,fleet", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = report["figures"]
    for peer in ("direct", "ssh", "ssh_aes", "tunnel"):
        assert figures[f"throughput_{peer}_mib_s"] > 0  # the sink counted every byte
        assert 0 < figures[f"rtt_{peer}_p50_us"] <= figures[f"rtt_{peer}_p99_us"]
    assert figures["agent_cpu_s_per_gib"] > 0
    assert figures["stub_cpu_s_per_gib"] > 0
    for control in ("idle_control_ping", "loaded_control_ping"):
        assert 0 < figures[f"{control}_p50_ms"] <= figures[f"{control}_p99_ms"]
    assert figures["loaded_stream_mib_s"] > 0
    assert 0 < figures["command_rtt_p50_ms"] <= figures["command_rtt_p99_ms"]
    assert figures["commands_per_s"] > 0
    assert figures["fleet_reconnected"] == figures["fleet_agents"] == 50
    assert {t["figure"] for t in report["targets"]} >= {
        "throughput_ratio_vs_ssh",
        "throughput_ratio_vs_ssh_aes",
        "rtt_p50_ratio_vs_ssh",
        "rtt_p99_ratio_vs_ssh",
        "agent_cpu_s_per_gib",
        "loaded_control_ping_p99_ms",
        "command_rtt_p50_ms",
        "fleet_reconnect_s",
    }
    assert "written:" in done.stdout


def test_the_documented_figures_are_the_recorded_ones() -> None:
    """docs/BENCHMARKS.md's block is what docs/benchmark-*.json make (make bench writes all)."""
    text = report_module.DOC.read_text()
    assert report_module.current_block(TARGETS) in text


def test_a_run_of_some_suites_replaces_their_figures_only(tmp_path: Path) -> None:
    doc, results, baseline = tmp_path / "B.md", tmp_path / "r.json", tmp_path / "b.json"
    doc.write_text(f"# Benchmarks\n\n{report_module.START}\nold\n{report_module.END}\nprose\n")
    baseline.write_text(
        json.dumps({"note": "the old run", "figures": {"throughput_tunnel_mib_s": 341}})
    )
    paths = {"doc": doc, "results": results, "baseline": baseline}
    first = {
        "when": "T1",
        "figures": {"throughput_tunnel_mib_s": 700.0, "rtt_tunnel_p50_us": 120.0},
    }
    report_module.update_docs(first, ["throughput", "rtt"], TARGETS, **paths)
    second = {"when": "T2", "figures": {"rtt_tunnel_p50_us": 110.0}}

    report_module.update_docs(second, ["rtt"], TARGETS, **paths)

    merged = json.loads(results.read_text())
    assert merged["figures"] == {"throughput_tunnel_mib_s": 700.0, "rtt_tunnel_p50_us": 110.0}
    assert [(r["when"], r["suites"]) for r in merged["runs"]] == [
        ("T1", ["throughput"]),
        ("T2", ["rtt"]),
    ]
    text = doc.read_text()
    assert "| stream throughput, tunnel | MiB/s | 341 | 700 |" in text
    assert "| 64 B round trip p50, tunnel | µs | — | 110 |" in text
    assert "Before: the old run" in text
    assert "old\n" not in text
    assert text.endswith(f"{report_module.END}\nprose\n")
