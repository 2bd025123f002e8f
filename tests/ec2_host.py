"""An EC2 host for the tests, set up once per session exactly as README "On an EC2 host" says.

The session fixture :func:`ec2_host`:

1. boots a real systemd in a container (tests/nspawn.py) and gives it a copy of this
   repository, as an operator's clone, and a wheelhouse of the agent's dependencies built on
   the host from ``constraints.txt`` (the container reaches no package index; ``make install``
   is run with ``PIP_NO_INDEX=1 PIP_FIND_LINKS=...``, pip's own settings, as a host with an
   internal mirror would be);
2. starts, on the host's loopback (the container shares the host's network), the stub control
   plane with its enrollment listener (certificates live 60 s, so renewal happens during the
   session) and an HTTP server for the workload's releases (the vendor's artifact store);
3. runs the README's ``<!-- readme-test: ec2 -->`` blocks in order, in a root shell in the
   clone, with what the vendor gives an operator: the enrollment URL (``$ENROLL_URL``), a
   one-time token on standard input, the CA bundle, command-signing key and release-signing
   key (:attr:`Ec2Host.release_key` is its private half) as files in the current directory,
   and an operator's user name (``$OPERATOR``). The one step the README leaves to the reader,
   editing agent.toml and the policy for this vendor (URL, issuer, releases, ports), is done
   by :meth:`Ec2Host.configure` right before the enroll block. A
   site drop-in shortens the unit's watchdog (8 s) and restart delay (1 s) so that the
   watchdog test does not wait 30 s; nothing else differs from the shipped unit.

The demo releases (``bin/milvus``, a shell script that runs the demo workload from the agent's
venv as ``milvus run querynode --instance N`` on ``base_port + N``, ``Type=notify``):
1.0.0; 2.0.0, which takes 2 s to start (so that a test can act while an instance restarts);
2.1.0, whose health check fails; 3.0.0 with a signature that does not verify; 6.6.6, whose
bytes differ from the pinned SHA-256; 7.0.0 from a URL outside ``allowed_urls``; 8.0.0 allowed
by the policy but not configured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certs.keyset import make_root_key
from certs.pki import PKIPaths, init_pki
from control_plane_stub.client import StubClient
from tests.conftest import scaled
from tests.nspawn import CACHE, Machine, Timing, boot, cache_lock
from tests.processes import REPO, ChildProcess, free_port, stub_process
from tests.readme_blocks import Block, blocks

AGENT_ID: Final = "ec2-host-1"
CLONE: Final = "/root/byoc-agent"
WHEELS: Final = "/var/cache/byoc-wheels"
AUDIT_LOG: Final = "/var/log/byoc-agent/audit.jsonl"
UNIT: Final = "byoc-agent.service"
DRIVER_STATE: Final = "systemd-driver.json"
OPERATOR: Final = "alice"
"""In byoc-agent and byoc-operators (the README's usermod): may look and approve."""
LOOKER: Final = "bob"
"""In byoc-agent only: may reach the control socket, not approve."""
OUTSIDER: Final = "carol"
"""In neither group."""
CERT_LIFETIME: Final = 60.0
SLOW_START: Final = 2.0
"""Seconds release 2.0.0 takes before it serves and sends READY=1."""
TEST_TIMING_DROPIN: Final = """\
# Test timing only (tests/ec2_host.py): the shipped 30 s and 5 s would make the watchdog
# test wait; every other setting is the shipped unit's.
[Service]
WatchdogSec=8s
RestartSec=1s
"""


# -- releases and the artifact store ----------------------------------------------------------


def release_tarball(
    version: str, *, base_port: int, delay: float = 0.0, broken: bool = False
) -> bytes:
    """A workload release: ``bin/milvus`` runs the demo workload from the agent's venv."""
    fail = ' --fail-health "schema migration failed"' if broken else ""
    script = f"""#!/bin/sh
# Demo release {version} of the workload: `milvus run querynode --instance N` serves /healthz,
# /metrics and /version on 127.0.0.1:{base_port}+N and sends READY=1 (Type=notify).
if [ "$1 $2 $3" != "run querynode --instance" ]; then
    echo "usage: milvus run querynode --instance N" >&2
    exit 2
fi
sleep {delay}
exec /opt/byoc-agent/current/bin/byoc-demo-workload --port $(({base_port} + $4)) \
    --version {version}{fail}
""".encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data, mode in (
            ("bin/milvus", script, 0o755),
            ("VERSION", version.encode(), 0o644),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def artifact_server(root: Path) -> Iterator[str]:
    """A real HTTP server on the host's loopback: the vendor's artifact store."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/milvus/"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Releases:
    """The releases table for agent.toml and the files behind it."""

    table: dict[str, dict[str, str]]
    public_key_pem: bytes


def publish_releases(root: Path, base: str, *, base_port: int) -> Releases:
    store = root / "milvus"
    store.mkdir(parents=True)
    key = Ed25519PrivateKey.generate()
    made = {
        "1.0.0": release_tarball("1.0.0", base_port=base_port),
        "2.0.0": release_tarball("2.0.0", base_port=base_port, delay=SLOW_START),
        "2.1.0": release_tarball("2.1.0", base_port=base_port, broken=True),
        "3.0.0": release_tarball("3.0.0", base_port=base_port),
    }
    table: dict[str, dict[str, str]] = {}
    for version, data in made.items():
        (store / f"{version}.tar.gz").write_bytes(data)
        signed = data if version != "3.0.0" else b"some other artifact"
        (store / f"{version}.tar.gz.sig").write_text(base64.b64encode(key.sign(signed)).decode())
        table[version] = {
            "url": f"{base}{version}.tar.gz",
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    tampered = release_tarball("6.6.6", base_port=base_port)
    (store / "6.6.6.tar.gz").write_bytes(tampered)
    (store / "6.6.6.tar.gz.sig").write_text(base64.b64encode(key.sign(tampered)).decode())
    table["6.6.6"] = {
        "url": f"{base}6.6.6.tar.gz",
        "sha256": hashlib.sha256(b"what the customer pinned").hexdigest(),
    }
    table["7.0.0"] = {"url": "https://elsewhere.example/7.0.0.tar.gz", "sha256": "0" * 64}
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return Releases(table, public)


# -- the wheelhouse -----------------------------------------------------------------------------


def wheelhouse(timing: Timing) -> Path:
    """Wheels of the agent's dependencies (and the build backend), pinned by constraints.txt,
    downloaded once on the host into the cache: what ``make install`` installs offline."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["fast"],
        *project["build-system"]["requires"],
    ]
    constraints = (REPO / "constraints.txt").read_bytes()
    key = hashlib.sha256(constraints + repr(requirements).encode()).hexdigest()[:16]
    dest = CACHE / f"wheels-{key}"
    with cache_lock("wheels"):
        if (dest / ".complete").exists():
            timing.steps["wheelhouse"] = 0.0
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        with timing.step("wheelhouse"):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--only-binary=:all:",
                    "--dest",
                    str(dest),
                    "--constraint",
                    str(REPO / "constraints.txt"),
                    *requirements,
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
            )
        if done.returncode != 0:
            raise RuntimeError(f"pip download failed:\n{done.stderr[-3000:]}")
        (dest / ".complete").write_text("")
        return dest


# -- the host ----------------------------------------------------------------------------------


@dataclass
class Ec2Host:
    machine: Machine
    timing: Timing
    pki: PKIPaths
    api_url: str
    agent_port: int
    enroll_port: int
    health_port: int
    base_port: int
    artifacts: str
    releases: Releases
    stub: ChildProcess
    release_key: Path
    """The vendor's release signing key (the agent trusts release-signing.pub)."""
    readme_output: dict[int, str] = field(default_factory=dict)

    # -- the README's "edit agent.toml" step ------------------------------------------------

    def configure(self) -> None:
        """What the operator edits for this vendor (README: "set control_plane.url, ...")."""
        config = self.machine.path("/etc/byoc-agent/agent.toml")
        text = config.read_text()
        for old, new in {
            'url = "wss://cp.vendor.example:443/v1/agent"': (
                f'url = "wss://127.0.0.1:{self.agent_port}/v1/agent"'
            ),
            'issuers = ["vendor-control-plane"]': 'issuers = ["cp-stub"]',
            'listen = "127.0.0.1:9464"': f'listen = "127.0.0.1:{self.health_port}"',
            'allowed_urls = ["https://artifacts.vendor.example/milvus/"]': (
                f'allowed_urls = ["{self.artifacts}"]'
            ),
            "base_port = 19530": f"base_port = {self.base_port}",
            "start_timeout = 60.0": "start_timeout = 8.0",
            '# signing_key = "/etc/byoc-agent/keys/artifacts.pub"': (
                'signing_key = "/etc/byoc-agent/keys/artifacts.pub"'
            ),
        }.items():
            assert text.count(old) == 1, f"systemd/ec2/agent.toml no longer has {old!r}"
            text = text.replace(old, new)
        text = text[: text.index("[driver.systemd.releases.")]
        for version, release in self.releases.table.items():
            text += f'[driver.systemd.releases."{version}"]\n'
            text += f'url = "{release["url"]}"\nsha256 = "{release["sha256"]}"\n\n'
        config.write_text(text)  # in place: keeps root:byoc-agent 0640
        policy = self.machine.path("/etc/byoc-agent/policy.toml")
        versions = 'versions = ["1.0.0", "2.0.0", "2.1.0"]'
        assert policy.read_text().count(versions) == 1
        policy.write_text(
            policy.read_text().replace(
                versions,
                'versions = ["1.0.0", "2.0.0", "2.1.0", "3.0.0", "6.6.6", "7.0.0", "8.0.0"]',
            )
        )
        keys = self.machine.path("/etc/byoc-agent/keys")
        (keys / "artifacts.pub").write_bytes(self.releases.public_key_pem)
        (keys / "artifacts.pub").chmod(0o644)
        dropin = self.machine.path(f"/etc/systemd/system/{UNIT}.d/zz-test-timing.conf")
        dropin.parent.mkdir(exist_ok=True)
        dropin.write_text(TEST_TIMING_DROPIN)
        self.machine.run("systemctl", "daemon-reload")

    # -- looking at it ----------------------------------------------------------------------

    def main_pid(self) -> int:
        return int(self.machine.show(UNIT, "MainPID")["MainPID"])

    def audit_records(self) -> list[dict[str, Any]]:
        path = self.machine.path(AUDIT_LOG)
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written right now
                records.append(json.loads(line))
        return records

    def audit_head(self) -> int:
        records = self.audit_records()
        return int(records[-1]["seq"]) if records else 0

    async def wait_audit(
        self, event: str, *, after: int = 0, within: float = 60.0, **match: object
    ) -> dict[str, Any]:
        """The first audit record ``event`` (with ``match``) after seq ``after``. The log is a
        file in the container; it is read again every 50 ms until the record is there."""
        deadline = time.monotonic() + scaled(within)
        while True:
            for record in self.audit_records():
                if (
                    record["seq"] > after
                    and record["event"] == event
                    and all(record.get(k) == v for k, v in match.items())
                ):
                    return record
            if time.monotonic() > deadline:
                tail = [f"{r['seq']} {r['event']}" for r in self.audit_records()[-15:]]
                raise AssertionError(f"no audit record {event} {match} after {after}: {tail}")
            await asyncio.sleep(0.05)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.machine.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", *args)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def client(self) -> StubClient:
        return StubClient(self.api_url, timeout=scaled(60))

    async def command(
        self, api: StubClient, command_type: str, params: dict[str, object], *, wait: float = 120
    ) -> dict[str, Any]:
        """Send a command through the stub and wait for its final state."""
        sent = await api.send(AGENT_ID, command_type, params)
        answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(wait))
        assert not answer["timed_out"], answer
        return dict(answer["command"])

    async def wait_connected(self, api: StubClient, within: float = 60.0) -> None:
        agent = await api.agent(AGENT_ID, wait_connected=scaled(within))
        assert agent["connected"], agent

    # -- the workload ----------------------------------------------------------------------

    def current(self) -> str | None:
        """The release ``/opt/milvus/current`` points to."""
        try:
            return Path(os.readlink(self.machine.path("/opt/milvus/current"))).name
        except OSError:
            return None

    def replicas(self) -> int:
        state = self.machine.path(f"/var/lib/byoc-agent/driver/{DRIVER_STATE}")
        return int(json.loads(state.read_text())["replicas"]) if state.exists() else 0

    def instance_versions(self, count: int) -> list[str | None]:
        """What each instance says it runs (GET /version on its port), None if it does not
        answer."""
        found: list[str | None] = []
        for index in range(count):
            url = f"http://127.0.0.1:{self.base_port + index}/version"
            try:
                with urllib.request.urlopen(url, timeout=scaled(5)) as answer:
                    found.append(json.loads(answer.read())["version"])
            except OSError:
                found.append(None)
        return found

    def unit_states(self, count: int) -> list[str]:
        return [
            self.machine.show(f"milvus-querynode@{i}.service", "ActiveState")["ActiveState"]
            for i in range(count)
        ]

    async def ensure(self, api: StubClient, *, version: str, replicas: int) -> None:
        """Bring the workload to ``replicas`` instances of ``version`` (through commands)."""
        await self.wait_connected(api)
        if self.current() != version:
            done = await self.command(api, "upgrade", {"version": version})
            assert done["state"] == "succeeded", done
        if self.replicas() != replicas:
            done = await self.command(api, "scale", {"replicas": replicas})
            assert done["state"] == "succeeded", done

    async def wait_restarted(self, old_pid: int, within: float = 60.0) -> int:
        """The unit's new main PID, once systemd has started it again and it is active."""
        deadline = time.monotonic() + scaled(within)
        while True:
            shown = self.machine.show(UNIT, "MainPID", "ActiveState")
            pid = int(shown["MainPID"])
            if pid not in (0, old_pid) and shown["ActiveState"] == "active":
                return pid
            if time.monotonic() > deadline:
                raise AssertionError(f"{UNIT} was not restarted in {within:g}s: {shown}")
            await asyncio.sleep(0.1)


def run_readme(host: Ec2Host, suite_blocks: list[Block], token: str) -> None:
    """Run the README's blocks in a root shell in the clone, as the README tells a reader (those
    it gives to the operators as ``$OPERATOR``, in a login of their own)."""
    env = {
        "ENROLL_URL": f"https://127.0.0.1:{host.enroll_port}",
        "OPERATOR": OPERATOR,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": WHEELS,
    }
    for block in suite_blocks:
        if "byoc-agent enroll" in block.text:
            with host.timing.step("operator edits agent.toml"):
                host.configure()
        stdin = f"{token}\n" if "--token -" in block.text else None
        with host.timing.step(f"README block at line {block.line}"):
            done = host.machine.run(
                "bash", "-euo", "pipefail", "-c", block.text,
                cwd="/" if block.as_operator else CLONE, env=env, stdin=stdin, check=False,
                timeout=900, user=OPERATOR if block.as_operator else None,
            )  # fmt: skip
        assert done.returncode == 0, (
            f"{block} failed with exit {done.returncode}:\n{block.text}\n"
            f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
        )
        host.readme_output[block.line] = done.stdout + done.stderr


def _copy_clone(machine: Machine) -> None:
    """The operator's clone of this repository (the working tree, without local state)."""
    shutil.copytree(
        REPO,
        machine.path(CLONE),
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".tools",
            "__pycache__",
            "*.egg-info",
            "build",
            ".demo",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
            ".hypothesis",
            "results",
        ),
        symlinks=True,
    )


@pytest.fixture(scope="session")
def ec2_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ec2Host]:
    timing = Timing()
    work = tmp_path_factory.mktemp("ec2")
    wheels = wheelhouse(timing)
    machine = boot(f"byoc-ec2-{os.getpid()}", timing)
    stub: ChildProcess | None = None
    try:
        with timing.step("copy clone and wheels"):
            _copy_clone(machine)
            shutil.copytree(wheels, machine.path(WHEELS))
        pki = init_pki(work / "pki", agent_ids=("agent-1",))
        release_key, release_pub = make_root_key(work / "release", name="release")
        for name, source in (
            ("vendor-ca.pem", pki.server_ca_cert),
            ("command-signing.pub", pki.signing_pub),
            ("release-signing.pub", release_pub),
        ):
            shutil.copyfile(source, machine.path(f"{CLONE}/{name}"))
        for user in (OPERATOR, LOOKER, OUTSIDER):  # groups: the README (alice), the tests
            machine.run("useradd", "--create-home", user)
        base_port = random.randrange(29100, 32600, 100)  # under the ephemeral ports
        ports = {name: free_port() for name in ("agents", "api", "enroll", "health")}
        stub = stub_process(
            pki,
            agent_port=ports["agents"],
            api_port=ports["api"],
            db=work / "stub.db",
            log=work / "stub.log",
        )
        stub.argv += ["--enroll", f"127.0.0.1:{ports['enroll']}"]
        stub.argv += ["--cert-lifetime", str(CERT_LIFETIME)]
        stub.start()
        with artifact_server(work / "artifacts") as base:
            releases = publish_releases(work / "artifacts", base, base_port=base_port)
            host = Ec2Host(
                machine=machine,
                timing=timing,
                pki=pki,
                api_url=f"http://127.0.0.1:{ports['api']}",
                agent_port=ports["agents"],
                enroll_port=ports["enroll"],
                health_port=ports["health"],
                base_port=base_port,
                artifacts=base,
                releases=releases,
                stub=stub,
                release_key=release_key,
            )

            async def token() -> str:
                async with host.client() as api:
                    await api.wait_ready(scaled(30))
                    return str((await api.enroll_token(AGENT_ID, ttl=900))["token"])

            run_readme(host, blocks("ec2"), asyncio.run(token()))
            yield host
    finally:
        with timing.step("stop"):
            machine.stop()
            if stub is not None:
                stub.ensure_dead()
        report = CACHE / "last-ec2-session.json"
        with contextlib.suppress(OSError):
            report.write_text(json.dumps(timing.steps, indent=2) + "\n")
        _TIMINGS.update(timing.steps)


_TIMINGS: dict[str, float] = {}
"""The last session's harness timings, for the terminal summary (tests/conftest.py)."""


def harness_timings() -> dict[str, float]:
    return dict(_TIMINGS)


__all__ = ["AGENT_ID", "UNIT", "Ec2Host", "ec2_host", "harness_timings"]
