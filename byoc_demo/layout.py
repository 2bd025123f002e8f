"""The files of a demo installation: agent configuration, customer policy, workload releases.

Used by ``make demo`` and by the end-to-end tests, so both run exactly what a user would.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEMO_AGENT_ID: Final = "agent-1"
DEMO_ISSUER: Final = "cp-stub"
GOOD_VERSIONS: Final = ("1.0.0", "2.0.0")
BROKEN_VERSION: Final = "2.1.0"
"""A release whose health check fails (a schema migration that does not work)."""

REFERENCE_POLICY: Final = """\
# The customer's policy for this host. Anything not allowed here is refused, however validly
# signed. Edit it and the agent picks the change up (or send SIGHUP).
version = 1

[scale]
allow = true
min_replicas = 1
max_replicas = 6
approval_above = 4          # more than 4 replicas costs money: a person on the host approves

[upgrade]
allow = true
versions = ["1.0.0", "2.0.0", "2.1.0"]
require_approval = false

[collect_metrics]
allow = true
targets = ["workload", "host"]

[open_stream]               # streams: the control plane reaching a port here, through the agent
allow = true
targets = ["127.0.0.1:20000-20999"]   # the process driver's replicas (port_range)
max_duration = 600
require_approval = false

[approvals]                 # who may approve or deny pending commands on this host
users = ["root"]
groups = ["byoc-operators"]
"""


def demo_policy(approver: str | None = None, stream_ports: tuple[int, int] = (20000, 20999)) -> str:
    """The reference policy, with the user running the demo allowed to approve.

    In the demo the agent runs as that same user, which a production policy should not allow
    (its workload may share the agent's user); see README.md, "Policy"."""
    user = approver or getpass.getuser()
    return REFERENCE_POLICY.replace('users = ["root"]', f"users = [{_toml(user)}]").replace(
        "127.0.0.1:20000-20999", f"127.0.0.1:{stream_ports[0]}-{stream_ports[1]}"
    )


def _toml(value: object) -> str:
    """TOML for the few value types a configuration here uses (JSON is valid TOML for them)."""
    return json.dumps(value)


def workload_argv(extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "{python}",
        "-m",
        "byoc_demo.workload",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--version",
        "{version}",
        *extra,
    ]


@dataclass(frozen=True, kw_only=True)
class DemoPaths:
    root: Path
    config: Path
    policy: Path
    audit_log: Path
    state_dir: Path
    control_socket: Path


def write_agent_files(
    root: Path,
    *,
    pki: Path,
    control_plane_port: int,
    agent_id: str = DEMO_AGENT_ID,
    run_dir: Path | None = None,
    port_range: tuple[int, int] = (21000, 21999),
    policy: str | None = None,
    heartbeat_interval: float = 15.0,
    heartbeat_timeout: float = 45.0,
    handshake_timeout: float = 10.0,
    backoff_base: float = 0.5,
    backoff_cap: float = 10.0,
    tls_rejected_retry: float = 300.0,
    max_peer_deferrals: int = 1000,
    shutdown_grace: float = 30.0,
    max_lifetime: float = 900.0,
    clock_skew: float = 60.0,
    command_timeout: float = 900.0,
    command_rate: float = 10.0,
    command_burst: int = 50,
    stop_on_close: bool = True,
    log_level: str = "info",
    server_name: str | None = None,
    control_plane_host: str = "localhost",
    connect_to: str | None = None,
    proxy: str | None = None,
    proxy_credentials_file: Path | None = None,
    root_key: Path | None = None,
    keyset: Path | None = None,
    health_listen: str = "127.0.0.1:0",
) -> DemoPaths:
    """Write an agent configuration and policy under ``root``; return where everything is.

    ``run_dir`` holds the control socket; Unix socket paths are limited to 107 bytes, so callers
    with deep temporary directories pass a short one.
    """
    root.mkdir(parents=True, exist_ok=True)
    run = run_dir or (root / "run")
    paths = DemoPaths(
        root=root,
        config=root / "agent.toml",
        policy=root / "policy.toml",
        audit_log=root / "audit" / "audit.jsonl",
        state_dir=root / "state",
        control_socket=run / "control.sock",
    )
    paths.policy.write_text(demo_policy(stream_ports=port_range) if policy is None else policy)
    versions = {version: {"argv": workload_argv()} for version in GOOD_VERSIONS}
    versions[BROKEN_VERSION] = {
        "argv": workload_argv(("--fail-health", "schema migration 0042 failed"))
    }
    version_tables = "\n".join(
        f"[driver.process.versions.{_toml(version)}]\nargv = {_toml(spec['argv'])}\n"
        for version, spec in versions.items()
    )
    optional = {
        "server_name": server_name,
        "connect_to": connect_to,
        "proxy": proxy,
        "proxy_credentials_file": str(proxy_credentials_file) if proxy_credentials_file else None,
    }
    server_name_line = "".join(
        f"{key} = {_toml(value)}\n" for key, value in optional.items() if value is not None
    )
    host = f"[{control_plane_host}]" if ":" in control_plane_host else control_plane_host
    if root_key is None:  # a fixed list of command keys
        command_keys = f"trusted_keys = [{_toml(str(pki / 'command-signing.pub'))}]"
    else:  # key sets signed by an offline root (key rotation)
        command_keys = f"root_key = {_toml(str(root_key))}"
        if keyset is not None:
            command_keys += f"\nkeyset = {_toml(str(keyset))}"
    paths.config.write_text(
        f"""\
# byoc-agent configuration (demo). Reference: systemd/agent.toml.
[agent]
id = {_toml(agent_id)}
state_dir = {_toml(str(paths.state_dir))}
audit_log = {_toml(str(paths.audit_log))}
policy = {_toml(str(paths.policy))}
control_socket = {_toml(str(paths.control_socket))}
shutdown_grace = {shutdown_grace}
log_level = {_toml(log_level)}

[control_plane]
url = "wss://{host}:{control_plane_port}/v1/agent"
{server_name_line}ca_bundle = {_toml(str(pki / "server-ca.pem"))}
client_cert = {_toml(str(pki / "agents" / f"{agent_id}.pem"))}
client_key = {_toml(str(pki / "agents" / f"{agent_id}.key"))}

[tunnel]
heartbeat_interval = {heartbeat_interval}
heartbeat_timeout = {heartbeat_timeout}
handshake_timeout = {handshake_timeout}
backoff_base = {backoff_base}
backoff_cap = {backoff_cap}
tls_rejected_retry = {tls_rejected_retry}
max_peer_deferrals = {max_peer_deferrals}

[commands]
{command_keys}
issuers = [{_toml(DEMO_ISSUER)}]
max_lifetime = {max_lifetime}
clock_skew = {clock_skew}
command_timeout = {command_timeout}
rate = {command_rate}
burst = {command_burst}

[health]
listen = {_toml(health_listen)}

[driver]
kind = "process"

[driver.process]
initial_version = "1.0.0"
host = "127.0.0.1"
port_range = [{port_range[0]}, {port_range[1]}]
start_timeout = 8.0
stop_timeout = 5.0
stop_on_close = {"true" if stop_on_close else "false"}

{version_tables}"""
    )
    return paths
