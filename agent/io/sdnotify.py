"""The systemd notification protocol (``sd_notify``), implemented directly.

When the unit has ``Type=notify``, systemd passes the path of a datagram socket in
``NOTIFY_SOCKET``. The service tells systemd about its state by sending one ``AF_UNIX``
``SOCK_DGRAM`` datagram per message; a message is newline-separated ``KEY=value`` assignments,
for example ``READY=1\\nSTATUS=connected``. The ones the agent uses:

``READY=1``      start-up finished (systemd holds ``systemctl start`` until it arrives), and
                 a reload finished
``RELOADING=1``  a reload began (sent with ``MONOTONIC_USEC=``; ``READY=1`` ends it)
``STOPPING=1``   shutdown began
``WATCHDOG=1``   keep-alive; without one every ``WatchdogSec=`` systemd kills and restarts us
``STATUS=...``   one line of human-readable status, shown by ``systemctl status``

A ``NOTIFY_SOCKET`` beginning with ``@`` names a socket in the Linux abstract namespace (the
``@`` stands for a leading NUL byte). ``WATCHDOG_USEC`` is the watchdog timeout in
microseconds; it applies only to the process named by ``WATCHDOG_PID`` when that is set. We ping
at half the timeout, as sd_watchdog_enabled(3) recommends.

Without ``NOTIFY_SOCKET`` (started by hand, in a container, in tests) the notifier is disabled
and every method is a no-op that returns ``False``. Notification is best effort: a failure to
notify is logged as a warning and reported by a ``False`` return value, and never raises, so it
cannot crash the agent. Messages carry only states and short status text, never secrets.

Child processes (the ``process`` driver's replicas) should not inherit the variables in
:data:`NOTIFY_ENV_VARS`; with ``NotifyAccess=main`` systemd ignores their messages anyway.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

__all__ = ["NOTIFY_ENV_VARS", "SystemdNotifier", "run_watchdog"]

NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""The environment variables systemd sets for the protocol."""

_STATUS_MAX_CHARS = 200
# A send to a live systemd completes at once; the timeout only bounds the pathological case of a
# full receive queue, so that a stuck service manager cannot stall the event loop for long.
_SEND_TIMEOUT_S = 1.0

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


def _one_line(text: str) -> str:
    """Status text as one short line: newlines would start new assignments."""
    return " ".join(text.split())[:_STATUS_MAX_CHARS]


class SystemdNotifier:
    """Sends state notifications to systemd; every method is a no-op when disabled."""

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None) -> None:
        """Use :meth:`from_environment`; ``address`` is the ``AF_UNIX`` address to send to."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._closed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ`` and ``pid`` to our own pid.
        """
        env = os.environ if environ is None else environ
        own_pid = os.getpid() if pid is None else pid

        address: str | bytes | None = None
        raw_socket = env.get("NOTIFY_SOCKET", "")
        if raw_socket.startswith("@") and len(raw_socket) > 1:
            address = b"\0" + raw_socket[1:].encode()
        elif raw_socket.startswith("/"):
            address = raw_socket
        elif raw_socket:
            _log.warning("sd_notify_unsupported_socket", notify_socket=raw_socket)

        watchdog_usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "")
        raw_pid = env.get("WATCHDOG_PID", "")
        if raw_usec:
            try:
                usec = int(raw_usec)
                for_us = not raw_pid or int(raw_pid) == own_pid
            except ValueError:
                _log.warning("sd_watchdog_bad_environment", usec=raw_usec, pid=raw_pid)
            else:
                if usec > 0 and for_us:
                    watchdog_usec = usec
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """Whether messages are sent (``NOTIFY_SOCKET`` was usable and :meth:`close` not called)."""
        return self._address is not None and not self._closed

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or ``None`` if off."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments as one datagram; ``True`` if it was sent."""
        address = self._address
        if address is None or self._closed or not assignments:
            return False
        if any("=" not in item or "\n" in item for item in assignments):
            # Not logged verbatim: a malformed item is a bug, and its text is unknown.
            _log.warning("sd_notify_malformed", count=len(assignments))
            return False
        keys = [item.split("=", 1)[0] for item in assignments]
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(_SEND_TIMEOUT_S)
                self._sock = sock
            self._sock.sendto(message, address)
        except OSError as exc:
            _log.warning("sd_notify_failed", keys=keys, error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        """A reload began; call :meth:`ready` when it is done."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """Shutdown began."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """One line of status text for ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def close(self) -> None:
        """Release the socket; afterwards the notifier is disabled. Idempotent."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _healthy(is_healthy: Callable[[], bool]) -> bool:
    try:
        return bool(is_healthy())
    except Exception as exc:  # a broken health check means unhealthy, not a dead watchdog task
        _log.warning("sd_watchdog_health_check_failed", error=f"{type(exc).__name__}: {exc}")
        return False


async def run_watchdog(
    notifier: SystemdNotifier, is_healthy: Callable[[], bool] = lambda: True
) -> None:
    """Ping the watchdog every ``watchdog_interval`` while ``is_healthy()``; runs until cancelled.

    Returns at once when the watchdog is off. Pings are skipped while ``is_healthy()`` returns
    ``False`` (or raises), so that systemd restarts an agent that is alive but stuck.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        if _healthy(is_healthy):
            notifier.watchdog()
        await asyncio.sleep(interval)
