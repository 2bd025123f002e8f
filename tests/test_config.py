"""Tests of the agent's configuration file (agent.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (
    AgentConfig,
    ControlPlaneConfig,
    TunnelConfig,
    load_config,
    parse_config,
)
from agent.core.backoff import BackoffSettings
from agent.core.errors import ConfigError
from agent.core.session import HeartbeatSettings

CONTROL_PLANE = """
[control_plane]
url = "wss://cp.example.com:8443/agent"
ca_bundle = "pki/server-ca.pem"
client_cert = "pki/agents/agent-1.pem"
client_key = "pki/agents/agent-1.key"
"""

COMMANDS = """
[commands]
trusted_keys = ["pki/command-signing.pub"]
issuers = ["byoc-control-plane"]
"""

MINIMAL = CONTROL_PLANE + COMMANDS

FULL = """
[agent]
id = "agent-1"
state_dir = "/var/lib/byoc"
audit_log = "logs/audit.jsonl"
policy = "/etc/byoc/policy.toml"
control_socket = "run/control.sock"
shutdown_grace = 12.5
log_level = "debug"

[control_plane]
url = "wss://cp.example.com/agent"
ca_bundle = "/etc/byoc/server-ca.pem"
client_cert = "certs/agent.pem"
client_key = "certs/agent.key"
server_name = "control-plane.internal"
connect_timeout = 3

[tunnel]
heartbeat_interval = 5
heartbeat_timeout = 20.5
handshake_timeout = 4
backoff_base = 0.5
backoff_cap = 30
tls_rejected_retry = 600
send_timeout = 7

[commands]
trusted_keys = ["keys/a.pub", "/etc/byoc/b.pub"]
issuers = ["cp-1", "cp-2"]
max_lifetime = 600
clock_skew = 30
max_pending = 16

[driver]
kind = "process"

[driver.process]
command = ["python3", "-m", "byoc_demo.workload"]
health_timeout = 10
env = { MODE = "demo" }
"""


def parse(text: str, tmp_path: Path) -> AgentConfig:
    return parse_config(text.encode("utf-8"), source=tmp_path / "agent.toml")


def config_error(text: str | bytes, tmp_path: Path) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=tmp_path / "agent.toml")
    return str(info.value)


def test_full_config(tmp_path: Path) -> None:
    config = parse(FULL, tmp_path)
    assert config == AgentConfig(
        source=tmp_path / "agent.toml",
        agent_id="agent-1",
        state_dir=Path("/var/lib/byoc"),
        audit_log=tmp_path / "logs" / "audit.jsonl",
        policy=Path("/etc/byoc/policy.toml"),
        control_socket=tmp_path / "run" / "control.sock",
        shutdown_grace=12.5,
        log_level="debug",
        control_plane=ControlPlaneConfig(
            url="wss://cp.example.com/agent",
            host="cp.example.com",
            port=443,
            ca_bundle=Path("/etc/byoc/server-ca.pem"),
            client_cert=tmp_path / "certs" / "agent.pem",
            client_key=tmp_path / "certs" / "agent.key",
            server_name="control-plane.internal",
            connect_timeout=3.0,
        ),
        tunnel=TunnelConfig(
            heartbeat=HeartbeatSettings(interval=5.0, timeout=20.5, handshake_timeout=4.0),
            backoff=BackoffSettings(base=0.5, cap=30.0, tls_rejected=600.0),
            send_timeout=7.0,
        ),
        commands=config.commands,
        driver_kind="process",
        driver_settings={
            "command": ["python3", "-m", "byoc_demo.workload"],
            "health_timeout": 10,
            "env": {"MODE": "demo"},
        },
    )
    assert config.commands.trusted_keys == (tmp_path / "keys" / "a.pub", Path("/etc/byoc/b.pub"))
    assert config.commands.issuers == frozenset({"cp-1", "cp-2"})
    assert config.commands.max_lifetime == 600.0
    assert config.commands.clock_skew == 30.0
    assert config.commands.max_pending == 16
    assert config.control_plane.verify_name == "control-plane.internal"
    assert isinstance(config.tunnel.heartbeat.interval, float)


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = parse(MINIMAL, tmp_path)
    assert config.agent_id is None
    assert config.state_dir == Path("/var/lib/byoc-agent")
    assert config.audit_log == Path("/var/log/byoc-agent/audit.jsonl")
    assert config.policy == Path("/etc/byoc-agent/policy.toml")
    assert config.control_socket == Path("/run/byoc-agent/control.sock")
    assert config.shutdown_grace == 30.0
    assert config.log_level == "info"
    assert config.tunnel == TunnelConfig()
    assert config.commands.max_lifetime == 900.0
    assert config.commands.clock_skew == 60.0
    assert config.commands.max_pending == 64
    assert config.driver_kind == "process"
    assert config.driver_settings == {}
    assert config.control_plane.server_name is None
    assert config.control_plane.verify_name == "cp.example.com"
    assert config.control_plane.connect_timeout == 10.0


def test_relative_paths_resolved_against_config_directory(tmp_path: Path) -> None:
    source = tmp_path / "etc" / "byoc" / "agent.toml"
    config = parse_config(MINIMAL.encode(), source=source)
    base = tmp_path / "etc" / "byoc"
    assert config.control_plane.ca_bundle == base / "pki" / "server-ca.pem"
    assert config.control_plane.client_cert == base / "pki" / "agents" / "agent-1.pem"
    assert config.control_plane.client_key == base / "pki" / "agents" / "agent-1.key"
    assert config.commands.trusted_keys == (base / "pki" / "command-signing.pub",)
    assert all(p.is_absolute() for p in config.commands.trusted_keys)


def test_home_directory_expanded(tmp_path: Path) -> None:
    config = parse('[agent]\nstate_dir = "~/byoc"\n' + MINIMAL, tmp_path)
    assert config.state_dir == Path("~/byoc").expanduser()
    assert config.state_dir.is_absolute()


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "agent.toml"
    path.parent.mkdir()
    path.write_text(MINIMAL)
    config = load_config(path)
    assert config.source == path.resolve()
    assert config.control_plane.ca_bundle == path.parent.resolve() / "pki" / "server-ca.pem"


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.toml")


# -- the URL --------------------------------------------------------------------------------------


def _with_url(url: str) -> str:
    return MINIMAL.replace("wss://cp.example.com:8443/agent", url)


def test_url_with_port(tmp_path: Path) -> None:
    cp = parse(MINIMAL, tmp_path).control_plane
    assert (cp.host, cp.port) == ("cp.example.com", 8443)


def test_default_port_443(tmp_path: Path) -> None:
    cp = parse(_with_url("wss://cp.example.com/agent"), tmp_path).control_plane
    assert (cp.host, cp.port) == ("cp.example.com", 443)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("wss://[::1]:8443/agent", "::1", 8443),
        ("wss://[2001:db8::5]/agent", "2001:db8::5", 443),
        ("wss://127.0.0.1:9000", "127.0.0.1", 9000),
    ],
)
def test_ip_literal_hosts(tmp_path: Path, url: str, host: str, port: int) -> None:
    cp = parse(_with_url(url), tmp_path).control_plane
    assert (cp.host, cp.port) == (host, port)
    assert cp.url == url


@pytest.mark.parametrize(
    "url",
    ["ws://cp.example.com/agent", "https://cp.example.com/agent", "cp.example.com", "WSS-x://a"],
)
def test_only_wss(tmp_path: Path, url: str) -> None:
    assert "wss://" in config_error(_with_url(url), tmp_path)


@pytest.mark.parametrize(
    "url",
    [
        "wss://user:secret@cp.example.com/agent",
        "wss://user@cp.example.com/agent",
        "wss://cp.example.com/agent?token=abc",
        "wss://cp.example.com/agent#frag",
    ],
)
def test_credentials_query_fragment_refused(tmp_path: Path, url: str) -> None:
    message = config_error(_with_url(url), tmp_path)
    assert "credentials, a query or a fragment" in message
    assert "secret" not in message


@pytest.mark.parametrize("url", ["wss:///agent", "wss://:8443/agent"])
def test_url_without_host(tmp_path: Path, url: str) -> None:
    assert "no host" in config_error(_with_url(url), tmp_path)


@pytest.mark.parametrize("url", ["wss://cp.example.com:99999/", "wss://cp.example.com:port/"])
def test_bad_port(tmp_path: Path, url: str) -> None:
    assert "control_plane.url" in config_error(_with_url(url), tmp_path)


def test_port_zero_refused(tmp_path: Path) -> None:
    # Port 0 is not a port one can connect to; it must not silently become 443.
    assert "control_plane.url" in config_error(_with_url("wss://cp.example.com:0/"), tmp_path)


def test_url_required(tmp_path: Path) -> None:
    text = MINIMAL.replace('url = "wss://cp.example.com:8443/agent"\n', "")
    assert "control_plane.url is required" in config_error(text, tmp_path)


# -- strictness -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("[logging]\nlevel = 'info'\n", "'logging'"),
        ("[agent]\nidentifier = 'x'\n", "'identifier'"),
        ("[tunnel]\nheartbeat = 5\n", "'heartbeat'"),
        ("[agent]\nlog-level = 'info'\n", "'log-level'"),
    ],
)
def test_unknown_keys_and_sections_named(tmp_path: Path, extra: str, named: str) -> None:
    message = config_error(MINIMAL + extra, tmp_path)
    assert "unknown key" in message
    assert named in message


def test_unknown_key_in_control_plane(tmp_path: Path) -> None:
    message = config_error(
        MINIMAL.replace("[control_plane]\n", "[control_plane]\nverify = false\n"), tmp_path
    )
    assert "[control_plane]" in message
    assert "'verify'" in message


def test_unknown_key_in_commands(tmp_path: Path) -> None:
    message = config_error(MINIMAL + "allow_unsigned = true\n", tmp_path)
    assert "[commands]" in message
    assert "'allow_unsigned'" in message


@pytest.mark.parametrize(
    ("fragment", "named"),
    [
        ("[agent]\nid = 5\n", "agent.id"),
        ("[agent]\nid = 'Agent_1'\n", "agent.id"),
        ("[agent]\nid = '-agent'\n", "agent.id"),
        ("[agent]\nstate_dir = 1\n", "agent.state_dir"),
        ("[agent]\nshutdown_grace = '30'\n", "agent.shutdown_grace"),
        ("[agent]\nshutdown_grace = true\n", "agent.shutdown_grace"),
        ("[agent]\nshutdown_grace = -1\n", "agent.shutdown_grace"),
        ("[agent]\nshutdown_grace = nan\n", "agent.shutdown_grace"),
        ("[agent]\nshutdown_grace = inf\n", "agent.shutdown_grace"),
        ("[agent]\nlog_level = 'verbose'\n", "agent.log_level"),
        ("[agent]\nlog_level = 10\n", "agent.log_level"),
        ("[tunnel]\nheartbeat_interval = '5'\n", "tunnel.heartbeat_interval"),
        ("[tunnel]\nheartbeat_timeout = 0\n", "tunnel.heartbeat_timeout"),
        ("[tunnel]\nbackoff_cap = false\n", "tunnel.backoff_cap"),
        ("[tunnel]\nsend_timeout = 601\n", "tunnel.send_timeout"),
        ("agent = 'x'\n", "[agent]"),
        ("tunnel = []\n", "[tunnel]"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(tmp_path: Path, fragment: str, named: str) -> None:
    # Top-level keys must come before any table in TOML.
    text = fragment + MINIMAL if not fragment.startswith("[") else MINIMAL + fragment
    assert named in config_error(text, tmp_path)


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ('ca_bundle = "pki/server-ca.pem"', "ca_bundle = 5", "control_plane.ca_bundle"),
        ('client_key = "pki/agents/agent-1.key"', "", "control_plane.client_key"),
        ('url = "wss://cp.example.com:8443/agent"', "url = ['wss://x']", "control_plane.url"),
        ('trusted_keys = ["pki/command-signing.pub"]', "trusted_keys = []", "trusted_keys"),
        ('trusted_keys = ["pki/command-signing.pub"]', "trusted_keys = 'k.pub'", "trusted_keys"),
        ('issuers = ["byoc-control-plane"]', "issuers = []", "commands.issuers"),
        ('issuers = ["byoc-control-plane"]', "issuers = [1]", "commands.issuers"),
        ('issuers = ["byoc-control-plane"]', "issuers = ['a']\nmax_pending = 0", "max_pending"),
        ('issuers = ["byoc-control-plane"]', "issuers = ['a']\nclock_skew = 601", "clock_skew"),
    ],
)
def test_section_values_name_the_key(tmp_path: Path, old: str, new: str, named: str) -> None:
    assert old in MINIMAL
    assert named in config_error(MINIMAL.replace(old, new), tmp_path)


def test_heartbeat_interval_must_be_below_timeout(tmp_path: Path) -> None:
    message = config_error(
        MINIMAL + "[tunnel]\nheartbeat_interval = 30\nheartbeat_timeout = 30\n", tmp_path
    )
    assert "[tunnel]" in message
    assert "interval" in message
    config_error(MINIMAL + "[tunnel]\nheartbeat_interval = 31\nheartbeat_timeout = 30\n", tmp_path)
    # Only the default timeout (45) is compared when the interval alone is set.
    assert "interval" in config_error(MINIMAL + "[tunnel]\nheartbeat_interval = 50\n", tmp_path)


def test_backoff_base_above_cap_refused(tmp_path: Path) -> None:
    message = config_error(MINIMAL + "[tunnel]\nbackoff_base = 10\nbackoff_cap = 5\n", tmp_path)
    assert "[tunnel]" in message
    assert "base" in message


@pytest.mark.parametrize(
    ("text", "named"),
    [(CONTROL_PLANE, "[commands]"), (COMMANDS, "[control_plane]"), ("", "[control_plane]")],
)
def test_missing_required_sections(tmp_path: Path, text: str, named: str) -> None:
    message = config_error(text, tmp_path)
    assert named in message
    assert "required" in message


@pytest.mark.parametrize("data", [b"[control_plane", b"url = ", b"\xff\xfe", b"a = 1\na = 2"])
def test_invalid_toml(tmp_path: Path, data: bytes) -> None:
    message = config_error(data, tmp_path)
    assert "not valid TOML" in message
    assert str(tmp_path / "agent.toml") in message


# -- driver ---------------------------------------------------------------------------------------


def test_driver_defaults_to_process(tmp_path: Path) -> None:
    config = parse(MINIMAL + "[driver]\n", tmp_path)
    assert config.driver_kind == "process"
    assert config.driver_settings == {}


def test_driver_settings_passed_through(tmp_path: Path) -> None:
    config = parse(
        MINIMAL
        + "[driver]\nkind = 'process'\n[driver.process]\nreplicas = 2\nport_range = [1, 9]\n",
        tmp_path,
    )
    assert config.driver_kind == "process"
    assert config.driver_settings == {"replicas": 2, "port_range": [1, 9]}


def test_other_driver_kind(tmp_path: Path) -> None:
    config = parse(
        MINIMAL + "[driver]\nkind = 'kubernetes'\n[driver.kubernetes]\nnamespace = 'demo'\n",
        tmp_path,
    )
    assert config.driver_kind == "kubernetes"
    assert config.driver_settings == {"namespace": "demo"}


def test_driver_settings_without_kind_mean_process(tmp_path: Path) -> None:
    config = parse(MINIMAL + "[driver.process]\nreplicas = 1\n", tmp_path)
    assert config.driver_kind == "process"
    assert config.driver_settings == {"replicas": 1}


@pytest.mark.parametrize(
    ("driver", "named"),
    [
        ("[driver]\nkind = 'process'\nreplicas = 2\n", "'replicas'"),
        ("[driver]\nkind = 'kubernetes'\n[driver.process]\nreplicas = 2\n", "'process'"),
        ("[driver]\nkind = 'process'\n[driver.proces]\nreplicas = 2\n", "'proces'"),
    ],
)
def test_unknown_keys_beside_driver_settings(tmp_path: Path, driver: str, named: str) -> None:
    message = config_error(MINIMAL + driver, tmp_path)
    assert "[driver]" in message
    assert named in message


def test_driver_kind_must_be_a_string(tmp_path: Path) -> None:
    assert "driver.kind" in config_error(MINIMAL + "[driver]\nkind = 3\n", tmp_path)


def test_driver_settings_must_be_a_table(tmp_path: Path) -> None:
    message = config_error(MINIMAL + "[driver]\nkind = 'process'\nprocess = 'fast'\n", tmp_path)
    assert "[driver.process] must be a table" in message


def test_driver_must_be_a_table(tmp_path: Path) -> None:
    assert "[driver] must be a table" in config_error("driver = 'process'\n" + MINIMAL, tmp_path)


def test_integer_too_large_for_a_float_names_the_key(tmp_path: Path) -> None:
    # TOML integers are parsed to unbounded Python ints; one beyond the float range must be
    # reported as a configuration error naming the key, like any other out-of-range value.
    huge = "9" * 400
    message = config_error(MINIMAL + f"[tunnel]\nsend_timeout = {huge}\n", tmp_path)
    assert "tunnel.send_timeout" in message
