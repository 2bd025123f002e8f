"""The I/O half of agent self-update outside systemd: the download (a real HTTP server on
loopback: redirects, statuses, size caps), unpacking a payload, the updater's decisions from its
journal (resuming after a restart, the trial, the rollback) on real files and links, and the
agent answering ``not_supported`` where it does not update itself (a pod, a host without
``[update]``, an agent that systemd does not run).

Installing a release (venv, pip) and the restarts are the EC2 tests' (tests/test_update_agent.py,
under a real systemd)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import __version__
from agent.cli import main as agent_cli
from agent.config import UpdateConfig, parse_config
from agent.core.commands import UpdateAgent
from agent.core.trust import KeyRing, Trust, read_keyset
from agent.core.verifier import TrustedKeys, jwk_thumbprint
from agent.drivers.base import ExecContext
from agent.io.runner import UPDATE_NOT_CONFIGURED
from agent.io.store import SCHEMA_VERSION
from agent.update import bridge, guard
from agent.update.download import download
from agent.update.errors import BundleRejected, Handover, UpdateError
from agent.update.install import MARKER, unpack_wheels
from agent.update.selftest import self_test
from agent.update.updater import EXIT_RESTART, Updater
from byoc_demo.layout import REFERENCE_POLICY
from certs.keyset import sign_keyset
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, scaled
from tests.fakes import RecordingDriver

OLD: Final = "0.0.9"
"""The release before this one, in the layouts made here."""
BODY: Final = b"bundle bytes " * 1000


# -- download ------------------------------------------------------------------------------------


@dataclass
class Served:
    base: str
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    hold = asyncio.Event()
    record = Served("")

    async def handle(request: web.Request) -> web.StreamResponse:
        record.hits.append(request.path)
        name = request.match_info["name"]
        if name == "ok":
            return web.Response(body=BODY)
        if name == "redirect":
            raise web.HTTPFound("/agent/ok")
        if name == "declared":  # a length over the cap, then nothing: never read, never waited
            response = web.StreamResponse(headers={"Content-Length": str(10**9)})
            await response.prepare(request)
            await hold.wait()
            return response
        if name == "endless":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(64):
                await response.write(bytes(64 * 1024))
            return response
        raise web.HTTPNotFound

    app = web.Application()
    app.router.add_get("/agent/{name}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    record.base = f"http://127.0.0.1:{port}/agent/"
    yield record
    hold.set()
    await runner.cleanup()


async def fetch(served: Served, name: str, dest: Path, cap: int = 100_000) -> Any:
    async with httpx.AsyncClient(timeout=scaled(10), trust_env=False) as client:
        return await download(client, f"{served.base}{name}", dest, max_bytes=cap)


async def test_a_download_is_hashed_as_it_streams(served: Served, tmp_path: Path) -> None:
    got = await fetch(served, "ok", tmp_path / "bundle")
    assert (got.size, got.sha256) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert (tmp_path / "bundle").read_bytes() == BODY
    assert oct((tmp_path / "bundle").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("redirect", "redirect_refused"),
        ("missing", "download_failed"),
        ("declared", "bundle_too_large"),
        ("endless", "bundle_too_large"),
    ],
)
async def test_a_download_refuses_redirects_errors_and_oversized_bodies(
    served: Served, tmp_path: Path, name: str, code: str
) -> None:
    with pytest.raises(UpdateError) as info:
        async with asyncio.timeout(scaled(10)):  # "declared" must not wait for its body
            await fetch(served, name, tmp_path / "bundle")
    assert info.value.code == code
    assert served.hits == [f"/agent/{name}"]  # a redirect is never followed
    if name == "endless":
        assert (tmp_path / "bundle").stat().st_size <= 100_000  # cut off at the cap


async def test_nothing_listening_is_a_download_failure(tmp_path: Path) -> None:
    served = Served("http://127.0.0.1:9/agent/")  # discard: nothing listens there
    with pytest.raises(UpdateError) as info:
        await fetch(served, "ok", tmp_path / "bundle")
    assert info.value.code == "download_failed"


# -- unpacking -------------------------------------------------------------------------------------


def payload(*members: tuple[str, bytes, bytes]) -> bytes:
    """A tar of (name, type, data) members, type being tarfile's REGTYPE, SYMTYPE, ..."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            else:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def unpack(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "bundle"
    path.write_bytes(b"HEADER\n" + data)
    return unpack_wheels(path, 7, len(data), tmp_path / "wheels")


def test_the_payload_s_wheels_are_unpacked(tmp_path: Path) -> None:
    names = unpack(
        tmp_path,
        payload(
            ("wheels/a-1-py3-none-any.whl", tarfile.REGTYPE, b"A"),
            ("wheels/b.whl", tarfile.REGTYPE, b"BB"),
        ),
    )
    assert names == ["a-1-py3-none-any.whl", "b.whl"]
    assert (tmp_path / "wheels" / "b.whl").read_bytes() == b"BB"


@pytest.mark.parametrize(
    "member",
    [
        ("wheels/../../escape.whl", tarfile.REGTYPE, b"x"),
        ("wheels/link.whl", tarfile.SYMTYPE, b""),
        ("wheels/dir.whl", tarfile.DIRTYPE, b""),
        ("install.sh", tarfile.REGTYPE, b"rm -rf /"),
    ],
)
def test_anything_but_wheel_files_refuses_the_payload(
    tmp_path: Path, member: tuple[str, bytes, bytes]
) -> None:
    with pytest.raises(BundleRejected) as info:
        unpack(tmp_path, payload(("wheels/ok.whl", tarfile.REGTYPE, b"ok"), member))
    assert info.value.code == "malformed_bundle"
    assert not (tmp_path / "escape.whl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "wheels"]


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 100])
def test_an_empty_or_foreign_payload_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(BundleRejected):
        unpack(tmp_path, data)


# -- the updater's decisions -----------------------------------------------------------------------


@dataclass
class Host:
    """A release layout, a journal and what the updater asked for."""

    root: Path
    state: Path
    audit: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    restarts: list[tuple[int, str]] = field(default_factory=list)

    def updater(self, *, systemd: bool = True, **config: Any) -> Updater:
        return Updater(
            UpdateConfig(root=self.root, **config),
            config_path=self.state / "agent.toml",
            state_dir=self.state,
            release_keys=lambda: TrustedKeys({}),
            restart=lambda code, reason: self.restarts.append((code, reason)),
            under_systemd=systemd,
            log=structlog.get_logger("test"),
        )

    def ctx(self, jti: str = "j-1") -> ExecContext:
        async def audit(event: str, /, **fields: object) -> None:
            self.audit.append((event, {"jti": jti, **fields}))

        return ExecContext(jti=jti, audit=audit, log=structlog.get_logger("test"))

    async def sink(self, event: str, /, **fields: object) -> None:
        self.audit.append((event, fields))

    def journal(self, **fields: Any) -> None:
        journal = {"format": 1, "jti": "j-1", "from": OLD, "to": __version__, "stage": "trial"}
        journal.update(fields)
        guard.write_journal(guard.journal_path(self.state), journal)

    def read(self) -> dict[str, Any]:
        journal = guard.read_journal(guard.journal_path(self.state))
        assert journal is not None
        return journal

    @property
    def events(self) -> list[str]:
        return [event for event, _ in self.audit]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root, state = tmp_path / "opt", tmp_path / "state"
    for version in (OLD, __version__):
        (root / "releases" / version).mkdir(parents=True)
    (root / "current").symlink_to(f"releases/{__version__}")
    state.mkdir()
    return Host(root, state)


COMMAND: Final = UpdateAgent(version="0.2.0", url="https://r.example/a/b.bundle", sha256="0" * 64)


async def failure(call: Callable[[], Any]) -> UpdateError:
    with pytest.raises(UpdateError) as info:
        await call()
    return info.value


async def test_not_supported_without_systemd_or_without_the_layout(host: Host) -> None:
    outside = await failure(lambda: host.updater(systemd=False).run(COMMAND, host.ctx()))
    assert outside.code == "not_supported"
    assert "not run by systemd" in outside.detail
    (host.root / "current").unlink()
    unlinked = await failure(lambda: host.updater().run(COMMAND, host.ctx()))
    assert (unlinked.code, "is not a link" in unlinked.detail) == ("not_supported", True)
    (host.root / "current").symlink_to(f"releases/{OLD}")
    elsewhere = await failure(lambda: host.updater().run(COMMAND, host.ctx()))
    assert (elsewhere.code, "restart it first" in elsewhere.detail) == ("not_supported", True)
    assert not guard.journal_path(host.state).exists()  # nothing was begun


async def test_the_running_version_needs_no_update(host: Host) -> None:
    same = UpdateAgent(version=__version__, url=COMMAND.url, sha256=COMMAND.sha256)
    result = await host.updater().run(same, host.ctx())
    assert result == {"version": __version__, "previous": __version__, "changed": False}
    assert host.events == ["update_not_needed"]


async def test_an_audit_sink_that_is_a_coroutine_function_is_awaited(host: Host) -> None:
    """The runner's ``ctx.audit`` (issue 12) is a coroutine function; today's is a plain one."""
    seen: list[str] = []

    async def audit(event: str, /, **fields: object) -> None:
        await asyncio.sleep(0)
        seen.append(event)

    ctx = ExecContext(jti="j-1", audit=audit, log=structlog.get_logger("t"))
    same = UpdateAgent(version=__version__, url=COMMAND.url, sha256=COMMAND.sha256)
    await host.updater().run(same, ctx)
    assert seen == ["update_not_needed"]


async def test_a_second_update_waits_for_the_trial_of_the_first(host: Host) -> None:
    host.journal(jti="j-0", deadline=time.time() + 60)
    refused = await failure(lambda: host.updater().run(COMMAND, host.ctx()))
    assert refused.code == "update_in_progress"


async def test_an_update_cut_off_before_its_switch_fails_and_is_cleaned_up(host: Host) -> None:
    unfinished = host.root / "releases" / "0.2.0"
    (unfinished / "bin").mkdir(parents=True)  # no marker: an install that never finished
    host.journal(**{"from": __version__, "to": "0.2.0", "stage": "installing", "step": "unpacked"})
    (guard.journal_path(host.state).parent / "work").mkdir()
    updater = host.updater()

    first = await failure(lambda: updater.run(COMMAND, host.ctx()))
    again = await failure(lambda: updater.run(COMMAND, host.ctx()))  # resumed twice: same answer

    assert first.code == again.code == "update_interrupted"
    assert "after step 'unpacked'" in first.detail
    assert first.result == {"version": __version__, "changed": False}
    assert not unfinished.exists()
    assert not (guard.journal_path(host.state).parent / "work").exists()
    assert host.read()["stage"] == "failed"
    assert host.events == ["update_interrupted"]


async def test_the_previous_release_reports_a_rollback(host: Host) -> None:
    (host.root / "releases" / "0.2.0").mkdir()
    (host.root / "releases" / "0.2.0" / MARKER).write_text("{}")
    host.journal(
        **{"from": __version__, "to": "0.2.0", "stage": "rolled_back"},
        reason="crashed",
        detail="0.2.0 was started 3 times without ...",
        by="guard",
        attempts=3,
    )
    failed = await failure(lambda: host.updater().run(COMMAND, host.ctx()))
    assert (failed.code, failed.detail) == ("rolled_back", "0.2.0 was started 3 times without ...")
    assert failed.result == {"rolled_back": True, "version": __version__, "failed_version": "0.2.0"}
    assert not (host.root / "releases" / "0.2.0").exists()  # the failed release is removed
    ((event, fields),) = host.audit
    assert (event, fields["by"], fields["reason"], fields["attempts"]) == (
        "update_rolled_back",
        "guard",
        "crashed",
        3,
    )


class Link:
    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.reconnects = 0


async def test_a_release_on_trial_that_connects_is_confirmed(host: Host) -> None:
    host.journal(deadline=time.time() + 60, switched_at=time.time(), attempts=1, max_attempts=3)
    (host.root / "releases" / "0.0.1").mkdir()  # older than both: pruned once confirmed
    (host.root / "releases" / "0.0.1" / MARKER).write_text("{}")
    (host.root / "releases" / "0.0.2").mkdir()  # an install that never finished: tidied at start
    updater = host.updater(trial_settle=0.05)
    started, link = asyncio.Event(), Link()
    supervising = asyncio.create_task(updater.supervise(started, lambda: link, host.sink))
    resumed = asyncio.create_task(updater.run(COMMAND, host.ctx()))
    started.set()
    await asyncio.sleep(0)
    link.ready.set()

    result = await asyncio.wait_for(resumed, scaled(10))
    await supervising

    assert result["version"] == __version__
    assert result["previous"] == OLD
    assert result["changed"] is True
    assert isinstance(result["connected_after_ms"], int)
    assert host.read()["stage"] == "confirmed"
    assert host.events == ["update_trial_started", "update_confirmed", "update_releases_removed"]
    assert sorted(p.name for p in (host.root / "releases").iterdir()) == [OLD, __version__]
    assert host.restarts == []


async def test_a_release_on_trial_that_never_connects_rolls_itself_back(host: Host) -> None:
    host.journal(deadline=time.time() + 0.3, switched_at=time.time(), attempts=1, max_attempts=3)
    updater = host.updater(trial_settle=0.05)
    started = asyncio.Event()
    started.set()
    resumed = asyncio.create_task(updater.run(COMMAND, host.ctx()))

    await asyncio.wait_for(updater.supervise(started, Link, host.sink), scaled(10))

    with pytest.raises(Handover):  # the previous release reports the command
        await asyncio.wait_for(resumed, scaled(10))
    assert os.readlink(host.root / "current") == f"releases/{OLD}"
    assert host.restarts == [(EXIT_RESTART, f"update trial of {__version__} failed")]
    journal = host.read()
    assert (journal["stage"], journal["by"], journal["reason"]) == (
        "rolled_back",
        "trial",
        "not_connected",
    )
    assert host.events == ["update_trial_started", "update_trial_failed", "update_rolling_back"]


class FlappingLink(Link):
    """Connected, but it reconnected once during the first settle time."""

    def __init__(self) -> None:
        super().__init__()
        self.ready.set()
        self._seen = iter([0, 1])

    @property
    def reconnects(self) -> int:
        return next(self._seen, 1)

    @reconnects.setter
    def reconnects(self, value: int) -> None:
        pass


async def test_a_connection_that_drops_during_the_settle_time_does_not_count(host: Host) -> None:
    host.journal(deadline=time.time() + 60, switched_at=time.time())
    updater = host.updater(trial_settle=0.1)
    started = asyncio.Event()
    started.set()
    await asyncio.wait_for(updater.supervise(started, FlappingLink, host.sink), scaled(10))
    assert host.read()["stage"] == "confirmed"
    (confirmed,) = [fields for event, fields in host.audit if event == "update_confirmed"]
    assert int(str(confirmed["connected_after_ms"])) >= 200  # a second, quiet settle time


# -- where the agent does not update itself ------------------------------------------------------


async def test_an_agent_without_update_configured_answers_not_supported(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's agent (no [update]: its image is rolled out) is never silently a no-op."""
    policy = REFERENCE_POLICY.replace(
        "https://releases.vendor.example/byoc-agent/", "https://r.example/a/"
    ).replace("require_approval = true     # a person", "require_approval = false    # a person")
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver(), policy=policy)
    sent = await api.send("agent-1", "update_agent", COMMAND.params())
    answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(20))
    command = answer["command"]
    assert (command["state"], command["reason"]) == ("failed", "not_supported")
    assert command["detail"] == UPDATE_NOT_CONFIGURED
    log = running.paths.audit_log.read_text()
    assert log.count('"event":"execution_finished"') == 1
    assert '"reason":"not_supported"' in log


# -- the self-test ---------------------------------------------------------------------------------


async def test_the_self_test_checks_the_live_files_and_changes_nothing(
    stub: StubServer, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await start_agent(port=stub.agent_port, driver=RecordingDriver())
    await running.stop()  # (it may run beside an agent; stopped, so that nothing else writes)
    config = running.paths.config
    files = [running.paths.state_dir / "agent.db", running.paths.audit_log]
    before = [(path.stat().st_mtime_ns, path.read_bytes()) for path in files]

    assert await asyncio.to_thread(agent_cli, ["self-test", "--config", str(config)]) == 0
    heading = f"byoc-agent {__version__} (state schema {SCHEMA_VERSION})\n  ok   config: "
    assert heading in capsys.readouterr().out
    report = self_test(config)

    assert (report.ok, report.version, report.state_schema) == (True, __version__, SCHEMA_VERSION)
    assert report.to_json()["ok"] is True
    assert [c.name for c in report.checks] == [
        "config",
        "policy",
        "state",
        "audit_chain",
        "credentials",
    ]
    assert [(path.stat().st_mtime_ns, path.read_bytes()) for path in files] == before
    log = running.paths.audit_log
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join([*lines[:2], lines[2].replace(b'"seq":3', b'"seq":4'), *lines[3:]]))
    broken = self_test(config)
    assert not broken.ok
    (failed,) = [c for c in broken.checks if not c.ok]
    assert failed.name == "audit_chain"
    assert "line 3" in failed.detail


# -- the bridge: release keys in force, restart ----------------------------------------------------


def test_the_key_set_in_force_names_the_release_keys_when_it_has_any(tmp_path: Path) -> None:
    configured, in_set, root = (Ed25519PrivateKey.generate() for _ in range(3))
    pem = configured.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "release.pub").write_bytes(pem)
    config = parse_config(
        b"""[control_plane]
url = "wss://cp.example/v1/agent"
ca_bundle = "ca.pem"
client_cert = "agent.pem"
client_key = "agent.key"
[commands]
trusted_keys = ["command.pub"]
issuers = ["cp"]
[update]
release_keys = ["release.pub"]
""",
        source=tmp_path / "agent.toml",
    )
    stops: list[tuple[int, str]] = []
    in_force: list[TrustedKeys | None] = [None]
    updater = bridge.build_updater(
        config,
        keyset_release_keys=lambda: in_force[0],
        restart=lambda code, reason: stops.append((code, reason)),
        clock=time.time,
        log=structlog.get_logger("t"),
    )
    assert updater is not None
    keys = updater._release_keys()  # the configured key
    assert set(keys.by_kid) == {jwk_thumbprint(configured.public_key())}

    def trust(release: list[Ed25519PrivateKey]) -> Trust:
        token = sign_keyset(
            root=root,
            version=1,
            keys=[root.public_key()],
            lifetime=60,
            release_keys=[k.public_key() for k in release],
        )
        return Trust(ring=KeyRing(root.public_key(), read_keyset(token, signer=root.public_key())))

    in_force[0] = trust([in_set]).release_keys()  # a key set that names release keys: they, only
    keys = updater._release_keys()
    assert set(keys.by_kid) == {jwk_thumbprint(in_set.public_key())}
    assert keys.expires_at is not None
    in_force[0] = trust([]).release_keys()  # a key set without: the configured ones still
    assert in_force[0] is None
    assert set(updater._release_keys().by_kid) == {jwk_thumbprint(configured.public_key())}

    updater._restart(EXIT_RESTART, "update_agent: switching to 0.2.0")
    assert stops == [(EXIT_RESTART, "update_agent: switching to 0.2.0")]


def test_the_command_may_last_its_steps_and_then_the_whole_trial(host: Host) -> None:
    """After the restart the command waits for the trial's end: a limit of the agent's
    command_timeout alone would report a long trial ``failed``/``timeout`` while it goes on."""
    updater = host.updater(trial_deadline=3600.0, trial_settle=10.0)
    assert updater.time_limit(900.0) == 4500.0
