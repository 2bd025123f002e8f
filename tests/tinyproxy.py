"""tinyproxy, an HTTP CONNECT proxy (a Debian package that .ci/run installs), run on a loopback
port for the tests that need a real proxy: the agent's egress, and doctor's proxy check."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from tests.ci import tool
from tests.conftest import scaled


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running_tinyproxy(directory: Path, settings: str = "") -> AsyncIterator[tuple[int, Path]]:
    """tinyproxy on a free loopback port, with ``settings`` (more lines of its configuration:
    ``BasicAuth``, ``ConnectPort`` ...) until the block ends; yields its port and its log.
    Skipped without tinyproxy, except under ``CI=true``, where that is a failure."""
    binary = tool("tinyproxy", "apt-get install tinyproxy")
    port = _free_port()
    config = directory / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\nMaxClients 50\n"
        f"Allow 127.0.0.1\nDisableViaHeader Yes\n{settings}"
    )
    log = directory / "tinyproxy.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            binary, "-d", "-c", str(config), stdout=out, stderr=out
        )
    try:
        async with asyncio.timeout(scaled(10)):  # a readiness probe of the proxy's port
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield port, log
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), scaled(10))
