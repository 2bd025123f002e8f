"""docs/BENCHMARKS.md's figures, written by ``make bench`` (``python -m bench --docs``).

The run's figures are merged into docs/benchmark-results.json (a run of some suites only
replaces those suites' figures), and the block between the two markers in docs/BENCHMARKS.md is
rewritten from it: every figure beside the one in docs/benchmark-baseline.json (the figures
before the last round of work, kept as they were), then the targets. The prose around the block
is written by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
DOC: Final = REPO / "docs" / "BENCHMARKS.md"
RESULTS: Final = REPO / "docs" / "benchmark-results.json"
BASELINE: Final = REPO / "docs" / "benchmark-baseline.json"
START: Final = "<!-- bench:figures:start (written by `make bench`: bench/report.py) -->"
END: Final = "<!-- bench:figures:end -->"

# (figure, what it is, unit, digits)
ROWS: Final[Sequence[tuple[str, str, str, int]]] = (
    ("throughput_direct_mib_s", "stream throughput, direct loopback TCP", "MiB/s", 0),
    ("throughput_ssh_mib_s", "stream throughput, ssh -R (chacha20-poly1305)", "MiB/s", 0),
    ("throughput_ssh_aes_mib_s", "stream throughput, ssh -R -c aes128-gcm", "MiB/s", 0),
    ("throughput_tunnel_mib_s", "stream throughput, tunnel", "MiB/s", 0),
    ("throughput_ratio_vs_ssh", "tunnel / ssh -R (default cipher)", "x", 2),
    ("throughput_ratio_vs_ssh_aes", "tunnel / ssh -R -c aes128-gcm", "x", 2),
    ("agent_cpu_s_per_gib", "agent CPU per GiB carried", "s", 2),
    ("stub_cpu_s_per_gib", "stub CPU per GiB carried", "s", 2),
    ("rtt_direct_p50_us", "64 B round trip p50, direct", "µs", 0),
    ("rtt_ssh_p50_us", "64 B round trip p50, ssh -R", "µs", 0),
    ("rtt_ssh_aes_p50_us", "64 B round trip p50, ssh -R -c aes128-gcm", "µs", 0),
    ("rtt_tunnel_p50_us", "64 B round trip p50, tunnel", "µs", 0),
    ("rtt_p50_ratio_vs_ssh", "round trip p50, tunnel / ssh -R", "x", 2),
    ("rtt_direct_p99_us", "64 B round trip p99, direct", "µs", 0),
    ("rtt_ssh_p99_us", "64 B round trip p99, ssh -R", "µs", 0),
    ("rtt_ssh_aes_p99_us", "64 B round trip p99, ssh -R -c aes128-gcm", "µs", 0),
    ("rtt_tunnel_p99_us", "64 B round trip p99, tunnel", "µs", 0),
    ("rtt_p99_ratio_vs_ssh", "round trip p99, tunnel / ssh -R", "x", 2),
    ("command_rtt_p50_ms", "signed command round trip p50", "ms", 1),
    ("command_rtt_p99_ms", "signed command round trip p99", "ms", 1),
    ("commands_per_s", "commands per second (3,000 in flight)", "/s", 0),
    ("idle_control_ping_p50_ms", "tunnel ping p50, idle", "ms", 2),
    ("idle_control_ping_p99_ms", "tunnel ping p99, idle", "ms", 2),
    ("loaded_control_ping_p50_ms", "tunnel ping p50, stream saturated", "ms", 2),
    ("loaded_control_ping_p99_ms", "tunnel ping p99, stream saturated", "ms", 2),
    ("idle_command_rtt_p99_ms", "command round trip p99, idle (same run)", "ms", 1),
    ("loaded_command_rtt_p50_ms", "command round trip p50, stream saturated", "ms", 1),
    ("loaded_command_rtt_p99_ms", "command round trip p99, stream saturated", "ms", 1),
    ("loaded_stream_mib_s", "the saturated stream meanwhile", "MiB/s", 0),
    ("idle_rss_mb", "idle agent RSS", "MB", 1),
    ("idle_cpu_percent", "idle agent CPU", "%", 2),
    ("rss_after_commands_mb", "agent RSS after 10,000 commands", "MB", 1),
    ("rss_growth_second_to_last_tenth_mb", "RSS growth, 2nd to 10th thousand", "MB", 2),
    ("fleet_connect_s", "10,000 agents connected in", "s", 0),
    ("fleet_stub_rss_mb", "stub RSS with 10,000 agents", "MB", 0),
    ("fleet_stub_kb_per_agent", "stub memory per agent", "kB", 0),
    ("fleet_reconnect_s", "all back after a stub restart in", "s", 1),
)


def met_target(value: float, op: str, target: float) -> bool:
    """Whether a figure meets its target (``op``: ``>=`` or ``<=``)."""
    return value >= target if op == ">=" else value <= target


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"figures": {}}
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _number(value: object, digits: int) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _with_unit(value: object, unit: str) -> str:
    shown = _number(value, 2)
    return shown if shown == "—" else f"{shown} {unit}"


def _describe(run: dict[str, Any]) -> str:
    machine, settings = run.get("machine", {}), run.get("settings", {})
    suites = ", ".join(run.get("suites", [])) or "all suites"
    return (
        f"{run.get('when', '?')} ({suites}): {machine.get('cpus', '?')} CPUs, "
        f"Python {machine.get('python', '?')}, {machine.get('platform', '?')}, event loop "
        f"{settings.get('event_loop', '?')}, {settings.get('runs', '?')} runs per figure"
    )


def render(
    baseline: dict[str, Any], current: dict[str, Any], targets: Sequence[tuple[Any, ...]]
) -> str:
    before, now = baseline.get("figures", {}), current.get("figures", {})
    runs = current.get("runs", [])
    lines = [
        START,
        "",
        f"Before: {baseline.get('note', baseline.get('when', '?'))}",
        "",
        *(f"Now: {_describe(run)}." for run in runs),
        *([] if runs else ["Now: no run yet."]),
        "",
        "| Figure | Unit | Before | Now |",
        "|---|---|---:|---:|",
    ]
    for key, text, unit, digits in ROWS:
        if key in before or key in now:
            lines.append(
                f"| {text} | {unit} | {_number(before.get(key), digits)} | "
                f"{_number(now.get(key), digits)} |"
            )
    lines += ["", "| Target | Before | Now | Met now |", "|---|---:|---:|---|"]
    for key, op, target, unit, text in targets:
        if key not in now:
            continue
        value = now[key]
        met = met_target(value, op, target)
        lines.append(
            f"| {text} | {_with_unit(before.get(key), unit)} | {_with_unit(value, unit)} | "
            f"{'yes' if met else 'no'} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def update_docs(
    report: dict[str, Any],
    suites: Sequence[str],
    targets: Sequence[tuple[Any, ...]],
    *,
    doc: Path = DOC,
    results: Path = RESULTS,
    baseline: Path = BASELINE,
) -> None:
    """Merge this run into docs/benchmark-results.json (its suites' figures replace theirs)
    and rewrite the block of docs/BENCHMARKS.md."""
    merged = _load(results)
    run: dict[str, Any] = {
        k: report[k] for k in ("when", "machine", "settings", "seconds") if k in report
    }
    run["suites"] = list(suites)
    kept = [r for r in merged.get("runs", []) if set(r.get("suites", [])) - set(suites)]
    for earlier in kept:  # an earlier run still contributes the suites not run now
        earlier["suites"] = [name for name in earlier["suites"] if name not in suites]
    merged["runs"] = [*kept, run]
    merged["figures"] = {**merged.get("figures", {}), **report["figures"]}
    results.write_text(json.dumps(merged, indent=2) + "\n")
    doc.write_text(replace_block(doc.read_text(), render(_load(baseline), merged, targets)))


def current_block(targets: Sequence[tuple[Any, ...]]) -> str:
    """The block as docs/benchmark-results.json and docs/benchmark-baseline.json make it."""
    return render(_load(BASELINE), _load(RESULTS), targets)


def replace_block(text: str, block: str) -> str:
    head, found, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise RuntimeError(f"the document has lost its markers ({START!r} ... {END!r})")
    return head + block + tail
