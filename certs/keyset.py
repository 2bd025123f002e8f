"""Offline tooling for command-signing key rotation (docs/PROTOCOL.md §5.4).

- :func:`make_root_key` writes an Ed25519 root key pair (``root.key`` 0600, ``root.pub``). The
  root stays offline; agents are configured with ``root.pub`` (``commands.root_key``).
- :func:`sign_keyset` signs a key set: the command-signing public keys agents must trust, a
  version (strictly increasing), a lifetime, and the root that signs the *next* set (this one,
  unless rotating the root).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.trust import KEYSET_TYP, public_jwk
from agent.core.verifier import jwk_thumbprint
from certs.errors import PKIError
from certs.pki import _write_private_key, _write_public


def make_root_key(directory: Path, *, name: str = "root") -> tuple[Path, Path]:
    """Create ``<name>.key`` (0600) and ``<name>.pub`` in ``directory``; refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if key_path.exists() or pub_path.exists():
        raise PKIError(f"{key_path} or {pub_path} exists already; not overwriting a root key")
    key = Ed25519PrivateKey.generate()
    _write_private_key(key_path, key)
    _write_public(
        pub_path,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return key_path, pub_path


def load_ed25519_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PKIError(f"cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PKIError(f"{path} is not an Ed25519 private key")
    return key


def load_ed25519_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PKIError(f"{path} is not an Ed25519 public key")
    return key


def sign_keyset(
    *,
    root: Ed25519PrivateKey,
    version: int,
    keys: Sequence[Ed25519PublicKey],
    lifetime: float,
    next_root: Ed25519PublicKey | None = None,
    release_keys: Sequence[Ed25519PublicKey] = (),
    issuer: str = "byoc-keyset",
    now: float | None = None,
) -> str:
    """A key set signed by ``root``. ``next_root`` rotates the root (default: ``root`` stays);
    ``release_keys`` are the keys agents trust to sign their own release bundles."""
    if version < 1:
        raise PKIError("version must be at least 1")
    if not keys:
        raise PKIError("a key set needs at least one key")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "version": version,
        "iat": issued,
        "exp": issued + int(lifetime),
        "keys": [public_jwk(key) for key in keys],
        "root": public_jwk(next_root or root.public_key()),
    }
    if release_keys:
        claims["release_keys"] = [public_jwk(key) for key in release_keys]
    return jwt.encode(
        claims,
        root,
        algorithm="EdDSA",
        headers={"typ": KEYSET_TYP, "kid": jwk_thumbprint(root.public_key())},
    )
