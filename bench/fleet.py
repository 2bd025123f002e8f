"""Fleet benchmark: one stub process, as many connected agents as the machine allows.

The stub is the real ``cp-stub serve`` in its own process (so its RSS is its own). The agents
are *fleet clients*: minimal, protocol-complete agents — their own certificate and key each,
mutual TLS, ``hello``/``welcome``, protocol heartbeats both ways, reconnection with the agent's
own capped, fully jittered backoff (agent/core/backoff.py, default settings) — without the state,
audit log and executor of a full agent, so that thousands fit in two worker processes. They
report how many of them are connected as JSON lines on stdout.

    python -m bench.fleet worker --pki DIR --port P --first I --count N
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import connect

from agent.core.backoff import Backoff, BackoffSettings
from agent.core.frames import (
    MAX_FRAME_TO_AGENT,
    PROTOCOL_VERSION,
    TO_AGENT,
    Hello,
    Ping,
    Pong,
    decode,
    encode,
)
from agent.io import event_loop
from agent.io.event_loop import EVENT_LOOPS
from agent.io.tls import client_context
from certs.pki import PKIPaths, issue_agent_cert

HEARTBEAT = 15.0
STABLE_AFTER = 10.0


@dataclass
class Counts:
    connected: int = 0
    ever: int = 0


def agent_name(index: int) -> str:
    return f"fleet-{index:05d}"


async def run_client(agent_id: str, context: ssl.SSLContext, url: str, counts: Counts) -> None:
    backoff = Backoff(BackoffSettings())
    while True:
        up_since: float | None = None
        try:
            async with connect(
                url,
                ssl=context,
                server_hostname="localhost",
                open_timeout=60,
                ping_interval=None,
                compression=None,
                max_size=16 * MAX_FRAME_TO_AGENT,
                max_queue=4,
            ) as websocket:
                hello = Hello(
                    protocol=PROTOCOL_VERSION,
                    agent_version="fleet-client",
                    capabilities={},
                    heartbeat_interval=HEARTBEAT,
                )
                await websocket.send(encode(hello))
                decode(await websocket.recv(), accept=TO_AGENT, max_bytes=MAX_FRAME_TO_AGENT)
                up_since = time.monotonic()
                counts.connected += 1
                counts.ever += 1

                async def pings() -> None:
                    ping_id = 0
                    while True:
                        await asyncio.sleep(HEARTBEAT)
                        ping_id += 1
                        await websocket.send(encode(Ping(id=ping_id)))

                ticker = asyncio.create_task(pings())
                try:
                    async for message in websocket:
                        frame = decode(message, accept=TO_AGENT, max_bytes=MAX_FRAME_TO_AGENT)
                        if isinstance(frame, Ping):
                            await websocket.send(encode(Pong(id=frame.id)))
                finally:
                    ticker.cancel()
        except Exception:  # noqa: S110  # any failure is a reason to reconnect
            pass
        finally:
            if up_since is not None:
                counts.connected -= 1
                if time.monotonic() - up_since >= STABLE_AFTER:
                    backoff.reset()
        await asyncio.sleep(backoff.next_delay())


async def worker(pki_root: Path, port: int, first: int, count: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pki = PKIPaths.at(pki_root)
    contexts = []
    for index in range(first, first + count):
        name = agent_name(index)
        if not pki.agent_cert(name).exists():
            issue_agent_cert(pki, name)
        contexts.append(
            (
                name,
                client_context(
                    ca_bundle=pki.server_ca_cert, cert=pki.agent_cert(name), key=pki.agent_key(name)
                ),
            )
        )
    counts = Counts()
    url = f"wss://localhost:{port}/v1/agent"
    print(json.dumps({"dialing": time.time()}), flush=True)
    tasks = [asyncio.create_task(run_client(name, ctx, url, counts)) for name, ctx in contexts]
    last = -1
    while not all(task.done() for task in tasks):  # report changes, ten times a second
        if counts.connected != last:
            last = counts.connected
            report = {"connected": last, "ever": counts.ever, "t": time.time()}
            print(json.dumps(report), flush=True)
        await asyncio.sleep(0.1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.fleet")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("worker")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(worker(args.pki, args.port, args.first, args.count), args.event_loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
