"""Receipts: the agent's signature over what it reported as a command's outcome.

A receipt is a JWS (compact) signed with the agent's own TLS client key, so it is bound to the
identity the agent CA certified; the control plane can later prove what the agent reported to
anyone who trusts that CA. Header: ``alg`` (``ES256`` for a P-256 key, ``ES384``, ``EdDSA`` or
``RS256``), ``typ`` ``byoc-receipt+jwt``, ``x5t#S256`` (base64url SHA-256 of the certificate's
DER, to find the certificate that verifies it). Claims: ``iss`` (agent id), ``jti``, ``ref``,
``state``, ``reason`` (or null), ``result_sha256`` (hex SHA-256 of the RFC 8785 canonical form of
the ``result`` object, ``null`` when there is none) and ``at``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from agent.core.canonical import canonicalize
from agent.core.errors import AgentError

RECEIPT_TYP: Final = "byoc-receipt+jwt"
_CURVES: Final = {"secp256r1": "ES256", "secp384r1": "ES384"}


class ReceiptInvalid(AgentError):
    pass


def result_sha256(result: Mapping[str, Any] | None) -> str:
    return hashlib.sha256(canonicalize(dict(result) if result is not None else None)).hexdigest()


def cert_thumbprint(der: bytes) -> str:
    """``x5t#S256``: base64url (no padding) SHA-256 of a certificate's DER."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _algorithm(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        alg = _CURVES.get(key.curve.name)
        if alg is None:
            raise ReceiptInvalid(f"unsupported curve {key.curve.name}")
        return alg
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise ReceiptInvalid(f"unsupported key type {type(key).__name__}")


@dataclass(frozen=True)
class ReceiptSigner:
    agent_id: str
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    cert_der: bytes

    @classmethod
    def from_pem(cls, agent_id: str, cert_pem: bytes, key_pem: bytes) -> ReceiptSigner:
        """A signer from the agent's certificate and private key (PEM bytes)."""
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
            private = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ReceiptInvalid(f"cannot load the receipt key: {exc}") from exc
        if not isinstance(
            private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        ):
            raise ReceiptInvalid(f"unsupported key type {type(private).__name__}")
        return cls(agent_id, private, certificate.public_bytes(Encoding.DER))

    def sign(
        self,
        *,
        jti: str,
        ref: str,
        state: str,
        reason: str | None,
        result: Mapping[str, Any] | None,
        at: float,
    ) -> str:
        claims = receipt_claims(
            agent_id=self.agent_id,
            jti=jti,
            ref=ref,
            state=state,
            reason=reason,
            result=result,
            at=at,
        )
        return jwt.encode(
            claims,
            self.key,
            algorithm=_algorithm(self.key),
            headers={"typ": RECEIPT_TYP, "x5t#S256": cert_thumbprint(self.cert_der)},
        )


def receipt_claims(
    *,
    agent_id: str,
    jti: str,
    ref: str,
    state: str,
    reason: str | None,
    result: Mapping[str, Any] | None,
    at: float,
) -> dict[str, object]:
    """What a receipt says: the signer makes these claims, a verifier expects them."""
    return {
        "iss": agent_id,
        "jti": jti,
        "ref": ref,
        "state": state,
        "reason": reason,
        "result_sha256": result_sha256(result),
        "at": at,
    }


def receipt_certificate_sha256(token: str) -> str | None:
    """The hex SHA-256 of the certificate a receipt names (``x5t#S256``), or None if it names
    none readable; which certificate to verify it with."""
    try:
        named = jwt.get_unverified_header(token).get("x5t#S256")
        digest = base64.urlsafe_b64decode(str(named) + "=" * (-len(str(named)) % 4))
    except (jwt.PyJWTError, ValueError):
        return None
    return digest.hex() if named is not None and len(digest) == 32 else None


def verify_receipt(token: str, certificate: x509.Certificate) -> dict[str, Any]:
    """Check a receipt's signature with ``certificate``; return its claims."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise ReceiptInvalid(f"not a JWS: {exc}") from exc
    if header.get("typ") != RECEIPT_TYP:
        raise ReceiptInvalid("not a receipt (typ)")
    if header.get("x5t#S256") != cert_thumbprint(certificate.public_bytes(Encoding.DER)):
        raise ReceiptInvalid("signed with another certificate's key")
    public = certificate.public_key()
    if not isinstance(
        public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    ):
        raise ReceiptInvalid(f"unsupported key type {type(public).__name__}")
    try:
        claims: dict[str, Any] = jwt.decode(
            token, public, algorithms=[_algorithm(public)], options={"verify_aud": False}
        )
    except jwt.PyJWTError as exc:
        raise ReceiptInvalid(f"signature does not verify: {exc}") from exc
    return claims
