"""``byoc-agent enroll``: get the agent's first client certificate with a one-time token.

The key is made here and never leaves the host: only a CSR travels, over HTTPS (httpx) to the
control plane's enrollment endpoint, verified against the CA bundle the operator installed
(no trust on first use). The control plane decides the identity from the token; the agent checks
that what comes back is a certificate for *its* new key, then writes key (0600), certificate
and the CA bundle to the paths of its configuration, each atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509

from agent.config import AGENT_ID_PATTERN
from agent.core.errors import AgentError
from agent.io.files import write_atomic
from agent.io.renewal import new_key_and_csr, private_key_pem
from agent.io.tls import common_name, verify_context

ENROLL_TIMEOUT = 30.0


class EnrollmentFailed(AgentError):
    """Enrollment did not produce a usable certificate (the message says why). ``status`` is
    the HTTP status of the control plane's refusal (e.g. 403: the token is spent or expired),
    None when it did not answer or its answer was unusable."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    not_after: float


def enroll(
    *,
    control_plane: str,
    token: str,
    trust: Path,
    client_key: Path,
    client_cert: Path,
    ca_bundle: Path,
    expected_id: str | None = None,
) -> Enrolled:
    key, csr = new_key_and_csr("enrolling-agent")
    url = control_plane.rstrip("/") + "/v1/enroll"
    if not url.startswith("https://"):
        raise EnrollmentFailed("the enrollment URL must be https://")
    try:
        with httpx.Client(
            verify=verify_context(trust),
            timeout=ENROLL_TIMEOUT,
            follow_redirects=False,  # never dial where the answer points (docs §2)
            trust_env=True,  # HTTPS_PROXY / NO_PROXY, as for the tunnel
        ) as http:
            response = http.post(url, json={"token": token, "csr": csr})
    except httpx.HTTPError as exc:
        raise EnrollmentFailed(f"cannot reach {url}: {exc}") from exc
    if response.is_redirect or 300 <= response.status_code < 400:
        location = response.headers.get("Location", "")[:200]
        raise EnrollmentFailed(
            f"{url} answered HTTP {response.status_code} with a redirect"
            f"{f' to {location!r}' if location else ''}; redirects are never followed: "
            "use the enrollment URL the vendor gave you"
        )
    try:
        answer = response.json()
    except ValueError as exc:
        raise EnrollmentFailed(f"{url} answered HTTP {response.status_code}, not JSON") from exc
    if response.status_code != 200 or not isinstance(answer, dict):
        message = answer.get("message") if isinstance(answer, dict) else None
        raise EnrollmentFailed(
            f"enrollment refused (HTTP {response.status_code}): {message}",
            status=response.status_code,
        )
    certificate, bundle = answer.get("certificate"), answer.get("ca_bundle")
    if not isinstance(certificate, str) or not isinstance(bundle, str):
        raise EnrollmentFailed("the answer has no certificate and CA bundle")
    try:
        cert = x509.load_pem_x509_certificate(certificate.encode())
        x509.load_pem_x509_certificates(bundle.encode())
    except ValueError as exc:
        raise EnrollmentFailed("the answer's certificate or CA bundle is not PEM") from exc
    if cert.public_key() != key.public_key():
        raise EnrollmentFailed("the certificate is not for the key made here")
    agent_id = common_name(cert.subject)
    if agent_id is None or not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise EnrollmentFailed("the certificate does not name a valid agent id")
    if expected_id is not None and agent_id != expected_id:
        raise EnrollmentFailed(
            f"the token is for {agent_id!r}, the configuration says {expected_id!r}"
        )
    for path in (client_key, client_cert, ca_bundle):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(client_key, private_key_pem(key), 0o600)
    write_atomic(client_cert, certificate.encode(), 0o644)
    write_atomic(ca_bundle, bundle.encode(), 0o644)
    return Enrolled(agent_id=agent_id, not_after=cert.not_valid_after_utc.timestamp())
