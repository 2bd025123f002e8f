"""Command tokens: JWS compact serialization, EdDSA (Ed25519), made with PyJWT.

The format is docs/PROTOCOL.md §5; any JWS library that does EdDSA can make the same tokens.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.core.verifier import COMMAND_TYP, jwk_thumbprint
from control_plane_stub.errors import StubConfigError

DEFAULT_TTL: Final = 300


@dataclass(frozen=True)
class SignedCommand:
    token: str
    jti: str
    exp: int


class CommandSigner:
    def __init__(self, key: Ed25519PrivateKey, *, issuer: str) -> None:
        self._key = key
        self.issuer = issuer
        self.kid = jwk_thumbprint(key.public_key())

    @classmethod
    def from_file(cls, path: Path, *, issuer: str) -> CommandSigner:
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise StubConfigError(f"cannot load signing key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise StubConfigError(f"{path} is not an Ed25519 private key")
        return cls(key, issuer=issuer)

    def sign(
        self,
        *,
        agent_id: str,
        command_type: str,
        params: dict[str, object],
        now: float,
        ttl: int = DEFAULT_TTL,
        jti: str | None = None,
        extra_claims: dict[str, object] | None = None,
    ) -> SignedCommand:
        issued = int(now)
        claims: dict[str, object] = {
            "iss": self.issuer,
            "aud": agent_id,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": jti or uuid.uuid4().hex,
            "cmd": {"type": command_type, "params": params},
            **(extra_claims or {}),
        }
        token = jwt.encode(
            claims, self._key, algorithm="EdDSA", headers={"typ": COMMAND_TYP, "kid": self.kid}
        )
        return SignedCommand(token=token, jti=str(claims["jti"]), exp=issued + ttl)
