"""byoc-agent.service under a real systemd (tests/nspawn.py), installed, enrolled and started
from README "On an EC2 host" by the session fixture (tests/ec2_host.py): READY=1 and the status
text, enrollment as the service user, the sandbox seen from the running service, renewal,
reload, the journal's priorities and the log level, the watchdog, and a draining stop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from datetime import UTC, datetime

from cryptography import x509

from agent import __version__
from tests.conftest import scaled
from tests.ec2_host import AGENT_ID, OPERATOR, UNIT, Ec2Host

WORKLOAD = "milvus-querynode@{}.service"
TLS = "/var/lib/byoc-agent/tls"


def agent_lines(
    host: Ec2Host, *args: str, pid: int | None = None
) -> list[tuple[int, dict[str, object]]]:
    """(priority, parsed JSON) of the agent's own journal lines (not systemd's about it), of
    the process ``pid`` if given."""
    found = []
    for entry in host.journal(*args):
        if entry.get("SYSLOG_IDENTIFIER") != "byoc-agent" or not str(entry["MESSAGE"]).startswith(
            "{"
        ):
            continue
        if pid is None or int(entry["_PID"]) == pid:
            found.append((int(entry["PRIORITY"]), json.loads(str(entry["MESSAGE"]))))
    return found


def cursor(host: Ec2Host) -> str:
    out = host.machine.run("journalctl", "-u", UNIT, "-n", "0", "--show-cursor", "--no-pager")
    return out.stdout.strip().rsplit("cursor: ", 1)[1]


async def test_active_only_after_ready_with_the_tunnel_state_as_status(ec2_host: Ec2Host) -> None:
    host = ec2_host
    shown = host.machine.show(UNIT, "Type", "NotifyAccess", "WatchdogUSec", "User")
    assert shown == {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogUSec": "8s",  # the test drop-in; 30 s as shipped
        "User": "byoc-agent",
    }
    old = host.main_pid()

    host.machine.run("systemctl", "restart", UNIT)
    # `systemctl restart` returned, so systemd has the new agent's READY=1; the agent sends it
    # after start-up, so its control socket answers now, with no retry.
    status = json.loads(host.machine.run("byoc-agent", "status", "--json").stdout)

    assert status["agent_id"] == AGENT_ID
    assert host.main_pid() not in (0, old)
    async with host.client() as api:
        await host.wait_connected(api)
    expected = f"connected to wss://127.0.0.1:{host.agent_port}/v1/agent"
    deadline = time.monotonic() + scaled(20)
    while host.machine.show(UNIT, "StatusText")["StatusText"] != expected:
        assert time.monotonic() < deadline, host.machine.show(UNIT, "StatusText")
        await asyncio.sleep(0.1)  # the status follows the session: nothing to await outside
    shown_status = host.machine.run("systemctl", "status", UNIT, "--no-pager", "--lines=0").stdout
    assert f'Status: "{expected}"' in shown_status


async def test_enrolling_as_the_service_user_spends_no_token_on_a_local_mistake(
    ec2_host: Ec2Host,
) -> None:
    host = ec2_host
    async with host.client() as api:
        token = str((await api.enroll_token("ec2-host-2", ttl=300))["token"])
    config = host.machine.path("/etc/byoc-agent/agent.toml").read_text()
    tried = "/etc/byoc-agent/enroll-test.toml"

    def enroll(
        text: str, *, config_path: str = tried, ca: str = "/etc/byoc-agent/vendor-ca.pem"
    ) -> tuple[int, str, str]:
        target = host.machine.path(config_path)
        target.write_text(text)
        target.chmod(0o644)
        done = host.machine.run(
            "byoc-agent", "enroll", "--config", config_path,
            "--control-plane", f"https://127.0.0.1:{host.enroll_port}",
            "--ca-bundle", ca, "--token", "-",
            user="byoc-agent", stdin=token + "\n", check=False,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    unwritable = config.replace("/var/lib/byoc-agent/tls/", "/etc/byoc-agent/tls/")
    writable = config.replace("/var/lib/byoc-agent/tls/", "/var/lib/byoc-agent/enroll-test/")
    try:
        mistakes = [
            enroll(unwritable),
            enroll(writable, ca="/etc/byoc-agent/no-such-ca.pem"),
            enroll(writable, config_path="/root/enroll-test.toml"),  # root's home: unreadable
        ]
        for code, out, err in mistakes:
            assert code in (1, 2), (code, out, err)
            assert out == ""
            assert err.count("\n") == 1, err  # one line
            assert "Traceback" not in err
        assert (
            "cannot write the key /etc/byoc-agent/tls/agent.key: Permission denied"
            in mistakes[0][2]
        )
        assert "(the token was not used)" in mistakes[0][2]
        assert "no-such-ca.pem" in mistakes[1][2]
        assert (
            "cannot read configuration /root/enroll-test.toml: Permission denied" in mistakes[2][2]
        )

        code, out, err = enroll(writable)  # the same token: it was never sent

        assert code == 0, err
        assert out.startswith("enrolled as ec2-host-2;")
        listing = host.machine.run(
            "stat",
            "-c",
            "%n %a %U",
            *(f"/var/lib/byoc-agent/enroll-test/{n}" for n in ("agent.key", "agent.pem", "ca.pem")),
        ).stdout.split("\n")
        assert listing[:3] == [
            "/var/lib/byoc-agent/enroll-test/agent.key 600 byoc-agent",
            "/var/lib/byoc-agent/enroll-test/agent.pem 644 byoc-agent",
            "/var/lib/byoc-agent/enroll-test/ca.pem 644 byoc-agent",
        ]
    finally:
        host.machine.run(
            "rm", "-rf", tried, "/root/enroll-test.toml", "/var/lib/byoc-agent/enroll-test"
        )


SANDBOX_PROBE = rf"""
for dir in /etc /usr /home /opt/byoc-agent/releases/{__version__} /root \
           /var/lib/byoc-agent/tls /var/log/byoc-agent /opt/milvus /opt/byoc-agent; do
    if touch "$dir/.sandbox-probe" 2>/tmp/err; then echo "$dir writable"; rm "$dir/.sandbox-probe"
    else echo "$dir $(sed 's/.*: //' /tmp/err)"; fi
done
"""


async def test_the_sandbox_holds_inside_the_running_service_and_renewal_still_writes(
    ec2_host: Ec2Host,
) -> None:
    host = ec2_host
    pid = host.main_pid()
    uid = host.machine.run("id", "-u", "byoc-agent").stdout.strip()
    status = host.machine.path(f"/proc/{pid}/status").read_text()
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
    assert fields["Uid"].split() == [uid] * 4
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # a filter is installed
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[caps], 16) == 0, (caps, fields[caps])

    # The file system as the service sees it (its mount namespace, its user).
    seen = host.machine.run(
        "nsenter", "-t", str(pid), "-m", "-S", uid, "-G", uid, "sh", "-c", SANDBOX_PROBE
    ).stdout.splitlines()
    assert seen == [
        "/etc Read-only file system",
        "/usr Read-only file system",
        "/home Permission denied",  # ProtectHome: an empty, inaccessible directory
        # the release make install made is root's: the agent can neither change nor remove it
        f"/opt/byoc-agent/releases/{__version__} Permission denied",
        "/root Permission denied",
        "/var/lib/byoc-agent/tls writable",
        "/var/log/byoc-agent writable",
        "/opt/milvus writable",
        "/opt/byoc-agent writable",  # its own releases and the current link (update_agent)
    ]

    # Renewal (certificates live 60 s here; renewed at two thirds) writes into the sandbox.
    await host.wait_audit("certificate_renewed", within=90)
    cert = x509.load_pem_x509_certificate(host.machine.path(f"{TLS}/agent.pem").read_bytes())
    renewed = {r["serial"] for r in host.audit_records() if r["event"] == "certificate_renewed"}
    assert format(cert.serial_number, "x") in renewed  # the file is the renewed certificate
    listing = host.machine.run("stat", "-c", "%n %a %U", f"{TLS}/agent.key", f"{TLS}/agent.pem")
    assert listing.stdout.splitlines() == [
        f"{TLS}/agent.key 600 byoc-agent",
        f"{TLS}/agent.pem 644 byoc-agent",
    ]


async def test_reload_applies_an_edited_policy_and_a_broken_one_is_an_error(
    ec2_host: Ec2Host,
) -> None:
    host = ec2_host
    policy = host.machine.path("/etc/byoc-agent/policy.toml")
    original = policy.read_text()
    start = cursor(host)
    since = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    before = host.audit_head()
    try:
        edited = original.replace("max_replicas = 6", "max_replicas = 5")
        assert edited != original
        policy.write_text(edited)
        host.machine.run("systemctl", "reload", UNIT)
        loaded = await host.wait_audit("policy_loaded", after=before, trigger="sighup")
        assert loaded["policy_sha256"] == hashlib.sha256(edited.encode()).hexdigest()
        async with host.client() as api:
            refused = await host.command(api, "scale", {"replicas": 6})
        assert refused["state"] == "rejected", refused
        assert "maximum of 5" in str(refused["detail"])

        policy.write_text(edited + "\n[surprise]\n")
        host.machine.run("systemctl", "reload", UNIT)
        failed = await host.wait_audit("policy_reload_failed", after=loaded["seq"])
        assert failed["kept_policy_sha256"] == loaded["policy_sha256"]
    finally:
        policy.write_text(original)
        host.machine.run("systemctl", "reload", UNIT)
        await host.wait_audit(
            "policy_loaded",
            after=before,
            trigger="sighup",
            policy_sha256=hashlib.sha256(original.encode()).hexdigest(),
        )

    # The journal has each line at its level's priority: -p err shows the error, and only errors
    # (journald reads the line a moment after the audit record is written: wait for it).
    deadline = time.monotonic() + scaled(20)
    while True:
        errors = [line for _, line in agent_lines(host, "-p", "err")]
        if any(
            e["event"] == "policy_reload_failed" and str(e["timestamp"]) > since for e in errors
        ):
            break
        assert time.monotonic() < deadline, errors
        await asyncio.sleep(0.1)
    assert {str(line["level"]) for line in errors} <= {"error", "critical"}
    everything = agent_lines(host, f"--after-cursor={start}")
    assert {(p, line["level"]) for p, line in everything} >= {(6, "info"), (3, "error")}
    assert all(
        (p, line["level"]) in {(6, "info"), (4, "warning"), (3, "error"), (7, "debug")}
        for p, line in everything
    )


async def restart_and_read(host: Ec2Host) -> list[tuple[int, dict[str, object]]]:
    """Load the unit files again, restart the agent, wait until it is connected: its lines."""
    host.machine.run("systemctl", "daemon-reload")
    start = cursor(host)
    host.machine.run("systemctl", "restart", UNIT)
    async with host.client() as api:
        await host.wait_connected(api)
    return agent_lines(host, f"--after-cursor={start}", pid=host.main_pid())


async def test_the_log_level_comes_from_the_environment(ec2_host: Ec2Host) -> None:
    host = ec2_host
    dropin = host.machine.path(f"/etc/systemd/system/{UNIT}.d/zz-log-level.conf")
    dropin.write_text("[Service]\nEnvironment=BYOC_LOG_LEVEL=debug\n")
    try:
        debug = [line for priority, line in await restart_and_read(host) if priority == 7]
        assert debug
        assert {line["level"] for line in debug} == {"debug"}
    finally:
        dropin.unlink()
        quiet = await restart_and_read(host)
    assert quiet
    assert 7 not in {priority for priority, _ in quiet}


async def test_the_watchdog_restarts_a_frozen_agent_and_nothing_accepted_is_lost_or_run_twice(
    ec2_host: Ec2Host,
) -> None:
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="1.0.0", replicas=1)
        before = host.audit_head()
        start = cursor(host)
        held = await api.send(AGENT_ID, "scale", {"replicas": 5})  # above 4: needs approval
        waiting = await api.command(
            held["ref"], wait_for="pending_approval", wait_seconds=scaled(30)
        )
        assert waiting["command"]["state"] == "pending_approval", waiting
        frozen = host.main_pid()

        host.machine.run("kill", "-STOP", str(frozen))
        queued = await api.send(AGENT_ID, "collect_metrics", {"targets": ["host"]})
        await host.wait_restarted(frozen, within=60)
        await host.wait_connected(api)
        approved = host.machine.run(
            "byoc-agent",
            "approve",
            held["jti"],
            "--note",
            "after the watchdog restart",
            user=OPERATOR,
        )
        first = await api.command(held["ref"], wait_for="final", wait_seconds=scaled(120))
        second = await api.command(queued["ref"], wait_for="final", wait_seconds=scaled(60))

    assert approved.stdout.startswith(f"approved {held['jti']}")
    assert first["command"]["state"] == "succeeded", first
    assert second["command"]["state"] == "succeeded", second
    messages = [str(e["MESSAGE"]) for e in host.journal(f"--after-cursor={start}")]
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]
    assert any("Failed with result 'watchdog'" in m for m in messages), messages[-20:]
    records = [r for r in host.audit_records() if r["seq"] > before]
    for jti in (held["jti"], queued["jti"]):
        assert sum(1 for r in records if r["event"] == "execution_started" and r["jti"] == jti) == 1
    assert any(r["event"] == "command_resumed" and r["jti"] == held["jti"] for r in records)
    assert host.unit_states(5) == ["active"] * 5


async def test_stop_lets_a_running_command_finish_within_timeout_stop_sec(
    ec2_host: Ec2Host,
) -> None:
    host = ec2_host
    async with host.client() as api:
        await host.ensure(api, version="2.0.0", replicas=1)  # 2.0.0 takes 2 s to start
        before = host.audit_head()
        sent = await api.send(AGENT_ID, "scale", {"replicas": 2})
        await host.wait_audit("unit_starting", after=before, unit=WORKLOAD.format(1))

        started = time.monotonic()
        host.machine.run("systemctl", "stop", UNIT)  # returns when the agent has exited
        took = time.monotonic() - started
        shown = host.machine.show(UNIT, "ActiveState", "Result", "TimeoutStopUSec")

        records = [r for r in host.audit_records() if r["seq"] > before]
        host.machine.run("systemctl", "start", UNIT)
        await host.wait_connected(api)
        final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(60))

    assert shown == {"ActiveState": "inactive", "Result": "success", "TimeoutStopUSec": "45s"}
    assert took < 45
    events = [r["event"] for r in records]
    stopping = records[events.index("agent_stopping")]
    assert stopping["running"] == 1
    finished = events.index("execution_finished")
    assert events.index("agent_stopping") < finished < events.index("agent_stopped")
    assert final["command"]["state"] == "succeeded", final
    assert host.unit_states(2) == ["active", "active"]
