"""``byoc-agent doctor`` against a healthy agent, and against each failure made for real on
loopback: a wrong CA bundle, a closed port, a blackhole (a listener whose accept queue is full,
so SYNs are dropped and connections time out), a skewed clock (doctor run under libfaketime),
an HTTP proxy that refuses CONNECT (tinyproxy with ``ConnectPort``), a key others can read, a
private endpoint outside the VPC's CIDR or timing out (the FAQ's security group).

Doctor is synchronous (blocking sockets, a short-lived command), so it runs in a worker thread
while the stub and the agent run in this event loop; the CLI itself runs as a child process
where its output and exit status are the point.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from agent.core.diagnosis import Where, diagnose
from agent.core.doctor_checks import (
    Status,
    judge_answer,
    judge_certificate,
    judge_clock,
)
from agent.doctor import Options, examine, vpc_cidrs_from_metadata
from byoc_demo.layout import DemoPaths, write_agent_files
from certs.pki import PKIPaths
from control_plane_stub.server import StubServer
from tests.ci import tool
from tests.conftest import AgentStarter, scaled
from tests.processes import REPO
from tests.tinyproxy import running_tinyproxy

Found = dict[str, tuple[Status, str, str]]
HEALTHY = [
    "config",
    "policy",
    "key",
    "cert-file",
    "ca-bundle",
    "state-dir",
    "audit-dir",
    "certificate",
    "route",
    "dns",
    "tcp",
    "tls",
    "identity",
    "clock",
    "agent",
]


async def doctor(config: Path, **options: object) -> Found:
    options.setdefault("timeout", scaled(2))
    checks = await asyncio.to_thread(examine, config, Options(**options))  # type: ignore[arg-type]
    return {check.name: (check.status, check.found, check.fix) for check in checks}


def agent_config(
    root: Path, pki: PKIPaths, port: int, run_dir: Path, **layout: object
) -> DemoPaths:
    paths = write_agent_files(
        root,
        pki=pki.root,
        control_plane_port=port,
        run_dir=run_dir,
        **layout,  # type: ignore[arg-type]
    )
    for directory in (paths.state_dir, paths.audit_log.parent):
        directory.mkdir(parents=True, mode=0o750)
    return paths


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


async def test_a_healthy_agent_passes_every_check(
    stub: StubServer, start_agent: AgentStarter
) -> None:
    running = await start_agent(port=stub.agent_port)
    found = await doctor(running.paths.config)
    assert list(found) == HEALTHY
    assert {name: status for name, (status, _, _) in found.items()} == dict.fromkeys(
        HEALTHY, Status.PASS
    )
    assert found["tls"][1].startswith("TLSv1.3 TLS_")
    assert "verified for localhost: localhost [localhost, 127.0.0.1, ::1]" in found["tls"][1]
    assert found["certificate"][1].startswith("agent-1, issued by BYOC dev agent CA")
    assert found["agent"][1] == (
        f"agent-1 (version 0.1.0) runs and is connected to wss://localhost:{stub.agent_port}"
        "/v1/agent"
    )


async def test_a_running_agent_that_lost_its_control_plane_is_explained(
    stub: StubServer, start_agent: AgentStarter
) -> None:
    running = await start_agent(port=stub.agent_port)
    await stub.close()  # the control plane goes away; the agent keeps trying
    link = running.agent.parts.link
    # Its next attempt fails (backoff at most 0.5 s): the link says so with an event.
    async with asyncio.timeout(scaled(30)):
        await link.failed.wait()
    assert not link.ready.is_set()
    assert link.last_error
    # `byoc-agent status` explains it the way doctor does
    diagnosis = running.agent.status()["diagnosis"]
    assert isinstance(diagnosis, dict)
    assert diagnosis["code"] == "connection_refused", diagnosis
    assert diagnosis["action"].startswith("check the port in control_plane.url")
    found = await doctor(running.paths.config)
    status, what, fix = found["agent"]
    assert status is Status.FAIL
    assert what.startswith("agent-1 (version 0.1.0) runs but is not connected; last error: ")
    assert f"nothing accepts connections at localhost:{stub.agent_port}" in what
    assert fix.startswith("check the port in control_plane.url")
    assert found["tcp"][0] is Status.FAIL


async def test_wrong_ca_bundle(
    stub: StubServer, pki: PKIPaths, foreign_pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_config(tmp_path / "agent", pki, stub.agent_port, short_tmp)
    replace(paths.config, str(pki.server_ca_cert), str(foreign_pki.server_ca_cert))
    found = await doctor(paths.config)
    status, what, fix = found["tls"]
    assert status is Status.FAIL
    assert what.startswith(
        "unable to get local issuer certificate; it presents localhost [localhost, 127.0.0.1, "
        "::1] issued by BYOC dev server CA"
    )
    assert f"not signed by a CA in ca_bundle ({foreign_pki.server_ca_cert})" in what
    assert fix.startswith(f"install the vendor's CA bundle at {foreign_pki.server_ca_cert}")
    assert found["identity"][0] is Status.SKIP
    assert found["tcp"][0] is Status.PASS


async def test_a_certificate_the_control_plane_refuses(
    stub: StubServer, pki: PKIPaths, foreign_pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    """Another environment's agent certificate: with TLS 1.3 the handshake completes on the
    agent's side; the refusal comes with the first answer, which doctor asks for."""
    paths = agent_config(tmp_path / "agent", pki, stub.agent_port, short_tmp)
    replace(paths.config, str(pki.agent_cert("agent-1")), str(foreign_pki.agent_cert("agent-1")))
    replace(paths.config, str(pki.agent_key("agent-1")), str(foreign_pki.agent_key("agent-1")))
    found = await doctor(paths.config)
    assert found["tls"][0] is Status.PASS
    status, what, fix = found["identity"]
    assert status is Status.FAIL
    assert what.startswith("no answer to a GET with the agent's certificate: the control plane ")
    assert "refused the agent's certificate" in what
    assert "enroll again" in fix


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_closed_port(pki: PKIPaths, tmp_path: Path, short_tmp: Path) -> None:
    port = closed_port()
    paths = agent_config(tmp_path / "agent", pki, port, short_tmp)
    found = await doctor(paths.config)
    status, what, fix = found["tcp"]
    assert status is Status.FAIL
    assert what.startswith(f"127.0.0.1:{port}: ConnectionRefusedError")
    assert f"nothing accepts connections at localhost:{port}" in what
    assert fix.startswith("check the port in control_plane.url")
    assert [found[name][0] for name in ("tls", "identity", "clock")] == [Status.SKIP] * 3
    assert found["agent"][0] is Status.WARN  # no agent runs here
    assert "no agent control socket at" in found["agent"][1]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose listener never accepts, its queue full: new SYNs are dropped."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=scaled(5)):  # fills it
            yield port


async def test_blackhole(blackhole: int, pki: PKIPaths, tmp_path: Path, short_tmp: Path) -> None:
    paths = agent_config(tmp_path / "agent", pki, blackhole, short_tmp)
    found = await doctor(paths.config, timeout=0.3)
    status, what, fix = found["tcp"]
    assert status is Status.FAIL
    assert what.startswith(f"127.0.0.1:{blackhole}: TimeoutError: timed out after 0.3 s")
    assert "get no answer: a firewall or security group drops them" in what
    assert "allow outbound TCP 443" in fix


async def test_private_endpoint_outside_the_vpc(
    stub: StubServer, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_config(
        tmp_path / "agent", pki, stub.agent_port, short_tmp, connect_to="127.0.0.1"
    )
    found = await doctor(paths.config, vpc_cidrs=("10.0.0.0/16",))
    status, what, fix = found["private-link-dns"]
    assert status is Status.FAIL
    assert what == (
        "127.0.0.1 (control_plane.connect_to) resolves to 127.0.0.1, outside the VPC's 10.0.0.0/16"
    )
    assert fix == "point control_plane.connect_to at the endpoint's private address"
    # Inside the VPC (loopback standing for it), the same endpoint passes and connects.
    found = await doctor(paths.config, vpc_cidrs=("127.0.0.0/8",))
    assert found["private-link-dns"][0] is Status.PASS
    assert found["tls"][0] is Status.PASS
    assert found["route"][1].startswith(f"direct to 127.0.0.1:{stub.agent_port}, a private")


async def test_private_endpoint_that_times_out_is_the_faqs_security_group(
    blackhole: int, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_config(tmp_path / "agent", pki, blackhole, short_tmp, connect_to="127.0.0.1")
    found = await doctor(paths.config, timeout=0.3, vpc_cidrs=("127.0.0.0/8",))
    status, what, fix = found["private-link-443"]
    assert status is Status.FAIL
    assert what == f"TCP connections to 127.0.0.1:{blackhole} (127.0.0.1) time out"
    assert fix == (
        f"allow inbound TCP {blackhole} from the VPC's CIDR (127.0.0.0/8) in the endpoint's "
        f"security group: aws ec2 authorize-security-group-ingress --group-id <endpoint-sg> "
        f"--protocol tcp --port {blackhole} --cidr 127.0.0.0/8"
    )


async def test_a_key_others_can_read(
    stub: StubServer, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    key = tmp_path / "agent.key"
    shutil.copy(pki.agent_key("agent-1"), key)
    key.chmod(0o644)
    paths = agent_config(tmp_path / "agent", pki, stub.agent_port, short_tmp)
    replace(paths.config, str(pki.agent_key("agent-1")), str(key))
    found = await doctor(paths.config)
    assert found["key"] == (
        Status.FAIL,
        f"{key} is 0644 root:root: other users can read it, so the agent refuses it",
        f"chmod 600 {key}",
    )
    assert found["tls"][0] is Status.FAIL
    assert found["tls"][2] == f"chmod 600 {key} (and chown it to the agent's user)"


# -- a proxy --------------------------------------------------------------------------------


@pytest.fixture
async def strict_proxy(tmp_path: Path) -> AsyncIterator[int]:
    """tinyproxy allowing CONNECT to port 443 only (a common corporate rule)."""
    async with running_tinyproxy(tmp_path, "ConnectPort 443\n") as (port, _):
        yield port


async def test_a_proxy_refusing_connect(
    stub: StubServer, strict_proxy: int, pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_config(
        tmp_path / "agent",
        pki,
        stub.agent_port,
        short_tmp,
        proxy=f"http://127.0.0.1:{strict_proxy}",
    )
    found = await doctor(paths.config)
    assert found["route"] == (
        Status.PASS,
        f"via proxy http://127.0.0.1:{strict_proxy} (control_plane.proxy)",
        "",
    )
    assert found["dns"][1] == "127.0.0.1 -> 127.0.0.1 (the proxy)"
    status, what, fix = found["proxy"]
    assert status is Status.FAIL
    assert what.startswith(
        f"CONNECT localhost:{stub.agent_port} via http://127.0.0.1:{strict_proxy}: HTTP 403: "
        f"the HTTP proxy refuses CONNECT to localhost:{stub.agent_port}"
    )
    assert fix.startswith(f"have CONNECT to localhost:{stub.agent_port} allowed on the proxy")
    assert found["tls"][0] is Status.SKIP


def test_no_proxy_decides_and_says_why(
    pki: PKIPaths, tmp_path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = agent_config(tmp_path / "agent", pki, closed_port(), short_tmp)
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "wss_proxy", "WSS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "example.com,localhost")
    found = {c.name: c for c in examine(paths.config, Options(timeout=0.5))}
    assert found["route"].found.endswith("(NO_PROXY='example.com,localhost' matches localhost)")
    monkeypatch.setenv("NO_PROXY", "example.com")
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@127.0.0.1:9")  # nothing listens there
    found = {c.name: c for c in examine(paths.config, Options(timeout=0.5))}
    assert found["route"].found == (
        "via proxy http://***@127.0.0.1:9 (HTTPS_PROXY from the environment; "
        "NO_PROXY='example.com' does not match localhost)"
    )
    assert found["tcp"].status is Status.FAIL  # the proxy's port is closed


# -- a skewed clock, and the command itself -----------------------------------------------------


def run_doctor(
    config: Path, *extra: str, skew: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", "doctor", "--config", str(config), *extra]
    if skew is not None:
        faketime = tool("faketime", "apt-get install faketime")
        argv = [faketime, "-f", skew, *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=scaled(60), check=False, cwd=REPO
    )


@pytest.mark.parametrize(
    ("skew", "status", "words"),
    [("+30s", "WARN", "the commands' allowance is 60 s"), ("-300s", "FAIL", "will be refused")],
)
async def test_a_skewed_clock(
    stub: StubServer,
    start_agent: AgentStarter,
    skew: str,
    status: str,
    words: str,
) -> None:
    """doctor's own clock is moved (libfaketime): the host's clock is what is wrong."""
    running = await start_agent(port=stub.agent_port)
    done = await asyncio.to_thread(run_doctor, running.paths.config, skew=skew)
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(f"{status}  clock")]
    measured = re.search(r"this host's clock is ([\d.]+) s (ahead of|behind) the control", line)
    assert measured is not None, line
    assert abs(float(measured.group(1)) - abs(int(skew[:-1]))) < 1.5
    assert measured.group(2) == ("ahead of" if skew.startswith("+") else "behind")
    assert words in line
    assert "-> fix: synchronise the clock: timedatectl set-ntp true" in line
    assert done.returncode == (1 if status == "FAIL" else 0), done.stdout


async def test_the_command_prints_one_line_per_check_and_json(
    stub: StubServer, pki: PKIPaths, foreign_pki: PKIPaths, tmp_path: Path, short_tmp: Path
) -> None:
    paths = agent_config(tmp_path / "agent", pki, stub.agent_port, short_tmp)
    replace(paths.config, str(pki.server_ca_cert), str(foreign_pki.server_ca_cert))
    done = await asyncio.to_thread(run_doctor, paths.config)
    assert done.returncode == 1
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == f"byoc-agent doctor: {paths.config}"
    assert [line.split()[:2] for line in lines[1:-1]][11] == ["FAIL", "tls"]
    assert " -> fix: install the vendor's CA bundle" in lines[12]
    assert lines[-1].startswith("FAILED: 11 passed, 1 warnings, 1 failed, 2 skipped (")
    done = await asyncio.to_thread(run_doctor, paths.config, "--json")
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert [c["check"] for c in report["checks"] if c["status"] == "fail"] == ["tls"]
    assert report["checks"][0] == {
        "check": "config",
        "status": "pass",
        "found": report["checks"][0]["found"],
        "fix": "",
    }


async def test_a_broken_configuration_is_one_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nlog_level = 'loud'\n")
    done = await asyncio.to_thread(run_doctor, config)
    assert done.returncode == 1
    assert done.stdout.splitlines()[1].startswith("FAIL  config  agent.log_level must be one of")


# -- the judgements themselves ----------------------------------------------------------------


def test_clock_judgement() -> None:
    assert judge_clock(0.4, uncertainty=0.5, allowance=60).status is Status.PASS
    assert judge_clock(-20, uncertainty=0.5, allowance=60).status is Status.WARN
    late = judge_clock(90, uncertainty=0.5, allowance=60)
    assert late.status is Status.FAIL
    assert late.found.startswith("this host's clock is 90.0 s behind the control plane's")


def test_answer_judgement() -> None:
    assert judge_answer(426, None).status is Status.PASS
    revoked = judge_answer(403, None)
    assert (revoked.status, revoked.found) == (
        Status.FAIL,
        "the control plane refuses this agent's certificate (HTTP 403): it was revoked",
    )
    assert "never follows" in judge_answer(301, "https://elsewhere.example/").found


def test_certificate_judgement(pki: PKIPaths) -> None:
    cert = x509.load_pem_x509_certificate(pki.agent_cert("agent-1").read_bytes())
    bundle = [x509.load_pem_x509_certificate(pki.agent_ca_cert.read_bytes())]
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc

    def judged(now: datetime, **kwargs: object) -> tuple[Status, str]:
        options: dict[str, object] = {"key_matches": True, "configured_id": None, "bundle": []}
        options.update(kwargs)
        check = judge_certificate(cert, now=now, **options)  # type: ignore[arg-type]
        return check.status, check.found

    assert judged(start + timedelta(hours=1))[0] is Status.PASS
    assert "(chains to ca_bundle)" in judged(start + timedelta(hours=1), bundle=bundle)[1]
    assert judged(end - (end - start) / 4)[0] is Status.WARN  # renewal overdue
    assert judged(end + timedelta(seconds=1)) == (
        Status.FAIL,
        f"agent-1's certificate expired at {end:%Y-%m-%dT%H:%M:%SZ}",
    )
    assert judged(start - timedelta(minutes=5))[0] is Status.FAIL
    assert "does not belong to the private key" in judged(start, key_matches=False)[1]
    assert "agent.id in agent.toml says agent-2" in judged(start, configured_id="agent-2")[1]


FAILURES = """\
server_ca_unknown
    control plane certificate refused: unable to get local issuer certificate
server_name_mismatch
    control plane certificate refused: Hostname mismatch, certificate is not valid for 'x'.
server_certificate_expired
    control plane certificate refused: certificate has expired
client_certificate_refused
    control plane refused our client certificate (TLSV1_ALERT_UNKNOWN_CA)
client_certificate_expired
    control plane refused our client certificate (SSLV3_ALERT_CERTIFICATE_EXPIRED)
client_certificate_refused
    the control plane closed the connection right after the TLS handshake, twice in a row: it
    most likely refused our client certificate
certificate_revoked
    control plane refused the connection: HTTP 403
certificate_revoked
    closed 4006: certificate revoked
http_refused
    control plane refused the connection: HTTP 404
redirect_refused
    control plane answered HTTP 301 with a redirect; redirects are never followed
proxy_auth
    the proxy refused the connection: HTTP 407 (via proxy http://***@p:3128)
proxy_forbidden
    the proxy refused the connection: HTTP 403 (via proxy http://p:3128)
proxy_failed
    the proxy refused the connection: HTTP 502 (via proxy http://p:3128)
proxy_unsupported
    the proxy from the environment (SOCKS_PROXY): socks5://p:1080 is a SOCKS proxy
connection_refused
    ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 8443)
timeout
    TimeoutError: timed out during opening handshake
dns
    gaierror: [Errno -2] Name or service not known
network_unreachable
    OSError: [Errno 101] Network is unreachable
key_permissions
    private key /k is accessible by group or others (mode 0644); run: chmod 600 /k
tls_files
    cannot read the CA bundle (control_plane.ca_bundle) /ca.pem: No such file or directory
tls_files
    cannot read the private key (control_plane.client_key) /k.pem: Permission denied
tls_files
    the client certificate /a.pem and key /a.key cannot be used together (not PEM, or not a
    pair): [SSL] PEM lib (_ssl.c:3917)
unknown
    InvalidMessage: did not receive a valid HTTP response
"""
"""What the tunnel keeps as its last error (tunnel.py, tls.py, egress.py), under its code (a
long text continues on the next indented line)."""


def failures() -> list[tuple[str, str]]:
    cases: list[tuple[str, str]] = []
    for line in FAILURES.splitlines():
        if line.startswith(" "):
            code, text = cases[-1]
            cases[-1] = (code, f"{text} {line.strip()}".strip())
        else:
            cases.append((line, ""))
    return cases


@pytest.mark.parametrize(("code", "error"), failures())
def test_each_failure_has_its_cause_and_action(code: str, error: str) -> None:
    diagnosis = diagnose(error, Where(host="cp.example.com", port=443, ca_bundle="/etc/ca.pem"))
    assert diagnosis.code == code
    assert diagnosis.cause
    assert diagnosis.action
    assert not diagnosis.cause.endswith(".")


def test_vpc_cidrs_from_the_instance_metadata() -> None:
    """IMDSv2's wire format, served on loopback: a PUT for a session token, then GETs that
    must carry it."""
    import http.server
    import threading

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
            self._answer("TOKEN")

        def do_GET(self) -> None:
            if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN":
                self.send_error(401)
                return
            answers = {
                "/latest/meta-data/mac": "0e:aa:bb:cc:dd:ee",
                "/latest/meta-data/network/interfaces/macs/0e:aa:bb:cc:dd:ee/"
                "vpc-ipv4-cidr-blocks": "10.0.0.0/16\n10.1.0.0/16",
            }
            if self.path not in answers:
                self.send_error(404)
                return
            self._answer(answers[self.path])

        def _answer(self, text: str) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert vpc_cidrs_from_metadata(base, 2.0) == ("10.0.0.0/16", "10.1.0.0/16")
    finally:
        server.shutdown()
        server.server_close()
    assert vpc_cidrs_from_metadata(f"http://127.0.0.1:{closed_port()}", 0.5) == ()
