"""Automatic renewal of the agent's client certificate over the tunnel (docs/PROTOCOL.md §14).

When two thirds of the certificate's validity have passed — on the *control plane's* clock,
measured at each ``welcome``, so a skewed host clock neither renews too late nor in a loop —
the agent makes a new key (it never leaves the host), sends a CSR in a ``renew`` frame, and
installs the certificate that comes back: the new key replaces the old one, then the
certificate, each atomically. The session in progress keeps its TLS state; the next connection
presents the new certificate. No restart, no gap: the old certificate is still valid then.

:func:`renewal_due` is the sans-I/O decision; :class:`CertificateRenewer` is the task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.core.frames import CertificateFrame, RenewRequest
from agent.io.files import write_atomic
from agent.io.tls import common_name

RENEW_AT: Final = 2 / 3
"""The fraction of the validity period after which the agent renews."""
ANSWER_WITHIN: Final = 30.0
RETRY_AFTER: Final = 60.0


@dataclass(frozen=True)
class Validity:
    not_before: float
    not_after: float

    @property
    def renew_at(self) -> float:
        return self.not_before + RENEW_AT * (self.not_after - self.not_before)


def renewal_due(validity: Validity, *, local_now: float, clock_offset: float) -> float:
    """Seconds until renewal is due (0 when due), judged on the control plane's clock
    (``local_now + clock_offset``), which is the clock that will check the certificate."""
    return max(0.0, validity.renew_at - (local_now + clock_offset))


def read_validity(path: Path) -> Validity | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return Validity(cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())


def new_key_and_csr(name: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key, made here, and a PEM CSR for it (the issuer decides the identity;
    ``name`` is only what the request asks for)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class RenewalRefused(Exception):
    """The certificate that came back cannot be installed (the message says why)."""


class CertificateRenewer:
    def __init__(
        self,
        *,
        agent_id: str,
        cert_path: Path,
        key_path: Path,
        send: Callable[[RenewRequest], object],
        connected: asyncio.Event,
        clock_offset: Callable[[], float],
        record: Callable[..., object],
        log: structlog.typing.FilteringBoundLogger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._agent_id = agent_id
        self._cert_path = cert_path
        self._key_path = key_path
        self._send = send
        self._connected = connected
        self._clock_offset = clock_offset
        self._record = record
        """Writes an audit record (agent/io/runner.py)."""
        self._log = log
        self._clock = clock
        self._pending_key: ec.EllipticCurvePrivateKey | None = None
        self._answer: asyncio.Future[CertificateFrame] | None = None
        self.renewed = 0

    def offered(self, frame: CertificateFrame) -> None:
        """A ``certificate`` frame arrived (from the tunnel)."""
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(frame)
        else:
            self._log.warning("certificate_unrequested")

    async def run(self) -> None:
        while True:
            # Judge only with a measured offset: the tunnel measures it at each welcome (before
            # the first one, a skewed clock would make the agent renew at once, or far too late).
            await self._connected.wait()
            validity = read_validity(self._cert_path)
            if validity is None:
                await asyncio.sleep(RETRY_AFTER)  # nothing to renew (yet); enroll first
                continue
            offset = self._clock_offset()
            wait = renewal_due(validity, local_now=self._clock(), clock_offset=offset)
            if wait > 0:
                await asyncio.sleep(min(wait, RETRY_AFTER))  # re-judged: the offset may change
                continue
            try:
                await self.renew_once()
            except (RenewalRefused, TimeoutError, ConnectionError) as exc:
                self._record("certificate_renewal_failed", detail=str(exc)[:300])
                self._log.warning("certificate_renewal_failed", error=str(exc))
                await asyncio.sleep(RETRY_AFTER)

    async def renew_once(self) -> None:
        key, csr = new_key_and_csr(self._agent_id)
        self._answer = asyncio.get_running_loop().create_future()
        self._record("certificate_renewal_requested")
        await self._send_request(csr)
        async with asyncio.timeout(ANSWER_WITHIN):
            frame = await self._answer
        self._install(key, frame)

    async def _send_request(self, csr: str) -> None:
        result = self._send(RenewRequest(csr=csr))
        if asyncio.iscoroutine(result):
            await result

    def _install(self, key: ec.EllipticCurvePrivateKey, frame: CertificateFrame) -> None:
        try:
            cert = x509.load_pem_x509_certificate(frame.certificate.encode())
        except ValueError as exc:
            raise RenewalRefused("the control plane sent no certificate") from exc
        if cert.public_key() != key.public_key():
            raise RenewalRefused("the certificate is not for the key we generated")
        name = common_name(cert.subject)
        if name != self._agent_id:
            raise RenewalRefused(f"the certificate names {name!r}, not {self._agent_id!r}")
        write_atomic(self._key_path, private_key_pem(key), 0o600)
        write_atomic(self._cert_path, frame.certificate.encode(), 0o644)
        self.renewed += 1
        not_after = int(cert.not_valid_after_utc.timestamp())
        self._record(
            "certificate_renewed", serial=format(cert.serial_number, "x"), not_after=not_after
        )
        self._log.info("certificate_renewed", not_after=not_after)
