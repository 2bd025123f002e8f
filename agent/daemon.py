"""The agent daemon: builds every part from the configuration, in one place, and runs them until
told to stop.

Wiring, in the order the parts depend on each other (nothing is bound later)::

    journal (state store + audit file) -> trust -> policy -> driver -> lifecycle, outbox
      -> link, dialer -> streams -> runner -> renewer -> tunnel (hands frames to the runner)
      -> control socket, health endpoint

One command's path (docs/PROTOCOL.md §6)::

    tunnel reader --frame--> session --CommandDelivered--> runner inbox
    runner turn: lifecycle.deliver -> effects (audit records, rows, outbox frames, Execute)
                 -> one journal batch (SQLite transaction + audit lines) -> syncer: WAL fsync
    durable: runner starts the driver; tunnel writer sends received/running
    driver done -> runner inbox -> lifecycle.finish -> batch -> fsync -> final status sent

Shutdown (SIGTERM/SIGINT): STOPPING=1; refuse new deliveries (``shutting_down``); let running
commands finish within ``shutdown_grace`` (then cancel them: they are reported ``interrupted``);
commands still waiting stay in the store for the next start; try to deliver every queued result;
close the tunnel with 1001; close the driver, the control socket and the journal, whose last
record is ``agent_stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate

from agent import __version__
from agent.config import AgentConfig
from agent.core.commands import COMMAND_TYPES, UpdateAgent
from agent.core.diagnosis import Where, diagnose
from agent.core.errors import AgentError, AuditError, CommandRejected, ConfigError
from agent.core.frames import MAX_FRAME_TO_AGENT, PROTOCOL_VERSION, CertificateFrame, Hello
from agent.core.lifecycle import Lifecycle, Limits, Operator
from agent.core.session import Outbox
from agent.core.targets import is_loopback_host
from agent.core.trust import Trust, TrustEffect
from agent.core.verifier import CommandVerifier, TrustedKeys, VerifierSettings
from agent.drivers import load_driver_factory
from agent.drivers.base import Driver, DriverEnvironment
from agent.io.audit_file import AuditFile
from agent.io.clock import Clock, SystemClock
from agent.io.control_socket import ControlSocketServer
from agent.io.dialer import Dialer
from agent.io.health import HealthServer
from agent.io.journal import Journal
from agent.io.metrics import Snapshot
from agent.io.metrics import render as render_metrics
from agent.io.policy_file import PolicyFile
from agent.io.receipt_keys import ReceiptKeyFiles
from agent.io.renewal import CertificateRenewer
from agent.io.runner import Runner, RunnerSettings, apply_trust
from agent.io.sdnotify import SystemdNotifier, run_watchdog
from agent.io.store import Store
from agent.io.streams import StreamManager
from agent.io.tls import certificate_common_name, check_private_key_file, client_context
from agent.io.tunnel import Connection, Link, Tunnel

if TYPE_CHECKING:
    from agent.update.updater import Updater as SelfUpdater

HOUSEKEEPING_INTERVAL: Final = 60.0
FLUSH_ON_STOP: Final = 5.0
FILE_WATCH_INTERVAL: Final = 2.0
"""While disconnected, how often the certificate, key and CA files are checked for a change
(a renewed or re-enrolled certificate is tried at once instead of after the backoff)."""


def load_trusted_keys(
    paths: tuple[Path, ...], setting: str = "commands.trusted_keys"
) -> TrustedKeys:
    """Ed25519 public keys from PEM files; a ConfigError names ``setting`` and the file."""
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{setting}: cannot load {path}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{setting}: {path} is not an Ed25519 public key")
        keys.append(key)
    return TrustedKeys.of(keys)


def resolve_agent_id(config: AgentConfig) -> str:
    """The agent's id is the CN of its client certificate; a configured id must agree."""
    from_cert = certificate_common_name(config.control_plane.client_cert)
    if config.agent_id is not None and config.agent_id != from_cert:
        raise ConfigError(
            f"agent.id is {config.agent_id!r} but the client certificate is for {from_cert!r}"
        )
    return from_cert


@dataclass(frozen=True)
class Dispatch:
    """Where the tunnel hands what arrives (agent/io/tunnel.py ``Handler``)."""

    runner: Runner
    renewer: CertificateRenewer
    streams: StreamManager

    def command(self, peer: Connection, ref: str, token: str) -> None:
        self.runner.deliver(peer, ref, token)

    def ack(self, peer: Connection, seq: int) -> None:
        self.runner.ack(peer, seq)

    def keyset(self, peer: Connection, token: str) -> None:
        self.runner.offer_keyset(peer, token)

    def certificate(self, frame: CertificateFrame) -> None:
        self.renewer.offered(frame)

    def record(self, event: str, /, **fields: object) -> None:
        self.runner.record(event, **fields)

    def session_ended(self) -> None:
        self.streams.abort_all("session_lost")
        self.runner.wake_acked()  # no ack will come on this session


@dataclass(frozen=True, kw_only=True)
class Parts:
    """The running components."""

    journal: Journal
    trust: Trust
    policy: PolicyFile
    driver: Driver
    outbox: Outbox
    link: Link
    streams: StreamManager
    runner: Runner
    renewer: CertificateRenewer
    tunnel: Tunnel
    control: ControlSocketServer


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        driver: Driver | None = None,
        notifier: SystemdNotifier | None = None,
        clock: Clock | None = None,
        freeze_gc: bool = False,
    ) -> None:
        """``clock`` is the host's clock as the agent reads it everywhere (tests skew it).
        ``freeze_gc``: the process is the agent's own (``byoc-agent run``), so what start-up
        allocated may be frozen out of the garbage collector's way."""
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.log = structlog.get_logger("agent").bind(logger="agent")
        self.agent_id = resolve_agent_id(config)
        self._driver_override = driver
        self._freeze_gc = freeze_gc
        self._notifier = notifier or SystemdNotifier.from_environment()
        self._stop = asyncio.Event()
        self._stop_reason = "requested"
        self.exit_code = 0
        self.started = asyncio.Event()
        self.audit = Journal(
            Store(config.state_dir / "agent.db"),
            AuditFile(config.audit_log),
            now=lambda: datetime.fromtimestamp(self.clock.time(), UTC),
        )
        """The journal: the audit log and the state store, written together."""
        self._parts: Parts | None = None
        self.health: HealthServer | None = None
        self._background: list[asyncio.Task[None]] = []

    @property
    def parts(self) -> Parts:
        """The running components; only valid once :attr:`started` is set."""
        if self._parts is None:
            raise RuntimeError("the agent is not running")
        return self._parts

    # -- control --------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested", *, failure: bool = False) -> None:
        """Begin a graceful stop. ``failure``: exit non-zero so that systemd restarts us."""
        if failure:
            self.exit_code = 1
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _restart(self, exit_code: int, reason: str) -> None:
        """Drain and exit with ``exit_code`` (systemd starts the agent again: a new release)."""
        self.exit_code = exit_code
        self.request_stop(reason)

    def _journal_failed(self, exc: BaseException) -> None:
        self.log.error("audit_log_failed", error=str(exc))
        self.request_stop(f"audit log failure: {exc}", failure=True)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        """A background task (tunnel, runner, watchdog...) must run until we stop; if one ends
        early, stop with a failure instead of running on half-alive."""
        if self._stop.is_set() or task.cancelled():
            return
        exc = task.exception()
        self.log.error("background_task_ended", task=task.get_name(), error=repr(exc))
        self.request_stop(f"{task.get_name()} task ended: {exc!r}", failure=True)

    def reload(self) -> None:
        """SIGHUP: re-read the policy, and try to connect at once if the tunnel is down."""
        if self._parts is not None:
            parts = self._parts

            def reload_policy(_batch: object) -> None:
                parts.policy.reload("sighup")

            parts.runner.submit(reload_policy)
            parts.link.retry_now()

    # -- run ------------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        async with contextlib.AsyncExitStack() as stack:
            # One agent per state directory, checked before anything is opened: two writers
            # would interleave the audit chain and both drive the workload.
            stack.enter_context(single_instance(self.config.state_dir))
            await self._run(stack, install_signal_handlers=install_signal_handlers)

    async def _run(
        self, stack: contextlib.AsyncExitStack, *, install_signal_handlers: bool
    ) -> None:
        config = self.config
        cp = config.control_plane
        # Refuse a key others can read before anything else (the tunnel checks it again on
        # every connection attempt, so a later chmod is caught too).
        check_private_key_file(cp.client_key)
        journal = self.audit
        journal.open()
        stack.callback(journal.close)
        journal.on_failure(self._journal_failed)
        stack.callback(self._notifier.close)
        trust, trust_effects = self._trust(journal.store)
        with journal.batch() as batch:
            if journal.repaired:
                batch.record("audit_tail_repaired", **journal.repaired)
            batch.record(
                "agent_started",
                version=__version__,
                agent_id=self.agent_id,
                config=str(config.source),
                trusted_kids=sorted(trust.keys().by_kid),
                keyset_version=trust.version,
                driver=self._driver_override.kind if self._driver_override else config.driver_kind,
                control_plane=cp.url,
            )
            apply_trust(batch, trust_effects, self.clock, self.log)
        stack.push_async_callback(self._stopped)
        if trust.version == 0 and config.commands.keyset:
            self._bootstrap_keyset(journal, trust, config.commands.keyset)
        log = self.log
        policy = PolicyFile(config.policy, journal.record, log)
        driver = self._driver_override or self._build_driver(journal)
        await driver.start()
        stack.push_async_callback(driver.close)
        updater = self._build_updater(trust) if config.update is not None else None
        lifecycle = Lifecycle(
            CommandVerifier(
                trust.keys(),
                VerifierSettings(
                    audience=self.agent_id,
                    issuers=config.commands.issuers,
                    max_lifetime=config.commands.max_lifetime,
                    clock_skew=config.commands.clock_skew,
                ),
            ),
            limits=Limits(
                max_pending=config.commands.max_pending,
                rate=config.commands.rate,
                burst=config.commands.burst,
            ),
            agent_uid=os.geteuid(),
            continues=frozenset({UpdateAgent.type}) if updater is not None else frozenset(),
        )
        outbox = Outbox(journal.store.outbox(), next_seq=journal.store.next_seq())
        link = Link()
        dialer = Dialer(
            cp,
            ssl_context=self._ssl_context,
            user_agent=f"byoc-agent/{__version__}",
            connected=link.ready,
        )
        streams = StreamManager(
            settings=config.streams, dial=dialer.stream, log=log.bind(component="streams")
        )
        runner = Runner(
            lifecycle=lifecycle,
            trust=trust,
            outbox=outbox,
            journal=journal,
            driver=driver,
            streams=streams,
            policy=policy,
            receipts=ReceiptKeyFiles(self.agent_id, cp.client_cert, cp.client_key),
            on_outbox=link.notify_outbox,
            settings=RunnerSettings(command_timeout=config.commands.command_timeout),
            clock=self.clock,
            log=log.bind(component="runner"),
            updater=updater,
        )
        renewer = CertificateRenewer(
            agent_id=self.agent_id,
            cert_path=cp.client_cert,
            key_path=cp.client_key,
            send=link.send,
            connected=link.ready,
            clock_offset=lambda: link.clock_offset,
            record=runner.record,
            log=log.bind(component="renewal"),
            clock=self.clock.time,
        )
        tunnel = Tunnel(
            link=link,
            dialer=dialer,
            control_plane=cp,
            settings=config.tunnel,
            ssl_context=self._ssl_context,
            hello=lambda: self._hello(driver.kind, trust),
            outbox=outbox,
            durable=lambda: journal.durable,
            handler=Dispatch(runner, renewer, streams),
            agent_id=self.agent_id,
            clock=self.clock,
            log=log.bind(component="tunnel"),
            on_state=self._notifier.status,
        )
        runner.recover()
        control = ControlSocketServer(
            config.control_socket, self._control_request, log.bind(component="control")
        )
        self._parts = parts = Parts(
            journal=journal,
            trust=trust,
            policy=policy,
            driver=driver,
            outbox=outbox,
            link=link,
            streams=streams,
            runner=runner,
            renewer=renewer,
            tunnel=tunnel,
            control=control,
        )
        await control.start()
        stack.push_async_callback(control.close)
        if config.health_listen is not None:
            await self._serve_health(stack, runner, *config.health_listen)
        if install_signal_handlers:
            self._install_signal_handlers()
        runner_task = asyncio.create_task(runner.run(), name="runner")
        tunnel_stop = asyncio.Event()
        background = [
            asyncio.create_task(tunnel.run(tunnel_stop), name="tunnel"),
            asyncio.create_task(self._housekeeping(runner), name="housekeeping"),
            asyncio.create_task(self._watch_files(link), name="file-watch"),
        ]
        if cp.renew:
            background.append(asyncio.create_task(renewer.run(), name="renewal"))
        if self._notifier.watchdog_interval is not None:  # systemd asked for a watchdog
            background.append(
                asyncio.create_task(run_watchdog(self._notifier, self._healthy), name="watchdog")
            )
        for task in (runner_task, *background):
            task.add_done_callback(self._background_done)
        self._background = [runner_task, *background]  # all must live (the watchdog, /livez)
        if updater is not None:  # decides a release on trial, then ends (stopped at shutdown)
            background.append(
                asyncio.create_task(
                    updater.supervise(self.started, lambda: link, runner.write),
                    name="update-supervision",
                )
            )
        await runner.settle()  # recovery and start-up records on disk before READY
        self._notifier.ready(f"agent {self.agent_id} started; connecting")
        log.info("agent_started", agent_id=self.agent_id, version=__version__)
        if self._freeze_gc:
            # What start-up made lives as long as the agent: out of the collector's way, so
            # that its full collections under load walk only what commands allocate.
            gc.collect()
            gc.freeze()
        self.started.set()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(parts, tunnel_stop, runner_task, background)

    def _trust(self, store: Store) -> tuple[Trust, list[TrustEffect]]:
        commands = self.config.commands
        if commands.root_key is None:
            return Trust(fixed=load_trusted_keys(commands.trusted_keys)), []
        (root,) = load_trusted_keys((commands.root_key,)).by_kid.values()
        try:
            return Trust.from_root(
                root, latest=store.latest_keyset(), signers=store.keyset_signers()
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def _bootstrap_keyset(self, journal: Journal, trust: Trust, path: Path) -> None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"commands.keyset: cannot read {path}: {exc.strerror}") from exc
        status, effects = trust.offer(
            token, now=self.clock.time(), clock_skew=self.config.commands.clock_skew
        )
        with journal.batch() as batch:
            apply_trust(batch, effects, self.clock, self.log)
        if not status.accepted:
            # Fail closed: no trusted command key until the control plane pushes a good set.
            self.log.error("keyset_bootstrap_refused", reason=status.reason, detail=status.detail)

    def _build_updater(self, trust: Trust) -> SelfUpdater | None:
        from agent.update.bridge import build_updater  # noqa: PLC0415  # only with [update]

        return build_updater(
            self.config,
            keyset_release_keys=trust.release_keys,
            restart=self._restart,
            clock=self.clock.time,
            log=self.log.bind(component="update"),
        )

    def _build_driver(self, journal: Journal) -> Driver:
        factory = load_driver_factory(self.config.driver_kind)
        driver_dir = self.config.state_dir / "driver"
        driver_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

        async def driver_audit(event: str, /, **fields: object) -> None:
            """What the driver does on its own initiative (supervision): on disk first."""
            journal.record(event, source="driver", **fields)
            await journal.settle()

        return factory(
            self.config.driver_settings,
            DriverEnvironment(
                state_dir=driver_dir,
                audit=driver_audit,
                log=self.log.bind(component=f"driver.{self.config.driver_kind}"),
            ),
        )

    async def _serve_health(
        self, stack: contextlib.AsyncExitStack, runner: Runner, host: str, port: int
    ) -> None:
        self.health = HealthServer(
            host=host,
            port=port,
            ready=self._ready,
            live=lambda: (self._healthy(), "running" if self._healthy() else "stopping"),
            metrics=lambda: render_metrics(self._snapshot()),
            log=self.log.bind(component="health"),
        )
        await self.health.start()
        stack.push_async_callback(self.health.close)
        runner.record("health_listening", url=self.health.url, loopback=is_loopback_host(host))
        if not is_loopback_host(host):
            self.log.warning("health_not_on_loopback", url=self.health.url)

    def _ssl_context(self) -> ssl.SSLContext:
        cp = self.config.control_plane
        # Built for every connection attempt, so renewed certificate files are picked up.
        return client_context(ca_bundle=cp.ca_bundle, cert=cp.client_cert, key=cp.client_key)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _hello(self, driver_kind: str, trust: Trust) -> Hello:
        capabilities: dict[str, object] = {
            "commands": list(COMMAND_TYPES),
            "driver": driver_kind,
            "max_frame_bytes": MAX_FRAME_TO_AGENT,
        }
        if trust.version is not None:
            capabilities["keyset_version"] = trust.version
        return Hello(
            protocol=PROTOCOL_VERSION,
            agent_version=__version__,
            capabilities=capabilities,
            heartbeat_interval=self.config.tunnel.heartbeat.interval,
        )

    # -- observation ------------------------------------------------------------------------

    def _ready(self) -> tuple[bool, str]:
        """For /readyz: the tunnel is up and the client certificate is within its validity."""
        parts = self.parts
        expiry = _cert_validity(self.config.control_plane.client_cert)
        if expiry is None:
            return False, "client certificate unreadable"
        not_before, not_after = expiry
        now = self.clock.time()
        if now < not_before:
            return False, "client certificate not yet valid"
        if now >= not_after:
            return False, "client certificate expired"
        if not parts.link.ready.is_set():
            return False, f"tunnel down: {parts.link.last_error or 'connecting'}"
        return True, "ready"

    def _snapshot(self) -> Snapshot:
        parts = self.parts
        validity = _cert_validity(self.config.control_plane.client_cert)
        return Snapshot(
            agent_id=self.agent_id,
            version=__version__,
            connected=parts.link.ready.is_set(),
            reconnects=parts.link.reconnects,
            commands=dict(parts.runner.lifecycle.outcomes),
            refusals=dict(parts.runner.lifecycle.refusals),
            audit_records=self.audit.head.seq,
            pending_approvals=len(parts.runner.lifecycle.pending_approvals()),
            unsent_frames=parts.outbox.unsent_results(),
            streams_open=len(parts.streams.active),
            stream_bytes_to_target=parts.streams.bytes_to_targets,
            stream_bytes_from_target=parts.streams.bytes_from_targets,
            certificate_expiry_seconds=None
            if validity is None
            else validity[1] - self.clock.time(),
        )

    def _healthy(self) -> bool:
        """For the systemd watchdog and /livez: running, and every background task alive."""
        return not self._stop.is_set() and all(not t.done() for t in self._background)

    # -- background -------------------------------------------------------------------------

    async def _housekeeping(self, runner: Runner) -> None:
        """Every minute: anchor the audit head if it moved, and forget expired commands."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            runner.anchor()
            runner.purge()

    async def _watch_files(self, link: Link) -> None:
        """While disconnected, try again at once when the certificate, key or CA files change
        (renewed, re-enrolled, or a wrong CA fixed): a person who fixed them should not wait
        out a 300 s retry."""
        cp = self.config.control_plane
        files = (cp.client_cert, cp.client_key, cp.ca_bundle)
        seen = _stamps(files)
        while True:
            await asyncio.sleep(FILE_WATCH_INTERVAL)
            now = _stamps(files)
            if now != seen and not link.ready.is_set():
                self.log.info("tls_files_changed", retry="now")
                link.retry_now()
            seen = now

    async def _shutdown(
        self,
        parts: Parts,
        tunnel_stop: asyncio.Event,
        runner_task: asyncio.Task[None],
        background: list[asyncio.Task[None]],
    ) -> None:
        """Finish or hand over in-flight work, then stop the tunnel and the runner. The exit
        stack closes the control socket, the driver and the journal afterwards."""
        self._notifier.stopping()
        runner = parts.runner
        runner.stop_accepting()
        failed = self.audit.failed
        if not failed:
            runner.record(
                "agent_stopping",
                reason=self._stop_reason,
                running=runner.running,
                queued=runner.queued,
            )
        self.log.info("agent_stopping", reason=self._stop_reason)
        parts.streams.abort_all("agent_stopping")  # a stream has no result to finish
        if not failed:
            with contextlib.suppress(AuditError):
                await runner.drain(self.config.shutdown_grace)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_ON_STOP):
                        await self._flushed(parts)
        tunnel_stop.set()
        for task in background:
            if task.get_name() != "tunnel":
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if not self.audit.failed:
            with contextlib.suppress(AuditError):
                await runner.settle()
        runner_task.cancel()
        await asyncio.gather(runner_task, return_exceptions=True)

    async def _flushed(self, parts: Parts) -> None:
        """Until every queued result is acknowledged, or the tunnel is down."""
        while parts.outbox.unsent_results() > 0 and parts.link.ready.is_set():
            await parts.runner.wait_acked()

    async def _stopped(self) -> None:
        if self.audit.failed or self._parts is None:
            return
        unsent = self._parts.outbox.unsent_results()
        with contextlib.suppress(AuditError):
            self.audit.record("agent_stopped", reason=self._stop_reason, unsent_frames=unsent)
            await self.audit.settle()
        self.log.info("agent_stopped", unsent_frames=unsent)

    # -- control socket -------------------------------------------------------------------

    async def _control_request(
        self, request: Mapping[str, Any], operator: Operator
    ) -> dict[str, object]:
        runner = self.parts.runner
        op = request.get("op")
        note = request.get("note")
        note = note[:500] if isinstance(note, str) else None
        try:
            if op in ("approve", "deny"):
                jti = request.get("jti")
                if not isinstance(jti, str):
                    return {"ok": False, "error": "bad_request", "message": "'jti' is required"}
                action = runner.approve if op == "approve" else runner.deny
                row = await action(jti, operator, note)
                self.log.info("command_approved" if op == "approve" else "command_denied",
                              jti=jti, by=operator.user)  # fmt: skip
                return {"ok": True, "command": row.to_json()}
            if op == "pending":
                rows = runner.lifecycle.pending_approvals()
                return {"ok": True, "commands": [row.to_json() for row in rows]}
            if op == "status":
                return {"ok": True, "status": self.status()}
        except CommandRejected as exc:
            return {"ok": False, "error": exc.code, "message": exc.detail}
        return {"ok": False, "error": "bad_request", "message": f"unknown op {str(op)[:32]!r}"}

    def _diagnosis(self, error: str | None) -> dict[str, str] | None:
        """The last connection error explained, as ``doctor`` explains it (cause, action)."""
        if error is None or self.parts.link.ready.is_set():
            return None
        cp = self.config.control_plane
        found = diagnose(
            error,
            Where(
                host=cp.host,
                port=cp.port,
                ca_bundle=str(cp.ca_bundle),
                client_cert=str(cp.client_cert),
                client_key=str(cp.client_key),
            ),
        )
        return {"code": found.code, "cause": found.cause, "action": found.action}

    def status(self) -> dict[str, object]:
        parts = self.parts
        link = parts.link
        connection = link.connection
        head = self.audit.head
        lifecycle = parts.runner.lifecycle
        return {
            "agent_id": self.agent_id,
            "version": __version__,
            "control_plane": self.config.control_plane.url,
            "connected": link.ready.is_set(),
            "connection": None
            if connection is None
            else {
                "peer_cert_sha256": connection.peer_sha256,
                "tls_version": connection.tls_version,
                "cipher": connection.cipher,
                "since": connection.since,
            },
            "route": link.route,
            "reconnects": link.reconnects,
            "consecutive_failures": link.consecutive_failures,
            "last_error": link.last_error,
            "last_failure_reason": link.last_failure.reason if link.last_failure else None,
            "diagnosis": self._diagnosis(link.last_error),
            "next_attempt_at": link.next_attempt_at,
            "client_certificate_expires": _cert_expiry(self.config.control_plane.client_cert),
            "pending_approvals": len(lifecycle.pending_approvals()),
            "running_commands": parts.runner.running,
            "queued_commands": parts.runner.queued,
            "last_command": lifecycle.last_command,
            "unsent_frames": parts.outbox.unsent_results(),
            "audit_head": {"seq": head.seq, "hash": head.hash},
            "policy_sha256": parts.policy.current.sha256,
            "workload": parts.driver.describe(),
            "streams": parts.streams.describe(),
            "health_url": self.health.url if self.health is not None else None,
            "tasks": len(asyncio.all_tasks()),
            "time": self.clock.time(),
        }


@contextlib.contextmanager
def single_instance(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir/agent.lock`` for as long as the agent runs."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AgentError(
                f"another agent (pid {holder}) is already running with state directory "
                f"{state_dir}; refusing to start twice"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _stamps(paths: tuple[Path, ...]) -> tuple[tuple[int, int] | None, ...]:
    out: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_mtime_ns))
    return tuple(out)


def _cert_validity(path: Path) -> tuple[float, float] | None:
    """(notBefore, notAfter) of a PEM certificate as Unix times, or None if unreadable."""
    try:
        cert = load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def _cert_expiry(path: Path) -> str | None:
    try:
        cert = load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.astimezone(UTC).isoformat()


__all__ = ["Agent", "load_trusted_keys", "resolve_agent_id"]
