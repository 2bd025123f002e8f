"""A small development PKI for the agent's mutual TLS and signed commands.

Layout of a PKI directory (keys 0600, certificates and public keys 0644, directories 0700)::

    server-ca.pem / .key            "BYOC dev server CA": issues the control plane's server cert
    agent-ca.pem / .key             "BYOC dev agent CA": issues agent client certs
    server.pem / .key               the control plane's leaf certificate (no chain) and its key
    command-signing.key / .pub      Ed25519 key pair the control plane signs commands with
    agents/<agent_id>.pem / .key    one client certificate per agent; CN = agent id

All X.509 keys are ECDSA P-256 signed with SHA-256. Certificates carry the extensions strict
verifiers require (``VERIFY_X509_STRICT``, ``cryptography.x509.verification``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.errors import PKIError, PKIExistsError, PKIIncompleteError

__all__ = [
    "PKIPaths",
    "agent_certificate",
    "init_pki",
    "issue_agent_cert",
    "issue_server_cert",
    "load_certificate",
    "load_pki",
    "validate_agent_id",
]

ORGANIZATION = "BYOC dev PKI"
SERVER_CA_NAME = "BYOC dev server CA"
AGENT_CA_NAME = "BYOC dev agent CA"
AGENT_URI_PREFIX = "urn:byoc:agent:"

CA_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=5)

_AGENT_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class PKIPaths:
    """Where each file of a PKI rooted at ``root`` lives. Computing it touches no file."""

    root: Path
    server_ca_cert: Path
    server_ca_key: Path
    agent_ca_cert: Path
    agent_ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    signing_pub: Path

    @classmethod
    def at(cls, root: Path) -> PKIPaths:
        """The paths of a PKI rooted at ``root``."""
        root = Path(root)
        return cls(
            root=root,
            server_ca_cert=root / "server-ca.pem",
            server_ca_key=root / "server-ca.key",
            agent_ca_cert=root / "agent-ca.pem",
            agent_ca_key=root / "agent-ca.key",
            server_cert=root / "server.pem",
            server_key=root / "server.key",
            signing_key=root / "command-signing.key",
            signing_pub=root / "command-signing.pub",
        )

    @property
    def agents_dir(self) -> Path:
        """The directory holding agent certificates and keys."""
        return self.root / "agents"

    def agent_cert(self, agent_id: str) -> Path:
        """The client certificate of ``agent_id``."""
        return self.agents_dir / f"{agent_id}.pem"

    def agent_key(self, agent_id: str) -> Path:
        """The private key of ``agent_id``."""
        return self.agents_dir / f"{agent_id}.key"

    def core_files(self) -> tuple[Path, ...]:
        """Every file of the PKI except the agents' (the ones ``load_pki`` requires)."""
        return (
            self.server_ca_cert,
            self.server_ca_key,
            self.agent_ca_cert,
            self.agent_ca_key,
            self.server_cert,
            self.server_key,
            self.signing_key,
            self.signing_pub,
        )


def validate_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if it is a DNS-label-like id (``[a-z0-9-]``, 1-63), else PKIError."""
    if _AGENT_ID.fullmatch(agent_id) is None:
        raise PKIError(
            f"invalid agent id {agent_id!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return agent_id


def init_pki(
    root: Path,
    *,
    agent_ids: Sequence[str] = ("agent-1",),
    server_dns: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1", "::1"),
    overwrite: bool = False,
    now: datetime | None = None,
) -> PKIPaths:
    """Create a PKI in ``root``, or complete an existing one.

    If ``root`` already holds a complete PKI and ``overwrite`` is false, its CAs, server
    certificate and signing key are kept as they are (even if ``server_dns``/``server_ips``
    differ) and only the agents in ``agent_ids`` that lack a certificate or key are issued.
    ``overwrite=True`` replaces the CAs, the server certificate, the signing key and the
    requested agents; other agents' files are left alone and no longer chain to the new CA.
    A partial PKI without ``overwrite`` raises :class:`PKIExistsError`.
    """
    now = _now(now)
    for agent_id in agent_ids:
        validate_agent_id(agent_id)
    _check_server_names(server_dns, server_ips)
    paths = PKIPaths.at(root)
    present = [p for p in paths.core_files() if p.exists()]
    if present and not overwrite and len(present) < len(paths.core_files()):
        missing = ", ".join(p.name for p in paths.core_files() if p not in present)
        raise PKIExistsError(
            f"{paths.root} holds a partial PKI (missing: {missing}); "
            "refusing to overwrite it without --force/overwrite=True"
        )
    _make_dir(paths.root)
    if overwrite or not present:
        for cert_path, key_path, name in (
            (paths.server_ca_cert, paths.server_ca_key, SERVER_CA_NAME),
            (paths.agent_ca_cert, paths.agent_ca_key, AGENT_CA_NAME),
        ):
            key = _new_key()
            _write_private_key(key_path, key)
            _write_public(
                cert_path, _make_ca(name, key, now).public_bytes(serialization.Encoding.PEM)
            )
        _write_signing_key(paths)
        issue_server_cert(paths, dns=server_dns, ips=server_ips, now=now)
    for agent_id in agent_ids:
        if overwrite or not (
            paths.agent_cert(agent_id).exists() and paths.agent_key(agent_id).exists()
        ):
            issue_agent_cert(paths, agent_id, now=now)
    return paths


def load_pki(root: Path) -> PKIPaths:
    """The paths of the complete PKI in ``root``; PKIIncompleteError if a file is missing.

    Agents' files are not checked: an agent certificate is issued on demand.
    """
    paths = PKIPaths.at(root)
    if not paths.root.is_dir():
        raise PKIIncompleteError(
            f"{paths.root} is not a directory; create a PKI with `byoc-certs init {paths.root}`"
        )
    missing = [p.name for p in paths.core_files() if not p.is_file()]
    if missing:
        raise PKIIncompleteError(
            f"{paths.root} is not a complete PKI (missing: {', '.join(missing)}); "
            f"create it with `byoc-certs init {paths.root}`"
        )
    return paths


def issue_agent_cert(
    paths: PKIPaths,
    agent_id: str,
    *,
    valid_for: timedelta = timedelta(days=365),
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue (or replace) the client certificate and key of ``agent_id``; returns (cert, key)."""
    key = _new_key()
    cert = agent_certificate(paths, agent_id, key.public_key(), valid_for=valid_for, now=_now(now))
    _make_dir(paths.agents_dir)
    cert_path, key_path = paths.agent_cert(agent_id), paths.agent_key(agent_id)
    _write_private_key(key_path, key)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def agent_certificate(
    paths: PKIPaths,
    agent_id: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    valid_for: timedelta,
    now: datetime,
    backdate: timedelta = CLOCK_SKEW,
) -> x509.Certificate:
    """An agent's client certificate on ``public_key``, signed by the agent CA: CN = agent id,
    SAN URI ``urn:byoc:agent:<id>``, clientAuth."""
    validate_agent_id(agent_id)
    ca_cert, ca_key = _load_ca(paths.agent_ca_cert, paths.agent_ca_key)
    return _make_leaf(
        _name(agent_id),
        public_key,
        sans=[x509.UniformResourceIdentifier(AGENT_URI_PREFIX + agent_id)],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        ca_cert=ca_cert,
        ca_key=ca_key,
        valid_for=valid_for,
        now=now,
        backdate=backdate,
    )


def issue_server_cert(
    paths: PKIPaths,
    *,
    dns: Sequence[str],
    ips: Sequence[str],
    valid_for: timedelta = timedelta(days=397),
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue (or replace) the control plane's server certificate and key; returns (cert, key).

    The subject CN is ``dns[0]``; the SAN lists every DNS name and IP address.
    """
    now = _now(now)
    sans = _check_server_names(dns, ips)
    ca_cert, ca_key = _load_ca(paths.server_ca_cert, paths.server_ca_key)
    key = _new_key()
    cert = _make_leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]),
        key.public_key(),
        sans=sans,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        ca_cert=ca_cert,
        ca_key=ca_key,
        valid_for=valid_for,
        now=now,
    )
    _write_private_key(paths.server_key, key)
    _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths.server_cert, paths.server_key


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate; PKIError if it cannot be read or parsed."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM certificate: {exc}") from exc


# -- helpers ------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise PKIError("`now` must be timezone-aware")
    return now


def _check_server_names(dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    """Validate the server's names up front and return them as SAN entries."""
    if not dns or not all(dns):
        raise PKIError("the server certificate needs at least one non-empty DNS name")
    if len(dns[0]) > 64:
        raise PKIError(f"DNS name {dns[0]!r} is too long for the subject CN (64 characters)")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PKIError(f"not an IP address: {ip!r}") from exc
    return sans


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _make_ca(common_name: str, key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    """A self-signed CA that may issue leaf certificates only (path length 0)."""
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _make_leaf(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    valid_for: timedelta,
    now: datetime,
    backdate: timedelta = CLOCK_SKEW,
) -> x509.Certificate:
    """An end-entity certificate for ``eku``, never valid beyond its CA; valid from
    ``backdate`` before ``now`` so that a peer whose clock is behind accepts it."""
    if valid_for <= timedelta(0):
        raise PKIError(f"validity must be positive, got {valid_for}")
    not_after = min(now + valid_for, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise PKIError(f"cannot read {key_path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise PKIError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def _write_signing_key(paths: PKIPaths) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private_key(paths.signing_key, key)
    _write_public(
        paths.signing_pub,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def _make_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if it does not exist (existing ones are left alone)."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise PKIError(f"{path} exists and is not a directory") from None
        return
    except OSError as exc:
        raise PKIError(f"cannot create {path}: {exc.strerror}") from exc
    path.chmod(0o700)  # the umask may have removed bits from 0700


def _write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM, readable by the owner only (0600)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key, world-readable (0644)."""
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` by ``data``; the file has ``mode`` from creation on, whatever the umask."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # a restrictive umask may have removed bits we need
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise PKIError(f"cannot write {path}: {exc.strerror}") from exc
