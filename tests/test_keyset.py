"""Command-signing key rotation with signed key sets (docs/PROTOCOL.md §5.4): the rules, and
the whole procedure of the README run for real against an agent through the stub."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.trust import KeyRing, KeySetRejected, accept_keyset, read_keyset
from agent.core.verifier import jwk_thumbprint
from certs.cli import main as certs_cli
from certs.keyset import load_ed25519_private, sign_keyset
from certs.pki import PKIPaths
from control_plane_stub.cli import EXIT_NOT_SUCCEEDED
from control_plane_stub.cli import main as stub_cli
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from control_plane_stub.signer import CommandSigner
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver

NOW = 1_800_000_000.0


@dataclass
class SteppedClock:
    """The system clock plus an offset the test moves forward (the agent's own clock)."""

    offset: float = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


DAY = 86_400.0


def keyset(
    root: Ed25519PrivateKey,
    version: int,
    *keys: Ed25519PrivateKey,
    lifetime: float = DAY,
    next_root: Ed25519PrivateKey | None = None,
    now: float = NOW,
) -> str:
    return sign_keyset(
        root=root,
        version=version,
        keys=[k.public_key() for k in keys],
        lifetime=lifetime,
        next_root=next_root.public_key() if next_root else None,
        now=now,
    )


def code_of(
    token: str, root: Ed25519PrivateKey, current: str | None = None, now: float = NOW
) -> str:
    """The refusal of ``token`` by an agent that holds the set ``current`` (a token) in force."""
    held = None if current is None else read_keyset(current, signer=root.public_key())
    with pytest.raises(KeySetRejected) as info:
        accept_keyset(token, root=root.public_key(), current=held, now=now, clock_skew=60)
    return info.value.code


# -- the rules (no network) --------------------------------------------------------------------


def test_a_set_signed_by_the_root_is_accepted() -> None:
    root, key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    accepted = accept_keyset(
        keyset(root, 1, key), root=root.public_key(), current=None, now=NOW, clock_skew=60
    )
    assert accepted.version == 1
    assert list(accepted.keys.by_kid) == [jwk_thumbprint(key.public_key())]
    assert accepted.root_kid == jwk_thumbprint(root.public_key())  # the root stays
    assert accepted.trusted().expires_at == NOW + DAY


def test_refusals() -> None:
    root, other, key = (Ed25519PrivateKey.generate() for _ in range(3))
    assert code_of(keyset(other, 1, key), root) == "unknown_root"
    good = keyset(root, 5, key)
    head, body, signature = good.split(".")
    assert code_of(f"{head}.{body}.{signature[:-4]}AAAA", root) == "bad_signature"
    assert code_of(good, root, current=keyset(root, 7, key)) == "rollback"
    assert code_of(good, root, current=good) == "already_current"
    # The same version with other content is not the set in force offered again: it is not
    # newer, so it is a rollback (the error budget), not a harmless re-offer (docs §5.4).
    other_key = Ed25519PrivateKey.generate()
    assert code_of(keyset(root, 5, other_key), root, current=good) == "rollback"
    assert code_of(keyset(root, 5, key, lifetime=2 * DAY), root, current=good) == "rollback"
    assert code_of(keyset(root, 1, key, lifetime=60), root, now=NOW + 3600) == "expired"
    assert code_of(keyset(root, 1, key, now=NOW + 3600), root) == "issued_in_future"
    too_many = [Ed25519PrivateKey.generate() for _ in range(33)]
    assert code_of(keyset(root, 1, *too_many), root) == "invalid_keyset"
    assert code_of("not.a.keyset", root) == "malformed_keyset"


def test_rotating_the_root_takes_the_old_roots_signature() -> None:
    old, new, key = (Ed25519PrivateKey.generate() for _ in range(3))
    ring = KeyRing(old.public_key())
    ring.install(ring.check(keyset(old, 1, key), now=NOW, clock_skew=60))
    ring.install(ring.check(keyset(old, 2, key, next_root=new), now=NOW, clock_skew=60))
    assert jwk_thumbprint(ring.root) == jwk_thumbprint(new.public_key())
    with pytest.raises(KeySetRejected) as info:  # the old root can no longer sign
        ring.check(keyset(old, 3, key), now=NOW, clock_skew=60)
    assert info.value.code == "unknown_root"
    ring.install(ring.check(keyset(new, 3, key), now=NOW, clock_skew=60))
    assert ring.version == 3
    # A set is re-read at start-up with the root that signed it.
    assert read_keyset(keyset(new, 3, key), signer=new.public_key()).version == 3


# -- the procedure, for real -------------------------------------------------------------------


class Rotation:
    """The operator's side: an offline root, key sets made with byoc-certs, pushed with
    cp-stub, commands signed by whichever key is current."""

    def __init__(self, tmp: Path, stub: StubServer, pki: PKIPaths) -> None:
        self.tmp = tmp
        self.stub = stub
        self.pki = pki
        self.offline = tmp / "offline"
        assert certs_cli(["root-key", str(self.offline)]) == 0
        self.root = load_ed25519_private(self.offline / "root.key")
        self.api = f"http://127.0.0.1:{stub.api_port}"

    def make(self, version: int, *keys: Path, days: float = 90, **extra: str) -> Path:
        out = self.tmp / f"keyset-v{version}.jws"
        args = ["keyset", str(self.offline), "--version", str(version), "--days", str(days)]
        for key in keys:
            args += ["--key", str(key)]
        for flag, value in extra.items():
            args += [f"--{flag.replace('_', '-')}", value]
        assert certs_cli([*args, "--out", str(out)]) == 0
        return out

    async def push(self, path: Path) -> int:
        return await asyncio.to_thread(
            stub_cli, ["push-keyset", "--api", self.api, "--wait", "agent-1", str(path)]
        )


async def command_signed_by(api: StubClient, key_path: Path) -> dict[str, object]:
    signer = CommandSigner.from_file(key_path, issuer="cp-stub")
    token = signer.sign(
        agent_id="agent-1", command_type="scale", params={"replicas": 2}, now=time.time()
    ).token
    sent = await api.send_signed("agent-1", token)
    return dict(
        (await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10)))["command"]
    )


async def test_the_rotation_procedure_end_to_end(
    stub: StubServer,
    api: StubClient,
    start_agent: AgentStarter,
    pki: PKIPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    op = Rotation(tmp_path, stub, pki)
    old_key, old_pub = pki.signing_key, pki.signing_pub
    # A second command-signing key (it would live in the control plane's HSM).
    assert certs_cli(["root-key", str(tmp_path / "signer2")]) == 0
    new_key, new_pub = tmp_path / "signer2" / "root.key", tmp_path / "signer2" / "root.pub"

    # Install: the agent trusts only the root, and starts from key set v1 (the old key).
    v1 = op.make(1, old_pub)
    running = await start_agent(
        port=stub.agent_port, driver=RecordingDriver(), root_key=op.offline / "root.pub", keyset=v1
    )
    assert (await command_signed_by(api, old_key))["state"] == "succeeded"
    assert (await command_signed_by(api, new_key))["reason"] == "unknown_kid"

    # Step 1: trust both keys (v2); step 2: the signer switches; step 3: drop the old key (v3).
    assert await op.push(op.make(2, old_pub, new_pub)) == 0
    assert "agent-1 accepted: key set version 2 in force" in capsys.readouterr().out
    assert (await command_signed_by(api, new_key))["state"] == "succeeded"
    assert await op.push(op.make(3, new_pub)) == 0
    assert (await command_signed_by(api, old_key))["reason"] == "unknown_kid"

    # A rollback to v2 (which still trusted the old key) is refused, also after a restart.
    assert await op.push(op.tmp / "keyset-v2.jws") == EXIT_NOT_SUCCEEDED
    assert "refused it: rollback" in capsys.readouterr().out
    await running.stop()
    restarted: RunningAgent = await start_agent(
        port=stub.agent_port, driver=RecordingDriver(), root_key=op.offline / "root.pub", keyset=v1
    )
    assert (await api.agent("agent-1"))["capabilities"]["keyset_version"] == 3
    assert await op.push(op.tmp / "keyset-v2.jws") == EXIT_NOT_SUCCEEDED
    assert (await command_signed_by(api, new_key))["state"] == "succeeded"

    # Root rotation: v4, signed by the old root, names the new one; then only it can sign.
    assert certs_cli(["root-key", str(tmp_path / "root2")]) == 0
    root2 = tmp_path / "root2"
    assert await op.push(op.make(4, new_pub, next_root=str(root2 / "root.pub"))) == 0
    assert await op.push(op.make(5, new_pub)) == EXIT_NOT_SUCCEEDED  # old root: refused
    assert "unknown_root" in capsys.readouterr().out
    assert await op.push(op.make(5, new_pub, root_key=str(root2 / "root.key"))) == 0

    accepted = restarted.audit.matching("keyset_accepted")
    assert [a["version"] for a in accepted] == [4, 5]
    assert accepted[0]["root_rotated"] is True
    refused = [r["reason"] for r in restarted.audit.matching("keyset_rejected")]
    assert refused == ["rollback", "unknown_root"]


async def test_an_expired_key_set_stops_trusting_its_keys(
    stub: StubServer, api: StubClient, start_agent: AgentStarter, pki: PKIPaths, tmp_path: Path
) -> None:
    op = Rotation(tmp_path, stub, pki)
    lifetime = 3.0
    short = tmp_path / "short.jws"
    short.write_text(
        keyset(
            op.root, 1, load_ed25519_private(pki.signing_key), lifetime=lifetime, now=time.time()
        )
    )
    clock = SteppedClock()
    await start_agent(
        port=stub.agent_port,
        driver=RecordingDriver(),
        root_key=op.offline / "root.pub",
        keyset=short,
        clock_skew=0.0,
        clock=clock,
    )
    assert (await command_signed_by(api, pki.signing_key))["state"] == "succeeded"
    clock.offset += lifetime + 1  # the agent's clock passes the set's expiry; nothing sleeps
    assert (await command_signed_by(api, pki.signing_key))["reason"] == "keyset_expired"


async def test_an_agent_with_a_fixed_key_list_refuses_key_sets(
    stub: StubServer,
    start_agent: AgentStarter,
    pki: PKIPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    op = Rotation(tmp_path, stub, pki)
    await start_agent(port=stub.agent_port, driver=RecordingDriver())
    assert await op.push(op.make(1, pki.signing_pub)) == EXIT_NOT_SUCCEEDED
    assert "keysets_not_enabled" in capsys.readouterr().out


async def test_a_replaced_root_key_wins_over_the_stored_key_sets(
    stub: StubServer,
    api: StubClient,
    start_agent: AgentStarter,
    pki: PKIPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """/tmp/review3/anchor_change.py: once a set was stored, changing ``commands.root_key`` had
    no effect: sets from the old root (feared stolen) were still accepted, the new root's
    refused."""
    op = Rotation(tmp_path, stub, pki)  # root A
    running = await start_agent(
        port=stub.agent_port,
        driver=RecordingDriver(),
        root_key=op.offline / "root.pub",
        keyset=op.make(1, pki.signing_pub),
    )
    assert await op.push(op.make(2, pki.signing_pub)) == 0  # version floor 2, under root A
    await running.stop()

    # The customer replaces root A by root B, with B's first set (another command key).
    assert certs_cli(["root-key", str(tmp_path / "root-b")]) == 0
    root_b = tmp_path / "root-b"
    assert certs_cli(["root-key", str(tmp_path / "signer-b")]) == 0
    signer_b = tmp_path / "signer-b"
    b1 = tmp_path / "b-v1.jws"
    args = ["keyset", str(root_b), "--version", "1", "--key", str(signer_b / "root.pub")]
    assert certs_cli([*args, "--out", str(b1)]) == 0
    restarted = await start_agent(
        port=stub.agent_port, driver=RecordingDriver(), root_key=root_b / "root.pub", keyset=b1
    )
    (replaced,) = restarted.audit.matching("keyset_root_replaced")
    assert replaced["root_kid"] == jwk_thumbprint(
        load_ed25519_private(root_b / "root.key").public_key()
    )
    assert replaced["previous_root_kid"] == jwk_thumbprint(op.root.public_key())
    assert replaced["discarded_version"] == 2
    assert [a["version"] for a in restarted.audit.matching("keyset_accepted")] == [1]  # B's
    assert (await api.agent("agent-1"))["capabilities"]["keyset_version"] == 1
    assert (await command_signed_by(api, signer_b / "root.key"))["state"] == "succeeded"
    assert (await command_signed_by(api, pki.signing_key))["reason"] == "unknown_kid"
    # The old root can no longer sign anything, whatever its version number.
    assert await op.push(op.make(3, pki.signing_pub)) == EXIT_NOT_SUCCEEDED
    assert "unknown_root" in capsys.readouterr().out

    # A root rotated through key sets (B hands over to C) is no replacement: kept on restart
    # with the configuration unchanged (B), and with it updated to the new root (C).
    assert certs_cli(["root-key", str(tmp_path / "root-c")]) == 0
    root_c = tmp_path / "root-c"
    b2 = tmp_path / "b-v2.jws"
    args = ["keyset", str(root_b), "--version", "2", "--key", str(signer_b / "root.pub")]
    args += ["--next-root", str(root_c / "root.pub")]
    assert certs_cli([*args, "--out", str(b2)]) == 0
    assert await op.push(b2) == 0
    await restarted.stop()
    for configured in (root_b, root_c):
        again = await start_agent(
            port=stub.agent_port,
            driver=RecordingDriver(),
            root_key=configured / "root.pub",
            keyset=b1,
        )
        assert again.audit.matching("keyset_root_replaced") == []
        assert (await api.agent("agent-1"))["capabilities"]["keyset_version"] == 2
        assert (await command_signed_by(api, signer_b / "root.key"))["state"] == "succeeded"
        await again.stop()
