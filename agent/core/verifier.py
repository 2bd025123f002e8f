"""Command verification: untrusted JWS compact tokens in, a trusted :class:`VerifiedToken` out.

This is the only place where bytes from the control plane become something the agent acts on.
Sans-I/O: keys, settings and ``now`` are arguments; nothing here reads a clock or a file.

Order of checks (docs/PROTOCOL.md §5.2); the first failure decides the rejection code:

 1. size and shape: three base64url segments                     -> ``malformed_token``
 2. protected header: a JSON object without ``crit``/``b64``     -> ``malformed_token``
 3. ``alg`` is ``EdDSA`` (``none``, ``HS*``, ``RS*``... refused)   -> ``unsupported_alg``
 4. ``typ`` is ``byoc-command+jwt``                              -> ``bad_typ``
 5. ``kid`` names a trusted command-signing key                  -> ``unknown_kid``
    (its key set has not expired)                                 -> ``keyset_expired``
 6. Ed25519 signature over the signing input (PyJWT)             -> ``bad_signature``
 7. payload: a JSON object with the required claims and types,   -> ``invalid_claims``
    ``cmd`` included: an object with a ``type`` string (a code) and
    an optional ``params`` object, nothing else
 8. ``iss`` is an accepted issuer                                -> ``bad_issuer``
 9. ``aud`` is exactly this agent's id                           -> ``wrong_audience``
10. time window, with the clock-skew allowance:
    ``exp`` passed -> ``expired``; ``nbf`` ahead -> ``not_yet_valid``;
    ``iat`` ahead -> ``issued_in_future``; ``exp - iat`` over the maximum -> ``lifetime_too_long``

The replay check (``jti`` never seen before) needs the persisted cache and is done by the caller
with :meth:`agent.io.store.AgentState.claim_command`, right after this succeeds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.errors import CommandRejected, ProtocolError
from agent.core.frames import ID_PATTERN, MAX_TOKEN_CHARS, parse_json_object

COMMAND_TYP: Final = "byoc-command+jwt"
ALLOWED_ALGORITHMS: Final = ("EdDSA",)
REQUIRED_CLAIMS: Final = ("iss", "aud", "iat", "nbf", "exp", "jti", "cmd")
MAX_HEADER_BYTES: Final = 4096
"""The protected header's size limit (decoded JSON, bytes): larger is ``malformed_token``."""
COMMAND_TYPE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""``cmd.type``: a code (docs/PROTOCOL.md §3); known or not is decided after acceptance."""
MAX_NUMERIC_DATE: Final = 2**41  # year ~71700; rejects absurd values before any arithmetic


def _b64url_decode(segment: str) -> bytes:
    padded = segment + "=" * (-len(segment) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(key: Ed25519PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of an Ed25519 key: its ``kid``."""
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url_encode(raw)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return _b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a token: what logs and the audit trail record instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class TrustedKeys:
    """The command-signing keys this agent trusts, by ``kid`` (RFC 7638 thumbprint)."""

    by_kid: Mapping[str, Ed25519PublicKey]
    expires_at: float | None = None
    """When they stop being trusted (the expiry of the key set that lists them), if ever."""

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey]) -> TrustedKeys:
        return cls({jwk_thumbprint(key): key for key in keys})

    def __len__(self) -> int:
        return len(self.by_kid)


@dataclass(frozen=True, kw_only=True)
class VerifierSettings:
    audience: str
    """This agent's id: ``aud`` must equal it."""
    issuers: frozenset[str]
    """Accepted ``iss`` values."""
    max_lifetime: float = 900.0
    """Largest accepted ``exp - iat``, in seconds."""
    clock_skew: float = 60.0
    """Allowance for clock differences when checking ``exp``, ``nbf`` and ``iat``."""

    def __post_init__(self) -> None:
        if not self.issuers:
            raise ValueError("at least one accepted issuer is required")
        if not 0 < self.max_lifetime <= 86400:
            raise ValueError("max_lifetime must be in (0, 86400] seconds")
        if not 0 <= self.clock_skew <= 600:
            raise ValueError("clock_skew must be in [0, 600] seconds")


@dataclass(frozen=True, kw_only=True)
class VerifiedToken:
    """A token whose signature, header and claims all checked out."""

    jti: str
    iss: str
    aud: str
    kid: str
    iat: float
    nbf: float
    exp: float
    command_type: str
    """``cmd.type``: a code, not necessarily one this agent knows."""
    params: Mapping[str, Any]
    """``cmd.params``: an object (``{}`` when the claim has none)."""
    token_sha256: str


@dataclass(frozen=True, kw_only=True)
class TokenPeek:
    """What an unverified token claims, for the ``command_received`` audit record only."""

    jti: str | None = None
    iss: str | None = None
    kid: str | None = None
    alg: str | None = None
    type: str | None = None
    params: Mapping[str, Any] | None = None

    def audit_fields(self) -> dict[str, object]:
        return {
            "jti": self.jti,
            "iss": self.iss,
            "kid": self.kid,
            "alg": self.alg,
            "command_type": self.type,
            "params": dict(self.params) if self.params is not None else None,
        }


def _clip(value: object, limit: int = 128) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def peek(token: str) -> TokenPeek:
    """Read what a token claims without trusting it. Never raises."""
    try:
        header_b64, payload_b64, _ = token.split(".")
        header = parse_json_object(
            _b64url_decode(header_b64), max_bytes=MAX_HEADER_BYTES, what="header"
        )
        claims = parse_json_object(_b64url_decode(payload_b64), max_bytes=MAX_TOKEN_CHARS)
    except (ValueError, ProtocolError, binascii.Error, UnicodeError):
        return TokenPeek()
    cmd = claims.get("cmd")
    cmd_type = params = None
    if isinstance(cmd, dict):
        cmd_type = _clip(cmd.get("type"), 64)
        raw_params = cmd.get("params")
        params = raw_params if isinstance(raw_params, dict) else None
    return TokenPeek(
        jti=_clip(claims.get("jti")),
        iss=_clip(claims.get("iss")),
        kid=_clip(header.get("kid")),
        alg=_clip(header.get("alg"), 32),
        type=cmd_type,
        params=params,
    )


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRejected("invalid_claims", f"claim {name!r} must be a NumericDate")
    # Compare before any float conversion: a huge integer must not overflow.
    if not 0 <= value < MAX_NUMERIC_DATE or not math.isfinite(value):
        raise CommandRejected("invalid_claims", f"claim {name!r} is out of range")
    return float(value)


def _string_claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims[name]
    if not isinstance(value, str) or not value or len(value) > 256:
        raise CommandRejected("invalid_claims", f"claim {name!r} must be a non-empty string")
    return value


class CommandVerifier:
    """Checks signed commands for one agent. Stateless apart from its keys and settings."""

    def __init__(self, keys: TrustedKeys, settings: VerifierSettings) -> None:
        self._keys = keys
        self._settings = settings
        self._jws = jwt.PyJWS(options={"verify_signature": True})

    @property
    def settings(self) -> VerifierSettings:
        return self._settings

    def with_keys(self, keys: TrustedKeys) -> CommandVerifier:
        return CommandVerifier(keys, self._settings)

    def verify(self, token: str, *, now: float) -> VerifiedToken:
        """Verify ``token`` at wall-clock time ``now`` (seconds since the epoch).

        Raises :class:`~agent.core.errors.CommandRejected` with the code of the first failed check.
        """
        header = self._check_shape_and_header(token)
        kid = header["kid"]
        key = self._keys.by_kid.get(kid)
        if key is None:
            raise CommandRejected("unknown_kid", f"kid {kid[:64]!r} is not a trusted signing key")
        expires = self._keys.expires_at
        if expires is not None and now - self._settings.clock_skew >= expires:
            raise CommandRejected(
                "keyset_expired", "the key set that trusted this key has expired; push a new one"
            )
        try:
            decoded = self._jws.decode_complete(token, key, algorithms=list(ALLOWED_ALGORITHMS))
        except jwt.InvalidSignatureError as exc:
            raise CommandRejected("bad_signature", "signature verification failed") from exc
        except jwt.PyJWTError as exc:
            raise CommandRejected("malformed_token", f"token rejected: {exc}") from exc
        try:
            claims = parse_json_object(
                decoded["payload"], max_bytes=MAX_TOKEN_CHARS, what="payload"
            )
        except ProtocolError as exc:
            raise CommandRejected("invalid_claims", exc.detail) from exc
        return self._check_claims(claims, kid=kid, token=token, now=now)

    def _check_shape_and_header(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_CHARS:
            raise CommandRejected("malformed_token", f"token longer than {MAX_TOKEN_CHARS} chars")
        if not token.isascii():  # the compact serialization is base64url and dots only
            raise CommandRejected("malformed_token", "token is not ASCII")
        if "=" in token:  # RFC 7515 §2: base64url without padding; one encoding per token
            raise CommandRejected("malformed_token", "base64url padding is not allowed")
        parts = token.split(".")
        # An empty signature is let through to the alg check, so that an unsecured token
        # (alg "none", RFC 7515 §A.5) is reported as what it is.
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise CommandRejected("malformed_token", "not a JWS in compact serialization")
        try:
            raw_header = _b64url_decode(parts[0])
            header = parse_json_object(raw_header, max_bytes=MAX_HEADER_BYTES, what="header")
        except (ValueError, binascii.Error, UnicodeError) as exc:
            raise CommandRejected("malformed_token", "header is not base64url JSON") from exc
        except ProtocolError as exc:
            raise CommandRejected("malformed_token", f"header: {exc.detail}") from exc
        if "crit" in header or "b64" in header:
            raise CommandRejected("malformed_token", "header parameters crit/b64 are not accepted")
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise CommandRejected(
                "unsupported_alg", f"alg {str(alg)[:32]!r} is not allowed (only EdDSA)"
            )
        if header.get("typ") != COMMAND_TYP:
            raise CommandRejected(
                "bad_typ", f"typ must be {COMMAND_TYP!r}, got {str(header.get('typ'))[:64]!r}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise CommandRejected("unknown_kid", "header has no kid")
        return header

    def _check_claims(
        self, claims: Mapping[str, Any], *, kid: str, token: str, now: float
    ) -> VerifiedToken:
        settings = self._settings
        missing = [name for name in REQUIRED_CLAIMS if name not in claims]
        if missing:
            raise CommandRejected("invalid_claims", f"missing claim(s) {missing}")
        iss = _string_claim(claims, "iss")
        jti = _string_claim(claims, "jti")
        if not ID_PATTERN.fullmatch(jti):
            raise CommandRejected("invalid_claims", f"jti must match {ID_PATTERN.pattern}")
        aud = claims["aud"]
        if not isinstance(aud, str):
            raise CommandRejected("invalid_claims", "claim 'aud' must be a single string")
        iat, nbf, exp = (_numeric_date(claims, name) for name in ("iat", "nbf", "exp"))
        command_type, params = _command_claim(claims["cmd"])
        if iss not in settings.issuers:
            raise CommandRejected("bad_issuer", f"issuer {iss[:64]!r} is not accepted")
        if aud != settings.audience:
            raise CommandRejected(
                "wrong_audience", f"command is for {aud[:64]!r}, not {settings.audience!r}"
            )
        skew = settings.clock_skew
        if exp <= nbf or exp <= iat:
            raise CommandRejected("invalid_claims", "exp must be later than iat and nbf")
        if now - skew >= exp:
            raise CommandRejected("expired", f"expired {now - exp:.0f}s ago")
        if nbf > now + skew:
            raise CommandRejected("not_yet_valid", f"not valid for another {nbf - now:.0f}s")
        if iat > now + skew:
            raise CommandRejected("issued_in_future", f"issued {iat - now:.0f}s in the future")
        if exp - iat > settings.max_lifetime:
            raise CommandRejected(
                "lifetime_too_long",
                f"lifetime {exp - iat:.0f}s exceeds the maximum of {settings.max_lifetime:.0f}s",
            )
        return VerifiedToken(
            jti=jti,
            iss=iss,
            aud=aud,
            kid=kid,
            iat=iat,
            nbf=nbf,
            exp=exp,
            command_type=command_type,
            params=params,
            token_sha256=token_sha256(token),
        )


def _command_claim(cmd: object) -> tuple[str, Mapping[str, Any]]:
    """The ``cmd`` claim's shape: ``{"type": <code>, "params": <object>}``, ``params`` optional.

    Whether the type is known and the parameters are valid for it is decided once the token is
    accepted (``unknown_command_type``, ``invalid_params``: docs/PROTOCOL.md §5.2); a ``cmd`` of
    the wrong shape never gets that far, so nothing downstream reads an untyped member."""
    if not isinstance(cmd, dict):
        raise CommandRejected("invalid_claims", "claim 'cmd' must be an object")
    extra = sorted(str(name)[:32] for name in set(cmd) - {"type", "params"})
    if extra:
        raise CommandRejected("invalid_claims", f"claim 'cmd' has unknown member(s) {extra}")
    kind = cmd.get("type")
    if not isinstance(kind, str) or not COMMAND_TYPE.fullmatch(kind):
        raise CommandRejected(
            "invalid_claims", f"cmd.type must be a string matching {COMMAND_TYPE.pattern}"
        )
    params = cmd.get("params", {})
    if not isinstance(params, dict):
        raise CommandRejected("invalid_claims", "cmd.params must be an object when present")
    return kind, params
