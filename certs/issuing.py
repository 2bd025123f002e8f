"""The agent CA at work: certificates from CSRs (enrollment and renewal).

Sans-I/O apart from reading the CA's files: callers pass the time. The certificate's subject is
the agent id the *issuer* decided (from the enrollment token or the tunnel identity), never what
the CSR asks for; the CSR only proves possession of the key it carries.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.errors import PKIError
from certs.pki import CLOCK_SKEW, PKIPaths, agent_certificate

MAX_CSR_BYTES = 8192
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CSRRejected(PKIError):
    """A CSR that cannot be signed (the message says why; safe to show the requester)."""


def parse_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected("not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise CSRRejected("the CSR's signature does not verify (no proof of the key)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ACCEPTED_CURVES):
        raise CSRRejected("the CSR's key must be ECDSA P-256 or P-384")
    return csr


def issue_from_csr(
    paths: PKIPaths,
    agent_id: str,
    csr: x509.CertificateSigningRequest,
    *,
    valid_for: timedelta,
    now: datetime,
) -> x509.Certificate:
    """A client certificate for ``agent_id`` on the CSR's key, signed by the agent CA."""
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # noqa: S101  # parse_csr checked
    # Tolerate clocks a little behind, without stretching a short certificate much.
    backdate = min(CLOCK_SKEW, valid_for / 10)
    return agent_certificate(
        paths, agent_id, public_key, valid_for=valid_for, now=now, backdate=backdate
    )


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
