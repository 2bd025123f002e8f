"""The ``systemd`` driver (EC2 hosts).

systemd is not PID 1 here, so ``systemctl`` is a stand-in (tests/fake_systemctl.py) that speaks
its command line, records the calls and really runs the release ``current`` points to. Every
other part is real: artifacts are downloaded with httpx from a local HTTP server, verified
(SHA-256, Ed25519 signature), unpacked, the ``current`` symlink is switched, and health checks
and metrics are HTTP against the running workload processes.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import signal
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.errors import ConfigError, DriverError
from agent.drivers import load_driver_factory
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.drivers.systemd import SystemdDriver
from tests.processes import REPO

UNIT = "demo-workload@{index}.service"


def release_tarball(version: str, *, broken: bool = False) -> bytes:
    argv = ["{python}", "-m", "byoc_demo.workload", "--port", "{port}", "--version", version]
    if broken:
        argv += ["--fail-health", "schema migration failed"]
    data = json.dumps({"argv": argv}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        info = tarfile.TarInfo("run.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def artifact_server(root: Path) -> Iterator[str]:
    """A real HTTP server for the artifacts (the vendor's artifact store)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Host:
    """A stand-in EC2 host: releases directory, ``current`` link, fake systemctl, artifacts."""

    root: Path
    base: str
    base_port: int
    systemctl: Path
    records: list[tuple[str, dict[str, object]]]
    settings: dict[str, Any]

    def calls(self) -> list[list[str]]:
        path = self.root / "systemctl" / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def current(self) -> str:
        """The release the ``current`` symlink points to."""
        link = Path(self.settings["current"])
        assert link.is_symlink()
        return link.resolve().name

    def installed(self, version: str) -> bool:
        return (Path(self.settings["releases_dir"]) / version).exists()

    def events(self, name: str) -> list[dict[str, object]]:
        return [fields for event, fields in self.records if event == name]

    def driver(self, **overrides: Any) -> SystemdDriver:
        def audit(event: str, /, **fields: object) -> None:
            self.records.append((event, fields))

        env = DriverEnvironment(
            state_dir=self.root / "state", audit=audit, log=structlog.get_logger()
        )
        return SystemdDriver({**self.settings, **overrides}, env)

    def ctx(self) -> ExecContext:
        def audit(event: str, /, **fields: object) -> None:
            self.records.append((event, fields))

        return ExecContext(jti="test", audit=audit, log=structlog.get_logger())

    def stop_all(self) -> None:
        units = self.root / "systemctl" / "units.json"
        if units.exists():
            for state in json.loads(units.read_text()).values():
                if isinstance(state.get("pid"), int):
                    with contextlib.suppress(OSError):
                        os.kill(state["pid"], signal.SIGKILL)


@pytest.fixture
def host(tmp_path: Path, port_range: tuple[int, int]) -> Iterator[Host]:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    releases = {
        "1.0.0": release_tarball("1.0.0"),
        "2.0.0": release_tarball("2.0.0"),
        "2.1.0": release_tarball("2.1.0", broken=True),
    }
    for version, data in releases.items():
        (artifacts / f"{version}.tar.gz").write_bytes(data)
    (artifacts / "tampered.tar.gz").write_bytes(release_tarball("6.6.6"))
    state = tmp_path / "systemctl"
    state.mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "opt").mkdir()
    systemctl = tmp_path / "bin" / "systemctl"
    systemctl.parent.mkdir()
    base_port = port_range[0] + 50
    systemctl.write_text(
        "#!/bin/sh\n"
        f"export FAKE_SYSTEMCTL_DIR={state}\n"
        f"export FAKE_SYSTEMCTL_CURRENT={tmp_path / 'opt' / 'current'}\n"
        f"export FAKE_SYSTEMCTL_BASE_PORT={base_port}\n"
        f"export PYTHONPATH={REPO}\n"
        f'exec {sys.executable} {REPO / "tests" / "fake_systemctl.py"} "$@"\n'
    )
    systemctl.chmod(0o755)
    with artifact_server(artifacts) as base:
        releases_table: dict[str, dict[str, str]] = {
            version: {"url": f"{base}{version}.tar.gz", "sha256": hashlib.sha256(data).hexdigest()}
            for version, data in releases.items()
        }
        releases_table["6.6.6"] = {  # served bytes that differ from the pinned digest
            "url": f"{base}tampered.tar.gz",
            "sha256": hashlib.sha256(b"what the customer pinned").hexdigest(),
        }
        releases_table["7.0.0"] = {
            "url": "https://elsewhere.example/7.0.0.tar.gz",
            "sha256": "0" * 64,
        }
        settings = {
            "unit": UNIT,
            "systemctl": str(systemctl),
            "releases_dir": str(tmp_path / "opt" / "releases"),
            "current": str(tmp_path / "opt" / "current"),
            "allowed_urls": [base],
            "releases": releases_table,
            "base_port": base_port,
            "start_timeout": 3.0,
            "health_poll_interval": 0.05,
        }
        made = Host(tmp_path, base, base_port, systemctl, [], settings)
        try:
            yield made
        finally:
            made.stop_all()


@pytest.fixture
async def driver(host: Host) -> AsyncIterator[SystemdDriver]:
    made = host.driver()
    await made.start()
    await made.upgrade("1.0.0", host.ctx())  # the host's first release, before any replica
    yield made
    await made.close()


def test_the_driver_is_registered() -> None:
    assert load_driver_factory("systemd") is SystemdDriver


async def versions(driver: SystemdDriver, host: Host) -> set[str]:
    result = await driver.collect_metrics(["workload"], host.ctx())
    samples: list[dict[str, Any]] = result["samples"]  # type: ignore[assignment]
    return {s["labels"]["version"] for s in samples if s["name"] == "demo_workload_info"}


async def test_scale_enables_and_disables_instances_and_checks_health(
    driver: SystemdDriver, host: Host
) -> None:
    assert await driver.scale(2, host.ctx()) == {
        "replicas": 2,
        "previous_replicas": 0,
        "version": "1.0.0",
    }
    assert await driver.scale(1, host.ctx()) == {
        "replicas": 1,
        "previous_replicas": 2,
        "version": "1.0.0",
    }

    assert host.calls() == [
        ["start", "demo-workload@0.service"],
        ["start", "demo-workload@1.service"],
        ["stop", "demo-workload@1.service"],
    ]
    assert [e["unit"] for e in host.events("unit_starting")] == [
        "demo-workload@0.service",
        "demo-workload@1.service",
    ]
    assert await versions(driver, host) == {"1.0.0"}
    assert json.loads((host.root / "state" / "systemd-driver.json").read_text()) == {"replicas": 1}


async def test_upgrade_downloads_verifies_switches_and_restarts_one_by_one(
    driver: SystemdDriver, host: Host
) -> None:
    await driver.scale(2, host.ctx())

    result = await driver.upgrade("2.0.0", host.ctx())

    assert result == {
        "version": "2.0.0",
        "previous_version": "1.0.0",
        "replicas": 2,
        "changed": True,
    }
    assert host.current() == "2.0.0"
    assert host.calls()[-2:] == [
        ["restart", "demo-workload@0.service"],
        ["restart", "demo-workload@1.service"],
    ]
    assert await versions(driver, host) == {"2.0.0"}
    verified = host.events("artifact_verified")[-1]
    assert verified["version"] == "2.0.0"
    order = [event for event, _ in host.records[-6:]]
    assert order.index("artifact_verified") < order.index("release_switching")
    assert (await driver.upgrade("2.0.0", host.ctx()))["changed"] is False


async def test_an_unhealthy_release_is_rolled_back(driver: SystemdDriver, host: Host) -> None:
    await driver.scale(2, host.ctx())
    await driver.upgrade("2.0.0", host.ctx())

    with pytest.raises(DriverError) as failed:
        await driver.upgrade("2.1.0", host.ctx())

    assert failed.value.code == "unhealthy_rolled_back"
    assert failed.value.result == {"rolled_back": True, "version": "2.0.0", "failed_replica": 0}
    assert host.current() == "2.0.0"
    assert host.events("rollback_started")
    assert await versions(driver, host) == {"2.0.0"}


@pytest.mark.parametrize(
    ("version", "code"),
    [("6.6.6", "checksum_mismatch"), ("7.0.0", "url_not_allowed"), ("9.9.9", "unknown_version")],
)
async def test_an_artifact_that_does_not_verify_changes_nothing(
    driver: SystemdDriver, host: Host, version: str, code: str
) -> None:
    await driver.scale(1, host.ctx())
    calls = host.calls()

    with pytest.raises(DriverError) as failed:
        await driver.upgrade(version, host.ctx())

    assert failed.value.code == code
    assert host.current() == "1.0.0"
    assert not host.installed(version)
    assert host.calls() == calls  # no unit touched
    assert await versions(driver, host) == {"1.0.0"}


async def test_a_signed_release_must_carry_a_valid_signature(host: Host) -> None:
    key = Ed25519PrivateKey.generate()
    public = host.root / "artifacts.pub"
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    artifacts = host.root / "artifacts"
    good = (artifacts / "2.0.0.tar.gz").read_bytes()
    (artifacts / "2.0.0.tar.gz.sig").write_text(base64.b64encode(key.sign(good)).decode())
    (artifacts / "1.0.0.tar.gz.sig").write_text(base64.b64encode(key.sign(b"other")).decode())
    signed = host.driver(signing_key=str(public))
    await signed.start()
    try:
        with pytest.raises(DriverError) as failed:
            await signed.upgrade("1.0.0", host.ctx())
        assert failed.value.code == "signature_invalid"
        assert (await signed.upgrade("2.0.0", host.ctx()))["version"] == "2.0.0"
    finally:
        await signed.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unit": "demo.service"}, "template"),
        ({"allowed_urls": []}, "allowed_urls"),
        ({"allowed_urls": ["ftp://x/"]}, "allowed_urls"),
        ({"releases": {"1.0.0": {"url": "https://x/", "sha256": "abc"}}}, "sha256"),
        ({"releases": {"bad version": {"url": "https://x/", "sha256": "0" * 64}}}, "version"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_settings_are_refused(host: Host, change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        host.driver(**change)


async def test_a_restarted_agent_starts_instances_that_are_down(
    driver: SystemdDriver, host: Host
) -> None:
    """After a reboot the units are down (they are not enabled): the agent keeps the count."""
    await driver.scale(2, host.ctx())
    host.stop_all()
    await driver.close()

    again = host.driver()
    await again.start()
    try:
        assert host.calls()[-4:] == [
            ["is-active", "--quiet", "demo-workload@0.service"],
            ["start", "demo-workload@0.service"],
            ["is-active", "--quiet", "demo-workload@1.service"],
            ["start", "demo-workload@1.service"],
        ]
        assert [e.get("reason") for e in host.events("unit_starting")][-2:] == ["reconcile"] * 2
        assert await again._healthy(0)  # started, not waited for: the agent's start goes on
        assert await again._healthy(1)
        assert await versions(again, host) == {"1.0.0"}
    finally:
        await again.close()
