"""Local processes of the ``process`` driver: spawning, adopting, signalling, waiting.

:class:`ManagedProcess` is one workload process (a child of the agent, or adopted from a previous
run and watched with psutil); the helpers open replica logs, describe exit statuses and probe
ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psutil

from agent.io.sdnotify import NOTIFY_ENV_VARS

_CREATE_TIME_TOLERANCE = 1.0
"""psutil derives create times from the boot time, which moves by up to a second with NTP."""
_EXIT_POLL_INTERVAL = 0.05


class ManagedProcess:
    """A workload process: our child, or adopted from a previous run (watched with psutil)."""

    def __init__(
        self,
        pid: int,
        create_time: float,
        *,
        child: asyncio.subprocess.Process | None = None,
        adopted: psutil.Process | None = None,
    ) -> None:
        self.pid = pid
        self.create_time = create_time
        self._child = child
        self._adopted = adopted

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], log_path: Path, *, marker: str | None = None
    ) -> ManagedProcess:
        """Start ``argv`` in a new session, output appended to ``log_path``; ``marker`` goes
        into its environment (:data:`MARKER_ENV`) so that it can be found again.

        Raises ``OSError`` if it cannot be started. If cancelled while starting, asyncio kills
        the child before re-raising.
        """
        log_fd = open_log(log_path)
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=workload_environment(marker),
            )
        finally:
            os.close(log_fd)
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:  # already gone: the record will never match a live process
            create_time = 0.0
        return cls(child.pid, create_time, child=child)

    @classmethod
    def adopt(cls, pid: int, create_time: float) -> ManagedProcess:
        """The process ``pid`` if it is still the one created at ``create_time``."""
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - create_time) > _CREATE_TIME_TOLERANCE:
                return cls(pid, create_time)
        except psutil.Error:
            return cls(pid, create_time)
        return cls(pid, create_time, adopted=process)

    @property
    def running(self) -> bool:
        if self._child is not None:
            return self._child.returncode is None
        if self._adopted is None:
            return False
        try:
            return self._adopted.is_running() and self._adopted.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def returncode(self) -> int | None:
        """The exit status if known (children only); negative: killed by that signal."""
        return None if self._child is None else self._child.returncode

    def signal(self, sig: signal.Signals) -> None:
        if not self.running:
            return
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if self._child is not None:
                self._child.send_signal(sig)
            elif self._adopted is not None:
                self._adopted.send_signal(sig)

    async def wait(self) -> None:
        """Wait for the process to exit (bound it with ``asyncio.timeout``)."""
        if self._child is not None:
            await self._child.wait()
            return
        # Not our child: no exit notification to wait for, only the process table to poll.
        while self.running:  # noqa: ASYNC110
            await asyncio.sleep(_EXIT_POLL_INTERVAL)


def open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like most servers (the demo workload included), ignore connections in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def listens_on(pid: int, port: int) -> bool:
    """Does process ``pid`` (or one of its descendants) hold a listening socket on ``port``?

    A health check must only count an answer from our own replica: another process may hold the
    port (it was taken between choosing it and the replica binding it)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in processes:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            return True
    return False


MARKER_ENV = "BYOC_AGENT_WORKLOAD"
"""Set in every replica's environment to the driver's marker (one per state directory)."""


def workload_environment(marker: str | None = None) -> dict[str, str]:
    """The agent's environment minus what belongs to the agent alone: systemd's notification
    socket and watchdog, and the credentials directory systemd may hand the agent; plus the
    driver's marker."""
    private = {*NOTIFY_ENV_VARS, "CREDENTIALS_DIRECTORY", "BYOC_AGENT_CONFIG", MARKER_ENV}
    env = {key: value for key, value in os.environ.items() if key not in private}
    if marker is not None:
        env[MARKER_ENV] = marker
    return env


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes of this user whose environment carries ``marker``: every replica a driver
    started, also one it had no time to record (the agent killed between spawn and record)."""
    found = []
    uid = os.getuid()
    for process in psutil.process_iter(["uids"]):
        try:
            if process.info["uids"] is None or process.info["uids"].real != uid:
                continue
            if process.environ().get(MARKER_ENV) == marker:
                found.append(process)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found
