"""``update_agent`` under a real systemd (tests/nspawn.py): the agent installed from README "On
an EC2 host" (tests/ec2_host.py) updates itself, from this tree's build to second builds with
bumped versions, each made by ``make bundle``'s code (agent/update/build.py) and signed with
the release key the README installed.

The releases (all built from this tree; the broken ones with one line changed, as a faulty
release would be):

- 0.1.1, 0.1.5: good;
- 0.1.2: hashes audit records differently, so its self-test cannot verify the live audit log;
- 0.1.3: speaks protocol version 99, so the control plane refuses every session it opens;
- 0.1.4: raises as soon as the daemon starts (a crash at start, after a passing self-test);
- 0.1.6: writes the next state schema (its self-test passes: it could migrate this one).

They are served over HTTP on the host's loopback (the container shares its network) by a
server that also redirects and sends bodies over the size cap. Test timing, set in agent.toml
and the policy by the module fixture: a 25 s trial, 2 s to settle, 3 starts, a 40 MiB cap; the
harness's drop-in restarts the unit after 1 s. The reference policy's approval requirement is
kept: every update is approved by the README's operator with ``byoc-agent approve``.

The tests run in file order and build on each other (the running version moves on); the
module's finalizer points ``current`` back at the release ``make install`` made.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.io.store import SCHEMA_VERSION
from agent.update import bundle as bundle_format
from agent.update.build import build_bundle, load_key
from agent.update.updater import PAUSE_ENV
from control_plane_stub.client import StubClient
from tests.conftest import scaled
from tests.ec2_host import AGENT_ID, AUDIT_LOG, OPERATOR, UNIT, Ec2Host, wheelhouse
from tests.processes import REPO
from tests.readme_blocks import blocks

CAP: Final = 40 * 1024 * 1024
TRIAL: Final = 25.0
SETTLE: Final = 2.0
ATTEMPTS: Final = 3
JOURNAL: Final = "/var/lib/byoc-agent/update/journal.json"
PAUSE_DROPIN: Final = f"/etc/systemd/system/{UNIT}.d/zz-update-pause.conf"
BROKEN: Final = {
    "0.1.2": (
        "agent/core/audit_chain.py",
        "return hashlib.sha256(canonical(body)).hexdigest()",
        'return hashlib.sha256(b"v2" + canonical(body)).hexdigest()',
    ),
    "0.1.3": (
        "agent/core/frames.py",
        "PROTOCOL_VERSION: Final = 1\n",
        "PROTOCOL_VERSION: Final = 99\n",
    ),
    "0.1.4": (
        "agent/daemon.py",
        "    async def run(self, *, install_signal_handlers: bool = True) -> None:\n",
        "    async def run(self, *, install_signal_handlers: bool = True) -> None:\n"
        '        raise RuntimeError("release 0.1.4 cannot start")\n',
    ),
    "0.1.6": (
        "agent/io/store.py",
        f"SCHEMA_VERSION: Final = {SCHEMA_VERSION}\n",
        f"SCHEMA_VERSION: Final = {SCHEMA_VERSION + 1}\n",
    ),
}


# -- the vendor's side: bundles and where they are served ---------------------------------------


class _Bundles(http.server.BaseHTTPRequestHandler):
    """``/agent/<file>``: the file; ``/agent/redirect/<file>``: a 302 to it; ``/agent/declared-
    huge.bundle``: a Content-Length over the cap; ``/agent/endless.bundle``: no length, and more
    bytes than the cap."""

    root: Path

    def do_GET(self) -> None:
        name = self.path.removeprefix("/agent/")
        if name.startswith("redirect/"):
            self.send_response(302)
            self.send_header("Location", f"/agent/{name.removeprefix('redirect/')}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name == "declared-huge.bundle":
            self.send_response(200)
            self.send_header("Content-Length", str(CAP + 1))
            self.end_headers()
            return  # the agent must not wait for the body
        if name == "endless.bundle":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0, no length: the body ends when the connection does
            chunk = bytes(1024 * 1024)
            with contextlib.suppress(OSError):
                for _ in range(CAP // len(chunk) + 8):
                    self.wfile.write(chunk)
            return
        path = self.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Vendor:
    base: str
    """``http://127.0.0.1:<port>/agent/``: the policy's one source."""
    root: Path
    bundles: dict[str, Path]

    def params(self, version: str, *, name: str | None = None) -> dict[str, object]:
        path = self.bundles[version]
        return {
            "version": version,
            "url": f"{self.base}{name or path.name}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }

    def publish(self, name: str, data: bytes) -> None:
        (self.root / name).write_bytes(data)


def _broken_tree(target: Path, version: str) -> Path:
    relative, old, new = BROKEN[version]
    shutil.copytree(
        REPO,
        target,
        ignore=shutil.ignore_patterns(
            ".*", "__pycache__", "tests", "docs", "bench", "deploy", "dist"
        ),
    )
    source = target / relative
    text = source.read_text()
    assert text.count(old) == 1, (relative, old)
    source.write_text(text.replace(old, new))
    return target


@pytest.fixture(scope="module")
def vendor(ec2_host: Ec2Host, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vendor]:
    host = ec2_host
    work = tmp_path_factory.mktemp("update")
    root = work / "served"
    root.mkdir()
    key = load_key(host.release_key)
    wheels = wheelhouse(host.timing)
    bundles: dict[str, Path] = {}
    with host.timing.step("update: make bundle (README) 0.1.1"):
        build, _ = blocks("update")
        env = {
            **os.environ,
            "RELEASE_KEY": str(host.release_key),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(wheels),
        }
        subprocess.run(
            ["bash", "-euo", "pipefail", "-c", build.text],
            cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        bundles["0.1.1"] = root / "byoc-agent-0.1.1.bundle"
        shutil.copyfile(REPO / "dist" / "byoc-agent-0.1.1.bundle", bundles["0.1.1"])
    with host.timing.step("update: build 5 more bundles"):
        for version in ("0.1.2", "0.1.3", "0.1.4", "0.1.5", "0.1.6"):
            source = _broken_tree(work / version, version) if version in BROKEN else REPO
            bundles[version] = build_bundle(
                source=source, version=version, key=key, out=root, wheels=wheels
            )
    handler = type("Handler", (_Bundles,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/agent/"
    _configure(host, base)
    try:
        yield Vendor(base, root, bundles)
    finally:
        server.shutdown()
        server.server_close()
        _restore(host)


def _configure(host: Ec2Host, base: str) -> None:
    config = host.machine.path("/etc/byoc-agent/agent.toml")
    lines = config.read_text().splitlines(keepends=True)
    (at,) = [i for i, line in enumerate(lines) if line.startswith("[update]")]
    lines.insert(
        at + 1,
        f"trial_deadline = {TRIAL}\ntrial_settle = {SETTLE}\nmax_attempts = {ATTEMPTS}\n"
        f"max_bundle_bytes = {CAP}\n",
    )
    config.write_text("".join(lines))  # in place: keeps root:byoc-agent 0640
    policy = host.machine.path("/etc/byoc-agent/policy.toml")
    source = 'sources = ["https://releases.vendor.example/byoc-agent/"]'
    text = policy.read_text()
    assert text.count(source) == 1
    policy.write_text(text.replace(source, f'sources = ["{base}"]'))
    host.machine.run("systemctl", "restart", UNIT)


def _restore(host: Ec2Host) -> None:
    """Back to the release make install made, as the README left the host."""
    host.machine.run("rm", "-f", PAUSE_DROPIN)
    host.machine.run("systemctl", "daemon-reload")
    host.machine.run(
        "runuser", "-u", "byoc-agent", "--",
        "ln", "-sfn", f"releases/{__version__}", "/opt/byoc-agent/current",
    )  # fmt: skip
    host.machine.run("rm", "-f", JOURNAL)
    host.machine.run("systemctl", "restart", UNIT)


# -- looking at the host -----------------------------------------------------------------------


def current(host: Ec2Host) -> str:
    return Path(host.machine.run("readlink", "/opt/byoc-agent/current").stdout.strip()).name


def releases(host: Ec2Host) -> list[str]:
    return sorted(p.name for p in host.machine.path("/opt/byoc-agent/releases").iterdir())


def events(host: Ec2Host, jti: str, *, after: int) -> list[str]:
    """The audit story of one command, and the agent starts and stops in between."""
    return [
        r["event"]
        for r in host.audit_records()
        if r["seq"] > after and (r.get("jti") == jti or r["event"].startswith("agent_st"))
    ]


def record(host: Ec2Host, event: str, *, after: int, **match: object) -> dict[str, Any]:
    found = [
        r
        for r in host.audit_records()
        if r["seq"] > after and r["event"] == event and all(r.get(k) == v for k, v in match.items())
    ]
    assert len(found) == 1, (event, match, found)
    return found[0]


def seconds_between(first: dict[str, Any], then: dict[str, Any]) -> float:
    def at(r: dict[str, Any]) -> float:
        from datetime import datetime

        return datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()

    return round(at(then) - at(first), 2)


async def send_approved(
    host: Ec2Host, api: StubClient, params: dict[str, object]
) -> dict[str, Any]:
    """Send ``update_agent``; the policy asks a person: the README's operator approves it."""
    await host.wait_connected(api)
    sent = await api.send(AGENT_ID, "update_agent", params)
    pending = await api.command(sent["ref"], wait_for="pending_approval", wait_seconds=scaled(30))
    assert pending["command"]["state"] == "pending_approval", pending
    host.machine.run("byoc-agent", "approve", sent["jti"], "--note", "CR-15", user=OPERATOR)
    return dict(sent)


async def send_from_readme(host: Ec2Host, api: StubClient, vendor: Vendor) -> dict[str, Any]:
    """The README's ``cp-stub send ... update-agent`` (in the repository, where ``make bundle``
    left the bundle), then the operator's approval."""
    await host.wait_connected(api)
    _, send = blocks("update")
    env = {
        **os.environ,
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
        "CP_STUB_API": host.api_url,
        "BUNDLE_URL": f"{vendor.base}byoc-agent-0.1.1.bundle",
    }
    said = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-euo", "pipefail", "-c", send.text],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    ref = said.stdout.split()[0]
    assert f"{ref}  update_agent " in said.stdout
    assert str(vendor.params("0.1.1")["sha256"]) in said.stdout  # the sha256sum in the block
    pending = await api.command(ref, wait_for="pending_approval", wait_seconds=scaled(30))
    assert pending["command"]["state"] == "pending_approval", pending
    jti = pending["command"]["jti"]
    listed = host.machine.run("byoc-agent", "pending", user=OPERATOR).stdout
    assert f"{jti}  update_agent " in listed
    host.machine.run("byoc-agent", "approve", jti, "--note", "CR-15", user=OPERATOR)
    return {"ref": ref, "jti": jti}


async def final(api: StubClient, sent: dict[str, Any], within: float = 120) -> dict[str, Any]:
    answer = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(within))
    assert not answer["timed_out"], answer
    finals = [
        h
        for h in answer["history"]
        if h["state"] in ("succeeded", "failed", "rejected", "interrupted")
    ]
    assert len(finals) == 1, answer["history"]  # one final state, reported once
    return dict(answer["command"])


def finished_once(host: Ec2Host, jti: str) -> dict[str, Any]:
    return record(host, "execution_finished", after=0, jti=jti)


async def running_version(host: Ec2Host, api: StubClient, within: float = 60) -> str:
    agent = await api.agent(AGENT_ID, wait_connected=scaled(within))
    return str(agent["agent_version"])


# -- the tests -----------------------------------------------------------------------------------


async def test_a_signed_bundle_updates_the_agent_which_then_reports_its_version(
    ec2_host: Ec2Host, vendor: Vendor
) -> None:
    host = ec2_host
    before, pid = host.audit_head(), host.main_pid()
    restarts = int(host.machine.show(UNIT, "NRestarts")["NRestarts"])
    assert current(host) == __version__
    async with host.client() as api:
        sent = await send_from_readme(host, api, vendor)
        done = await final(api, sent)
        version = await running_version(host, api)
        listed = (
            await asyncio.to_thread(
                subprocess.run,
                [str(REPO / ".venv/bin/cp-stub"), "agents", "--api", host.api_url],
                capture_output=True, text=True, check=True, timeout=60,
            )
        ).stdout  # fmt: skip

    assert done["state"] == "succeeded", (done.get("reason"), done.get("detail"))
    assert done["result"]["version"] == "0.1.1"
    assert done["result"]["previous"] == __version__
    assert done["result"]["changed"] is True
    assert version == "0.1.1"  # hello.agent_version
    assert f"{AGENT_ID:<24} connected  version 0.1.1 " in listed  # cp-stub agents
    status = json.loads(host.machine.run("byoc-agent", "status", "--json", user=OPERATOR).stdout)
    assert status["version"] == "0.1.1"
    assert host.main_pid() != pid
    assert current(host) == "0.1.1"
    assert releases(host) == sorted([__version__, "0.1.1"])
    owners = host.machine.run(
        "stat",
        "-c",
        "%n %U",
        f"/opt/byoc-agent/releases/{__version__}",
        "/opt/byoc-agent/releases/0.1.1",
    ).stdout.split("\n")
    assert owners[:2] == [
        f"/opt/byoc-agent/releases/{__version__} root",  # make install's, untouched
        "/opt/byoc-agent/releases/0.1.1 byoc-agent",
    ]
    story = events(host, sent["jti"], after=before)
    expected = [
        "approval_granted", "execution_started", "update_started", "update_downloading",
        "update_downloaded", "update_verified", "update_unpacked", "update_installing",
        "update_installed", "update_self_tested", "update_switching", "update_switched",
        "update_restarting", "agent_stopping", "agent_stopped", "agent_started",
        "command_resumed", "execution_started", "update_trial_started", "update_confirmed",
        "execution_finished",
    ]  # fmt: skip
    assert [e for e in story if e in expected] == expected, story
    started = [
        r for r in host.audit_records() if r["seq"] > before and r["event"] == "agent_started"
    ]
    assert [r["version"] for r in started] == ["0.1.1"]
    stopping = record(host, "agent_stopping", after=before)
    assert stopping["reason"] == "update_agent: switching to 0.1.1"
    # systemd restarted it on its own (exit status 75: RestartForceExitStatus=)
    assert int(host.machine.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    steps = {
        e: record(host, e, after=before, jti=sent["jti"])
        for e in (
            "update_started",
            "update_downloaded",
            "update_installed",
            "update_switched",
            "update_confirmed",
        )
    }
    resumed = record(host, "command_resumed", after=before, jti=sent["jti"])
    host.timing.steps.update(
        {
            "update 0.1.1: download+verify": seconds_between(
                steps["update_started"], steps["update_downloaded"]
            ),
            "update 0.1.1: unpack+install": seconds_between(
                steps["update_downloaded"], steps["update_installed"]
            ),
            "update 0.1.1: self-test+switch": seconds_between(
                steps["update_installed"], steps["update_switched"]
            ),
            "update 0.1.1: drain+restart": seconds_between(steps["update_switched"], resumed),
            "update 0.1.1: trial": seconds_between(resumed, steps["update_confirmed"]),
        }
    )


def _resigned(
    data: bytes, key: Ed25519PrivateKey | None = None, *, flip_payload: bool = False
) -> bytes:
    """The bundle with its header's signature broken (no ``key``), or signed again by ``key``;
    or with one payload byte changed under the original header."""
    token, offset = bundle_format.split_header(data[: bundle_format.MAX_HEADER_BYTES])
    payload = data[offset:]
    if flip_payload:
        return data[:-1] + bytes([data[-1] ^ 1])
    if key is None:
        head, claims, signature = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[0] ^= 1
        broken = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        return bundle_format.MAGIC + f"{head}.{claims}.{broken}\n".encode() + payload
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return (
        bundle_format.make_header(
            key,
            version=claims["version"],
            payload_sha256=claims["payload_sha256"],
            payload_bytes=claims["payload_bytes"],
            requirement=claims["requirement"],
            python=claims["python"],
            platform=claims["platform"],
            issued_at=claims["iat"],
        )
        + payload
    )


REFUSALS: Final = {
    # case: (how the command is made, the reason it fails with)
    "wrong_sha256": "checksum_mismatch",
    "bad_signature": "signature_invalid",
    "untrusted_key": "untrusted_release_key",
    "tampered_payload": "payload_mismatch",
    "redirect": "redirect_refused",
    "declared_oversize": "bundle_too_large",
    "streamed_oversize": "bundle_too_large",
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_bad_bundle_is_refused_before_anything_is_unpacked(
    ec2_host: Ec2Host, vendor: Vendor, case: str
) -> None:
    host = ec2_host
    good = vendor.bundles["0.1.5"].read_bytes()
    params = vendor.params("0.1.5")
    if case == "wrong_sha256":
        params["sha256"] = hashlib.sha256(b"another file").hexdigest()
    elif case in ("bad_signature", "untrusted_key", "tampered_payload"):
        data = _resigned(
            good,
            Ed25519PrivateKey.generate() if case == "untrusted_key" else None,
            flip_payload=case == "tampered_payload",
        )
        vendor.publish(f"{case}.bundle", data)
        params.update(url=f"{vendor.base}{case}.bundle", sha256=hashlib.sha256(data).hexdigest())
    elif case == "redirect":
        params["url"] = f"{vendor.base}redirect/{vendor.bundles['0.1.5'].name}"
    else:
        name = "declared-huge" if case == "declared_oversize" else "endless"
        params["url"] = f"{vendor.base}{name}.bundle"
    before, pid, running = host.audit_head(), host.main_pid(), current(host)
    kept = releases(host)

    async with host.client() as api:
        sent = await send_approved(host, api, params)
        done = await final(api, sent, within=60)

    assert (done["state"], done["reason"]) == ("failed", REFUSALS[case]), done
    story = events(host, sent["jti"], after=before)
    assert "update_downloading" in story
    assert not {"update_verified", "update_unpacked", "update_installing"} & set(story), story
    assert story.count("execution_finished") == 1
    assert (host.main_pid(), current(host), releases(host)) == (pid, running, kept)
    assert not host.machine.path("/var/lib/byoc-agent/update/work").exists()
    journal = json.loads(host.machine.path(JOURNAL).read_text())
    assert (journal["jti"], journal["stage"], journal["reason"]) == (
        sent["jti"],
        "failed",
        REFUSALS[case],
    )


@pytest.mark.parametrize(
    ("version", "reason", "said"),
    [
        ("0.1.2", "self_test_failed", "audit_chain: AuditIntegrityError: line 1:"),
        (
            "0.1.6",
            "state_incompatible",
            f"0.1.6 writes state schema {SCHEMA_VERSION + 1}; 0.1.1 reads {SCHEMA_VERSION}",
        ),
    ],
)
async def test_a_release_that_fails_its_self_test_is_never_switched(
    ec2_host: Ec2Host, vendor: Vendor, version: str, reason: str, said: str
) -> None:
    """0.1.2 cannot verify the live audit log; 0.1.6 passes its own checks but writes a state
    schema the running release could not read after a rollback. Both are installed, tested
    by their own code, and removed; the agent never restarts."""
    host = ec2_host
    before, pid, running = host.audit_head(), host.main_pid(), current(host)
    kept = releases(host)
    async with host.client() as api:
        sent = await send_approved(host, api, vendor.params(version))
        done = await final(api, sent)

    story = events(host, sent["jti"], after=before)
    assert (done["state"], done["reason"]) == ("failed", reason), (done["detail"], story)
    assert said in done["detail"]
    assert "update_installed" in story
    assert not {"update_self_tested", "update_switching", "agent_stopping"} & set(story), story
    assert (host.main_pid(), current(host), releases(host)) == (pid, running, kept)


async def _rolled_back(
    host: Ec2Host, vendor: Vendor, version: str
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Update to ``version``, which is switched to and then fails; the command's final state,
    the update_rolled_back record, and the audit head before."""
    before, previous = host.audit_head(), current(host)
    async with host.client() as api:
        sent = await send_approved(host, api, vendor.params(version))
        done = await final(api, sent, within=TRIAL + 60)
        assert await running_version(host, api) == previous
    assert (done["state"], done["reason"]) == ("failed", "rolled_back"), done
    assert done["result"] == {"rolled_back": True, "version": previous, "failed_version": version}
    assert current(host) == previous
    assert version not in releases(host)  # the failed release is removed
    rolled = record(host, "update_rolled_back", after=before, jti=sent["jti"])
    switched = record(host, "update_switched", after=before, jti=sent["jti"])
    assert seconds_between(switched, rolled) < TRIAL + 10  # back within the trial (+ a restart)
    host.timing.steps[f"update {version}: switch to rolled back"] = seconds_between(
        switched, rolled
    )
    # The previous release reads what the newer one wrote: same state, one audit chain; an
    # operator (the byoc-agent group, not root) verifies it.
    verified = host.machine.run("byoc-agent", "audit", "verify", AUDIT_LOG, user=OPERATOR)
    assert verified.stdout.startswith(f"{AUDIT_LOG}: OK")
    return done, rolled, before


async def test_a_release_that_crashes_at_start_is_rolled_back_by_the_guard(
    ec2_host: Ec2Host, vendor: Vendor
) -> None:
    host = ec2_host
    cursor_restarts = int(host.machine.show(UNIT, "NRestarts")["NRestarts"])
    done, rolled, before = await _rolled_back(host, vendor, "0.1.4")

    assert (rolled["by"], rolled["reason"], rolled["attempts"]) == ("guard", "crashed", ATTEMPTS)
    assert f"0.1.4 was started {ATTEMPTS} times" in done["detail"]
    # systemd started 0.1.4 three times, then the previous release (the guard's rollback)
    restarts = int(host.machine.show(UNIT, "NRestarts")["NRestarts"]) - cursor_restarts
    assert restarts == ATTEMPTS + 1
    guard_said = [
        str(e["MESSAGE"])
        for e in host.journal("-n", "400")
        if str(e.get("MESSAGE", "")).startswith("byoc-agent-update-guard: ")
    ]
    assert [m for m in guard_said if "0.1.4" in m][-ATTEMPTS - 1 :] == [
        *(f"byoc-agent-update-guard: trial of 0.1.4: start {n} of {ATTEMPTS}" for n in (1, 2, 3)),
        f"byoc-agent-update-guard: 0.1.4 failed {ATTEMPTS} starts: back to {current(host)}",
    ]
    started = [
        r["version"]
        for r in host.audit_records()
        if r["seq"] > before and r["event"] == "agent_started"
    ]
    assert started == [current(host)]  # 0.1.4 never got as far as its audit log


async def test_a_release_that_cannot_connect_rolls_itself_back_at_its_deadline(
    ec2_host: Ec2Host, vendor: Vendor
) -> None:
    host = ec2_host
    done, rolled, before = await _rolled_back(host, vendor, "0.1.3")

    assert (rolled["by"], rolled["reason"]) == ("trial", "not_connected")
    assert "0.1.3 did not reach a connected, healthy session" in done["detail"]
    story = events(host, done["jti"], after=before)
    assert [
        e
        for e in story
        if e.startswith(("update_trial", "update_rolling", "agent_started", "update_rolled"))
    ] == [
        "agent_started",  # 0.1.3
        "update_trial_started",
        "update_trial_failed",
        "update_rolling_back",
        "agent_started",  # the previous release again
        "update_rolled_back",
    ], story
    versions = [
        r["version"]
        for r in host.audit_records()
        if r["seq"] > before and r["event"] == "agent_started"
    ]
    assert versions == ["0.1.3", current(host)]


def _pause_after(host: Ec2Host, step: str | None) -> None:
    """Make the agent stop after ``step`` of its next update (None: not at all); restarts it
    when there is a step, so that it has the setting."""
    if step is None:
        host.machine.run("rm", "-f", PAUSE_DROPIN)
        host.machine.run("systemctl", "daemon-reload")
        return
    host.machine.path(PAUSE_DROPIN).write_text(f"[Service]\nEnvironment={PAUSE_ENV}={step}\n")
    host.machine.run("systemctl", "daemon-reload")
    host.machine.run("systemctl", "restart", UNIT)


@pytest.mark.parametrize("step", ["downloaded", "unpacked", "switched"])
async def test_sigkill_at_each_step_leaves_one_working_version_and_one_final_state(
    ec2_host: Ec2Host, vendor: Vendor, step: str
) -> None:
    host = ec2_host
    _pause_after(host, step)
    try:
        before, previous = host.audit_head(), current(host)
        restarts = int(host.machine.show(UNIT, "NRestarts")["NRestarts"])
        async with host.client() as api:
            sent = await send_approved(host, api, vendor.params("0.1.5"))
            await host.wait_audit("update_paused", after=before, jti=sent["jti"], step=step)
            killed = host.main_pid()
            _pause_after(host, None)  # the agent systemd starts next runs without it
            host.machine.run("kill", "-KILL", str(killed))
            began = time.monotonic()
            done = await final(api, sent, within=TRIAL + 60)
            host.timing.steps[f"update SIGKILL after {step}: to final state"] = round(
                time.monotonic() - began, 2
            )
            version = await running_version(host, api)
    finally:
        _pause_after(host, None)

    assert int(host.machine.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    assert host.main_pid() != killed
    finished = finished_once(host, sent["jti"])  # the one final state, audited once
    assert finished["outcome"] == done["state"]
    if step == "switched":  # the new release came up, passed its trial and reported
        assert done["state"] == "succeeded", done
        assert version == current(host) == "0.1.5"
        assert previous in releases(host)  # kept: the one to go back to by hand
    else:  # nothing was switched: the release that ran before runs again and reports
        assert (done["state"], done["reason"]) == ("failed", "update_interrupted"), done
        assert f"after step '{step}'" in done["detail"]
        assert version == current(host) == previous
        assert "0.1.5" not in releases(host)
        assert not host.machine.path("/var/lib/byoc-agent/update/work").exists()
