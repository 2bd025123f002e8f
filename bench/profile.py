"""Where a stream's time goes: keep one stream saturated (stub in this process, agent in its
own, ``sink`` and ``source`` peers as in the benchmarks) and sample the agent and the stub with
py-spy (``pip install py-spy``; not a dependency of the project).

    python -m bench.profile [--seconds 8] [--rate 250] [--out bench/results]

Prints, for each process, the share of samples by where the CPU was (the kernel's read/write,
OpenSSL, memory copies, Python code, ...) and the top functions; the raw collapsed stacks are
kept in ``--out`` (``agent.txt``, ``stub.txt``) for a flame graph. docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
from pathlib import Path

from agent.io import event_loop
from agent.logs import configure_logging
from bench.harness import Workspace, python_child, running_agent, running_stub
from bench.net import free_port, wait_port
from bench.suites import MIB, _forward

_LIBRARY = re.compile(r"\(([^():]+\.so[.\d]*)\)")


_WAITING = ("epoll_wait", "epoll_pwait", "poll ", "select ", "PyThread_acquire_lock", "sem_")


def summarize(collapsed: Path, top: int = 12) -> str:
    """Shares of the busy samples (not waiting in epoll, poll or a lock) by library (or
    Python code), and the top leaf functions."""
    by_place: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    busy = waiting = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        leaf = stack.split(";")[-1]
        if leaf.startswith(_WAITING):
            waiting += samples
            continue
        busy += samples
        by_leaf[leaf] += samples
        found = _LIBRARY.search(leaf)
        if found:
            place = found.group(1)
            if place.startswith("libc.so") and leaf.startswith("0x"):
                place += " (unnamed: memcpy and friends)"
            elif place.startswith("libc.so"):
                place += f" ({leaf.split(' ')[0]})"
        elif ".py:" in leaf:
            place = "Python code"
        else:
            place = "C extensions (uvloop, _ssl, the interpreter)"
        by_place[place] += samples
    if not busy:
        return "  no samples"
    lines = [f"  busy in {100 * busy / (busy + waiting):.0f}% of the samples; of those:"]
    lines += [f"  {100 * n / busy:5.1f}%  {place}" for place, n in by_place.most_common(top)]
    lines.append("  top functions:")
    lines += [f"  {100 * n / busy:5.1f}%  {leaf}" for leaf, n in by_leaf.most_common(top)]
    return "\n".join(lines)


async def _profile(seconds: float, rate: int, out: str) -> float:
    """Sample both processes into ``out``/agent.txt and stub.txt; the stream's MiB/s."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    ws = Workspace.create()
    sink_port = free_port()
    sink = python_child(ws, "bench.net", "sink", str(sink_port), name="sink")
    try:
        await asyncio.to_thread(wait_port, sink_port)
        async with running_stub(ws) as stub, running_agent(ws, stub, event_loop="uvloop") as agent:
            port = await _forward(stub, sink_port)
            load = python_child(ws, "bench.net", "source", str(port), str(1 << 40), name="load")
            await asyncio.sleep(1.0)  # full speed first (a measurement window, not a sync point)
            before = sum(f.sent for f in stub.streams.forwards.values())
            command = [pyspy, "record", "--native", "-d", str(int(seconds)), "-r", str(rate)]
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        subprocess.run,
                        [*command, "-p", str(pid), "-f", "raw", "-o", f"{out}/{name}.txt"],
                        capture_output=True,
                        check=True,
                    )
                    for name, pid in (("agent", agent.pid), ("stub", os.getpid()))
                )
            )
            moved = sum(f.sent for f in stub.streams.forwards.values()) - before
            load.stop()
            for forward in list(stub.streams.forwards.values()):
                for task in list(forward.tasks):
                    task.cancel()
    finally:
        sink.stop()
    return moved / seconds / MIB


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    configure_logging("warning")
    args.out.mkdir(parents=True, exist_ok=True)
    rate = event_loop.run(_profile(args.seconds, args.rate, str(args.out)), "uvloop")
    print(f"stream: {rate:.0f} MiB/s while sampled (py-spy slows it)")
    for name in ("agent", "stub"):
        print(f"{name}:\n{summarize(args.out / f'{name}.txt')}")


if __name__ == "__main__":
    main()
