"""``byoc-agent enroll``: get the agent's first client certificate with a one-time token.

The key is made here and never leaves the host: only a CSR travels, over HTTPS (httpx) to the
control plane's enrollment endpoint, verified against the CA bundle the operator installed
(no trust on first use). The control plane decides the identity from the token; the agent checks
that what comes back is a certificate for *its* new key, then writes key (0600), certificate
and the CA bundle to the paths of its configuration, each atomically.

A token works once, so everything that can be checked here is checked before it is sent
(:func:`check_preconditions`): the URL, the CA bundle to verify the endpoint with, and that
this user can write the directories of the key, the certificate and the CA bundle. A failure
is one line that says what to fix, and the token stays unspent.

An identity already on the host is never replaced by accident (:func:`check_existing`): a key
or certificate at the configured paths stops enrollment before the token is sent, unless the
caller forces it; then :attr:`Enrolled.replaced` names the identity that was replaced, so that
replacing ``agent-1`` by ``agent-2`` is said aloud.
"""

from __future__ import annotations

import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509

from agent.config import AGENT_ID_PATTERN
from agent.core.errors import AgentError, ConfigError
from agent.io.files import write_atomic
from agent.io.renewal import new_key_and_csr, private_key_pem
from agent.io.tls import common_name, verify_context

ENROLL_TIMEOUT = 30.0


class EnrollmentFailed(AgentError):
    """Enrollment did not produce a usable certificate (the message says why). ``status`` is
    the HTTP status of the control plane's refusal (e.g. 403: the token is spent or expired),
    None when it did not answer or its answer was unusable. ``spent``: the control plane did
    issue a certificate (so the token is used up) but it cannot be used or kept here: trying
    again with the same token is pointless."""

    def __init__(self, message: str, *, status: int | None = None, spent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.spent = spent


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    not_after: float
    replaced: str | None = None
    """The agent id of the certificate this enrollment replaced (``--force``), if any."""


@dataclass(frozen=True)
class Existing:
    """An identity found at the configured paths before enrolling."""

    agent_id: str | None
    """The certificate's common name; None when only a key is there (or no readable cert)."""
    not_after: float | None = None


def check_existing(*, client_key: Path, client_cert: Path, force: bool) -> Existing | None:
    """What is at the key and certificate paths already. Without ``force``, anything there
    stops enrollment (before the token is spent) with a line that says what would be lost."""
    if not client_cert.exists() and not client_key.exists():
        return None
    found = Existing(agent_id=None)
    if client_cert.exists():
        try:
            cert = x509.load_pem_x509_certificate(client_cert.read_bytes())
        except (OSError, ValueError):
            found = Existing(agent_id=None)
        else:
            found = Existing(common_name(cert.subject), cert.not_valid_after_utc.timestamp())
    if force:
        return found
    if found.agent_id is not None:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.not_after or 0))
        raise EnrollmentFailed(
            f"this host is enrolled already: {client_cert} is the certificate of "
            f"{found.agent_id} (valid until {until}), with its key {client_key}; enrolling "
            f"again replaces both, and {found.agent_id}'s identity is gone from this host. "
            "To do that, run enroll again with --force (the token was not used)"
        )
    there = client_key if client_key.exists() else client_cert
    raise EnrollmentFailed(
        f"{there} exists already (without a usable certificate at {client_cert}: an "
        "enrollment that did not finish?); run enroll again with --force to replace it "
        "(the token was not used)"
    )


def check_preconditions(
    *, url: str, trust: Path, outputs: Sequence[tuple[str, Path]]
) -> ssl.SSLContext:
    """Everything enrollment needs locally, checked before the token is spent; returns the
    TLS context that verifies the enrollment endpoint. ``outputs``: (what, path) to write."""
    if not url.startswith("https://"):
        raise EnrollmentFailed(f"the enrollment URL must be https://, not {url!r}")
    try:
        context = verify_context(trust)
    except ConfigError as exc:
        raise EnrollmentFailed(
            f"{exc}; it verifies the enrollment endpoint: install the vendor's CA bundle there "
            "or name it with --ca-bundle (the token was not used)"
        ) from exc
    for what, path in outputs:
        _check_writable(what, path)
    return context


def _check_writable(what: str, path: Path) -> None:
    """Create ``path``'s directory if needed and prove this user can create files in it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise EnrollmentFailed(
            f"cannot write the {what} {path}: {exc.strerror or exc}; run enroll as the agent's "
            "user (sudo -u byoc-agent) with key, certificate and CA bundle in a directory it "
            "owns and the unit may write, such as /var/lib/byoc-agent/tls (the token was not used)"
        ) from exc


def enroll(
    *,
    control_plane: str,
    token: str,
    trust: Path,
    client_key: Path,
    client_cert: Path,
    ca_bundle: Path,
    expected_id: str | None = None,
    force: bool = False,
) -> Enrolled:
    """Enroll with ``token``. A key or certificate already at the configured paths is
    replaced only with ``force`` (:func:`check_existing`)."""
    url = control_plane.rstrip("/") + "/v1/enroll"
    existing = check_existing(client_key=client_key, client_cert=client_cert, force=force)
    context = check_preconditions(
        url=url,
        trust=trust,
        outputs=(("key", client_key), ("certificate", client_cert), ("CA bundle", ca_bundle)),
    )
    key, csr = new_key_and_csr("enrolling-agent")
    try:
        with httpx.Client(
            verify=context,
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
        raise EnrollmentFailed("the answer has no certificate and CA bundle", spent=True)
    try:
        cert = x509.load_pem_x509_certificate(certificate.encode())
        x509.load_pem_x509_certificates(bundle.encode())
    except ValueError as exc:
        raise EnrollmentFailed(
            "the answer's certificate or CA bundle is not PEM", spent=True
        ) from exc
    if cert.public_key() != key.public_key():
        raise EnrollmentFailed("the certificate is not for the key made here", spent=True)
    agent_id = common_name(cert.subject)
    if agent_id is None or not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise EnrollmentFailed("the certificate does not name a valid agent id", spent=True)
    if expected_id is not None and agent_id != expected_id:
        raise EnrollmentFailed(
            f"the token is for {agent_id!r}, the configuration says {expected_id!r}", spent=True
        )
    try:
        write_atomic(client_key, private_key_pem(key), 0o600)
        write_atomic(client_cert, certificate.encode(), 0o644)
        write_atomic(ca_bundle, bundle.encode(), 0o644)
    except OSError as exc:
        raise EnrollmentFailed(
            f"enrolled as {agent_id}, but writing {exc.filename or 'the files'} failed: "
            f"{exc.strerror or exc}; ask the vendor for a new token",
            spent=True,
        ) from exc
    replaced = existing.agent_id if existing is not None else None
    return Enrolled(
        agent_id=agent_id, not_after=cert.not_valid_after_utc.timestamp(), replaced=replaced
    )
