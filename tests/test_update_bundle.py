"""The sans-I/O half of agent self-update: the ``update_agent`` command's parameters, its policy
section, release keys carried by key sets, and the release bundle's format and checks
(agent/update/bundle.py), with bytes and keys made here."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Final

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.core.commands import UpdateAgent, parse_command
from agent.core.errors import CommandRejected, PolicyError
from agent.core.policy import Policy, Verdict, decide_update_agent, is_older
from agent.core.trust import KeySetRejected, read_keyset
from agent.core.verifier import TrustedKeys, jwk_thumbprint
from agent.update import bundle
from agent.update.errors import BundleRejected
from certs.keyset import sign_keyset

NOW: Final = 1_700_000_000
KEY: Final = Ed25519PrivateKey.generate()
KEYS: Final = TrustedKeys.of([KEY.public_key()])
PAYLOAD: Final = b"a tar of wheels, as far as the header is concerned" * 100
URL: Final = "https://releases.example/agent/byoc-agent-0.2.0.bundle"


def header(key: Ed25519PrivateKey = KEY, **claims: Any) -> bytes:
    values: dict[str, Any] = {
        "version": "0.2.0",
        "payload_sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "payload_bytes": len(PAYLOAD),
        "requirement": "byoc-agent[fast]==0.2.0",
        "python": "cp311",
        "platform": "linux-x86_64",
        "issued_at": NOW,
    }
    values.update(claims)
    return bundle.make_header(key, **values)


def verified(data: bytes, keys: TrustedKeys = KEYS, version: str = "0.2.0") -> bundle.Release:
    token, offset = bundle.split_header(data[: bundle.MAX_HEADER_BYTES])
    release = bundle.verify_header(token, keys, version=version, now=NOW)
    payload = data[offset:]
    bundle.check_payload(release, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    return release


def refusal(data: bytes, keys: TrustedKeys = KEYS, version: str = "0.2.0") -> str:
    with pytest.raises(BundleRejected) as info:
        verified(data, keys, version)
    return info.value.code


# -- the bundle ------------------------------------------------------------------------------------


def test_a_bundle_signed_by_a_trusted_release_key_verifies() -> None:
    release = verified(header() + PAYLOAD)
    assert release.version == "0.2.0"
    assert release.kid == jwk_thumbprint(KEY.public_key())
    assert release.requirement == "byoc-agent[fast]==0.2.0"
    assert (release.python, release.platform) == ("cp311", "linux-x86_64")
    bundle.check_target(release, python="cp311", platform="linux-x86_64")
    with pytest.raises(BundleRejected) as info:
        bundle.check_target(release, python="cp312", platform="linux-x86_64")
    assert info.value.code == "incompatible_bundle"


def test_the_checks_refuse_each_thing_that_is_wrong() -> None:
    good = header() + PAYLOAD
    token = bundle.split_header(good)[0]
    head, claims, signature = token.split(".")
    flipped = base64.urlsafe_b64decode(signature + "==")
    broken = base64.urlsafe_b64encode(bytes([flipped[0] ^ 1]) + flipped[1:]).rstrip(b"=")
    assert refusal(bundle.MAGIC + f"{head}.{claims}.".encode() + broken + b"\n" + PAYLOAD) == (
        "signature_invalid"
    )
    assert refusal(header(Ed25519PrivateKey.generate()) + PAYLOAD) == "untrusted_release_key"
    assert refusal(good, TrustedKeys({})) == "untrusted_release_key"
    assert refusal(good, version="0.2.1") == "version_mismatch"
    assert refusal(good + b"x") == "payload_mismatch"
    assert refusal(good[:-1] + bytes([good[-1] ^ 1])) == "payload_mismatch"
    assert refusal(header(requirement="byoc-agent==0.1.0") + PAYLOAD) == "malformed_bundle"
    assert refusal(header(python="cp 311") + PAYLOAD) == "malformed_bundle"
    assert refusal(b"PK\x03\x04" + good) == "malformed_bundle"  # not a bundle at all
    assert refusal(bundle.MAGIC + b"x" * bundle.MAX_HEADER_BYTES) == "malformed_bundle"
    assert refusal(bundle.MAGIC + b"not.a-jws\n" + PAYLOAD) == "malformed_bundle"
    # a command-signing key set's expiry also ends the release keys it named
    expired = TrustedKeys(KEYS.by_kid, expires_at=NOW - 1)
    assert refusal(good, expired) == "release_keys_expired"


def test_a_header_of_another_type_or_algorithm_is_refused() -> None:
    claims = {"name": "byoc-agent", "version": "0.2.0"}
    kid = jwk_thumbprint(KEY.public_key())
    for headers in ({"typ": "byoc-command+jwt", "kid": kid}, {"typ": bundle.RELEASE_TYP}):
        token = jwt.encode(claims, KEY, algorithm="EdDSA", headers=headers)
        data = bundle.MAGIC + token.encode() + b"\n" + PAYLOAD
        assert refusal(data) in ("malformed_bundle", "untrusted_release_key")
    hs = jwt.encode(claims, "k" * 32, algorithm="HS256", headers={"typ": bundle.RELEASE_TYP})
    assert refusal(bundle.MAGIC + hs.encode() + b"\n" + PAYLOAD) == "malformed_bundle"


def test_the_file_must_be_the_one_the_command_names() -> None:
    bundle.check_digest("a" * 64, "a" * 64)
    with pytest.raises(BundleRejected) as info:
        bundle.check_digest("a" * 64, "b" * 64)
    assert info.value.code == "checksum_mismatch"


@pytest.mark.parametrize(
    ("name", "regular", "size"),
    [
        ("wheels/../../etc/passwd.whl", True, 10),
        ("/wheels/x.whl", True, 10),
        ("wheels/x.whl", False, 10),  # a link, a device, a directory
        ("wheels/x.tar.gz", True, 10),
        ("setup.py", True, 10),
        ("wheels/sub/x.whl", True, 10),
        ("wheels/x.whl", True, 10**9),
    ],
)
def test_only_wheel_files_may_be_unpacked(name: str, regular: bool, size: int) -> None:
    with pytest.raises(BundleRejected) as info:
        bundle.wheel_member(name, regular=regular, size=size, count=0, limit=1000)
    assert info.value.code == "malformed_bundle"


def test_wheel_members_are_counted() -> None:
    name = "wheels/byoc_agent-0.2.0-py3-none-any.whl"
    assert bundle.wheel_member(name, regular=True, size=1, count=0, limit=10) == name[7:]
    with pytest.raises(BundleRejected):
        bundle.wheel_member(name, regular=True, size=1, count=bundle.MAX_WHEELS, limit=10)


# -- the command -----------------------------------------------------------------------------------


def params(**changes: object) -> dict[str, object]:
    return {"version": "0.2.0", "url": URL, "sha256": "ab" * 32, **changes}


def test_update_agent_parses_strictly() -> None:
    command = parse_command({"type": "update_agent", "params": params()})
    assert command == UpdateAgent(version="0.2.0", url=URL, sha256="ab" * 32)
    assert command.params() == params()
    assert UpdateAgent.mutating


@pytest.mark.parametrize(
    "url",
    [
        "ftp://releases.example/agent/x.bundle",
        "https://user:pw@releases.example/agent/x.bundle",
        "https://releases.example/agent/x.bundle?v=1",
        "https://releases.example/agent/x.bundle#frag",
        "https://releases.example/agent/../other/x.bundle",
        "https://releases.example/agent/./x.bundle",
        "https://releases.example/agent/%2e%2e/x.bundle",
        "https://releases.example/agent/x bundle",
        "https://releases.example",
        "https://releases.example/agent/" + "x" * 2048,
        "https://[::1]/agent/x.bundle",
        7,
    ],
)
def test_bundle_urls_are_plain(url: object) -> None:
    with pytest.raises(CommandRejected) as info:
        parse_command({"type": "update_agent", "params": params(url=url)})
    assert info.value.code == "invalid_params"


@pytest.mark.parametrize(
    "changes",
    [{"sha256": "AB" * 32}, {"sha256": "ab" * 31}, {"version": "../1"}, {"extra": 1}, {}],
)
def test_update_agent_refuses_bad_digest_version_or_members(changes: dict[str, object]) -> None:
    given = params(**changes) if changes else {"version": "0.2.0", "url": URL}
    with pytest.raises(CommandRejected) as info:
        parse_command({"type": "update_agent", "params": given})
    assert info.value.code == "invalid_params"


# -- the policy ------------------------------------------------------------------------------------

SECTION: Final = """
version = 1
[update_agent]
versions = ["0.2.*", "1.0.0"]
sources = ["https://releases.example/agent/"]
"""


def decide(policy_text: str, version: str = "0.2.0", url: str = URL, running: str = "0.1.0") -> Any:
    policy = Policy.from_toml(policy_text.encode())
    return decide_update_agent(
        policy.update_agent, UpdateAgent(version=version, url=url, sha256="0" * 64), running=running
    )


def test_updates_need_a_person_unless_the_policy_says_otherwise() -> None:
    decision = decide(SECTION)
    assert (decision.verdict, decision.rule) == (
        Verdict.REQUIRE_APPROVAL,
        "update_agent.require_approval",
    )
    assert decide(SECTION + "require_approval = false\n").verdict is Verdict.ALLOW


@pytest.mark.parametrize(
    ("text", "version", "url", "rule"),
    [
        ("version = 1\n", "0.2.0", URL, "update_agent"),
        (SECTION + "allow = false\n", "0.2.0", URL, "update_agent.allow"),
        (SECTION, "0.3.0", URL, "update_agent.versions"),
        (SECTION, "10.2.0", URL, "update_agent.versions"),  # a pattern matches all of it
        (SECTION, "0.2.0", "https://releases.example/agent-evil/x.bundle", "update_agent.sources"),
        (SECTION, "0.2.0", "http://releases.example/agent/x.bundle", "update_agent.sources"),
        (SECTION, "0.2.0", "https://releases.example.evil/agent/x.bundle", "update_agent.sources"),
    ],
)
def test_the_policy_refuses_what_it_does_not_allow(
    text: str, version: str, url: str, rule: str
) -> None:
    decision = decide(text, version, url)
    assert (decision.verdict, decision.rule) == (Verdict.DENY, rule)


def test_downgrades_are_refused_unless_allowed() -> None:
    older = decide(SECTION.replace('"1.0.0"', '"0.1.*"'), "0.1.9", running="0.2.0")
    assert (older.verdict, older.rule) == (Verdict.DENY, "update_agent.allow_downgrade")
    allowed = SECTION.replace('"1.0.0"', '"0.1.*"') + "allow_downgrade = true\n"
    assert decide(allowed, "0.1.9", running="0.2.0").verdict is Verdict.REQUIRE_APPROVAL
    assert is_older("0.9.1", "0.10.0")
    assert not is_older("0.10.0", "0.9.1")
    assert not is_older("1.2", "1.2.0")
    assert not is_older("nightly", "1.0.0")
    assert is_older("1.0.0rc1", "1.0.1")


def test_the_running_version_is_the_agents_own() -> None:
    policy = Policy.from_toml(SECTION.replace('"1.0.0"', '"*"').encode())
    same = policy.decide(UpdateAgent(version=__version__, url=URL, sha256="0" * 64))
    assert same.verdict is Verdict.REQUIRE_APPROVAL
    assert policy.summary()["update_agent"] == {
        "allow": True,
        "versions": ["0.2.*", "*"],
        "sources": ["https://releases.example/agent/"],
        "require_approval": True,
        "allow_downgrade": False,
    }


@pytest.mark.parametrize(
    "line",
    [
        'sources = ["https://releases.example/agent"]',  # a prefix must end with /
        'sources = ["https://releases.example/agent/../x/"]',
        'sources = ["file:///opt/agent/"]',
        'versions = ["0.2/*"]',
        "allow_downgrade = 1",
        "approval_above = 3",
    ],
)
def test_a_bad_update_agent_section_is_an_error(line: str) -> None:
    with pytest.raises(PolicyError):
        Policy.from_toml(f"version = 1\n[update_agent]\n{line}\n".encode())


# -- release keys in key sets ----------------------------------------------------------------------


def test_a_key_set_may_carry_release_keys_apart_from_command_keys() -> None:
    root, command, release = (Ed25519PrivateKey.generate() for _ in range(3))
    token = sign_keyset(
        root=root,
        version=2,
        keys=[command.public_key()],
        lifetime=3600,
        release_keys=[release.public_key()],
        now=NOW,
    )
    keyset = read_keyset(token, signer=root.public_key())
    release_kid = jwk_thumbprint(release.public_key())
    assert set(keyset.trusted_release_keys().by_kid) == {release_kid}
    assert keyset.trusted_release_keys().expires_at == NOW + 3600
    assert release_kid not in keyset.trusted().by_kid  # a release key never signs commands
    assert jwk_thumbprint(command.public_key()) not in keyset.release_keys.by_kid
    plain = read_keyset(
        sign_keyset(root=root, version=3, keys=[command.public_key()], lifetime=60, now=NOW),
        signer=root.public_key(),
    )
    assert len(plain.release_keys) == 0


def test_malformed_release_keys_refuse_the_key_set() -> None:
    root = Ed25519PrivateKey.generate()
    claims = json.loads(
        base64.urlsafe_b64decode(
            sign_keyset(root=root, version=1, keys=[root.public_key()], lifetime=60, now=NOW).split(
                "."
            )[1]
            + "=="
        )
    )
    for bad in ("not a list", [{"kty": "RSA"}], [claims["keys"][0]] * 33):
        token = jwt.encode(
            {**claims, "release_keys": bad},
            root,
            algorithm="EdDSA",
            headers={"typ": "byoc-keyset+jwt", "kid": jwk_thumbprint(root.public_key())},
        )
        with pytest.raises(KeySetRejected) as info:
            read_keyset(token, signer=root.public_key())
        assert info.value.code == "invalid_keyset"
