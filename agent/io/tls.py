"""TLS for the tunnel, built in one place for both ends.

- TLS 1.2 minimum, TLS 1.3 preferred (OpenSSL negotiates the highest both sides support);
- TLS 1.2 cipher suites restricted to ECDHE with AES-GCM or ChaCha20-Poly1305 (AEAD, forward
  secret); TLS 1.3 suites are all AEAD;
- no TLS compression, no renegotiation;
- the client verifies the server certificate against the configured CA bundle *and* host name,
  and presents its own certificate; the server requires a client certificate from the agent CA;
- a private key file readable by group or others is refused, as ssh refuses one.
"""

from __future__ import annotations

import hashlib
import ssl
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.core.errors import ConfigError, TLSRejected

AEAD_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"


def check_private_key_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"private key {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o});"
            " run: chmod 600 " + str(path)
        )


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(AEAD_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _readable(what: str, path: Path) -> None:
    try:
        path.open("rb").close()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def client_context(*, ca_bundle: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The agent's context: verify the control plane, present the agent certificate. A file
    that cannot be used is named in the error, with why."""
    check_private_key_file(key)
    _readable("CA bundle (control_plane.ca_bundle)", ca_bundle)
    _readable("client certificate (control_plane.client_cert)", cert)
    _readable("private key (control_plane.client_key)", key)
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED + check_hostname
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the CA bundle {ca_bundle} holds no usable certificate: {exc}") from exc
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"the client certificate {cert} and key {key} cannot be used together (not PEM, or "
            f"not a pair): {exc}"
        ) from exc
    return context


def server_context(*, cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The control plane's context: present the server certificate, require an agent one."""
    check_private_key_file(key)
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        context.load_verify_locations(cafile=str(client_ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material ({cert}, {client_ca}): {exc}") from exc
    return context


def verify_context(ca_bundle: Path) -> ssl.SSLContext:
    """A client context that verifies a server against ``ca_bundle`` (no client certificate)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA bundle {ca_bundle}: {exc}") from exc
    return context


def enrollment_server_context(*, cert: Path, key: Path) -> ssl.SSLContext:
    """The enrollment listener's context: server-authenticated only (the agent enrolling has
    no certificate yet; its bootstrap token authenticates it)."""
    check_private_key_file(key)
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material ({cert}): {exc}") from exc
    return context


@dataclass(frozen=True)
class PeerCertificate:
    sha256: str
    """Lowercase hex SHA-256 of the DER certificate: the fingerprint in audit records."""
    subject_cn: str | None
    """The subject's common name; None if it has none or more than one."""
    issuer_cn: str | None
    not_after: datetime
    serial: int

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        cert = x509.load_der_x509_certificate(der)
        return cls(
            sha256=hashlib.sha256(der).hexdigest(),
            subject_cn=_common_name(cert.subject),
            issuer_cn=_common_name(cert.issuer),
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
        )

    @classmethod
    def from_ssl_object(cls, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate:
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise TLSRejected("peer presented no certificate", by_peer=False)
        return cls.from_der(der)


def _common_name(name: x509.Name) -> str | None:
    """The name's common name if it has exactly one; None if it has none or several (which of
    two CNs would be the identity is a guess: docs/PROTOCOL.md §2 requires exactly one)."""
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def common_name(subject: x509.Name) -> str | None:
    """The subject's one common name; None if it has none or several."""
    return _common_name(subject)


def certificate_common_name(path: Path) -> str:
    """The subject CN of a PEM certificate file (the agent's own id lives there)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from exc
    name = _common_name(cert.subject)
    if not name:
        count = len(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
        raise ConfigError(
            f"certificate {path} has {count} subject common names; exactly one is required"
        )
    return name


# OpenSSL alert reasons that mean "the peer refused our certificate".
_PEER_REFUSED_MARKERS: Final = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
    "ALERT_DECRYPT_ERROR",
)


def classify_tls_failure(exc: BaseException) -> TLSRejected | None:
    """If ``exc`` (or anything in its cause/context chain) is a certificate refusal, say which."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return TLSRejected(
                f"control plane certificate refused: {current.verify_message}", by_peer=False
            )
        if isinstance(current, ssl.SSLError):
            reason = str(getattr(current, "reason", None) or current)
            if any(marker in reason for marker in _PEER_REFUSED_MARKERS):
                return TLSRejected(
                    f"control plane refused our client certificate ({reason})", by_peer=True
                )
        current = current.__cause__ or current.__context__
    return None
