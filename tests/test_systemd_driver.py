"""The ``systemd`` driver against a real systemd (tests/nspawn.py, set up by tests/ec2_host.py).

The driver runs where it runs in production: inside ``byoc-agent.service``, as the
unprivileged ``byoc-agent`` user, under the unit's SystemCallFilter and sandbox, talking to
systemd over D-Bus and allowed by the polkit rule ``make install`` added. Commands come from
the stub control plane; releases from an HTTP server on the host's loopback; the instances are
real units (``milvus-querynode@N.service``, Type=notify) whose health checks and versions are
HTTP against the processes systemd started.

No stand-in remains (the stand-in ``systemctl`` these tests used before is gone): every failure
they need, real systemd produces (a unit that is unhealthy, a start refused by polkit, an agent
killed half way through an upgrade). Only the settings checks below run without systemd.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from pathlib import Path

import pytest
import structlog

from agent.core.errors import ConfigError
from agent.drivers import load_driver_factory
from agent.drivers.base import DriverEnvironment
from agent.drivers.systemd import SystemdDriver, extract_release
from tests.ec2_host import AGENT_ID, UNIT, Ec2Host

WORKLOAD = "milvus-querynode@{}.service"


# -- without systemd: the driver's settings --------------------------------------------------


def test_the_driver_is_registered() -> None:
    assert load_driver_factory("systemd") is SystemdDriver


GOOD = {
    "unit": "milvus-querynode@{index}.service",
    "releases_dir": "/opt/milvus/releases",
    "current": "/opt/milvus/current",
    "allowed_urls": ["https://artifacts.example/milvus/"],
    "releases": {
        "1.0.0": {"url": "https://artifacts.example/milvus/1.0.0.tgz", "sha256": "0" * 64}
    },
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unit": "demo.service"}, "template"),
        ({"allowed_urls": []}, "allowed_urls"),
        ({"allowed_urls": ["ftp://x/"]}, "allowed_urls"),
        ({"releases": {"1.0.0": {"url": "https://x/", "sha256": "abc"}}}, "sha256"),
        ({"releases": {"bad version": {"url": "https://x/", "sha256": "0" * 64}}}, "version"),
        ({"job_timeout": 0}, "job_timeout"),
        ({"systemctl": "/usr/bin/systemctl"}, "systemctl"),  # the driver speaks D-Bus now
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, change: dict[str, object], message: str) -> None:
    async def audit(event: str, /, **fields: object) -> None:
        pass  # nothing is recorded: the settings are refused before anything runs

    env = DriverEnvironment(state_dir=tmp_path, audit=audit, log=structlog.get_logger())
    SystemdDriver(GOOD, env)  # the good settings are good
    with pytest.raises(ConfigError, match=message):
        SystemdDriver({**GOOD, **change}, env)


def tarball(*members: tarfile.TarInfo) -> tarfile.TarFile:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    out.seek(0)
    return tarfile.open(fileobj=out)


def member(
    name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.fixture(params=["stdlib filter", "without it (Python < 3.11.4)"])
def extraction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Debian 12's Python 3.11.2 has no tarfile filters: the driver's own checks run there."""
    if request.param != "stdlib filter":
        monkeypatch.delattr(tarfile, "data_filter")
    return str(request.param)


def test_a_release_unpacks_files_directories_and_inner_links(
    extraction: str, tmp_path: Path
) -> None:
    archive = tarball(
        member("bin", tarfile.DIRTYPE, mode=0o755),
        member("bin/milvus", mode=0o4777),
        member("bin/alias", tarfile.SYMTYPE, link="milvus"),
        member("README", mode=0o600),
    )
    umask = os.umask(0o077)  # the agent's (UMask= in the unit); the workload is another user
    try:
        extract_release(archive, tmp_path / "release")
    finally:
        os.umask(umask)
    assert (tmp_path / "release/bin/milvus").stat().st_mode & 0o7777 == 0o755  # no setuid, no o+w
    assert (tmp_path / "release/bin").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "release/README").stat().st_mode & 0o777 == 0o644
    extract_release(tarball(member("/etc/evil")), tmp_path / "other")  # made relative
    assert (tmp_path / "other/etc/evil").is_file()
    assert (tmp_path / "release/bin/alias").resolve() == (tmp_path / "release/bin/milvus")


@pytest.mark.parametrize(
    "bad",
    [
        member("../outside"),
        member("bin/link", tarfile.SYMTYPE, link="/etc/shadow"),
        member("bin/link", tarfile.SYMTYPE, link="../../outside"),
        member("bin/hard", tarfile.LNKTYPE, link="../outside"),
        member("dev/sda", tarfile.BLKTYPE),
        member("fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "symlink-absolute", "symlink-out", "hardlink-out", "device", "fifo"],
)
def test_a_release_that_reaches_outside_is_refused(
    extraction: str, tmp_path: Path, bad: tarfile.TarInfo
) -> None:
    with pytest.raises(tarfile.TarError):
        extract_release(tarball(bad), tmp_path / "release")
    assert not (tmp_path / "outside").exists()


# -- against systemd, through the running agent ------------------------------------------------


def started_at(host: Ec2Host, index: int) -> int:
    """When systemd last started instance ``index`` (monotonic microseconds)."""
    shown = host.machine.show(WORKLOAD.format(index), "ExecMainStartTimestampMonotonic")
    return int(shown["ExecMainStartTimestampMonotonic"])


async def test_scale_up_and_down_as_the_unprivileged_user_under_seccomp(ec2_host: Ec2Host) -> None:
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="1.0.0", replicas=1)
        before = host.audit_head()

        up = await host.command(api, "scale", {"replicas": 3})
        assert up["state"] == "succeeded", up
        assert up["result"]["replicas"] == 3
        assert host.unit_states(3) == ["active"] * 3
        assert host.instance_versions(3) == ["1.0.0"] * 3

        # It was the agent that did it: its own user, its own seccomp filter, no capabilities.
        pid = host.main_pid()
        status = host.machine.path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        assert uid is not None
        assert uid.group(1) == host.machine.run("id", "-u", "byoc-agent").stdout.strip()
        assert re.search(r"^Seccomp:\s+2$", status, re.M)
        assert re.search(r"^CapEff:\s+0+$", status, re.M)
        assert "@system-service" in (host.machine.path("/etc/systemd/system") / UNIT).read_text()
        assert host.machine.show(UNIT, "SystemCallFilter")["SystemCallFilter"]

        down = await host.command(api, "scale", {"replicas": 1})
        assert down["state"] == "succeeded", down
        assert host.unit_states(3) == ["active", "inactive", "inactive"]
    starts = [
        r["unit"]
        for r in host.audit_records()
        if r["seq"] > before and r["event"] == "unit_starting"
    ]
    stops = [
        r["unit"]
        for r in host.audit_records()
        if r["seq"] > before and r["event"] == "unit_stopping"
    ]
    assert starts == [WORKLOAD.format(1), WORKLOAD.format(2)]
    assert stops == [WORKLOAD.format(2), WORKLOAD.format(1)]


PROBE = """
import asyncio, sys
from agent.drivers.systemd_bus import SystemdBus
from agent.core.errors import DriverError

async def main() -> None:
    bus = await SystemdBus.connect(job_timeout=60)
    for verb, unit in (line.split() for line in sys.stdin.read().splitlines()):
        try:
            await bus.run_job(verb, unit)
            print(verb, unit, "done")
        except DriverError as exc:
            print(verb, unit, exc.code)
    bus.close()

asyncio.run(main())
"""


def test_the_agents_user_may_drive_the_workload_units_and_no_other(ec2_host: Ec2Host) -> None:
    """The polkit rule, with the driver's own D-Bus client, as the agent's user."""
    host = ec2_host
    jobs = "\n".join(
        [
            "restart dbus.service",
            f"stop {UNIT}",
            "start systemd-journald.service",
            "start milvus-querynode@x.service",
            "start milvus-querynode@9.socket",
            f"start {WORKLOAD.format(9)}",
            f"stop {WORKLOAD.format(9)}",
        ]
    )
    probe = host.machine.path("/opt/byoc-probe.py")
    probe.write_text(PROBE)
    try:
        out = host.machine.run(
            "/opt/byoc-agent/bin/python", "/opt/byoc-probe.py",
            user="byoc-agent", stdin=jobs,
        ).stdout.splitlines()  # fmt: skip
    finally:
        probe.unlink()
    assert out == [
        "restart dbus.service access_denied",
        f"stop {UNIT} access_denied",
        "start systemd-journald.service access_denied",
        "start milvus-querynode@x.service access_denied",
        "start milvus-querynode@9.socket access_denied",
        f"start {WORKLOAD.format(9)} done",
        f"stop {WORKLOAD.format(9)} done",
    ]
    # systemctl says the same to that user.
    refused = host.machine.run(
        "systemctl", "restart", "dbus.service", user="byoc-agent", check=False
    )
    assert refused.returncode != 0
    assert "Interactive authentication required" in refused.stderr


async def test_rolling_upgrade_downloads_verifies_switches_and_restarts_one_by_one(
    ec2_host: Ec2Host,
) -> None:
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="1.0.0", replicas=3)
        before = host.audit_head()
        restarted_before = [started_at(host, i) for i in range(3)]

        done = await host.command(api, "upgrade", {"version": "2.0.0"})

    assert done["state"] == "succeeded", done
    assert done["result"]["version"] == "2.0.0"
    assert done["result"]["previous_version"] == "1.0.0"
    assert host.current() == "2.0.0"
    assert host.instance_versions(3) == ["2.0.0"] * 3
    link = host.machine.path("/opt/milvus/current")
    assert link.is_symlink()
    assert Path(link.readlink()) == Path("/opt/milvus/releases/2.0.0")
    records = [r for r in host.audit_records() if r["seq"] > before]
    driver = [r["event"] for r in records if r["event"].startswith(("artifact_", "release_"))]
    assert driver == [
        "artifact_downloading",
        "artifact_verified",
        "release_installing",
        "release_switching",
    ]
    assert [r["unit"] for r in records if r["event"] == "unit_restarting"] == [
        WORKLOAD.format(i) for i in range(3)
    ]
    # One by one: each restart began after the one before was up (2.0.0 takes 2 s to start).
    starts = [started_at(host, i) for i in range(3)]
    assert all(new > old for new, old in zip(starts, restarted_before, strict=True))
    assert starts[0] < starts[1] < starts[2]
    assert starts[1] - starts[0] >= 1_500_000
    assert starts[2] - starts[1] >= 1_500_000


async def test_an_unhealthy_release_is_rolled_back(ec2_host: Ec2Host) -> None:
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="2.0.0", replicas=2)
        before = host.audit_head()

        done = await host.command(api, "upgrade", {"version": "2.1.0"})

    assert done["state"] == "failed", done
    assert done["reason"] == "unhealthy_rolled_back"
    assert done["result"] == {"rolled_back": True, "version": "2.0.0", "failed_replica": 0}
    assert host.current() == "2.0.0"
    assert host.instance_versions(2) == ["2.0.0"] * 2
    records = [r for r in host.audit_records() if r["seq"] > before]
    rollback = next(r for r in records if r["event"] == "rollback_started")
    assert rollback["to"] == "2.0.0"
    assert rollback["units"] == [WORKLOAD.format(0)]  # instance 1 never left 2.0.0


@pytest.mark.parametrize(
    ("version", "code"),
    [
        ("6.6.6", "checksum_mismatch"),
        ("7.0.0", "url_not_allowed"),
        ("3.0.0", "signature_invalid"),
        ("8.0.0", "unknown_version"),
    ],
)
async def test_an_artifact_that_does_not_verify_changes_nothing(
    ec2_host: Ec2Host, version: str, code: str
) -> None:
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="2.0.0", replicas=1)
        current, started = host.current(), started_at(host, 0)

        done = await host.command(api, "upgrade", {"version": version})

    assert (done["state"], done["reason"]) == ("failed", code), done
    assert host.current() == current
    assert not host.machine.path(f"/opt/milvus/releases/{version}").exists()
    assert started_at(host, 0) == started  # no unit was touched
    assert [
        p.name
        for p in host.machine.path("/opt/milvus/releases").iterdir()
        if p.name.startswith(".")
    ] == []


async def test_killed_while_restarting_instance_2_of_3_the_workload_converges(
    ec2_host: Ec2Host,
) -> None:
    """SIGKILL the agent while systemd restarts the second of three instances onto 2.0.0: when
    systemd has started the agent again, every instance runs 1.0.0 (the command is reported
    interrupted, so the workload goes back to where it began), and the audit log says so."""
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="1.0.0", replicas=3)
        before = host.audit_head()
        old_pid = host.main_pid()
        sent = await api.send(AGENT_ID, "upgrade", {"version": "2.0.0"})

        restarting = await host.wait_audit("unit_restarting", after=before, unit=WORKLOAD.format(1))
        host.machine.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT)
        killed_at = time.monotonic()
        await host.wait_restarted(old_pid)
        recovered = await host.wait_audit("upgrade_recovered", after=restarting["seq"])
        await host.wait_connected(api)
        final = await api.command(sent["ref"], wait_for="final", wait_seconds=60)

    assert final["command"]["state"] == "interrupted", final
    assert recovered["version"] == "1.0.0"
    assert host.current() == "1.0.0"
    assert host.unit_states(3) == ["active"] * 3
    assert host.instance_versions(3) == ["1.0.0"] * 3
    records = [r for r in host.audit_records() if r["seq"] > restarting["seq"]]
    events = [r["event"] for r in records]
    assert "unit_restarting" not in events[: events.index("agent_started")]  # killed there
    after_start = records[events.index("agent_started") :]
    interrupted = next(r for r in after_start if r["event"] == "upgrade_interrupted")
    assert interrupted["to"] == "2.0.0"
    assert interrupted["previous"] == "1.0.0"
    assert interrupted["units"] == [WORKLOAD.format(0), WORKLOAD.format(1)]
    assert [r["unit"] for r in after_start if r["event"] == "unit_restarting"] == [
        WORKLOAD.format(0),
        WORKLOAD.format(1),
    ]
    assert any(
        r["event"] == "command_interrupted" and r["jti"] == final["command"]["jti"]
        for r in after_start
    )
    verify = host.machine.run("byoc-agent", "audit", "verify", "/var/log/byoc-agent/audit.jsonl")
    assert ": OK," in verify.stdout
    state = host.machine.path("/var/lib/byoc-agent/driver/systemd-driver.json").read_text()
    assert "upgrade" not in state
    assert time.monotonic() - killed_at < 60


async def test_a_restarted_agent_starts_what_is_down_and_stops_what_is_extra(
    ec2_host: Ec2Host,
) -> None:
    """Instances are not enabled: after a reboot they are down, and the agent, which keeps the
    count, starts them; one above the count (left by a scale the agent did not finish) it stops."""
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version=host.current() or "1.0.0", replicas=2)
        host.machine.run("systemctl", "stop", WORKLOAD.format(1))
        host.machine.run("systemctl", "start", WORKLOAD.format(7))
        before = host.audit_head()
        old = host.main_pid()

        host.machine.run("systemctl", "restart", UNIT)
        await host.wait_restarted(old)
        await host.wait_connected(api)

    assert host.unit_states(2) == ["active", "active"]
    assert host.machine.show(WORKLOAD.format(7), "ActiveState")["ActiveState"] == "inactive"
    records = [r for r in host.audit_records() if r["seq"] > before]
    assert [
        (r["event"], r["unit"], r["reason"]) for r in records if r["event"].startswith("unit_")
    ] == [
        ("unit_stopping", WORKLOAD.format(7), "above the replica count"),
        ("unit_starting", WORKLOAD.format(1), "reconcile"),
    ]


async def test_the_units_are_loaded_by_systemd_and_verify(ec2_host: Ec2Host) -> None:
    """The example workload unit and the driver's drop-in, as systemd itself loads them."""
    host = ec2_host
    async with host.client() as api:  # verify wants ExecStart to exist: a release installed
        await host.ensure(api, version=host.current() or "1.0.0", replicas=max(host.replicas(), 1))
    verify = host.machine.run("systemd-analyze", "verify", WORKLOAD.format(0), UNIT, check=False)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    shown = host.machine.show(UNIT, "DropInPaths", "ReadWritePaths")
    assert "/etc/systemd/system/byoc-agent.service.d/systemd-driver.conf" in shown["DropInPaths"]
    assert "/opt/milvus" in shown["ReadWritePaths"].split()
    workload = host.machine.show(WORKLOAD.format(0), "Type", "DynamicUser", "NotifyAccess")
    assert workload == {"Type": "notify", "DynamicUser": "yes", "NotifyAccess": "main"}
