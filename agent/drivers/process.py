"""The ``process`` driver: replicas of a workload supervised as local processes.

Each replica ``i`` (``0..n-1``) is one process started from the configured ``argv`` of its
version, in its own session, with stdout and stderr appended to ``<state_dir>/replica-<i>.log``.
A replica is healthy when ``GET http://<host>:<port><health_path>`` answers 200.

Settings (the ``[driver.process]`` table)::

    versions."1.0.0".argv = ["{python}", "-m", "byoc_demo.workload",
                             "--host", "{host}", "--port", "{port}", "--version", "{version}"]
    initial_version = "1.0.0"     # used when there is no previous state
    host = "127.0.0.1"
    port_range = [20000, 20999]   # inclusive
    health_path = "/healthz"
    metrics_path = "/metrics"
    start_timeout = 15.0          # seconds for a new replica to become healthy
    health_poll_interval = 0.1
    stop_timeout = 10.0           # SIGTERM, then SIGKILL
    supervise_interval = 2.0
    stop_on_close = false         # true: stop the replicas when the agent stops

``argv`` items may use the placeholders ``{python}``, ``{port}``, ``{host}``, ``{version}``,
``{replica}`` and ``{state_dir}`` (``{{`` and ``}}`` for literal braces).

State: ``<state_dir>/process-driver.json`` names the current version and every process the
driver started that may still exist, with its role: ``serving`` (a replica), ``starting`` (not yet
healthy) or ``stopping``. It is rewritten atomically whenever a process is spawned, promoted or
stopped, so a crash or cancellation at any point leaves a file naming every process. ``starting``
and ``stopping`` entries exist only while an operation holds the driver's lock; one found later
(by :meth:`ProcessDriver.start` or the supervisor) is left over from a cancelled operation and is
stopped. ``serving`` entries whose process is gone are restarted by the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import string
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal, NoReturn, TypeVar, cast

import httpx
import psutil
from structlog.typing import FilteringBoundLogger

from agent.drivers import metrics
from agent.drivers.base import AuditSink, DriverEnvironment, ExecContext
from agent.errors import ConfigError, DriverError

# --------------------------------------------------------------------------------------------
# Settings and argv templates (pure)
# --------------------------------------------------------------------------------------------

PLACEHOLDERS = frozenset({"python", "port", "host", "version", "replica", "state_dir"})
_PREFIX = "driver.process"


@dataclass(frozen=True, kw_only=True)
class ProcessDriverSettings:
    """The validated ``[driver.process]`` table."""

    versions: Mapping[str, tuple[str, ...]]
    """version -> argv template."""
    initial_version: str
    host: str = "127.0.0.1"
    port_range: tuple[int, int] = (20000, 20999)
    health_path: str = "/healthz"
    metrics_path: str = "/metrics"
    start_timeout: float = 15.0
    health_poll_interval: float = 0.1
    stop_timeout: float = 10.0
    supervise_interval: float = 2.0
    stop_on_close: bool = False

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> ProcessDriverSettings:
        """Validate ``raw``; raise :class:`ConfigError` naming the first bad key."""
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigError(f"{_PREFIX}.{key}: unknown setting (known: {', '.join(known)})")
        for key in ("versions", "initial_version"):
            if key not in raw:
                raise ConfigError(f"{_PREFIX}.{key}: required")
        versions = _versions(raw["versions"])
        initial_version = _string(raw, "initial_version", "")
        if initial_version not in versions:
            raise ConfigError(
                f"{_PREFIX}.initial_version: {initial_version!r} is not one of the versions "
                f"({', '.join(versions)})"
            )
        return cls(
            versions=MappingProxyType(versions),
            initial_version=initial_version,
            host=_string(raw, "host", cls.host),
            port_range=_port_range(raw.get("port_range", cls.port_range)),
            health_path=_url_path(raw, "health_path", cls.health_path),
            metrics_path=_url_path(raw, "metrics_path", cls.metrics_path),
            start_timeout=_seconds(raw, "start_timeout", cls.start_timeout),
            health_poll_interval=_seconds(raw, "health_poll_interval", cls.health_poll_interval),
            stop_timeout=_seconds(raw, "stop_timeout", cls.stop_timeout),
            supervise_interval=_seconds(raw, "supervise_interval", cls.supervise_interval),
            stop_on_close=_boolean(raw, "stop_on_close", cls.stop_on_close),
        )


def _string(raw: Mapping[str, object], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_PREFIX}.{key}: expected a non-empty string, got {value!r}")
    return value


def _url_path(raw: Mapping[str, object], key: str, default: str) -> str:
    value = _string(raw, key, default)
    if not value.startswith("/"):
        raise ConfigError(f"{_PREFIX}.{key}: expected a path starting with '/', got {value!r}")
    return value


def _seconds(raw: Mapping[str, object], key: str, default: float) -> float:
    value = raw.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{_PREFIX}.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _boolean(raw: Mapping[str, object], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_PREFIX}.{key}: expected true or false, got {value!r}")
    return value


def _port_range(value: object) -> tuple[int, int]:
    where = f"{_PREFIX}.port_range"
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"{where}: expected [first, last], got {value!r}")
    first, last = value
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in (first, last)):
        raise ConfigError(f"{where}: expected two integers, got {value!r}")
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"{where}: expected 1 <= first <= last <= 65535, got {value!r}")
    return first, last


def _versions(value: object) -> dict[str, tuple[str, ...]]:
    where = f"{_PREFIX}.versions"
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: expected a non-empty table of versions, got {value!r}")
    versions: dict[str, tuple[str, ...]] = {}
    for version, spec in value.items():
        here = f"{where}.{json.dumps(version)}"
        if not isinstance(version, str) or not version:
            raise ConfigError(f"{here}: a version must be a non-empty string")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{here}: expected a table with argv, got {spec!r}")
        for key in spec:
            if key != "argv":
                raise ConfigError(f"{here}.{key}: unknown setting (known: argv)")
        argv = spec.get("argv")
        if (
            not isinstance(argv, list | tuple)
            or not argv
            or not all(isinstance(item, str) for item in argv)
        ):
            raise ConfigError(f"{here}.argv: expected a non-empty list of strings, got {argv!r}")
        for item in argv:
            _check_template(item, f"{here}.argv")
        versions[version] = tuple(argv)
    return versions


def _check_template(item: str, where: str) -> None:
    try:
        parsed = list(string.Formatter().parse(item))
    except ValueError as exc:
        raise ConfigError(f"{where}: {item!r}: {exc} (write {{{{ and }}}} for braces)") from exc
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            raise ConfigError(
                f"{where}: {item!r}: unknown placeholder {{{field}}} "
                f"(known: {', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))})"
            )


def render_argv(
    template: Sequence[str],
    *,
    python: str,
    host: str,
    port: int,
    version: str,
    replica: int,
    state_dir: Path,
) -> list[str]:
    """Fill the placeholders of a validated argv template."""
    values = {
        "python": python,
        "host": host,
        "port": str(port),
        "version": version,
        "replica": str(replica),
        "state_dir": str(state_dir),
    }
    return [item.format_map(values) for item in template]


# --------------------------------------------------------------------------------------------
# State file
# --------------------------------------------------------------------------------------------

STATE_FILE = "process-driver.json"
_STATE_FORMAT = 1
Role = Literal["serving", "starting", "stopping"]
_ROLES: tuple[Role, ...] = ("serving", "starting", "stopping")
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    """One process as the state file names it."""

    index: int
    pid: int
    port: int
    version: str
    create_time: float
    """psutil's create time: with ``pid``, identifies the process across pid reuse."""
    role: Role = "serving"


@dataclass(frozen=True, kw_only=True)
class DriverState:
    version: str
    processes: tuple[ProcessRecord, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "format": _STATE_FORMAT,
            "version": self.version,
            "replicas": [
                {
                    "index": p.index,
                    "pid": p.pid,
                    "port": p.port,
                    "version": p.version,
                    "create_time": p.create_time,
                    "role": p.role,
                }
                for p in self.processes
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> DriverState:
        """Raise ``ValueError`` if ``data`` is not a state this module wrote."""
        doc = _typed(data, dict, "state")
        if doc.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported format {doc.get('format')!r}")
        processes = []
        for item in _typed(doc.get("replicas"), list, "replicas"):
            entry = _typed(item, dict, "replica")
            role = entry.get("role", "serving")
            if role not in _ROLES:
                raise ValueError(f"bad role {role!r}")
            create_time = entry.get("create_time")
            if isinstance(create_time, bool) or not isinstance(create_time, int | float):
                raise ValueError(f"bad create_time {create_time!r}")
            processes.append(
                ProcessRecord(
                    index=_typed(entry.get("index"), int, "index"),
                    pid=_typed(entry.get("pid"), int, "pid"),
                    port=_typed(entry.get("port"), int, "port"),
                    version=_typed(entry.get("version"), str, "version"),
                    create_time=float(create_time),
                    role=cast(Role, role),
                )
            )
        return cls(version=_typed(doc.get("version"), str, "version"), processes=tuple(processes))


def _typed(value: object, kind: type[_T], what: str) -> _T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"bad {what}: {value!r}")
    return value


def load_state(path: Path) -> DriverState | None:
    """Read the state file; ``None`` if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DriverError("state_unreadable", f"{path}: {exc}") from exc
    try:
        return DriverState.from_json(json.loads(text))
    except ValueError as exc:
        raise DriverError("state_unreadable", f"{path}: {exc}") from exc


def save_state(path: Path, state: DriverState) -> None:
    """Replace the state file atomically (temporary file, fsync, rename, fsync directory)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(state.to_json(), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_CREATE_TIME_TOLERANCE = 1.0
"""psutil derives create times from the boot time, which moves by up to a second with NTP."""
_EXIT_POLL_INTERVAL = 0.05
_KILL_WAIT = 5.0


class _Proc:
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
    async def spawn(cls, argv: Sequence[str], log_path: Path) -> _Proc:
        """Start ``argv`` in a new session, output appended to ``log_path``.

        Raises ``OSError`` if it cannot be started. If cancelled while starting, asyncio kills
        the child before re-raising.
        """
        log_fd = _open_log(log_path)
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:  # already gone: the record will never match a live process
            create_time = 0.0
        return cls(child.pid, create_time, child=child)

    @classmethod
    def adopt(cls, pid: int, create_time: float) -> _Proc:
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


async def _all(operations: Iterable[Awaitable[None]]) -> None:
    """Run ``operations`` concurrently and let every one finish; then raise the first error."""
    for result in await asyncio.gather(*operations, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like most servers (the demo workload included), ignore connections in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

TARGETS = ("workload", "host")
_HTTP_TIMEOUT = 2.0
_RESTART_DELAY_MIN = 1.0
_RESTART_DELAY_MAX = 60.0
_RESTART_DELAY_RESET = 60.0
"""A replica that has run this long is no longer crash-looping: its restart delay resets."""


@dataclass(eq=False, kw_only=True)
class _Replica:
    index: int
    port: int
    version: str
    proc: _Proc
    role: Role
    started_at: float
    """Event-loop time of the last start (``-inf`` if unknown)."""
    restart_delay: float = _RESTART_DELAY_MIN

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            index=self.index,
            pid=self.proc.pid,
            port=self.port,
            version=self.version,
            create_time=self.proc.create_time,
            role=self.role,
        )


class _ReplicaFailed(Exception):
    """A new replica could not be started or did not become healthy (it has been stopped)."""

    def __init__(self, index: int, reason: str, replica: _Replica | None = None) -> None:
        super().__init__(f"replica {index}: {reason}")
        self.index = index
        self.reason = reason
        self.replica = replica


class ProcessDriver:
    """Supervises the replicas of a workload as local processes (see the module docstring).

    The constructor is the driver factory: ``ProcessDriver(settings, env)``.
    """

    kind = "process"

    def __init__(self, settings: Mapping[str, object], env: DriverEnvironment) -> None:
        self.settings = ProcessDriverSettings.from_mapping(settings)
        self._env = env
        self._state_path = env.state_dir / STATE_FILE
        self._version = self.settings.initial_version
        self._replicas: list[_Replica] = []
        """Every process that may exist: serving replicas (alive or not) and transient ones."""
        self._reserved_ports: set[int] = set()
        self._lock = asyncio.Lock()
        self._client = httpx.AsyncClient(timeout=_HTTP_TIMEOUT, trust_env=False)
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the replicas named by the state file and start supervising them."""
        if self._supervisor is not None:
            return
        state = load_state(self._state_path)
        async with self._lock:
            if state is not None:
                self._version = state.version
                self._adopt(state.processes)
            await self._stop_leftovers(self._env.audit, self._env.log)
            self._persist()
        self._supervisor = asyncio.create_task(self._supervise(), name="process-driver-supervisor")

    def _adopt(self, records: Iterable[ProcessRecord]) -> None:
        now = asyncio.get_running_loop().time()
        for record in records:
            proc = _Proc.adopt(record.pid, record.create_time)
            running = proc.running
            self._replicas.append(
                _Replica(
                    index=record.index,
                    port=record.port,
                    version=record.version,
                    proc=proc,
                    role=record.role,
                    started_at=now if running else -math.inf,
                )
            )
            self._env.log.info(
                "replica_adopted" if running else "replica_gone",
                replica=record.index,
                pid=record.pid,
                port=record.port,
                version=record.version,
                role=record.role,
            )

    async def close(self) -> None:
        """Stop supervising; stop the replicas if ``stop_on_close``; release the HTTP client.

        Stopped serving replicas stay in the state file (as processes that are gone), so the next
        :meth:`start` brings the workload back at the same scale and version.
        """
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.wait([self._supervisor])
            self._supervisor = None
        try:
            if self.settings.stop_on_close:
                results = await asyncio.gather(
                    *(
                        self._stop(
                            replica,
                            self._env.audit,
                            self._env.log,
                            reason="driver closing",
                            keep_slot=replica.role == "serving",
                        )
                        for replica in sorted(self._replicas, key=lambda r: -r.index)
                    ),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, BaseException):
                        self._env.log.error("replica_stop_failed", error=repr(result))
        finally:
            await self._client.aclose()

    # -- commands --------------------------------------------------------------------------

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise DriverError("invalid_replicas", f"expected a count >= 0, got {replicas!r}")
        async with self._lock:
            serving = self._serving()
            previous = len(serving)
            if replicas > previous:
                await self._scale_up(range(previous, replicas), previous, ctx)
            elif replicas < previous:
                await _all(
                    self._stop(r, ctx.audit, ctx.log, reason=f"scale down to {replicas}")
                    for r in reversed(serving[replicas:])
                )
            ctx.log.info("scaled", replicas=replicas, previous_replicas=previous)
            return {
                "replicas": replicas,
                "previous_replicas": previous,
                "version": self._version,
                "ports": self._ports(),
            }

    async def _scale_up(self, indexes: range, previous: int, ctx: ExecContext) -> None:
        version = self._version
        results = await asyncio.gather(
            *(self._start_replica(i, version, ctx.audit, ctx.log) for i in indexes),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, _Replica)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            for replica in started:
                replica.role = "serving"
            self._persist()
            return
        await _all(
            self._stop(r, ctx.audit, ctx.log, reason="scale-up failed") for r in reversed(started)
        )
        failed = failures[0]
        if isinstance(failed, _ReplicaFailed):
            raise DriverError(
                "unhealthy",
                f"replica {failed.index} of {version} failed its health check: {failed.reason}",
                result={
                    "replicas": previous,
                    "version": version,
                    "failed_replica": failed.index,
                    "health": failed.reason,
                },
            ) from failed
        raise failed

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        if version not in self.settings.versions:
            known = ", ".join(self.settings.versions)
            raise DriverError("unknown_version", f"{version!r} is not configured (known: {known})")
        async with self._lock:
            previous = self._version
            serving = self._serving()
            stale = [r for r in serving if r.version != version]
            result: dict[str, object] = {
                "version": version,
                "previous_version": previous,
                "replicas": len(serving),
            }
            if version == previous and not stale:
                return result | {"changed": False}
            ctx.log.info("upgrade_started", version=version, previous_version=previous)
            upgraded: list[tuple[int, str]] = []  # (index, the version it ran before)
            for replica in stale:
                try:
                    await self._replace(replica, version, ctx, reason=f"upgrade to {version}")
                except _ReplicaFailed as failed:
                    await self._roll_back(upgraded, version, previous, failed, ctx)
                except DriverError as exc:  # e.g. no free port for the new process
                    cause = _ReplicaFailed(replica.index, str(exc))
                    await self._roll_back(upgraded, version, previous, cause, ctx)
                upgraded.append((replica.index, replica.version))
            self._version = version
            self._persist()
            ctx.log.info("upgraded", version=version, previous_version=previous)
            return result | {"changed": True}

    async def _roll_back(
        self,
        upgraded: Sequence[tuple[int, str]],
        version: str,
        previous: str,
        failed: _ReplicaFailed,
        ctx: ExecContext,
    ) -> NoReturn:
        """Put the ``upgraded`` replicas back on the versions they ran; always raises."""
        ctx.audit(
            "rollback_started",
            from_version=version,
            to_version=previous,
            failed_replica=failed.index,
            reason=failed.reason,
        )
        ctx.log.warning("rollback_started", failed_replica=failed.index, reason=failed.reason)
        failure = f"replica {failed.index} of {version} failed its health check: {failed.reason}"
        not_rolled_back: list[str] = []
        for index, old_version in upgraded:
            replica = next(r for r in self._serving() if r.index == index)
            try:
                await self._replace(replica, old_version, ctx, reason=f"rollback to {old_version}")
            except _ReplicaFailed as again:
                not_rolled_back.append(f"replica {index}: {again.reason}")
            except DriverError as again:  # e.g. the old version is no longer configured
                not_rolled_back.append(f"replica {index}: {again}")
        result: dict[str, object] = {
            "version": previous,
            "failed_replica": failed.index,
            "health": failed.reason,
        }
        if not_rolled_back:
            raise DriverError(
                "rollback_failed",
                f"{failure}; rolling back to {previous} failed: {'; '.join(not_rolled_back)}",
                result=result
                | {"rolled_back": False, "versions": [r.version for r in self._serving()]},
            ) from failed
        raise DriverError(
            "unhealthy_rolled_back",
            f"{failure}; rolled back to {previous}",
            result=result | {"rolled_back": True},
        ) from failed

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise DriverError(
                "unknown_target", f"{', '.join(unknown)} (known: {', '.join(TARGETS)})"
            )
        serving = self._serving()
        samples: list[metrics.Sample] = []
        errors: list[dict[str, object]] = []
        if "workload" in targets and serving:
            results = await asyncio.gather(
                *(self._scrape(r) for r in serving), return_exceptions=True
            )
            for replica, result in zip(serving, results, strict=True):
                if isinstance(result, DriverError):
                    errors.append(
                        {
                            "target": "workload",
                            "replica": replica.index,
                            "port": replica.port,
                            "code": result.code,
                            "error": result.detail,
                        }
                    )
                elif isinstance(result, BaseException):
                    raise result
                else:
                    samples.extend(result)
            if len(errors) == len(serving) and set(targets) == {"workload"}:
                raise DriverError(
                    "scrape_failed",
                    "; ".join(str(e["error"]) for e in errors),
                    result={"errors": errors},
                )
        if "host" in targets:
            samples.extend(await asyncio.to_thread(metrics.host_metrics, self._env.state_dir))
        ctx.log.info("metrics_collected", samples=len(samples), errors=len(errors))
        return {
            "samples": [s.to_json() for s in samples],
            "errors": errors,
            "replicas": len(serving),
            "version": self._version,
        }

    async def _scrape(self, replica: _Replica) -> list[metrics.Sample]:
        return await metrics.scrape(
            self._client,
            self._url(replica.port, self.settings.metrics_path),
            target="workload",
            extra_labels={"replica": str(replica.index), "port": str(replica.port)},
        )

    def describe(self) -> dict[str, object]:
        serving = self._serving()
        return {
            "kind": self.kind,
            "version": self._version,
            "replicas": len(serving),
            "running": sum(1 for r in serving if r.proc.running),
            "ports": [r.port for r in serving],
            "pids": [r.proc.pid for r in serving],
        }

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._supervise_once()
            except Exception:
                self._env.log.exception("supervision_failed")
            await asyncio.sleep(self.settings.supervise_interval)

    async def _supervise_once(self) -> None:
        await self._stop_leftovers(self._env.audit, self._env.log)
        now = asyncio.get_running_loop().time()
        due: list[_Replica] = []
        for replica in self._serving():
            if replica.proc.running:
                if now - replica.started_at >= _RESTART_DELAY_RESET:
                    replica.restart_delay = _RESTART_DELAY_MIN
            elif now >= replica.started_at + replica.restart_delay:
                due.append(replica)
        await _all(self._restart(r) for r in due)

    async def _restart(self, dead: _Replica) -> None:
        audit, log = self._env.audit, self._env.log
        audit(
            "replica_restarting",
            replica=dead.index,
            pid=dead.proc.pid,
            exit_status=dead.proc.returncode,
            version=dead.version,
        )
        log.warning(
            "replica_restarting",
            replica=dead.index,
            pid=dead.proc.pid,
            exit_status=dead.proc.returncode,
            restart_delay=dead.restart_delay,
        )
        delay = min(dead.restart_delay * 2, _RESTART_DELAY_MAX)
        try:
            new = await self._start_replica(dead.index, dead.version, audit, log, dead.port)
        except (_ReplicaFailed, DriverError) as exc:
            log.error("replica_restart_failed", replica=dead.index, error=str(exc))
            dead.started_at = asyncio.get_running_loop().time()
            dead.restart_delay = delay
            if isinstance(exc, _ReplicaFailed) and exc.replica is not None:
                dead.proc = exc.replica.proc  # report the latest attempt next time
            self._persist()
            return
        new.role = "serving"
        new.restart_delay = delay
        self._replicas.remove(dead)
        self._persist()

    async def _stop_leftovers(self, audit: AuditSink, log: FilteringBoundLogger) -> None:
        """Stop processes left ``starting`` or ``stopping`` by a cancelled operation.

        Only called with the lock held, when no operation is in progress.
        """
        leftovers = [r for r in self._replicas if r.role != "serving"]
        await _all(
            self._stop(r, audit, log, reason="left over from an interrupted operation")
            for r in leftovers
        )

    # -- replica operations ----------------------------------------------------------------

    async def _replace(
        self, old: _Replica, version: str, ctx: ExecContext, *, reason: str
    ) -> _Replica:
        """Surge: start ``version`` on a fresh port, wait healthy, then stop ``old``."""
        new = await self._start_replica(old.index, version, ctx.audit, ctx.log)
        new.role = "serving"
        await self._stop(old, ctx.audit, ctx.log, reason=reason)  # persists both changes
        return new

    async def _start_replica(
        self,
        index: int,
        version: str,
        audit: AuditSink,
        log: FilteringBoundLogger,
        reuse_port: int | None = None,
    ) -> _Replica:
        """Start a replica and wait until it is healthy; it is left in the ``starting`` role.

        Raises :class:`_ReplicaFailed` (after stopping it) if it does not become healthy.
        """
        replica = await self._spawn(index, version, audit, log, reuse_port)
        try:
            await self._wait_healthy(replica)
        except _ReplicaFailed as failed:
            log.warning("replica_unhealthy", replica=index, version=version, reason=failed.reason)
            await self._stop(replica, audit, log, reason=f"unhealthy: {failed.reason}")
            failed.replica = replica
            raise
        audit(
            "replica_healthy",
            replica=index,
            pid=replica.proc.pid,
            port=replica.port,
            version=version,
        )
        return replica

    async def _spawn(
        self,
        index: int,
        version: str,
        audit: AuditSink,
        log: FilteringBoundLogger,
        reuse_port: int | None,
    ) -> _Replica:
        template = self.settings.versions.get(version)
        if template is None:
            raise DriverError("unknown_version", f"{version!r} is not configured")
        port = self._allocate_port(reuse_port)
        try:
            argv = render_argv(
                template,
                python=sys.executable,
                host=self.settings.host,
                port=port,
                version=version,
                replica=index,
                state_dir=self._env.state_dir,
            )
            audit("replica_starting", replica=index, version=version, port=port)
            try:
                proc = await _Proc.spawn(argv, self._env.state_dir / f"replica-{index}.log")
            except OSError as exc:
                raise _ReplicaFailed(index, f"could not start {argv[0]!r}: {exc}") from exc
            replica = _Replica(
                index=index,
                port=port,
                version=version,
                proc=proc,
                role="starting",
                started_at=asyncio.get_running_loop().time(),
            )
            self._replicas.append(replica)
            self._persist()
        finally:
            self._reserved_ports.discard(port)
        log.info("replica_started", replica=index, pid=proc.pid, port=port, version=version)
        return replica

    async def _wait_healthy(self, replica: _Replica) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        url = self._url(replica.port, self.settings.health_path)
        last = "no answer"
        while True:
            if not replica.proc.running:
                raise _ReplicaFailed(
                    replica.index,
                    f"{_describe_exit(replica.proc.returncode)} before it was healthy",
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _ReplicaFailed(
                    replica.index,
                    f"not healthy after {self.settings.start_timeout:g}s (last answer: {last})",
                )
            try:
                response = await self._client.get(url, timeout=min(_HTTP_TIMEOUT, remaining))
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code == httpx.codes.OK:
                    return
                body = response.text.strip()[:200]
                last = f"HTTP {response.status_code} {body}".rstrip()
            await asyncio.sleep(self.settings.health_poll_interval)

    async def _stop(
        self,
        replica: _Replica,
        audit: AuditSink,
        log: FilteringBoundLogger,
        *,
        reason: str,
        keep_slot: bool = False,
    ) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; then forget the replica.

        With ``keep_slot`` the (stopped) replica stays recorded, to be restarted later.
        """
        if replica.proc.running:
            audit(
                "replica_stopping",
                replica=replica.index,
                pid=replica.proc.pid,
                version=replica.version,
                reason=reason,
            )
            if not keep_slot:
                replica.role = "stopping"
                self._persist()
            replica.proc.signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.settings.stop_timeout):
                    await replica.proc.wait()
            except TimeoutError:
                log.warning("replica_kill", replica=replica.index, pid=replica.proc.pid)
                replica.proc.signal(signal.SIGKILL)
                try:
                    async with asyncio.timeout(_KILL_WAIT):
                        await replica.proc.wait()
                except TimeoutError:
                    log.error("replica_unkillable", replica=replica.index, pid=replica.proc.pid)
            log.info(
                "replica_stopped",
                replica=replica.index,
                pid=replica.proc.pid,
                exit_status=replica.proc.returncode,
            )
        if not keep_slot and replica in self._replicas:
            self._replicas.remove(replica)
            self._persist()

    # -- helpers ---------------------------------------------------------------------------

    def _serving(self) -> list[_Replica]:
        return sorted((r for r in self._replicas if r.role == "serving"), key=lambda r: r.index)

    def _ports(self) -> list[int]:
        return [r.port for r in self._serving()]

    def _url(self, port: int, path: str) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"

    def _persist(self) -> None:
        state = DriverState(
            version=self._version, processes=tuple(r.record() for r in self._replicas)
        )
        save_state(self._state_path, state)

    def _allocate_port(self, reuse: int | None) -> int:
        """A port of ``port_range`` that nothing listens on, reserved until the spawn is recorded.

        ``reuse`` (a restarted replica's own port) is preferred when it is free.
        """
        first, last = self.settings.port_range
        taken = {r.port for r in self._replicas} | self._reserved_ports
        candidates = [reuse] if reuse is not None and reuse not in self._reserved_ports else []
        candidates += [p for p in range(first, last + 1) if p not in taken]
        for port in candidates:
            if _port_is_free(self.settings.host, port):
                self._reserved_ports.add(port)
                return port
        raise DriverError("no_free_port", f"no free port in {first}-{last} on {self.settings.host}")
