"""The reference configuration and policy shipped in systemd/ stay valid."""

from __future__ import annotations

from pathlib import Path

from agent.config import parse_config
from agent.core.commands import OpenStream
from agent.core.policy import Policy, Verdict
from agent.core.targets import parse_target
from agent.drivers.process import ProcessDriverSettings
from byoc_demo.layout import REFERENCE_POLICY

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def test_reference_agent_config_parses_with_the_documented_defaults() -> None:
    path = SYSTEMD / "agent.toml"
    config = parse_config(path.read_bytes(), source=path)
    assert config.control_plane.port == 443
    assert config.tunnel.heartbeat.interval == 15.0
    assert config.tunnel.backoff.cap == 60.0
    assert config.commands.max_lifetime == 900.0
    assert config.control_socket == Path("/run/byoc-agent/control.sock")
    settings = ProcessDriverSettings.from_mapping(config.driver_settings)
    assert settings.stop_on_close is False


def test_reference_policy_is_shipped_and_parses() -> None:
    text = (SYSTEMD / "policy.toml").read_text()
    assert text == REFERENCE_POLICY
    policy = Policy.from_toml(text.encode())
    assert policy.scale is not None
    assert policy.scale.max_replicas == 6


def test_the_reference_config_runs_what_the_reference_policy_allows() -> None:
    """README's examples with the reference files work as written (issue 13): the upgrade to
    2.0.0 is a release the process driver knows, and a stream may reach every port its
    replicas can get (it once allowed 21000-21999 while they ran on 20000-20999)."""
    path = SYSTEMD / "agent.toml"
    settings = ProcessDriverSettings.from_mapping(
        parse_config(path.read_bytes(), source=path).driver_settings
    )
    policy = Policy.from_toml((SYSTEMD / "policy.toml").read_bytes())
    assert policy.upgrade is not None
    for version in ("1.0.0", "2.0.0"):
        assert version in settings.versions
        assert version in policy.upgrade.versions
    low, high = settings.port_range
    for port in (low, (low + high) // 2, high):
        command = OpenStream(target=parse_target(f"{settings.host}:{port}"), max_duration=60)
        assert policy.decide(command).verdict is Verdict.ALLOW, port
