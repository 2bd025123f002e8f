"""The agent's configuration file (TOML), parsed into frozen dataclasses.

Relative paths are resolved against the directory of the configuration file. The reference,
with every key and its default, is ``systemd/agent.toml`` and README.md ("Configuration").
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from agent.core.backoff import BackoffSettings
from agent.core.errors import ConfigError
from agent.core.session import HeartbeatSettings
from agent.core.targets import TargetError, parse_listen
from agent.core.toml_tables import Table
from agent.io.event_loop import EVENT_LOOPS
from agent.io.proxy_url import normalize_proxy_url
from agent.io.streams import StreamSettings
from agent.logs import LEVELS as LOG_LEVELS

DEFAULT_CONFIG_PATH: Final = Path("/etc/byoc-agent/agent.toml")
AGENT_ID_PATTERN: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True, kw_only=True)
class ControlPlaneConfig:
    url: str
    host: str
    port: int
    ca_bundle: Path
    client_cert: Path
    client_key: Path
    server_name: str | None = None
    """Verify the server certificate (and send SNI) for this name instead of the URL's host."""
    connect_timeout: float = 10.0
    connect_to: tuple[str, int] | None = None
    """Dial this address instead of the URL's host (a private endpoint); TLS still verifies
    ``verify_name``. Not used through a proxy."""
    proxy: str = "environment"
    """``environment`` (HTTPS_PROXY / NO_PROXY), ``none``, or ``http(s)://host:port``."""
    proxy_credentials_file: Path | None = None
    """A file holding ``user:password`` for the proxy (mode 0600), instead of the URL."""
    renew: bool = True
    """Renew the client certificate over the tunnel at two thirds of its life (renewal.py)."""

    @property
    def verify_name(self) -> str:
        return self.server_name or self.host


@dataclass(frozen=True, kw_only=True)
class EnrollConfig:
    """``[enroll]``: enroll at first start from a one-time token file (agent/bootstrap.py), e.g.
    a Kubernetes Secret mounted in the pod, instead of a person running ``byoc-agent enroll``."""

    url: str
    """The control plane's enrollment endpoint, ``https://``."""
    token_file: Path
    ca_bundle: Path
    """Verifies the enrollment endpoint (default: ``control_plane.ca_bundle``)."""
    check_interval: float = 10.0
    """While waiting (no token yet, a refused one, a local problem): how often to look again."""


@dataclass(frozen=True, kw_only=True)
class TunnelConfig:
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    send_timeout: float = 10.0


@dataclass(frozen=True, kw_only=True)
class CommandsConfig:
    trusted_keys: tuple[Path, ...]
    """A fixed list of command-signing keys; or, instead, ``root_key``."""
    issuers: frozenset[str]
    root_key: Path | None = None
    """The offline root that signs key sets (docs/PROTOCOL.md §5.4): the initial trust anchor."""
    keyset: Path | None = None
    """A first signed key set to accept at start, if none was accepted before."""
    max_lifetime: float = 900.0
    clock_skew: float = 60.0
    max_pending: int = 64
    """Commands accepted but not finished (queued, awaiting approval, running) at any time."""
    rate: float = 10.0
    burst: int = 50
    command_timeout: float = 900.0


@dataclass(frozen=True, kw_only=True)
class UpdateConfig:
    """``[update]``: the agent updating itself (agent/update, README "Updating the agent")."""

    root: Path = Path("/opt/byoc-agent")
    """``releases/<version>/`` and the ``current`` link the unit runs."""
    release_keys: tuple[Path, ...] = ()
    """Ed25519 public keys (PEM) that sign release bundles, unless the key set in force names
    its own (``release_keys`` in a key set, docs/PROTOCOL.md §5.4)."""
    max_bundle_bytes: int = 256 * 1024 * 1024
    download_timeout: float = 300.0
    install_timeout: float = 600.0
    """Seconds each of making the venv, installing the wheels and the self-test may take."""
    trial_deadline: float = 300.0
    """Seconds from the switch for the new release to reach a connected, healthy session."""
    trial_settle: float = 10.0
    """...and to stay connected, without a reconnect, this long."""
    max_attempts: int = 3
    """Starts of the new release during its trial before the guard rolls it back."""
    ca_bundle: Path | None = None
    """Verify https bundle URLs with this CA bundle instead of the default (certifi)."""


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    source: Path
    agent_id: str | None
    state_dir: Path
    audit_log: Path
    policy: Path
    control_socket: Path
    shutdown_grace: float
    log_level: str
    control_plane: ControlPlaneConfig
    tunnel: TunnelConfig
    commands: CommandsConfig
    driver_kind: str
    driver_settings: Mapping[str, object]
    streams: StreamSettings = field(default_factory=StreamSettings)
    event_loop: str = "asyncio"
    """``asyncio`` or ``uvloop`` (the ``fast`` extra): agent/io/event_loop.py."""
    health_listen: tuple[str, int] | None = ("127.0.0.1", 9464)
    """Where /healthz, /livez, /readyz and /metrics are served (agent/io/health.py); None: off."""
    enroll: EnrollConfig | None = None
    """Self-enrollment at first start; None: enroll with ``byoc-agent enroll``."""
    update: UpdateConfig | None = None
    """Self-update (``update_agent``); None: the command answers ``not_supported``."""


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _control_plane(t: Table, base: Path) -> ControlPlaneConfig:
    url = t.string("url")
    parts = urlsplit(url)
    if parts.scheme != "wss":
        raise ConfigError("control_plane.url must start with wss:// (TLS is not optional)")
    if not parts.hostname:
        raise ConfigError("control_plane.url has no host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("control_plane.url must not carry credentials, a query or a fragment")
    try:
        port = 443 if parts.port is None else parts.port
    except ValueError as exc:
        raise ConfigError(f"control_plane.url: {exc}") from exc
    if not 0 < port < 65536:
        raise ConfigError(f"control_plane.url: port {port} is not a valid port")
    credentials = t.optional_string("proxy_credentials_file")
    return ControlPlaneConfig(
        url=url,
        host=parts.hostname,
        port=port,
        ca_bundle=_path(base, t.string("ca_bundle")),
        client_cert=_path(base, t.string("client_cert")),
        client_key=_path(base, t.string("client_key")),
        server_name=t.optional_string("server_name"),
        connect_timeout=t.number("connect_timeout", 10.0, low=0.1, high=300.0),
        connect_to=_connect_to(t.optional_string("connect_to"), port),
        proxy=_proxy(t.string("proxy", "environment"), replaced=credentials is not None),
        proxy_credentials_file=_path(base, credentials) if credentials else None,
        renew=t.boolean("renew", True),
    )


def _connect_to(value: str | None, default_port: int) -> tuple[str, int] | None:
    """``10.0.0.5``, ``10.0.0.5:8443``, ``fd00::5``, ``[fd00::5]:8443`` or a host name."""
    if value is None:
        return None
    bare_ipv6 = value.count(":") > 1 and not value.startswith("[")
    parts = urlsplit(f"//[{value}]" if bare_ipv6 else f"//{value}")
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"control_plane.connect_to: {exc}") from exc
    if not parts.hostname or parts.path or parts.username:
        raise ConfigError("control_plane.connect_to must be HOST or HOST:PORT")
    return parts.hostname, port


def _proxy(value: str, *, replaced: bool) -> str:
    if value in ("environment", "none"):
        return value
    # Checked again (and the credentials file applied) for every connection: agent/io/egress.py.
    return normalize_proxy_url(value, source="control_plane.proxy", credentials_replaced=replaced)


def _tunnel(t: Table) -> TunnelConfig:
    try:
        heartbeat = HeartbeatSettings(
            interval=t.number("heartbeat_interval", 15.0, low=0.05, high=3600.0),
            timeout=t.number("heartbeat_timeout", 45.0, low=0.1, high=7200.0),
            handshake_timeout=t.number("handshake_timeout", 10.0, low=0.1, high=300.0),
            max_peer_errors=t.integer("max_peer_errors", 100, low=1, high=1_000_000),
            peer_error_window=t.number("peer_error_window", 60.0, low=0.1, high=86_400.0),
            max_peer_deferrals=t.integer("max_peer_deferrals", 1000, low=1, high=1_000_000),
        )
        backoff = BackoffSettings(
            base=t.number("backoff_base", 1.0, low=0.01, high=600.0),
            cap=t.number("backoff_cap", 60.0, low=0.01, high=3600.0),
            tls_rejected=t.number("tls_rejected_retry", 300.0, low=0.01, high=86400.0),
        )
    except ValueError as exc:
        raise ConfigError(f"[tunnel]: {exc}") from exc
    return TunnelConfig(
        heartbeat=heartbeat,
        backoff=backoff,
        send_timeout=t.number("send_timeout", 10.0, low=0.1, high=600.0),
    )


def _commands(t: Table, base: Path) -> CommandsConfig:
    keys = tuple(_path(base, p) for p in t.strings("trusted_keys"))
    root = t.optional_string("root_key")
    keyset = t.optional_string("keyset")
    if bool(keys) == bool(root):
        raise ConfigError(
            "commands: set either trusted_keys (a fixed list of command keys) or root_key "
            "(key sets signed by an offline root), not both and not neither"
        )
    if keyset and not root:
        raise ConfigError("commands.keyset needs commands.root_key to verify it")
    issuers = frozenset(t.strings("issuers"))
    if not issuers:
        raise ConfigError("commands.issuers must name at least one accepted issuer")
    return CommandsConfig(
        trusted_keys=keys,
        issuers=issuers,
        root_key=_path(base, root) if root else None,
        keyset=_path(base, keyset) if keyset else None,
        max_lifetime=t.number("max_lifetime", 900.0, low=1.0, high=86400.0),
        clock_skew=t.number("clock_skew", 60.0, low=0.0, high=600.0),
        max_pending=t.integer("max_pending", 64, low=1, high=10_000),
        rate=t.number("rate", 10.0, low=0.01, high=100_000.0),
        burst=t.integer("burst", 50, low=1, high=1_000_000),
        command_timeout=t.number("command_timeout", 900.0, low=0.1, high=86_400.0),
    )


def parse_config(data: bytes, *, source: Path) -> AgentConfig:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # absurd nesting, 5,000-digit integers
        raise ConfigError(f"{source}: not a usable configuration: {type(exc).__name__}") from exc
    root = Table(
        "config",
        doc,
        {
            "agent",
            "control_plane",
            "tunnel",
            "commands",
            "streams",
            "health",
            "driver",
            "enroll",
            "update",
        },
        ConfigError,
    )
    base = source.parent
    agent = Table(
        "agent",
        doc.get("agent", {}),
        {
            "id",
            "state_dir",
            "audit_log",
            "policy",
            "control_socket",
            "shutdown_grace",
            "log_level",
            "event_loop",
        },
        ConfigError,
    )
    agent_id = agent.optional_string("id")
    if agent_id is not None and not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise ConfigError(f"agent.id must match {AGENT_ID_PATTERN.pattern}")
    log_level = agent.string("log_level", "info")
    event_loop = agent.string("event_loop", "asyncio")
    if event_loop not in EVENT_LOOPS:
        raise ConfigError(f"agent.event_loop must be one of {EVENT_LOOPS}")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"agent.log_level must be one of {LOG_LEVELS}")
    if not root.has("control_plane"):
        raise ConfigError("[control_plane] is required")
    if not root.has("commands"):
        raise ConfigError("[commands] is required")
    control_plane = Table(
        "control_plane",
        doc["control_plane"],
        {
            "url",
            "ca_bundle",
            "client_cert",
            "client_key",
            "server_name",
            "connect_timeout",
            "connect_to",
            "proxy",
            "proxy_credentials_file",
            "renew",
        },
        ConfigError,
    )
    tunnel = Table(
        "tunnel",
        doc.get("tunnel", {}),
        {
            "heartbeat_interval",
            "heartbeat_timeout",
            "handshake_timeout",
            "backoff_base",
            "backoff_cap",
            "tls_rejected_retry",
            "send_timeout",
            "max_peer_errors",
            "peer_error_window",
            "max_peer_deferrals",
        },
        ConfigError,
    )
    commands = Table(
        "commands",
        doc["commands"],
        {
            "trusted_keys",
            "root_key",
            "keyset",
            "issuers",
            "max_lifetime",
            "clock_skew",
            "max_pending",
            "rate",
            "burst",
            "command_timeout",
        },
        ConfigError,
    )
    streams = Table(
        "streams", doc.get("streams", {}), {"max_streams", "connect_timeout"}, ConfigError
    )
    health = Table("health", doc.get("health", {}), {"listen"}, ConfigError)
    driver_table = doc.get("driver", {"kind": "process"})
    if not isinstance(driver_table, dict):
        raise ConfigError("[driver] must be a table")
    driver_kind = driver_table.get("kind", "process")
    if not isinstance(driver_kind, str):
        raise ConfigError("driver.kind must be a string")
    unknown = sorted(set(driver_table) - {"kind", driver_kind})
    if unknown:
        raise ConfigError(
            f"[driver]: unknown key(s) {unknown} (settings go in [driver.{driver_kind}])"
        )
    driver_settings = driver_table.get(driver_kind, {})
    if not isinstance(driver_settings, dict):
        raise ConfigError(f"[driver.{driver_kind}] must be a table")
    cp = _control_plane(control_plane, base)
    return AgentConfig(
        source=source,
        agent_id=agent_id,
        state_dir=_path(base, agent.string("state_dir", "/var/lib/byoc-agent")),
        audit_log=_path(base, agent.string("audit_log", "/var/log/byoc-agent/audit.jsonl")),
        policy=_path(base, agent.string("policy", "/etc/byoc-agent/policy.toml")),
        control_socket=_path(base, agent.string("control_socket", "/run/byoc-agent/control.sock")),
        shutdown_grace=agent.number("shutdown_grace", 30.0, low=0.0, high=3600.0),
        log_level=log_level,
        control_plane=cp,
        tunnel=_tunnel(tunnel),
        commands=_commands(commands, base),
        driver_kind=driver_kind,
        driver_settings=driver_settings,
        streams=StreamSettings(
            max_streams=streams.integer("max_streams", 64, low=1, high=10_000),
            connect_timeout=streams.number("connect_timeout", 10.0, low=0.1, high=300.0),
        ),
        event_loop=event_loop,
        health_listen=_listen(health.string("listen", "127.0.0.1:9464")),
        enroll=_enroll(doc.get("enroll"), base, cp),
        update=_update(doc.get("update"), base),
    )


def _update(table: object, base: Path) -> UpdateConfig | None:
    if table is None:
        return None
    t = Table(
        "update",
        table,
        {
            "root",
            "release_keys",
            "max_bundle_bytes",
            "download_timeout",
            "install_timeout",
            "trial_deadline",
            "trial_settle",
            "max_attempts",
            "ca_bundle",
        },
        ConfigError,
    )
    ca_bundle = t.optional_string("ca_bundle")
    config = UpdateConfig(
        root=_path(base, t.string("root", "/opt/byoc-agent")),
        release_keys=tuple(_path(base, p) for p in t.strings("release_keys")),
        max_bundle_bytes=t.integer("max_bundle_bytes", 256 * 1024 * 1024, low=1024, high=2**34),
        download_timeout=t.number("download_timeout", 300.0, low=1.0, high=86_400.0),
        install_timeout=t.number("install_timeout", 600.0, low=1.0, high=86_400.0),
        trial_deadline=t.number("trial_deadline", 300.0, low=1.0, high=86_400.0),
        trial_settle=t.number("trial_settle", 10.0, low=0.0, high=3600.0),
        max_attempts=t.integer("max_attempts", 3, low=1, high=100),
        ca_bundle=_path(base, ca_bundle) if ca_bundle else None,
    )
    if config.trial_settle >= config.trial_deadline:
        raise ConfigError("update.trial_settle must be shorter than update.trial_deadline")
    return config


def _enroll(table: object, base: Path, cp: ControlPlaneConfig) -> EnrollConfig | None:
    if table is None:
        return None
    t = Table("enroll", table, {"url", "token_file", "ca_bundle", "check_interval"}, ConfigError)
    url = t.string("url")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise ConfigError("enroll.url must be https://host[:port] (no credentials)")
    ca_bundle = t.optional_string("ca_bundle")
    return EnrollConfig(
        url=url,
        token_file=_path(base, t.string("token_file")),
        ca_bundle=_path(base, ca_bundle) if ca_bundle else cp.ca_bundle,
        check_interval=t.number("check_interval", 10.0, low=0.01, high=3600.0),
    )


def _listen(value: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``) to listen on, or None for ``""``."""
    if not value:
        return None
    try:
        return parse_listen(value)
    except TargetError as exc:
        raise ConfigError(f"health.listen must be host:port (or empty to disable): {exc}") from exc


def load_config(path: Path) -> AgentConfig:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    return parse_config(data, source=path.resolve())
