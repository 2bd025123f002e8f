"""Signed key sets: which command-signing keys the agent trusts, and how that changes.

A key set is a JWS (compact, EdDSA) signed by a **root** key that stays offline. Header:
``alg`` ``EdDSA``, ``typ`` ``byoc-keyset+jwt``, ``kid`` = the root's RFC 7638 thumbprint.
Claims::

    {"iss": "...", "version": 7, "iat": ..., "exp": ...,
     "keys": [{"kty": "OKP", "crv": "Ed25519", "x": "..."}, ...],   # trusted command keys
     "root": {"kty": "OKP", "crv": "Ed25519", "x": "..."}}          # signs the NEXT set

The agent accepts a set only if it is signed by the current root, its version is higher than
every version accepted before (persisted, so a rollback is refused after a restart too), and it
has not expired. Once the accepted set expires, its keys are no longer trusted. Rotating the
root is one more set, signed by the old root, whose ``root`` is the new one.

Sans-I/O: tokens, keys and ``now`` in; a :class:`KeySet` or :class:`KeySetRejected` out.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.errors import CommandRejected, ProtocolError
from agent.core.frames import MAX_TOKEN_CHARS, KeySetStatus, parse_json_object
from agent.core.verifier import TrustedKeys, jwk_thumbprint

KEYSET_TYP: Final = "byoc-keyset+jwt"
MAX_KEYS: Final = 32


class KeySetRejected(CommandRejected):
    """A key set was refused; ``code`` and ``detail`` as for commands."""


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
    }


def key_from_jwk(value: object, where: str = "key") -> Ed25519PublicKey:
    if not isinstance(value, dict) or value.get("kty") != "OKP" or value.get("crv") != "Ed25519":
        raise KeySetRejected("invalid_keyset", f"{where} is not an Ed25519 JWK")
    x = value.get("x")
    try:
        raw = _b64url(x) if isinstance(x, str) and x.isascii() and "=" not in x else b""
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise KeySetRejected("invalid_keyset", f"{where}: x is not a 32-byte base64url key")
    return Ed25519PublicKey.from_public_bytes(raw)


def _date(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KeySetRejected("invalid_keyset", f"claim {name!r} must be a NumericDate")
    if not 0 <= value < 2**41 or not math.isfinite(value):
        raise KeySetRejected("invalid_keyset", f"claim {name!r} is out of range")
    return float(value)


@dataclass(frozen=True)
class KeySet:
    version: int
    issued_at: float
    expires_at: float
    keys: TrustedKeys
    root: Ed25519PublicKey
    """The key that must sign the next set."""
    token: str

    @property
    def root_kid(self) -> str:
        return jwk_thumbprint(self.root)

    def trusted(self) -> TrustedKeys:
        """The command keys, valid until this set expires."""
        return TrustedKeys(self.keys.by_kid, expires_at=self.expires_at)


def read_keyset(token: str, *, signer: Ed25519PublicKey) -> KeySet:
    """Parse and check the signature of a key set (no version or time checks)."""
    if not token.isascii() or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise KeySetRejected("malformed_keyset", "not a JWS in compact serialization")
    try:
        header = parse_json_object(
            _b64url(token.split(".", maxsplit=1)[0]), max_bytes=4096, what="header"
        )
    except (ValueError, binascii.Error, ProtocolError) as exc:
        raise KeySetRejected("malformed_keyset", "header is not base64url JSON") from exc
    if header.get("alg") != "EdDSA" or header.get("typ") != KEYSET_TYP or "crit" in header:
        raise KeySetRejected("malformed_keyset", f"alg must be EdDSA and typ {KEYSET_TYP!r}")
    if header.get("kid") != jwk_thumbprint(signer):
        raise KeySetRejected("unknown_root", "not signed by the current root key")
    try:
        decoded = jwt.PyJWS().decode_complete(token, signer, algorithms=["EdDSA"])
        claims = parse_json_object(decoded["payload"], max_bytes=MAX_TOKEN_CHARS, what="payload")
    except jwt.InvalidSignatureError as exc:
        raise KeySetRejected("bad_signature", "signature verification failed") from exc
    except (jwt.PyJWTError, ProtocolError) as exc:
        raise KeySetRejected("malformed_keyset", f"cannot read the key set: {exc}") from exc
    version = claims.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2**53:
        raise KeySetRejected("invalid_keyset", "version must be a positive integer")
    keys = claims.get("keys")
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS:
        raise KeySetRejected("invalid_keyset", f"keys must list 1..{MAX_KEYS} keys")
    return KeySet(
        version=version,
        issued_at=_date(claims, "iat"),
        expires_at=_date(claims, "exp"),
        keys=TrustedKeys.of(key_from_jwk(key, f"keys[{i}]") for i, key in enumerate(keys)),
        root=key_from_jwk(claims.get("root"), "root"),
        token=token,
    )


def accept_keyset(
    token: str,
    *,
    root: Ed25519PublicKey,
    current: KeySet | None,
    now: float,
    clock_skew: float,
) -> KeySet:
    """Verify a key set offered now against the current root and the set in force.

    Only the very set in force offered again is ``already_current`` (a harmless re-offer); a
    different set under the same version is not newer, so it is a ``rollback``."""
    keyset = read_keyset(token, signer=root)
    current_version = current.version if current is not None else 0
    if current is not None and keyset.version == current_version:
        if token == current.token:
            raise KeySetRejected("already_current", f"version {keyset.version} is in force")
        raise KeySetRejected(
            "rollback",
            f"version {keyset.version} is in force with other content; a new set needs a "
            "higher version",
        )
    if keyset.version < current_version:
        raise KeySetRejected(
            "rollback", f"version {keyset.version} is older than {current_version} (in force)"
        )
    if now - clock_skew >= keyset.expires_at:
        raise KeySetRejected("expired", f"the key set expired {now - keyset.expires_at:.0f}s ago")
    if keyset.issued_at > now + clock_skew:
        raise KeySetRejected("issued_in_future", "the key set is issued in the future")
    if keyset.expires_at <= keyset.issued_at:
        raise KeySetRejected("invalid_keyset", "exp must be later than iat")
    return keyset


class KeyRing:
    """The root in force and the accepted key set, as the agent holds them. No I/O: the caller
    persists what :meth:`install` installs."""

    def __init__(self, anchor: Ed25519PublicKey, current: KeySet | None = None) -> None:
        self.anchor = anchor
        self.current = current

    @property
    def version(self) -> int:
        return self.current.version if self.current is not None else 0

    @property
    def root(self) -> Ed25519PublicKey:
        """The key that must sign the next set: the configured anchor until a set names one."""
        return self.current.root if self.current is not None else self.anchor

    def check(self, token: str, *, now: float, clock_skew: float) -> KeySet:
        return accept_keyset(
            token, root=self.root, current=self.current, now=now, clock_skew=clock_skew
        )

    def install(self, keyset: KeySet) -> None:
        self.current = keyset

    def trusted(self) -> TrustedKeys:
        return self.current.trusted() if self.current is not None else TrustedKeys({})


# -- what the agent trusts, and how an offer changes it ------------------------------------------


@dataclass(frozen=True)
class StoredKeySet:
    """A key set accepted earlier, as the store keeps it: the token and the root that signed it
    (a JWK, JSON)."""

    token: str
    signer: str


@dataclass(frozen=True)
class SaveKeySet:
    """Effect: keep an accepted set with its signer (so a rollback is refused after a restart)."""

    version: int
    token: str
    signer: str


@dataclass(frozen=True)
class DiscardKeySets:
    """Effect: forget every kept set and its version floor (the configured root replaced)."""


@dataclass(frozen=True)
class TrustRecord:
    """Effect: an audit record (and the operational log line that goes with it)."""

    event: str
    fields: dict[str, object]
    level: str = "info"


TrustEffect = SaveKeySet | DiscardKeySets | TrustRecord


class Trust:
    """The command-signing keys the agent trusts: a fixed list, or an offline root and the
    newest key set it signed. Sans-I/O: the store's contents in, effects out."""

    def __init__(self, *, fixed: TrustedKeys | None = None, ring: KeyRing | None = None) -> None:
        if (fixed is None) == (ring is None):
            raise ValueError("trust: either a fixed key list or a key ring")
        self._fixed = fixed
        self.ring = ring

    @classmethod
    def from_root(
        cls, root: Ed25519PublicKey, *, latest: StoredKeySet | None, signers: list[str]
    ) -> tuple[Trust, list[TrustEffect]]:
        """The configured root, and the highest set accepted before (re-checked against the
        root that signed it).

        The configured root wins: the kept sets count only if they descend from it (it signed
        one of them, or the latest names it as the next root: the root was rotated through key
        sets and the configuration updated to match). Otherwise the customer replaced the root
        (feared stolen, say): the kept sets and their version floor are discarded
        (``keyset_root_replaced``) and trust starts again from the configured root.

        Raises ValueError when a kept set no longer verifies (a damaged store)."""
        if latest is None:
            return cls(ring=KeyRing(root)), []
        try:
            current = read_keyset(latest.token, signer=key_from_jwk(_json(latest.signer), "signer"))
            kids = {jwk_thumbprint(key_from_jwk(_json(jwk), "signer")) for jwk in signers}
        except KeySetRejected as exc:
            raise ValueError(f"the stored key set no longer verifies: {exc.detail}") from exc
        configured = jwk_thumbprint(root)
        if configured in kids or configured == current.root_kid:
            return cls(ring=KeyRing(root, current)), []
        fields: dict[str, object] = {
            "root_kid": configured,
            "previous_root_kid": current.root_kid,
            "discarded_version": current.version,
        }
        effects: list[TrustEffect] = [
            TrustRecord("keyset_root_replaced", fields, level="warning"),
            DiscardKeySets(),
        ]
        return cls(ring=KeyRing(root)), effects

    @property
    def version(self) -> int | None:
        """The version of the key set in force (0: none yet); None with a fixed key list."""
        return None if self.ring is None else self.ring.version

    def keys(self) -> TrustedKeys:
        if self._fixed is not None:
            return self._fixed
        assert self.ring is not None  # noqa: S101  # one of the two, by construction
        return self.ring.trusted()

    def offer(
        self, token: str, *, now: float, clock_skew: float
    ) -> tuple[KeySetStatus, list[TrustEffect]]:
        """Judge a key set offered now (docs/PROTOCOL.md §5.4)."""
        ring = self.ring
        if ring is None:
            return (
                KeySetStatus(
                    version=0,
                    accepted=False,
                    reason="keysets_not_enabled",
                    detail="this agent trusts a fixed list of command keys (commands.trusted_keys)",
                ),
                [],
            )
        try:
            keyset = ring.check(token, now=now, clock_skew=clock_skew)
        except KeySetRejected as exc:
            record = TrustRecord(
                "keyset_rejected", {"reason": exc.code, "detail": exc.detail}, level="warning"
            )
            status = KeySetStatus(
                version=ring.version, accepted=False, reason=exc.code, detail=exc.detail
            )
            return status, [record]
        accepted = TrustRecord(
            "keyset_accepted",
            {
                "version": keyset.version,
                "previous_version": ring.version,
                "kids": sorted(keyset.keys.by_kid),
                "root_kid": keyset.root_kid,
                "root_rotated": keyset.root_kid != jwk_thumbprint(ring.root),
                "expires": int(keyset.expires_at),
            },
        )
        save = SaveKeySet(keyset.version, token, json.dumps(public_jwk(ring.root)))
        ring.install(keyset)
        return KeySetStatus(version=keyset.version, accepted=True), [accepted, save]


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise KeySetRejected("malformed_keyset", "a stored signer is not JSON") from exc
