"""The agent's release bundle: one file, signed, checked before anything in it is read. Sans-I/O.

Layout (README.md, "Updating the agent")::

    BYOC-AGENT-BUNDLE/1\\n                      magic line
    <JWS compact serialization>\\n              the signed header (at most 16 KiB)
    <payload>                                   a POSIX tar archive: wheels/<name>.whl only

The header is a JWS signed with a **release key** (Ed25519), trusted apart from the
command-signing keys: ``alg`` ``EdDSA``, ``typ`` ``byoc-release+jwt``, ``kid`` = the key's RFC 7638
thumbprint. Its claims::

    {"name": "byoc-agent", "version": "0.1.1", "iat": 1700000000,
     "payload_sha256": "<hex>", "payload_bytes": 17301504,
     "requirement": "byoc-agent[fast]==0.1.1",       # what pip installs from the wheels
     "python": "cp311", "platform": "linux-x86_64"}  # what the wheels were built for

The order of the checks, all before the payload is opened: the whole file's SHA-256 against the
one the signed command names (:func:`check_digest`), the magic line and the header's shape
(:func:`split_header`), the signature by a trusted release key and the claims
(:func:`verify_header`: the version must be the one the command names, so a validly signed
bundle of another version cannot stand in), then the payload's size and SHA-256 against the
signed claims (:func:`check_payload`). Only then are tar members read, each checked by
:func:`wheel_member`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.commands import SHA256_PATTERN, VERSION_PATTERN
from agent.core.errors import ProtocolError
from agent.core.frames import parse_json_object
from agent.core.verifier import TrustedKeys, jwk_thumbprint
from agent.update.errors import BundleRejected

MAGIC: Final = b"BYOC-AGENT-BUNDLE/1\n"
RELEASE_TYP: Final = "byoc-release+jwt"
NAME: Final = "byoc-agent"
MAX_HEADER_BYTES: Final = 16 * 1024
"""The magic line and the signed header together; what is read before the signature is known."""
MAX_WHEELS: Final = 256
WHEEL_NAME: Final = re.compile(r"wheels/[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl")
REQUIREMENT: Final = re.compile(r"byoc-agent(?:\[[a-z,]{1,64}\])?==[0-9A-Za-z.+_-]{1,64}")
TAG: Final = re.compile(r"[a-z0-9_.-]{1,64}")


@dataclass(frozen=True, kw_only=True)
class Release:
    """The signed claims of a bundle whose header verified."""

    version: str
    issued_at: int
    payload_sha256: str
    payload_bytes: int
    requirement: str
    python: str
    platform: str
    kid: str
    """The release key that signed it."""

    def audit_fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "release_kid": self.kid,
            "requirement": self.requirement,
            "python": self.python,
            "platform": self.platform,
            "payload_bytes": self.payload_bytes,
        }


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def check_digest(actual: str, expected: str) -> None:
    """The downloaded file is exactly the one the signed command names."""
    if actual != expected:
        raise BundleRejected(
            "checksum_mismatch", f"the bundle's SHA-256 is {actual}, the command names {expected}"
        )


def split_header(head: bytes) -> tuple[str, int]:
    """The signed header token and the payload's offset, from the first bytes of the file (at
    least :data:`MAX_HEADER_BYTES` of them, or the whole file if shorter)."""
    if not head.startswith(MAGIC):
        raise BundleRejected("malformed_bundle", "not an agent release bundle (no magic line)")
    end = head.find(b"\n", len(MAGIC), MAX_HEADER_BYTES)
    if end < 0:
        raise BundleRejected(
            "malformed_bundle", f"no signed header within the first {MAX_HEADER_BYTES} bytes"
        )
    raw = head[len(MAGIC) : end]
    if not raw.isascii() or raw.count(b".") != 2:
        raise BundleRejected("malformed_bundle", "the header is not a JWS compact serialization")
    return raw.decode("ascii"), end + 1


def verify_header(token: str, keys: TrustedKeys, *, version: str, now: float) -> Release:
    """Check the header's signature against the trusted release keys and type its claims; the
    version must be ``version`` (the one the command asked for)."""
    try:
        header = parse_json_object(_b64url(token.split(".", 1)[0]), max_bytes=4096, what="header")
    except (ValueError, binascii.Error, ProtocolError) as exc:
        raise BundleRejected("malformed_bundle", "the header's JOSE header is not JSON") from exc
    if header.get("alg") != "EdDSA" or header.get("typ") != RELEASE_TYP or "crit" in header:
        raise BundleRejected("malformed_bundle", f"alg must be EdDSA and typ {RELEASE_TYP!r}")
    if keys.expires_at is not None and now >= keys.expires_at:
        raise BundleRejected(
            "release_keys_expired", "the key set that names the release keys has expired"
        )
    kid = header.get("kid")
    key = keys.by_kid.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise BundleRejected(
            "untrusted_release_key",
            f"signed by {str(kid)[:64]!r}, which is not a trusted release key"
            + ("" if keys.by_kid else " (this agent trusts none: [update] release_keys)"),
        )
    try:
        decoded = jwt.PyJWS().decode_complete(token, key, algorithms=["EdDSA"])
    except jwt.InvalidSignatureError as exc:
        raise BundleRejected("signature_invalid", "the bundle's signature does not verify") from exc
    except jwt.PyJWTError as exc:
        raise BundleRejected("malformed_bundle", f"cannot read the signed header: {exc}") from exc
    try:
        claims = parse_json_object(decoded["payload"], max_bytes=MAX_HEADER_BYTES, what="claims")
    except ProtocolError as exc:
        raise BundleRejected("malformed_bundle", f"the signed claims: {exc.detail}") from exc
    release = _release(claims, kid=jwk_thumbprint(key))
    if release.version != version:
        raise BundleRejected(
            "version_mismatch",
            f"the bundle is signed as version {release.version}, the command asks for {version}",
        )
    return release


def _release(claims: Mapping[str, Any], *, kid: str) -> Release:
    def text(name: str, pattern: re.Pattern[str]) -> str:
        value = claims.get(name)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise BundleRejected("malformed_bundle", f"claim {name!r} is missing or malformed")
        return value

    def integer(name: str, high: int) -> int:
        value = claims.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise BundleRejected("malformed_bundle", f"claim {name!r} must be an integer")
        return value

    if claims.get("name") != NAME:
        raise BundleRejected("malformed_bundle", f"this is not a {NAME} release")
    version = text("version", VERSION_PATTERN)
    requirement = text("requirement", REQUIREMENT)
    if not requirement.endswith(f"=={version}"):
        raise BundleRejected("malformed_bundle", "the requirement does not pin the version")
    return Release(
        version=version,
        issued_at=integer("iat", 2**41),
        payload_sha256=text("payload_sha256", SHA256_PATTERN),
        payload_bytes=integer("payload_bytes", 2**40),
        requirement=requirement,
        python=text("python", TAG),
        platform=text("platform", TAG),
        kid=kid,
    )


def check_payload(release: Release, *, sha256: str, size: int) -> None:
    """The payload after the header is the one the release key signed."""
    if size != release.payload_bytes or sha256 != release.payload_sha256:
        raise BundleRejected(
            "payload_mismatch",
            f"the payload ({size} bytes, SHA-256 {sha256}) is not the signed one "
            f"({release.payload_bytes} bytes, {release.payload_sha256})",
        )


def check_target(release: Release, *, python: str, platform: str) -> None:
    """The wheels were built for this interpreter and platform."""
    if (release.python, release.platform) != (python, platform):
        raise BundleRejected(
            "incompatible_bundle",
            f"built for {release.python} on {release.platform}; this host runs {python} on "
            f"{platform}",
        )


def wheel_member(name: str, *, regular: bool, size: int, count: int, limit: int) -> str:
    """Check one tar member (its name, type, size, and how many came before); returns the file
    name to write it as."""
    if count >= MAX_WHEELS:
        raise BundleRejected("malformed_bundle", f"more than {MAX_WHEELS} files in the payload")
    if not regular or not WHEEL_NAME.fullmatch(name) or ".." in name:
        raise BundleRejected(
            "malformed_bundle", f"{name[:100]!r}: only regular files wheels/<name>.whl allowed"
        )
    if size > limit:
        raise BundleRejected("malformed_bundle", f"{name}: larger than the bundle")
    return name.removeprefix("wheels/")


def make_header(
    key: Ed25519PrivateKey,
    *,
    version: str,
    payload_sha256: str,
    payload_bytes: int,
    requirement: str,
    python: str,
    platform: str,
    issued_at: int,
) -> bytes:
    """The magic line and signed header for a payload (what ``make bundle`` writes)."""
    claims = {
        "name": NAME,
        "version": version,
        "iat": issued_at,
        "payload_sha256": payload_sha256,
        "payload_bytes": payload_bytes,
        "requirement": requirement,
        "python": python,
        "platform": platform,
    }
    token = jwt.encode(
        claims,
        key,
        algorithm="EdDSA",
        headers={"typ": RELEASE_TYP, "kid": jwk_thumbprint(key.public_key())},
    )
    head = MAGIC + token.encode("ascii") + b"\n"
    if len(head) > MAX_HEADER_BYTES:  # pragma: no cover - the claims are small and bounded
        raise ValueError("header too large")
    return head
