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
import hashlib
import math
import signal
import sys
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import httpx
import psutil
from structlog.typing import FilteringBoundLogger

from agent.core.errors import DriverError
from agent.drivers import metrics
from agent.drivers.base import AuditSink, DriverEnvironment, ExecContext
from agent.drivers.process_control import (
    ManagedProcess,
    describe_exit,
    listens_on,
    marked_processes,
    port_is_free,
)
from agent.drivers.process_settings import PLACEHOLDERS, ProcessDriverSettings, render_argv
from agent.drivers.process_state import (
    STATE_FILE,
    DriverState,
    ProcessRecord,
    Role,
    load_state,
    save_state,
)

__all__ = [
    "PLACEHOLDERS",
    "STATE_FILE",
    "TARGETS",
    "DriverState",
    "ProcessDriver",
    "ProcessDriverSettings",
    "ProcessRecord",
    "Role",
    "load_state",
    "render_argv",
    "save_state",
]


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

TARGETS = ("workload", "host")
_HTTP_TIMEOUT = 2.0
_PORT_ATTEMPTS = 3
_KILL_WAIT = 5.0
_RESTART_DELAY_MIN = 1.0
_RESTART_DELAY_MAX = 60.0
_RESTART_DELAY_RESET = 60.0
"""A replica that has run this long is no longer crash-looping: its restart delay resets."""


async def _all(operations: Iterable[Awaitable[None]]) -> None:
    """Run ``operations`` concurrently and let every one finish; then raise the first error."""
    for result in await asyncio.gather(*operations, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


@dataclass(eq=False, kw_only=True)
class _Replica:
    index: int
    port: int
    version: str
    proc: ManagedProcess
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

    def __init__(
        self,
        index: int,
        reason: str,
        replica: _Replica | None = None,
        *,
        port_conflict: bool = False,
    ) -> None:
        super().__init__(f"replica {index}: {reason}")
        self.index = index
        self.reason = reason
        self.replica = replica
        self.port_conflict = port_conflict
        """Another process holds the replica's port: worth retrying on another port."""


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
        metrics.start_cpu_measurement()
        state = load_state(self._state_path)
        async with self._lock:
            if state is not None:
                self._version = state.version
                self._adopt(state.processes)
            await self._stop_orphans()
            await self._stop_leftovers(self._env.audit, self._env.log)
            self._persist()
        self._supervisor = asyncio.create_task(self._supervise(), name="process-driver-supervisor")

    @property
    def _marker(self) -> str:
        return hashlib.sha256(str(self._env.state_dir.resolve()).encode()).hexdigest()[:16]

    async def _stop_orphans(self) -> None:
        """Stop replicas this driver started but never recorded: the agent was killed between
        starting one and writing the state file. They carry the driver's marker."""
        known = {replica.proc.pid for replica in self._replicas}
        orphans = [p for p in marked_processes(self._marker) if p.pid not in known]
        for orphan in orphans:
            await self._env.audit("replica_orphan_stopping", pid=orphan.pid)
            with contextlib.suppress(psutil.Error):
                orphan.terminate()
        if orphans:
            _, alive = await asyncio.to_thread(
                psutil.wait_procs, orphans, timeout=self.settings.stop_timeout
            )
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()

    def _adopt(self, records: Iterable[ProcessRecord]) -> None:
        now = asyncio.get_running_loop().time()
        for record in records:
            proc = ManagedProcess.adopt(record.pid, record.create_time)
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
        await ctx.audit(
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
        await audit(
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
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            replica = await self._spawn(index, version, audit, log, reuse_port)
            try:
                await self._wait_healthy(replica)
            except _ReplicaFailed as failed:
                log.warning(
                    "replica_unhealthy", replica=index, version=version, reason=failed.reason
                )
                await self._stop(replica, audit, log, reason=f"unhealthy: {failed.reason}")
                failed.replica = replica
                if failed.port_conflict and attempt < _PORT_ATTEMPTS:
                    reuse_port = None  # another process took the port: try another one
                    continue
                raise
            break
        await audit(
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
            await audit("replica_starting", replica=index, version=version, port=port)
            try:
                proc = await ManagedProcess.spawn(
                    argv, self._env.state_dir / f"replica-{index}.log", marker=self._marker
                )
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
                taken = not port_is_free(self.settings.host, replica.port)
                raise _ReplicaFailed(
                    replica.index,
                    f"{describe_exit(replica.proc.returncode)} before it was healthy"
                    + (f" (port {replica.port} is held by another process)" if taken else ""),
                    port_conflict=taken,
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
                    if listens_on(replica.proc.pid, replica.port):
                        return
                    # Someone else answered on our port: it is not our replica that is healthy.
                    raise _ReplicaFailed(
                        replica.index,
                        f"port {replica.port} is answered by another process",
                        port_conflict=True,
                    )
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
            await audit(
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
            if port_is_free(self.settings.host, port):
                self._reserved_ports.add(port)
                return port
        raise DriverError("no_free_port", f"no free port in {first}-{last} on {self.settings.host}")
