"""``python -m bench``: run the benchmarks, print a table against the targets, write JSON.

    python -m bench [--quick] [--only NAME,...] [--runs N] [--out PATH] [--docs]

Names: throughput, rtt, commands, loaded, footprint, fleet. ``--docs`` (what ``make bench``
does) also writes the figures into docs/BENCHMARKS.md beside the earlier ones (bench/report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from agent.io import event_loop
from agent.io.event_loop import EVENT_LOOPS
from agent.logs import configure_logging
from bench import report as docs
from bench import suites
from bench.harness import Workspace

Suite = Callable[[Workspace, suites.Settings], Coroutine[Any, Any, dict[str, float]]]
SUITES: Final[dict[str, Suite]] = {
    "throughput": suites.stream_throughput,
    "rtt": suites.stream_round_trip,
    "commands": suites.commands,
    "loaded": suites.control_latency_under_load,
    "footprint": suites.footprint,
    "fleet": suites.fleet,
}

# (figure, comparison, target, unit, what the issue asks)
TARGETS: Final = [
    ("throughput_ratio_vs_ssh", ">=", 1.2, "x", "stream throughput >= 1.2 x ssh -R"),
    (
        "throughput_ratio_vs_ssh_aes",
        ">=",
        1.0,
        "x",
        "stream throughput >= ssh -R -c aes128-gcm (stretch)",
    ),
    ("rtt_p50_ratio_vs_ssh", "<=", 2.0, "x", "small-message RTT p50 within 2 x ssh -R"),
    ("rtt_p99_ratio_vs_ssh", "<=", 3.0, "x", "small-message RTT p99 within 3 x ssh -R"),
    ("agent_cpu_s_per_gib", "<=", 2.6, "s", "agent CPU per GiB below 2.6 s"),
    ("command_rtt_p50_ms", "<=", 1.0, "ms", "signed command round trip p50 <= 1 ms"),
    ("command_rtt_p99_ms", "<=", 3.0, "ms", "signed command round trip p99 <= 3 ms"),
    ("commands_per_s", ">=", 3000.0, "/s", ">= 3,000 commands/s"),
    (
        "loaded_command_rtt_p99_ms",
        "<=",
        10.0,
        "ms",
        "control channel p99 <= 10 ms while a stream is saturated (commands)",
    ),
    (
        "loaded_control_ping_p99_ms",
        "<=",
        10.0,
        "ms",
        "control channel p99 <= 10 ms while a stream is saturated (pings)",
    ),
    ("idle_rss_mb", "<=", 40.0, "MB", "idle agent RSS <= 40 MB"),
    ("idle_cpu_percent", "<=", 0.2, "%", "idle agent CPU <= 0.2 %"),
    ("fleet_stub_rss_mb", "<=", 1073.7, "MB", "10,000 agents on one stub within 1 GiB RSS"),
    ("fleet_reconnect_s", "<=", 60.0, "s", "all reconnected within 60 s of a stub restart"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated suite names")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    parser.add_argument(
        "--docs", action="store_true", help="write the figures into docs/BENCHMARKS.md"
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="for the agents and the stub (default uvloop, the fast extra)",
    )
    args = parser.parse_args(argv)
    if args.docs and args.quick:
        parser.error("--docs with --quick: quick figures mean nothing and are not documented")
    settings = suites.Settings.quick() if args.quick else suites.Settings()
    settings = dataclasses.replace(settings, event_loop=args.event_loop)
    if args.runs is not None:
        settings = dataclasses.replace(settings, runs=args.runs)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    configure_logging("warning")
    figures: dict[str, float] = {}
    timings: dict[str, float] = {}
    for name in names:
        ws = Workspace.create()
        started = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            figures.update(event_loop.run(SUITES[name](ws, settings), args.event_loop))
        finally:
            if not os.environ.get("BENCH_KEEP"):
                shutil.rmtree(ws.root, ignore_errors=True)
        timings[name] = time.monotonic() - started
        print(f"   done in {timings[name]:.0f}s", flush=True)
    print()
    print(f"{'figure':40} {'value':>12}")
    for key, value in figures.items():
        print(f"{key:40} {value:12.3f}")
    print()
    print(f"{'target':62} {'measured':>12} {'met':>5}")
    results = []
    for key, op, target, unit, text in TARGETS:
        if key not in figures:
            continue
        met = docs.met_target(figures[key], op, target)
        results.append(
            {"figure": key, "target": f"{op} {target} {unit}", "value": figures[key], "met": met}
        )
        print(f"{text:62} {figures[key]:10.3f}{unit:>2} {'yes' if met else 'NO':>5}")
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "settings": dataclasses.asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "figures": figures,
        "targets": results,
        "seconds": timings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    if args.docs:
        docs.update_docs(report, names, TARGETS)
        print(f"written: {docs.DOC.relative_to(docs.REPO)}, {docs.RESULTS.relative_to(docs.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
