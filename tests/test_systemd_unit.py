"""The shipped systemd files, checked by systemd's own tools.

``systemd-analyze verify`` checks that the ExecStart binary exists and is executable, and
``/opt/byoc-agent/current/bin/byoc-agent`` exists only on a host where the agent is installed. So
the
verify test runs on a temporary copy of ``systemd/byoc-agent.service`` in which the one
difference is that ExecStart's path is prefixed with a temporary directory holding a stub
executable at ``opt/byoc-agent/current/bin/byoc-agent``; the test asserts that every other line, and
ExecStart's arguments, are byte-identical to the shipped file. Everything else is resolved on
this host as on a real one (the dependency units, ``/bin/kill`` for ExecReload). The security
rating needs no binary and is computed on the shipped file itself.

systemd 252's ``verify`` does not resolve ``User=``, so it neither needs nor reports the
``byoc-agent`` user. The user comes from ``systemd/byoc-agent.sysusers.conf``, which a separate
test applies with ``systemd-sysusers --root=`` to an empty root and checks the accounts created.

These tests need systemd's tools but not systemd as PID 1. Without them the tests skip; CI
installs them (package ``systemd``) in ``.ci/run``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.ci import tool

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "byoc-agent.service"
SYSUSERS = SYSTEMD_DIR / "byoc-agent.sysusers.conf"
SHIPPED_BINARY = "/opt/byoc-agent/current/bin/byoc-agent"
EXEC_START = f"ExecStart={SHIPPED_BINARY} run --config /etc/byoc-agent/agent.toml"
MAX_EXPOSURE = 1.2  # what README.md and systemd/README.md state (systemd 252)
AGENT_GRACE_PERIOD_S = 30.0


def require(name: str) -> str:
    return tool(name, "package `systemd`")


def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value assigned to it, from the non-comment lines of a unit file."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(timespan: str) -> float:
    """A systemd time span such as ``45s``, ``1min 30s`` or ``90`` (seconds), in seconds."""
    units = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan)
    assert parts, f"not a time span: {timespan!r}"
    assert re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", timespan), timespan
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return directives(UNIT.read_text())


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    shipped = UNIT.read_bytes()
    assert shipped.count(EXEC_START.encode()) == 1

    stub = tmp_path / SHIPPED_BINARY.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "unit" / UNIT.name  # the unit name must stay byoc-agent.service
    copy.parent.mkdir()
    copy.write_bytes(
        shipped.replace(f"ExecStart={SHIPPED_BINARY} ".encode(), f"ExecStart={stub} ".encode())
    )

    shipped_lines = shipped.splitlines()
    copy_lines = copy.read_bytes().splitlines()
    differing = [
        i for i, (a, b) in enumerate(zip(shipped_lines, copy_lines, strict=True)) if a != b
    ]
    assert len(differing) == 1
    (index,) = differing
    assert shipped_lines[index] == EXEC_START.encode()
    assert copy_lines[index] == EXEC_START.replace(SHIPPED_BINARY, str(stub)).encode()

    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_security_exposure_is_what_the_docs_say() -> None:
    analyze = require("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for byoc-agent\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_sysusers_creates_the_unprivileged_user(tmp_path: Path) -> None:
    sysusers = require("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    def entries(name: str) -> dict[str, list[str]]:
        lines = (tmp_path / "etc" / name).read_text().splitlines()
        return {fields[0]: fields for fields in (line.split(":") for line in lines)}

    _, _, uid, gid, _, home, shell = entries("passwd")["byoc-agent"]
    assert 0 < int(uid) < 1000  # a system user, not root
    assert entries("group")["byoc-agent"][2] == gid
    assert home == "/"
    assert shell.endswith("/nologin")


def test_lifecycle_directives(unit: dict[str, list[str]]) -> None:
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["Restart"] == ["on-failure"]
    assert seconds(unit["RestartSec"][0]) >= 1
    assert unit["KillMode"] == ["mixed"]
    assert seconds(unit["TimeoutStopSec"][0]) > AGENT_GRACE_PERIOD_S
    assert unit["ExecStart"] == [EXEC_START.removeprefix("ExecStart=")]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_identity_and_directories(unit: dict[str, list[str]]) -> None:
    assert unit["User"] == ["byoc-agent"]
    assert unit["Group"] == ["byoc-agent"]
    assert "DynamicUser" not in unit
    assert unit["UMask"] == ["0077"]
    for kind, mode in [("State", "0700"), ("Logs", "0750"), ("Runtime", "0750")]:
        assert unit[f"{kind}Directory"] == ["byoc-agent"]
        assert unit[f"{kind}DirectoryMode"] == [mode]
    assert unit["ConfigurationDirectory"] == ["byoc-agent"]


def test_sandboxing_directives(unit: dict[str, list[str]]) -> None:
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectHostname",
        "ProtectClock",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RemoveIPC",
    ]:
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectProc"] == ["invisible"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["AmbientCapabilities"] == [""]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert unit["SystemCallArchitectures"] == ["native"]
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert unit["DevicePolicy"] == ["closed"]


def test_proc_subset_is_not_restricted(unit: dict[str, list[str]]) -> None:
    """The agent's host metrics (psutil) read /proc/stat and /proc/meminfo.

    ProcSubset=pid would hide them; ProtectProc=invisible is what restricts /proc instead.
    """
    assert "ProcSubset" not in unit


def test_private_users_is_not_set(unit: dict[str, list[str]]) -> None:
    """Approvals are audited with the operator's uid from SO_PEERCRED on the control socket.

    PrivateUsers=yes would map every operator to "nobody" inside the service.
    """
    assert "PrivateUsers" not in unit


@pytest.mark.parametrize(
    ("timespan", "expected"),
    [("45s", 45.0), ("1min 30s", 90.0), ("90", 90.0), ("500ms", 0.5), ("2h", 7200.0)],
)
def test_timespan_parser(timespan: str, expected: float) -> None:
    assert seconds(timespan) == expected
