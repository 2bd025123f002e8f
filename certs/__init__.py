"""Development PKI for the BYOC agent: two CAs, a server certificate, agent client certificates
and the Ed25519 command-signing key, written with safe file permissions.

    pki     PKIPaths, init_pki, load_pki, issue_agent_cert, issue_server_cert
    cli     the ``byoc-certs`` command (init, agent, show)

Exception tree (see :mod:`certs.errors`)::

    PKIError
    ├── PKIExistsError        refusing to overwrite without overwrite=True
    └── PKIIncompleteError    load_pki() found missing files
"""

from certs.errors import PKIError, PKIExistsError, PKIIncompleteError
from certs.pki import (
    PKIPaths,
    init_pki,
    issue_agent_cert,
    issue_server_cert,
    load_certificate,
    load_pki,
    validate_agent_id,
)

__all__ = [
    "PKIError",
    "PKIExistsError",
    "PKIIncompleteError",
    "PKIPaths",
    "init_pki",
    "issue_agent_cert",
    "issue_server_cert",
    "load_certificate",
    "load_pki",
    "validate_agent_id",
]
