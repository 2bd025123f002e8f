"""First start without a certificate: enroll from a one-time token file, nobody at a shell.

``byoc-agent run`` calls :func:`ensure_enrolled` before it builds the agent (whose id is the CN
of the certificate that enrollment brings):

- a client certificate is there: nothing to do;
- none, and no ``[enroll]`` table: a configuration error naming both ways to enroll;
- none, with ``[enroll] token_file`` (in a pod: the Secret ``byoc-agent-enroll`` mounted as a
  file): check every local precondition first (the token works once, so nothing that could
  fail after it is spent is left unchecked: the enrollment CA, the command-signing keys, the
  policy, the driver's settings, a writable directory for the key, certificate, CA bundle,
  state, audit log and control socket, no other agent on the same state), then enroll with
  :func:`agent.enroll.enroll` (the key is made here, 0600, next to the certificate on the state
  volume; only a CSR leaves) and return, and the agent starts and connects.

While it cannot enroll it **waits**; it never exits, since a container that exits at once is
restarted in a loop, and a native sidecar that does so holds its pod back. It says why, and what
to do, in four places: one log line per new reason; an Event about its own pod when it runs in
Kubernetes (``kubectl describe pod``, ``kubectl get events``: no ``kubectl exec`` needed); the
health endpoint (``/readyz`` 503 with the reason, ``/livez`` 200: waiting is not a fault); and
``byoc-agent status`` over the control socket. It tries again when the reason may have gone:

========================  ===================================================================
state                     tried again
========================  ===================================================================
``blocked``               a local precondition fails: every ``check_interval``
``waiting_for_token``     no token file (or an empty one): when it appears
``token_refused``         the control plane refused the token (HTTP 4xx: spent, expired,
                          unknown): only once the token file holds another token
``unreachable``           no answer, or 5xx: with the tunnel's backoff
========================  ===================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
from cryptography import x509

from agent import __version__
from agent.config import AgentConfig, EnrollConfig
from agent.core.backoff import Backoff
from agent.core.errors import AgentError, ConfigError, PolicyError
from agent.core.lifecycle import Operator
from agent.io.control_socket import ControlSocketServer
from agent.io.health import HealthServer
from agent.io.policy_file import read_policy

MAX_TOKEN: Final = 256
EVENT_REASONS: Final = {
    "enrolled": "Enrolled",
    "token_refused": "EnrollmentTokenRefused",
    "waiting_for_token": "EnrollmentTokenMissing",
    "unreachable": "EnrollmentUnreachable",
}
SECRET_NAME: Final = "byoc-agent-enroll"  # noqa: S105  # a name, not a secret


class EventSink(Protocol):
    """Where the agent can say what is wrong before it has a tunnel (PodEvents in a pod)."""

    async def post(self, *, warning: bool, reason: str, message: str) -> str | None: ...

    async def close(self) -> None: ...


@dataclass
class EnrollmentState:
    state: str = "starting"
    message: str = "checking the local preconditions"
    action: str = ""
    attempts: int = 0
    since: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _writable(directory: Path) -> str | None:
    """None if the agent can create files in ``directory`` (made if missing), else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = directory / f".byoc-agent-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{directory} is not writable by uid {os.geteuid()}: {exc.strerror}"
    return None


def local_problems(config: AgentConfig) -> list[str]:
    """Everything that would make the agent fail after the token is spent, each with its fix."""
    from agent.daemon import load_trusted_keys  # noqa: PLC0415  # the daemon's loader, no cycle

    assert config.enroll is not None  # noqa: S101  # checked by the caller
    problems: list[str] = []
    try:
        x509.load_pem_x509_certificates(config.enroll.ca_bundle.read_bytes())
    except (OSError, ValueError) as exc:
        problems.append(
            f"cannot use the enrollment CA bundle {config.enroll.ca_bundle} ({exc}): put the "
            "vendor's ca.pem there (in Kubernetes: the ConfigMap byoc-agent-config)"
        )
    try:
        keys = config.commands.trusted_keys or (config.commands.root_key,)
        load_trusted_keys(tuple(k for k in keys if k is not None))
    except ConfigError as exc:
        problems.append(f"{exc}: put the vendor's command-signing public key there")
    try:
        read_policy(config.policy)
    except (PolicyError, ConfigError, OSError) as exc:
        problems.append(f"the policy {config.policy} is not usable: {exc}")
    problem = _driver_problem(config)
    if problem:
        problems.append(problem)
    cp = config.control_plane
    directories = {
        cp.client_key.parent, cp.client_cert.parent, cp.ca_bundle.parent,
        config.state_dir, config.audit_log.parent, config.control_socket.parent,
    }  # fmt: skip
    for directory in sorted(directories):
        why = _writable(directory)
        if why:
            problems.append(
                f"{why}: in Kubernetes, check that the state volume is mounted there and the "
                "pod sets fsGroup"
            )
    return problems


def _driver_problem(config: AgentConfig) -> str | None:
    from agent.drivers import load_driver_factory  # noqa: PLC0415

    try:
        load_driver_factory(config.driver_kind)
        if config.driver_kind == "kubernetes":
            from agent.drivers.kubernetes import KubernetesSettings  # noqa: PLC0415

            KubernetesSettings.from_table(config.driver_settings)
    except (ConfigError, AgentError) as exc:
        return f"the driver's settings are not usable: {exc}"
    return None


def _read_token(path: Path) -> tuple[str | None, str]:
    """(token, "") or (None, why there is none)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None, f"no enrollment token at {path}"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read the enrollment token {path}: {exc}"
    if not token:
        return None, f"the enrollment token file {path} is empty"
    if len(token) > MAX_TOKEN or any(c.isspace() for c in token):
        return None, f"{path} does not hold one enrollment token (one line, no spaces)"
    return token, ""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Bootstrap:
    def __init__(
        self,
        config: AgentConfig,
        *,
        log: structlog.typing.FilteringBoundLogger,
        events: EventSink | None = None,
    ) -> None:
        assert config.enroll is not None  # noqa: S101  # ensure_enrolled checks
        self.config = config
        self.settings: EnrollConfig = config.enroll
        self.log = log
        self.events = events
        self.state = EnrollmentState(since=time.time())
        self._posted: tuple[str, str] | None = None
        self._backoff = Backoff(config.tunnel.backoff)

    # -- what it says ------------------------------------------------------------------------

    def _ready(self) -> tuple[bool, str]:
        return False, f"not enrolled: {self.state.state}: {self.state.message}"

    async def _control(self, request: Mapping[str, Any], operator: Operator) -> dict[str, object]:
        if request.get("op") == "status":
            return {"ok": True, "status": {"phase": "enrolling", "version": __version__,
                                           "enrollment": self.state.to_json()}}  # fmt: skip
        return {"ok": False, "error": "not_enrolled", "message": self._ready()[1]}

    async def _report(self, state: str, message: str, action: str) -> None:
        """A new state: log it once, post an Event once, show it in /readyz and status."""
        changed = (state, message) != (self.state.state, self.state.message)
        self.state = EnrollmentState(state, message, action, self.state.attempts, time.time())
        if not changed:
            return
        level = self.log.info if state == "enrolled" else self.log.error
        level("enrollment_" + state, detail=message, action=action)
        if self.events is not None and (state, message) != self._posted:
            self._posted = (state, message)
            reason = EVENT_REASONS.get(state, "EnrollmentBlocked")
            failed = await self.events.post(
                warning=state != "enrolled", reason=reason, message=f"{message}. {action}".strip()
            )
            if failed:
                self.log.warning("pod_event_not_posted", reason=reason, error=failed)

    # -- what it does ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> bool:
        """Enroll, waiting as long as needed; False if ``stop`` was set first."""
        health = None
        if self.config.health_listen is not None:
            host, port = self.config.health_listen
            health = HealthServer(
                host=host, port=port, ready=self._ready,
                live=lambda: (True, f"waiting to enroll: {self.state.state}"),
                metrics=lambda: (b"# TYPE byoc_agent_enrolled gauge\nbyoc_agent_enrolled 0\n",
                                 "text/plain; version=0.0.4; charset=utf-8"),
                log=self.log.bind(component="health"),
            )  # fmt: skip
        control = ControlSocketServer(
            self.config.control_socket, self._control, self.log.bind(component="control")
        )
        started: list[HealthServer | ControlSocketServer] = []
        try:
            for server in (health, control):
                if server is None:
                    continue
                try:
                    await server.start()
                except (OSError, AgentError) as exc:  # the agent itself will say it again
                    self.log.warning("bootstrap_listener_failed", error=str(exc))
                    continue
                started.append(server)
            return await self._loop(stop)
        finally:
            for server in reversed(started):
                await server.close()

    async def _loop(self, stop: asyncio.Event) -> bool:
        refused: str | None = None
        while not stop.is_set():
            problems = await asyncio.to_thread(local_problems, self.config)
            if problems:
                await self._report("blocked", "; ".join(problems), "fix it; the agent checks "
                                   f"again every {self.settings.check_interval:g} s")  # fmt: skip
                if await _wait(stop, self.settings.check_interval):
                    return False
                continue
            token, why = _read_token(self.settings.token_file)
            if token is None or _digest(token) == refused:
                if token is None:
                    await self._report("waiting_for_token", why, self._token_action())
                if await _wait(stop, self.settings.check_interval):
                    return False
                continue
            outcome = await self._attempt(token)
            if outcome == "enrolled":
                return True
            if outcome == "refused":
                refused = _digest(token)
                continue
            if await _wait(stop, self._backoff.next_delay()):
                return False
        return False

    def _token_action(self) -> str:
        namespace = os.environ.get("POD_NAMESPACE", "NAMESPACE")
        return (
            "get a new one-time token from the vendor (cp-stub enroll-token --agent-id ID) and "
            f"replace the Secret: kubectl -n {namespace} create secret generic {SECRET_NAME} "
            "--from-file=token=TOKEN_FILE --dry-run=client -o yaml | kubectl apply -f - ; "
            "the agent tries again when the mounted file changes (within about a minute). "
            f"Outside Kubernetes: write it to {self.settings.token_file}"
        )

    async def _attempt(self, token: str) -> str:
        from agent.daemon import single_instance  # noqa: PLC0415
        from agent.enroll import EnrollmentFailed, enroll  # noqa: PLC0415

        cp = self.config.control_plane
        self.state.attempts += 1
        self.log.info("enrollment_attempt", url=self.settings.url, attempt=self.state.attempts)
        try:
            with single_instance(self.config.state_dir):
                done = await asyncio.to_thread(
                    enroll,
                    control_plane=self.settings.url,
                    token=token,
                    trust=self.settings.ca_bundle,
                    client_key=cp.client_key,
                    client_cert=cp.client_cert,
                    ca_bundle=cp.ca_bundle,
                    expected_id=self.config.agent_id,
                    # Only ever called without a certificate: a key left by an enrollment that
                    # did not finish holds no identity, and is replaced.
                    force=True,
                )
        except EnrollmentFailed as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                await self._report("token_refused", str(exc), self._token_action())
                return "refused"
            if exc.spent:  # issued, but unusable or not kept here: the token is used up
                await self._report(
                    "blocked",
                    str(exc),
                    "fix what it names (the state volume, the agent id), then replace the "
                    "token in the Secret byoc-agent-enroll: this one is spent",
                )
                return "refused"
            await self._report(
                "unreachable",
                str(exc),
                f"check egress to {self.settings.url} (port 443: NetworkPolicy, proxy, DNS); "
                "the agent retries with backoff",
            )
            return "retry"
        except AgentError as exc:  # another agent holds the state directory
            await self._report("blocked", str(exc), "stop the other agent")
            return "retry"
        except OSError as exc:  # the state directory's lock (enroll reports its own writes)
            await self._report(
                "blocked", f"cannot use the state directory: {exc}", "fix the state volume",
            )  # fmt: skip
            return "retry"
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(done.not_after))
        await self._report(
            "enrolled",
            f"enrolled as {done.agent_id}; certificate valid until {expires}, key made in the pod",
            "delete the Secret byoc-agent-enroll: the token is spent",
        )
        return "enrolled"


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True if stopped."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


def _pod_events(config: AgentConfig) -> EventSink | None:
    """Events about the agent's own pod, when it runs in one with the kubernetes driver."""
    if config.driver_kind != "kubernetes":
        return None
    from agent.core.toml_tables import Table  # noqa: PLC0415
    from agent.drivers.kubernetes import TABLE_KEYS as KEYS  # noqa: PLC0415
    from agent.drivers.kubernetes import ApiSettings, PodEvents, PodRef  # noqa: PLC0415

    pod = PodRef.from_environment()
    if pod is None:
        return None
    try:
        api = ApiSettings.from_table(
            Table("driver.kubernetes", dict(config.driver_settings), KEYS, ConfigError)
        )
    except ConfigError:
        return None  # reported among the local problems
    return PodEvents(api, pod)


async def ensure_enrolled(
    config: AgentConfig, *, events: EventSink | None = None, install_signal_handlers: bool = True
) -> bool:
    """True once the agent has a certificate; False if told to stop while waiting for one."""
    cp = config.control_plane
    if cp.client_cert.exists():
        return True
    if config.enroll is None:
        raise ConfigError(
            f"no client certificate at {cp.client_cert}: enroll first (byoc-agent enroll "
            "--token - ...), or set [enroll] token_file to enroll at start"
        )
    log = structlog.get_logger("agent").bind(logger="agent", component="bootstrap")
    sink = events if events is not None else _pod_events(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        return await Bootstrap(config, log=log, events=sink).run(stop)
    finally:
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if sink is not None:
            await sink.close()


__all__ = ["Bootstrap", "EnrollmentState", "ensure_enrolled", "local_problems"]
