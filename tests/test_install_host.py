"""scripts/install-host.sh (``make install``) staged into a directory (DESTDIR): what lands
where, with which modes, and a configuration the agent accepts. systemd is not PID 1 here, so
nothing is enabled; the script says so."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.core.policy import Policy
from agent.drivers.systemd import SystemdSettings
from tests.processes import REPO


def stage(tmp_path: Path, driver: str) -> Path:
    root = tmp_path / "root"
    done = subprocess.run(
        ["sh", str(REPO / "scripts" / "install-host.sh")],
        env={**os.environ, "DESTDIR": str(root), "DRIVER": driver},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"staged into {root}" in done.stdout
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("driver", ["process", "systemd"])
def test_install_stages_unit_user_directories_and_config(tmp_path: Path, driver: str) -> None:
    root = stage(tmp_path, driver)
    assert (root / "etc/systemd/system/byoc-agent.service").read_text() == (
        REPO / "systemd/byoc-agent.service"
    ).read_text()
    assert (root / "usr/lib/sysusers.d/byoc-agent.conf").exists()
    config = root / "etc/byoc-agent/agent.toml"
    assert mode(config) == 0o640
    assert mode(root / "etc/byoc-agent/policy.toml") == 0o640
    Policy.from_toml((root / "etc/byoc-agent/policy.toml").read_bytes())
    parsed = parse_config(config.read_bytes(), source=Path("/etc/byoc-agent/agent.toml"))
    assert parsed.driver_kind == driver
    if driver == "systemd":
        SystemdSettings.from_table(parsed.driver_settings)  # the sample is a valid configuration
        dropin = root / "etc/systemd/system/byoc-agent.service.d/systemd-driver.conf"
        assert "ReadWritePaths=/opt/milvus" in dropin.read_text()
        rule = (root / "etc/polkit-1/rules.d/50-byoc-agent.rules").read_text()
        assert "manage-unit-files" not in rule.split("// Nothing else")[0]
        assert (root / "opt/milvus/releases").is_dir()


def test_install_never_overwrites_an_edited_configuration(tmp_path: Path) -> None:
    root = stage(tmp_path, "systemd")
    config = root / "etc/byoc-agent/agent.toml"
    config.write_text(config.read_text() + "\n# edited by the customer\n")
    stage(tmp_path, "systemd")
    assert config.read_text().endswith("# edited by the customer\n")
