"""The agent daemon: builds every part from the configuration and runs them until told to stop.

Start-up: audit log, state, policy, driver (adopts the existing workload), recovery of commands a
previous run left behind, the local control socket, then the tunnel; READY=1 to systemd.

Shutdown (SIGTERM/SIGINT): STOPPING=1; refuse new deliveries (``shutting_down``); let running
commands finish within ``shutdown_grace`` (then cancel them: they are reported ``interrupted``);
commands still waiting stay queued in SQLite for the next start; try to deliver every queued
result; close the tunnel with 1001; close the driver, the control socket, the state and the
audit log, whose last record is ``agent_stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, Final

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate

from agent import __version__
from agent.config import AgentConfig
from agent.core.commands import COMMAND_TYPES
from agent.core.errors import AgentError, AuditError, CommandRejected, ConfigError
from agent.core.frames import MAX_FRAME_TO_AGENT, PROTOCOL_VERSION, Hello, KeySetStatus
from agent.core.targets import is_loopback_host
from agent.core.trust import KeyRing, KeySetRejected, key_from_jwk, public_jwk, read_keyset
from agent.core.verifier import CommandVerifier, TrustedKeys, VerifierSettings, jwk_thumbprint
from agent.drivers import load_driver_factory
from agent.drivers.base import Driver, DriverEnvironment
from agent.executor import CommandLimits, CommandProcessor, DeliveryOutcome, Operator
from agent.io.audit_file import AuditLog
from agent.io.control_socket import ControlSocketServer
from agent.io.health import HealthServer
from agent.io.metrics import Snapshot
from agent.io.metrics import render as render_metrics
from agent.io.policy_file import PolicyFile
from agent.io.receipt_keys import ReceiptKeyFiles
from agent.io.renewal import CertificateRenewer
from agent.io.sdnotify import SystemdNotifier, run_watchdog
from agent.io.store import AgentState
from agent.io.streams import StreamManager
from agent.io.tls import certificate_common_name, check_private_key_file, client_context
from agent.io.tunnel import Tunnel

HOUSEKEEPING_INTERVAL: Final = 60.0
FLUSH_ON_STOP: Final = 5.0


def load_trusted_keys(paths: tuple[Path, ...]) -> TrustedKeys:
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"commands.trusted_keys: cannot load {path}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"commands.trusted_keys: {path} is not an Ed25519 public key")
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


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        driver: Driver | None = None,
        notifier: SystemdNotifier | None = None,
        host_clock: Callable[[], float] = time.time,
    ) -> None:
        """``host_clock`` is the host's wall clock, as far as the tunnel's clock-offset
        measurement and certificate renewal are concerned (tests skew it)."""
        self.config = config
        self._host_clock = host_clock
        self.log = structlog.get_logger("agent").bind(logger="agent")
        self.agent_id = resolve_agent_id(config)
        self._driver_override = driver
        self._notifier = notifier or SystemdNotifier.from_environment()
        self._stop = asyncio.Event()
        self._stop_reason = "requested"
        self.exit_code = 0
        self.started = asyncio.Event()
        self.audit = AuditLog(config.audit_log)
        self._parts: _Parts | None = None
        self.health: HealthServer | None = None
        self._background: list[asyncio.Task[None]] = []
        self._keyring: KeyRing | None = None

    @property
    def parts(self) -> _Parts:
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

    def _audit_failed(self, exc: OSError) -> None:
        self.log.error("audit_log_failed", error=str(exc))
        self.request_stop(f"audit log failure: {exc}", failure=True)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        """A background task (tunnel, watchdog, purge) must run until we stop; if one ends
        early, stop with a failure instead of running on half-alive."""
        if self._stop.is_set() or task.cancelled():
            return
        exc = task.exception()
        self.log.error("background_task_ended", task=task.get_name(), error=repr(exc))
        self.request_stop(f"{task.get_name()} task ended: {exc!r}", failure=True)

    def reload_policy(self) -> None:
        if self._parts is not None:
            self._parts.policy.reload("sighup")

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
        # Refuse a key others can read before anything else (the tunnel checks it again on
        # every connection attempt, so a later chmod is caught too).
        check_private_key_file(config.control_plane.client_key)
        self.audit.open()
        stack.callback(self.audit.close)
        self.audit.on_failure(self._audit_failed)
        state = AgentState(config.state_dir / "agent.db")
        stack.callback(state.close)
        stack.callback(self._notifier.close)
        self._keyring = self._load_keyring(state) if config.commands.root_key else None
        keys = (
            self._keyring.trusted()
            if self._keyring is not None
            else load_trusted_keys(config.commands.trusted_keys)
        )
        self.audit.append(
            "agent_started",
            version=__version__,
            agent_id=self.agent_id,
            config=str(config.source),
            trusted_kids=sorted(keys.by_kid),
            keyset_version=self._keyring.version if self._keyring is not None else None,
            driver=self._driver_override.kind if self._driver_override else config.driver_kind,
            control_plane=config.control_plane.url,
        )
        stack.callback(self._audit_stopped, state)
        if self._keyring is not None and self._keyring.version == 0 and config.commands.keyset:
            self._bootstrap_keyset(state, config.commands.keyset)
            keys = self._keyring.trusted()
        policy = PolicyFile(config.policy, self.audit, self.log)
        driver = self._driver_override or self._build_driver()
        await driver.start()
        stack.push_async_callback(driver.close)
        verifier = CommandVerifier(
            keys,
            VerifierSettings(
                audience=self.agent_id,
                issuers=config.commands.issuers,
                max_lifetime=config.commands.max_lifetime,
                clock_skew=config.commands.clock_skew,
            ),
        )
        tunnel = Tunnel(
            control_plane=config.control_plane,
            settings=config.tunnel,
            ssl_context=self._ssl_context,
            hello=lambda: self._hello(driver.kind),
            state=state,
            audit=self.audit,
            on_delivery=self._deliver,
            on_keyset=lambda token: self._offer_keyset(state, token),
            log=self.log.bind(component="tunnel"),
            agent_id=self.agent_id,
            on_state=self._notifier.status,
            on_session_end=lambda: streams.abort_all("session_lost"),
            on_certificate=lambda frame: renewer.offered(frame),  # noqa: PLW0108  # bound later
            clock=self._host_clock,
        )
        renewer = CertificateRenewer(
            agent_id=self.agent_id,
            cert_path=config.control_plane.client_cert,
            key_path=config.control_plane.client_key,
            send=tunnel.send_frame,
            connected=tunnel.ready,
            clock_offset=lambda: tunnel.clock_offset,
            audit=self.audit,
            log=self.log.bind(component="renewal"),
            clock=self._host_clock,
        )
        streams = StreamManager(
            settings=config.streams,
            dial=tunnel.open_stream_connection,
            log=self.log.bind(component="streams"),
        )
        processor = CommandProcessor(
            verifier=verifier,
            policy=lambda: policy.current,
            state=state,
            audit=self.audit,
            driver=driver,
            max_pending=config.commands.max_pending,
            on_outbox=tunnel.notify_outbox,
            log=self.log.bind(component="executor"),
            agent_uid=os.geteuid(),
            limits=CommandLimits(
                rate=config.commands.rate,
                burst=config.commands.burst,
                timeout=config.commands.command_timeout,
            ),
            receipt_signer=ReceiptKeyFiles(
                self.agent_id, config.control_plane.client_cert, config.control_plane.client_key
            ),
            streams=streams,
        )
        processor.recover()
        control = ControlSocketServer(
            config.control_socket, self._control_request, self.log.bind(component="control")
        )
        await control.start()
        stack.push_async_callback(control.close)
        if config.health_listen is not None:
            host, port = config.health_listen
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
            self.audit.append(
                "health_listening", url=self.health.url, loopback=is_loopback_host(host)
            )
            if not is_loopback_host(host):
                self.log.warning("health_not_on_loopback", url=self.health.url)
        self._parts = _Parts(
            state=state,
            policy=policy,
            driver=driver,
            tunnel=tunnel,
            processor=processor,
            control=control,
            streams=streams,
        )
        if install_signal_handlers:
            self._install_signal_handlers()
        tunnel_stop = asyncio.Event()
        background = [
            asyncio.create_task(tunnel.run(tunnel_stop), name="tunnel"),
            asyncio.create_task(self._housekeeping(processor, state), name="housekeeping"),
        ]
        if config.control_plane.renew:
            background.append(asyncio.create_task(renewer.run(), name="renewal"))
        if self._notifier.watchdog_interval is not None:  # systemd asked for a watchdog
            background.append(
                asyncio.create_task(run_watchdog(self._notifier, self._healthy), name="watchdog")
            )
        for task in background:
            task.add_done_callback(self._background_done)
        self._background = background
        self._notifier.ready(f"agent {self.agent_id} started; connecting")
        self.log.info("agent_started", agent_id=self.agent_id, version=__version__)
        self.started.set()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(self._parts, tunnel_stop, background)

    def _build_driver(self) -> Driver:
        factory = load_driver_factory(self.config.driver_kind)
        driver_dir = self.config.state_dir / "driver"
        driver_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        audit = self.audit

        def driver_audit(event: str, /, **fields: object) -> None:
            audit.append(event, source="driver", **fields)

        return factory(
            self.config.driver_settings,
            DriverEnvironment(
                state_dir=driver_dir,
                audit=driver_audit,
                log=self.log.bind(component=f"driver.{self.config.driver_kind}"),
            ),
        )

    def _ssl_context(self) -> ssl.SSLContext:
        cp = self.config.control_plane
        # Built for every connection attempt, so renewed certificate files are picked up.
        return client_context(ca_bundle=cp.ca_bundle, cert=cp.client_cert, key=cp.client_key)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload_policy)

    def _hello(self, driver_kind: str) -> Hello:
        capabilities: dict[str, object] = {
            "commands": list(COMMAND_TYPES),
            "driver": driver_kind,
            "max_frame_bytes": MAX_FRAME_TO_AGENT,
        }
        if self._keyring is not None:
            capabilities["keyset_version"] = self._keyring.version
        return Hello(
            protocol=PROTOCOL_VERSION,
            agent_version=__version__,
            capabilities=capabilities,
            heartbeat_interval=self.config.tunnel.heartbeat.interval,
        )

    # -- key sets -------------------------------------------------------------------------

    def _load_keyring(self, state: AgentState) -> KeyRing:
        """The configured root, and the highest key set accepted before (re-checked against the
        root that signed it, kept beside it).

        The configured root wins: the stored sets are kept only if they descend from it (it
        signed one of them, or the latest names it as the next root, i.e. the root was rotated
        through key sets and the configuration updated to match). Otherwise the customer has
        replaced the root (feared stolen, say): the stored sets and their version floor are
        discarded, audited as ``keyset_root_replaced``, and trust starts again from the
        configured root (and the ``keyset`` file, if configured)."""
        assert self.config.commands.root_key is not None  # noqa: S101  # checked by the caller
        anchor = load_trusted_keys((self.config.commands.root_key,))
        (root,) = anchor.by_kid.values()
        configured_kid = jwk_thumbprint(root)
        stored = state.latest_keyset()
        if stored is None:
            return KeyRing(root)
        token, signer = stored
        try:
            current = read_keyset(token, signer=key_from_jwk(json.loads(signer), "signer"))
            signers = {
                jwk_thumbprint(key_from_jwk(json.loads(jwk), "signer"))
                for jwk in state.keyset_signers()
            }
        except (KeySetRejected, ValueError) as exc:
            raise ConfigError(f"the stored key set no longer verifies: {exc}") from exc
        if configured_kid in signers or configured_kid == current.root_kid:
            return KeyRing(root, current)
        self.audit.append(
            "keyset_root_replaced",
            root_kid=configured_kid,
            previous_root_kid=current.root_kid,
            discarded_version=current.version,
        )
        self.log.warning(
            "keyset_root_replaced",
            root_kid=configured_kid,
            previous_root_kid=current.root_kid,
            discarded_version=current.version,
        )
        state.discard_keysets()
        return KeyRing(root)

    def _bootstrap_keyset(self, state: AgentState, path: Path) -> None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"commands.keyset: cannot read {path}: {exc.strerror}") from exc
        answer = self._offer_keyset(state, token)
        if not answer.accepted:
            # Fail closed: no trusted command key until the control plane pushes a good set.
            self.log.error("keyset_bootstrap_refused", reason=answer.reason, detail=answer.detail)

    def _offer_keyset(self, state: AgentState, token: str) -> KeySetStatus:
        ring = self._keyring
        if ring is None:
            return KeySetStatus(
                version=0,
                accepted=False,
                reason="keysets_not_enabled",
                detail="this agent trusts a fixed list of command keys (commands.trusted_keys)",
            )
        try:
            keyset = ring.check(token, now=time.time(), clock_skew=self.config.commands.clock_skew)
        except KeySetRejected as exc:
            self.audit.append("keyset_rejected", reason=exc.code, detail=exc.detail)
            self.log.warning("keyset_rejected", reason=exc.code, detail=exc.detail)
            return KeySetStatus(
                version=ring.version, accepted=False, reason=exc.code, detail=exc.detail
            )
        self.audit.append(
            "keyset_accepted",
            version=keyset.version,
            previous_version=ring.version,
            kids=sorted(keyset.keys.by_kid),
            root_kid=keyset.root_kid,
            root_rotated=keyset.root_kid != jwk_thumbprint(ring.root),
            expires=int(keyset.expires_at),
        )
        state.store_keyset(
            version=keyset.version,
            token=token,
            signer=json.dumps(public_jwk(ring.root)),
            now=time.time(),
        )
        ring.install(keyset)
        if self._parts is not None:
            self._parts.processor.set_keys(keyset.trusted())
        self.log.info("keyset_accepted", version=keyset.version)
        return KeySetStatus(version=keyset.version, accepted=True)

    def _deliver(self, ref: str, token: str) -> DeliveryOutcome:
        return self.parts.processor.handle_delivery(ref, token)

    def _ready(self) -> tuple[bool, str]:
        """For /readyz: the tunnel is up and the client certificate is within its validity."""
        parts = self.parts
        expiry = _cert_validity(self.config.control_plane.client_cert)
        if expiry is None:
            return False, "client certificate unreadable"
        not_before, not_after = expiry
        now = time.time()
        if now < not_before:
            return False, "client certificate not yet valid"
        if now >= not_after:
            return False, "client certificate expired"
        if not parts.tunnel.ready.is_set():
            return False, f"tunnel down: {parts.tunnel.last_error or 'connecting'}"
        return True, "ready"

    def _snapshot(self) -> Snapshot:
        parts = self.parts
        validity = _cert_validity(self.config.control_plane.client_cert)
        return Snapshot(
            agent_id=self.agent_id,
            version=__version__,
            connected=parts.tunnel.ready.is_set(),
            reconnects=parts.tunnel.reconnects,
            commands=dict(parts.processor.outcomes),
            refusals=dict(parts.processor.refusals),
            audit_records=self.audit.head.seq,
            pending_approvals=len(parts.processor.pending_approvals()),
            unsent_frames=parts.state.unsent_results(),
            streams_open=len(parts.streams.active),
            stream_bytes_to_target=parts.streams.bytes_to_targets,
            stream_bytes_from_target=parts.streams.bytes_from_targets,
            certificate_expiry_seconds=None if validity is None else validity[1] - time.time(),
        )

    def _healthy(self) -> bool:
        """For the systemd watchdog: running, and every background task alive."""
        return not self._stop.is_set() and all(not t.done() for t in self._background)

    async def _housekeeping(self, processor: CommandProcessor, state: AgentState) -> None:
        """Every minute: forget expired commands, and anchor the audit head if it moved."""
        anchored = -1
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            head = self.audit.head
            if head.seq != anchored:
                state.queue_anchor(audit_seq=head.seq, audit_hash=head.hash, now=time.time())
                self.parts.tunnel.notify_outbox()
                anchored = head.seq
            purged = processor.purge()
            if purged:
                self.log.info("replay_cache_purged", commands=purged)

    async def _shutdown(
        self, parts: _Parts, tunnel_stop: asyncio.Event, background: list[asyncio.Task[None]]
    ) -> None:
        """Finish or hand over in-flight work, then stop the tunnel. The exit stack closes the
        control socket, the driver, the state and the audit log afterwards, in that order."""
        self._notifier.stopping()
        parts.processor.stop_accepting()
        self._audit_if_possible(
            "agent_stopping",
            reason=self._stop_reason,
            running=parts.processor.running,
            queued=parts.processor.queued,
        )
        self.log.info("agent_stopping", reason=self._stop_reason)
        parts.streams.abort_all("agent_stopping")  # a stream has no result to finish
        await parts.processor.drain(self.config.shutdown_grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_ON_STOP):
                await parts.tunnel.wait_flushed()
        tunnel_stop.set()
        for task in background:
            if task.get_name() != "tunnel":
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

    def _audit_if_possible(self, event: str, **fields: object) -> None:
        """Shutdown must complete even when the audit log is what failed."""
        if not self.audit.failed:
            with contextlib.suppress(AuditError):
                self.audit.append(event, **fields)

    def _audit_stopped(self, state: AgentState) -> None:
        unsent = state.unsent_results()
        self._audit_if_possible("agent_stopped", reason=self._stop_reason, unsent_frames=unsent)
        self.log.info("agent_stopped", unsent_frames=unsent)

    # -- control socket -------------------------------------------------------------------

    async def _control_request(
        self, request: Mapping[str, Any], operator: Operator
    ) -> dict[str, object]:
        processor = self.parts.processor
        op = request.get("op")
        note = request.get("note")
        note = note[:500] if isinstance(note, str) else None
        try:
            if op in ("approve", "deny"):
                jti = request.get("jti")
                if not isinstance(jti, str):
                    return {"ok": False, "error": "bad_request", "message": "'jti' is required"}
                action = processor.approve if op == "approve" else processor.deny
                row = action(jti, operator, note)
                self.log.info(f"command_{op}d", jti=jti, by=operator.user)
                return {"ok": True, "command": row.to_json()}
            if op == "pending":
                return {
                    "ok": True,
                    "commands": [row.to_json() for row in processor.pending_approvals()],
                }
            if op == "status":
                return {"ok": True, "status": self.status()}
        except CommandRejected as exc:
            return {"ok": False, "error": exc.code, "message": exc.detail}
        return {"ok": False, "error": "bad_request", "message": f"unknown op {str(op)[:32]!r}"}

    def status(self) -> dict[str, object]:
        parts = self.parts
        connection = parts.tunnel.connection
        head = self.audit.head
        return {
            "agent_id": self.agent_id,
            "version": __version__,
            "control_plane": self.config.control_plane.url,
            "connected": parts.tunnel.ready.is_set(),
            "connection": None
            if connection is None
            else {
                "peer_cert_sha256": connection.peer_sha256,
                "tls_version": connection.tls_version,
                "cipher": connection.cipher,
                "since": connection.since,
            },
            "route": parts.tunnel.route,
            "reconnects": parts.tunnel.reconnects,
            "consecutive_failures": parts.tunnel.consecutive_failures,
            "last_error": parts.tunnel.last_error,
            "client_certificate_expires": _cert_expiry(self.config.control_plane.client_cert),
            "pending_approvals": len(parts.processor.pending_approvals()),
            "running_commands": parts.processor.running,
            "queued_commands": parts.processor.queued,
            "last_command": parts.processor.last_command,
            "unsent_frames": parts.state.unsent_results(),
            "audit_head": {"seq": head.seq, "hash": head.hash},
            "policy_sha256": parts.policy.current.sha256,
            "workload": parts.driver.describe(),
            "streams": parts.streams.describe(),
            "health_url": self.health.url if self.health is not None else None,
            "tasks": len(asyncio.all_tasks()),
            "time": time.time(),
        }


@dataclass(frozen=True, kw_only=True)
class _Parts:
    state: AgentState
    policy: PolicyFile
    driver: Driver
    tunnel: Tunnel
    processor: CommandProcessor
    control: ControlSocketServer
    streams: StreamManager


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
