"""The part of systemd's D-Bus API the systemd driver uses, through dbus-fast.

``org.freedesktop.systemd1.Manager`` on the system bus: ``StartUnit``, ``StopUnit`` and
``RestartUnit`` (mode ``replace``) queue a job and return its object path; the job's outcome
arrives later in the ``JobRemoved`` signal (``done``, ``failed``, ``timeout``, ``canceled``,
``dependency``, ``skipped``), which :class:`SystemdBus` waits for, so a call returns when the unit
has really started (``Type=notify``: sent READY=1), stopped or restarted. ``LoadUnit`` and the
``ActiveState`` property, and ``ListUnitsByPatterns``, need no authorization.

Whether an unprivileged caller may start, stop or restart a unit is polkit's decision (action
``org.freedesktop.systemd1.manage-units`` with the unit and verb as details:
systemd/ec2/50-byoc-agent.rules). Errors become :class:`~agent.core.errors.DriverError` with a code:

``access_denied``        polkit said no (AccessDenied, InteractiveAuthorizationRequired)
``unit_not_found``       no such unit file (NoSuchUnit, LoadFailed)
``job_failed``           the job ended other than ``done`` (the journal has the unit's reason)
``job_timeout``          no JobRemoved within the timeout
``systemd_unreachable``  no connection to the system bus, or it dropped
``systemd_error``        any other D-Bus error (its name and text are in the detail)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from typing import Any, Final

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError

from agent.core.errors import DriverError

SYSTEMD: Final = "org.freedesktop.systemd1"
MANAGER_PATH: Final = "/org/freedesktop/systemd1"
MANAGER: Final = "org.freedesktop.systemd1.Manager"
UNIT: Final = "org.freedesktop.systemd1.Unit"
_REMEMBERED_JOBS: Final = 1024
"""Finished jobs remembered for a caller whose method reply arrives after the signal."""

_DENIED: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    }
)
_NOT_FOUND: Final = frozenset(
    {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.LoadFailed"}
)
_VERBS: Final = {"start": "StartUnit", "stop": "StopUnit", "restart": "RestartUnit"}


class SystemdBus:
    """One connection to systemd; use :meth:`connect`, then :meth:`close`."""

    def __init__(self, bus: MessageBus, *, job_timeout: float) -> None:
        self._bus = bus
        self._job_timeout = job_timeout
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        bus.add_message_handler(self._on_message)
        self._watch = asyncio.create_task(self._fail_waiters_on_disconnect())

    @classmethod
    async def connect(cls, address: str | None = None, *, job_timeout: float) -> SystemdBus:
        """Connect to the system bus (``address``, else ``$DBUS_SYSTEM_BUS_ADDRESS`` or
        /run/dbus/system_bus_socket) and subscribe to systemd's job signals. A job that has not
        finished within ``job_timeout`` seconds is reported as ``job_timeout``."""
        try:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        except (OSError, EOFError, DBusFastError) as exc:
            raise DriverError(
                "systemd_unreachable", f"cannot connect to the system bus: {exc}"
            ) from exc
        made = cls(bus, job_timeout=job_timeout)
        try:
            await made._call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                signature="s",
                body=[
                    f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',"
                    f"path='{MANAGER_PATH}',member='JobRemoved'"
                ],
            )
            await made._manager("Subscribe", "", [])
        except DriverError:
            made.close()
            raise
        return made

    @property
    def connected(self) -> bool:
        return bool(self._bus.connected)

    def close(self) -> None:
        self._bus.disconnect()
        self._watch.cancel()
        for future in self._waiting.values():
            if not future.done():
                future.cancel()

    async def _fail_waiters_on_disconnect(self) -> None:
        with contextlib.suppress(Exception):  # however it ended, it ended
            await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        for job, future in self._waiting.items():
            if not future.done():
                future.set_exception(
                    DriverError("systemd_unreachable", f"{job}: the system bus connection dropped")
                )

    # -- units ------------------------------------------------------------------------------

    async def run_job(self, verb: str, unit: str) -> None:
        """``start``, ``stop`` or ``restart`` ``unit`` and wait until systemd's job is done."""
        reply = await self._manager(_VERBS[verb], "ss", [unit, "replace"], unit=unit)
        job = str(reply[0])
        result = self._finished.pop(job, None)
        if result is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[job] = future
            try:
                async with asyncio.timeout(self._job_timeout):
                    result = await future
            except TimeoutError as exc:
                raise DriverError(
                    "job_timeout", f"{verb} {unit}: no result in {self._job_timeout:g}s"
                ) from exc
            finally:
                self._waiting.pop(job, None)
        if result != "done":
            raise DriverError(
                "job_failed",
                f"{verb} {unit}: the job ended '{result}' (journalctl -u {unit} says why)",
            )

    async def active_state(self, unit: str) -> str:
        """``active``, ``activating``, ``inactive``, ``failed``, ... (loads the unit if needed)."""
        (path,) = await self._manager("LoadUnit", "s", [unit], unit=unit)
        body = await self._call(
            SYSTEMD,
            str(path),
            "org.freedesktop.DBus.Properties",
            "Get",
            signature="ss",
            body=[UNIT, "ActiveState"],
        )
        return str(body[0].value)

    async def units_matching(self, pattern: str, states: Sequence[str]) -> list[str]:
        """Names of the loaded units matching the glob ``pattern`` in one of ``states``."""
        (units,) = await self._manager("ListUnitsByPatterns", "asas", [list(states), [pattern]])
        return [str(row[0]) for row in units]

    # -- plumbing ---------------------------------------------------------------------------

    async def _manager(
        self, member: str, signature: str, body: list[Any], *, unit: str | None = None
    ) -> list[Any]:
        return await self._call(
            SYSTEMD, MANAGER_PATH, MANAGER, member, signature=signature, body=body, unit=unit
        )

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        *,
        signature: str,
        body: list[Any],
        unit: str | None = None,
    ) -> list[Any]:
        what = f"{member} {unit}" if unit else member
        if not self._bus.connected:
            raise DriverError("systemd_unreachable", f"{what}: not connected to the system bus")
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            reply = await self._bus.call(message)
        except (OSError, EOFError, DBusFastError) as exc:
            raise DriverError("systemd_unreachable", f"{what}: {exc}") from exc
        if reply is None:
            raise DriverError("systemd_unreachable", f"{what}: no reply from the system bus")
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or "unknown"
            text = str(reply.body[0]) if reply.body else ""
            if name in _DENIED:
                raise DriverError(
                    "access_denied", f"{what}: not allowed for this user (polkit): {text}"
                )
            if name in _NOT_FOUND:
                raise DriverError("unit_not_found", f"{what}: {text}")
            raise DriverError("systemd_error", f"{what}: {name}: {text}")
        return list(reply.body)

    def _on_message(self, message: Message) -> None:
        if (
            message.message_type != MessageType.SIGNAL
            or message.interface != MANAGER
            or message.member != "JobRemoved"
        ):
            return
        _id, job, _unit, result = message.body
        future = self._waiting.pop(str(job), None)
        if future is not None and not future.done():
            future.set_result(str(result))
            return
        self._finished[str(job)] = str(result)
        while len(self._finished) > _REMEMBERED_JOBS:
            self._finished.popitem(last=False)


__all__ = ["SystemdBus"]
