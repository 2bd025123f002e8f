"""scripts/install-host.sh (``make install``).

On a real host: a Debian 12 container with systemd as PID 1 (tests/nspawn.py), where the
session fixture (tests/ec2_host.py) ran README "On an EC2 host", ``make install DRIVER=systemd``
first. What it made (users, groups, owners, modes, a venv pinned to constraints.txt), that a
second run changes nothing, that a staged install names the final paths, and that the
approvers' group it creates is what decides who may approve.

Staged into a directory on this machine (DESTDIR, WITH_VENV=0): the files and configuration
for both drivers, without systemd.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.core.policy import Policy
from agent.drivers.systemd import SystemdSettings
from tests.conftest import scaled
from tests.ec2_host import AGENT_ID, CLONE, LOOKER, OPERATOR, OUTSIDER, WHEELS, Ec2Host
from tests.processes import REPO

OFFLINE = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS}


# -- on a host with systemd ---------------------------------------------------------------------


def test_users_groups_directories_owners_and_modes(ec2_host: Ec2Host) -> None:
    machine = ec2_host.machine
    _, _, uid, _, _, home, shell = (
        machine.run("getent", "passwd", "byoc-agent").stdout.strip().split(":")
    )
    assert 0 < int(uid) < 1000
    assert (home, shell) == ("/", "/usr/sbin/nologin")
    operators = machine.run("getent", "group", "byoc-operators").stdout.strip().split(":")
    assert operators[3].split(",") == [OPERATOR]  # the README's usermod
    paths = {
        "/etc/byoc-agent": "755 root root",
        "/etc/byoc-agent/agent.toml": "640 root byoc-agent",
        "/etc/byoc-agent/policy.toml": "640 root byoc-agent",
        "/etc/byoc-agent/keys": "755 root root",
        "/var/lib/byoc-agent": "700 byoc-agent byoc-agent",
        "/var/lib/byoc-agent/tls": "700 byoc-agent byoc-agent",
        "/var/lib/byoc-agent/tls/agent.key": "600 byoc-agent byoc-agent",
        "/var/log/byoc-agent": "750 byoc-agent byoc-agent",
        "/opt/byoc-agent": "755 root root",
        "/opt/milvus": "755 byoc-agent byoc-agent",
        "/opt/milvus/releases": "755 byoc-agent byoc-agent",
        "/etc/systemd/system/byoc-agent.service": "644 root root",
        "/etc/systemd/system/byoc-agent.service.d/systemd-driver.conf": "644 root root",
        "/etc/systemd/system/milvus-querynode@.service": "644 root root",
        "/etc/polkit-1/rules.d/50-byoc-agent.rules": "644 root root",
        "/usr/lib/sysusers.d/byoc-agent.conf": "644 root root",
    }
    listing = machine.run("stat", "-c", "%n %a %U %G", *paths).stdout.splitlines()
    assert listing == [f"{path} {expected}" for path, expected in paths.items()]
    assert machine.run("readlink", "/usr/local/bin/byoc-agent").stdout.strip() == (
        "/opt/byoc-agent/bin/byoc-agent"
    )
    # The agent reads its configuration through its group; a stranger cannot.
    machine.run("cat", "/etc/byoc-agent/agent.toml", user="byoc-agent")
    assert machine.run("cat", "/etc/byoc-agent/agent.toml", user=OUTSIDER, check=False).returncode


def test_the_venv_is_pinned_to_constraints_with_working_entry_points(ec2_host: Ec2Host) -> None:
    machine = ec2_host.machine
    listed = machine.run(
        "/opt/byoc-agent/bin/python", "-m", "pip", "list", "--format=freeze",
        "--disable-pip-version-check",
    ).stdout  # fmt: skip
    installed = dict(line.split("==", 1) for line in listed.splitlines() if "==" in line)

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    installed = {norm(name): version for name, version in installed.items()}
    pins = {
        norm(name): version
        for name, version in (
            line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
        )
    }
    runtime = [
        "websockets", "cryptography", "httpx", "structlog", "pyjwt", "prometheus-client",
        "psutil", "h11", "dbus-fast", "uvloop", "cffi", "anyio", "httpcore",
    ]  # fmt: skip
    for name in runtime:
        assert installed.get(name) == pins[name], (name, installed.get(name), pins[name])
    assert "aiohttp" not in installed  # the stub's (the `stub` extra): not on a customer host
    assert "jinja2" not in installed
    unpinned = {n: v for n, v in installed.items() if n in pins and pins[n] != v}
    assert unpinned == {}
    for script in ("byoc-agent", "cp-stub", "byoc-certs", "byoc-demo-workload"):
        first = machine.path(f"/opt/byoc-agent/bin/{script}").read_text().splitlines()[0]
        assert first == "#!/opt/byoc-agent/bin/python", (script, first)
    version = machine.run("byoc-agent", "--version", user=OUTSIDER).stdout
    assert version.startswith("byoc-agent ")


INSTALLED = [
    "/etc/byoc-agent",
    "/etc/systemd/system/byoc-agent.service",
    "/etc/systemd/system/byoc-agent.service.d",
    "/etc/systemd/system/milvus-querynode@.service",
    "/etc/polkit-1/rules.d",
    "/usr/lib/sysusers.d/byoc-agent.conf",
    "/opt/byoc-agent",
    "/usr/local/bin/byoc-agent",
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
]
"""Everything install-host.sh writes that the running agent does not change."""
RUNTIME_DIRS = [
    "/var/lib/byoc-agent",
    "/var/lib/byoc-agent/tls",
    "/var/log/byoc-agent",
    "/opt/milvus",
    "/opt/milvus/releases",
]
"""Its directories whose contents the agent changes: their owners and modes only."""


def snapshot(ec2_host: Ec2Host) -> list[str]:
    machine = ec2_host.machine
    files = machine.run(
        "find", *INSTALLED, "-printf", r"%p %y %m %u %g %s %T@ %l\n"
    ).stdout.splitlines()
    digests = machine.sh(
        f"find {' '.join(INSTALLED)} -type f -print0 | sort -z | xargs -0 sha256sum"
    ).stdout.splitlines()
    dirs = machine.run("stat", "-c", "%n %a %U %G", *RUNTIME_DIRS).stdout.splitlines()
    return sorted(files) + digests + dirs


def test_a_second_run_changes_nothing_and_keeps_the_edited_configuration(ec2_host: Ec2Host) -> None:
    machine = ec2_host.machine
    config = machine.path("/etc/byoc-agent/agent.toml").read_text()
    assert f"127.0.0.1:{ec2_host.agent_port}" in config  # edited after the first run
    before = snapshot(ec2_host)

    again = machine.run("make", "install", "DRIVER=systemd", cwd=CLONE, env=OFFLINE, timeout=600)

    assert snapshot(ec2_host) == before
    said = [line for line in again.stdout.splitlines() if line.startswith("install-host: ")]
    assert not [
        line for line in said if re.match(r"install-host: (installed|created|linked) ", line)
    ], said
    assert "install-host: kept /etc/byoc-agent/agent.toml (edited; the shipped one is" in "\n".join(
        said
    )
    assert "install-host: /opt/byoc-agent is up to date" in said


def test_a_staged_install_names_the_final_paths_not_the_stage(ec2_host: Ec2Host) -> None:
    machine = ec2_host.machine
    stage = "/var/tmp/stage"
    try:
        done = machine.run(
            "make",
            "install",
            "DRIVER=systemd",
            f"DESTDIR={stage}",
            cwd=CLONE,
            env=OFFLINE,
            timeout=600,
        )
        assert f"install-host: staged into {stage}" in done.stdout
        for script in ("byoc-agent", "cp-stub"):
            first = machine.path(f"{stage}/opt/byoc-agent/bin/{script}").read_text().splitlines()[0]
            assert first == "#!/opt/byoc-agent/bin/python"
        leftover = machine.run("grep", "-rl", "--", stage, f"{stage}/opt/byoc-agent", check=False)
        assert (leftover.returncode, leftover.stdout) == (1, "")  # nowhere, not even in .pyc
        assert not machine.path(f"{stage}/etc/passwd").exists()  # users are made on the target
        imported = machine.run(
            f"{stage}/opt/byoc-agent/bin/python",
            "-c",
            "import agent.drivers.systemd, dbus_fast, uvloop; print('ok')",
            cwd="/",
        )
        assert imported.stdout == "ok\n"
    finally:
        machine.run("rm", "-rf", stage)


async def test_the_approvers_group_decides_who_may_approve(ec2_host: Ec2Host) -> None:
    """alice (byoc-agent + byoc-operators, as the README says) approves and denies; bob (only
    byoc-agent) reaches the socket and is refused, and audited; carol reaches nothing."""
    host = ec2_host
    host.machine.run("usermod", "-aG", "byoc-agent", LOOKER)
    async with host.client() as api:
        await host.ensure(api, version=host.current() or "1.0.0", replicas=1)
        before = host.audit_head()
        denied = await api.send(AGENT_ID, "scale", {"replicas": 5})
        await api.command(denied["ref"], wait_for="pending_approval", wait_seconds=scaled(30))

        refused = host.machine.run("byoc-agent", "approve", denied["jti"], user=LOOKER, check=False)
        stranger = host.machine.run(
            "byoc-agent", "approve", denied["jti"], "--socket", "/run/byoc-agent/control.sock",
            user=OUTSIDER, check=False,
        )  # fmt: skip
        deny = host.machine.run(
            "byoc-agent", "deny", denied["jti"], "--note", "not now", user=OPERATOR
        )
        first = await api.command(denied["ref"], wait_for="final", wait_seconds=scaled(30))

        approved = await api.send(AGENT_ID, "scale", {"replicas": 5})
        await api.command(approved["ref"], wait_for="pending_approval", wait_seconds=scaled(30))
        approve = host.machine.run("byoc-agent", "approve", approved["jti"], user=OPERATOR)
        second = await api.command(approved["ref"], wait_for="final", wait_seconds=scaled(120))

    assert refused.returncode == 1
    assert refused.stderr == (
        f"byoc-agent: error: not_authorized: {LOOKER} is not listed in approvals.users or "
        "approvals.groups\n"
    )
    assert stranger.returncode == 1
    assert stranger.stderr.count("\n") == 1
    assert "permission denied on /run/byoc-agent/control.sock" in stranger.stderr
    assert deny.stdout.startswith(f"denied {denied['jti']}")
    assert first["command"]["state"] == "rejected"
    assert approve.stdout.startswith(f"approved {approved['jti']}")
    assert second["command"]["state"] == "succeeded", second
    records = [r for r in host.audit_records() if r["seq"] > before]
    by_event = {(r["event"], r["jti"]): r for r in records if r.get("jti")}
    uid = {u: int(host.machine.run("id", "-u", u).stdout) for u in (LOOKER, OPERATOR)}
    refusal = by_event["approval_refused", denied["jti"]]
    assert (refusal["by"], refusal["uid"]) == (LOOKER, uid[LOOKER])  # from SO_PEERCRED
    assert by_event["approval_denied", denied["jti"]]["by"] == OPERATOR
    granted = by_event["approval_granted", approved["jti"]]
    assert (granted["by"], granted["uid"]) == (OPERATOR, uid[OPERATOR])


# -- staged on this machine (no systemd needed) ---------------------------------------------------


def stage(tmp_path: Path, driver: str) -> Path:
    root = tmp_path / "root"
    done = subprocess.run(
        ["sh", str(REPO / "scripts" / "install-host.sh")],
        env={**os.environ, "DESTDIR": str(root), "DRIVER": driver, "WITH_VENV": "0"},
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
    assert mode(root / "var/lib/byoc-agent") == 0o700
    assert mode(root / "var/lib/byoc-agent/tls") == 0o700
    assert mode(root / "var/log/byoc-agent") == 0o750
    assert not (root / "opt/byoc-agent").exists()  # WITH_VENV=0
    Policy.from_toml((root / "etc/byoc-agent/policy.toml").read_bytes())
    parsed = parse_config(config.read_bytes(), source=Path("/etc/byoc-agent/agent.toml"))
    assert parsed.driver_kind == driver
    assert parsed.control_plane.client_key == Path("/var/lib/byoc-agent/tls/agent.key")
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
