"""The reference configuration and policy shipped in systemd/ stay valid."""

from __future__ import annotations

from pathlib import Path

from agent.config import UpdateConfig, parse_config
from agent.core.policy import Policy
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
    # [update] spells out every default (the commented ca_bundle excepted)
    assert config.update == UpdateConfig(
        release_keys=(Path("/etc/byoc-agent/keys/release-signing.pub"),)
    )


def test_reference_policy_is_shipped_and_parses() -> None:
    text = (SYSTEMD / "policy.toml").read_text()
    assert text == REFERENCE_POLICY
    policy = Policy.from_toml(text.encode())
    assert policy.scale is not None
    assert policy.scale.max_replicas == 6
    assert policy.update_agent is not None
    assert policy.update_agent.require_approval  # the reference asks a person for every update
    assert not policy.update_agent.allow_downgrade
