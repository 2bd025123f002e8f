"""The sd_notify protocol of :mod:`agent.io.sdnotify`, checked on the wire.

systemd is not PID 1 where these tests run, so each test plays systemd's side itself: it binds a
real ``AF_UNIX`` ``SOCK_DGRAM`` socket (a file in ``tmp_path``, or a name in the Linux abstract
namespace), passes its address in ``NOTIFY_SOCKET`` exactly as systemd would, and asserts the
exact datagrams that arrive. This is a stand-in for systemd as PID 1 speaking the real protocol:
the notifier under test sends through the kernel just as it does in production.

Nothing here sleeps to synchronise: datagrams are awaited with a bounded timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import structlog
from structlog.testing import LogCapture

from agent.io import sdnotify
from agent.io.sdnotify import SystemdNotifier, run_watchdog

RECV_TIMEOUT_S = 5.0
MakeNotifier = Callable[[Mapping[str, str]], SystemdNotifier]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's end: a datagram socket bound to a path, and that path."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT_S)
    yield sock, path
    sock.close()


@pytest.fixture
def make_notifier() -> Iterator[MakeNotifier]:
    """Builds notifiers from an environ mapping and closes them all afterwards."""
    made: list[SystemdNotifier] = []

    def make(environ: Mapping[str, str]) -> SystemdNotifier:
        notifier = SystemdNotifier.from_environment(environ)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> LogCapture:
    """What the module logs, independent of the global structlog configuration."""
    capture = LogCapture()
    monkeypatch.setattr(sdnotify, "_log", structlog.wrap_logger(None, processors=[capture]))
    return capture


def assert_nothing_queued(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(RECV_TIMEOUT_S)


async def recv_async(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    async with asyncio.timeout(RECV_TIMEOUT_S):
        return await asyncio.get_running_loop().sock_recv(sock, 4096)


def test_ready_with_status_is_one_datagram(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path})

    assert notifier.enabled
    assert notifier.ready("connected to control plane")
    assert sock.recv(4096) == b"READY=1\nSTATUS=connected to control plane"
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"


def test_watchdog_stopping_and_status_datagrams(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path})

    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.status("draining\n2 commands\r\nin flight")
    assert notifier.notify("STATUS=x", "ERRNO=0")

    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STOPPING=1"
    assert sock.recv(4096) == b"STATUS=draining 2 commands in flight"
    assert sock.recv(4096) == b"STATUS=x\nERRNO=0"
    assert_nothing_queued(sock)


def test_reloading_carries_monotonic_timestamp(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path})

    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000

    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", sock.recv(4096))
    assert match is not None
    assert before <= int(match.group(1)) <= after


def test_abstract_namespace_socket(make_notifier: MakeNotifier) -> None:
    name = f"byoc-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT_S)
        notifier = make_notifier({"NOTIFY_SOCKET": "@" + name})

        assert notifier.enabled
        assert notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_status_text_is_one_short_line(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path})

    assert notifier.status("x" * 10_000 + "\nREADY=1")
    message = sock.recv(65536)
    assert b"\n" not in message
    assert message.startswith(b"STATUS=x")
    assert len(message) <= 256


def test_malformed_assignments_are_refused(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier, logs: LogCapture
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path})

    assert not notifier.notify("READY")
    assert not notifier.notify("STATUS=a\nREADY=1")
    assert not notifier.notify()
    assert_nothing_queued(sock)
    assert [entry["event"] for entry in logs.entries] == ["sd_notify_malformed"] * 2


def test_watchdog_interval_is_half_of_watchdog_usec(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    _, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval == 15.0


def test_watchdog_pid_must_be_ours(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}

    ours = make_notifier({**env, "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_interval == 15.0

    other = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": "4242"}, pid=4243)
    try:
        assert other.watchdog_interval is None
        assert other.enabled  # the watchdog is someone else's; notifications still go out
    finally:
        other.close()

    explicit = SystemdNotifier.from_environment({**env, "WATCHDOG_PID": "4242"}, pid=4242)
    try:
        assert explicit.watchdog_interval == 15.0
    finally:
        explicit.close()


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_USEC": "abc"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"},
    ],
)
def test_unusable_watchdog_settings_disable_the_watchdog(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier, environ: dict[str, str]
) -> None:
    _, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path, **environ})
    assert notifier.enabled
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": "30000000"},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/notify.sock"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
        {"NOTIFY_SOCKET": "@"},
    ],
)
def test_disabled_without_a_usable_notify_socket(
    monkeypatch: pytest.MonkeyPatch, make_notifier: MakeNotifier, environ: dict[str, str]
) -> None:
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("a disabled notifier must not open a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    notifier = make_notifier(environ)

    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.notify("READY=1")
    assert not notifier.ready("up")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert not notifier.status("up")


def test_vanished_socket_does_not_raise(
    tmp_path: Path, make_notifier: MakeNotifier, logs: LogCapture
) -> None:
    path = tmp_path / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = make_notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.watchdog()
    path.unlink()

    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert [entry["event"] for entry in logs.entries] == ["sd_notify_failed"] * 2
    assert all(entry["log_level"] == "warning" for entry in logs.entries)


def test_close_disables_and_is_idempotent(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"

    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.stopping()
    assert_nothing_queued(sock)


async def test_run_watchdog_pings_repeatedly_and_is_cancellable(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # every 10 ms
    assert notifier.watchdog_interval == 0.01

    task = asyncio.create_task(run_watchdog(notifier))
    try:
        for _ in range(3):
            assert await recv_async(sock) == b"WATCHDOG=1"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_run_watchdog_skips_pings_while_unhealthy(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    healthy = False
    checks = 0
    three_unhealthy_checks = asyncio.Event()

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        if checks == 3:
            three_unhealthy_checks.set()
        return healthy

    task = asyncio.create_task(run_watchdog(notifier, is_healthy))
    try:
        async with asyncio.timeout(RECV_TIMEOUT_S):
            await three_unhealthy_checks.wait()
        assert_nothing_queued(sock)  # pings are sent right after a check; none were

        healthy = True
        assert await recv_async(sock) == b"WATCHDOG=1"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_watchdog_treats_a_failing_health_check_as_unhealthy(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier, logs: LogCapture
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    checks = 0
    second_check = asyncio.Event()

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        if checks == 2:
            second_check.set()
        raise RuntimeError("health check broke")

    task = asyncio.create_task(run_watchdog(notifier, is_healthy))
    try:
        async with asyncio.timeout(RECV_TIMEOUT_S):
            await second_check.wait()
        assert not task.done()  # the task survived the first failure
        assert_nothing_queued(sock)
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {entry["event"] for entry in logs.entries} == {"sd_watchdog_health_check_failed"}


async def test_run_watchdog_returns_at_once_without_a_watchdog(
    listener: tuple[socket.socket, str], make_notifier: MakeNotifier
) -> None:
    sock, path = listener
    notifier = make_notifier({"NOTIFY_SOCKET": path})
    assert notifier.watchdog_interval is None

    def is_healthy() -> bool:
        raise AssertionError("not called when the watchdog is off")

    async with asyncio.timeout(RECV_TIMEOUT_S):
        await run_watchdog(notifier, is_healthy)
    assert_nothing_queued(sock)
