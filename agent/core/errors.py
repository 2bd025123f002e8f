"""Every error the agent raises on purpose derives from :class:`AgentError`::

    AgentError
    ├── ConfigError (ValueError)          the agent's configuration file is invalid
    ├── PolicyError (ValueError)          the customer's policy file is invalid
    ├── ProtocolError                     the peer broke docs/PROTOCOL.md (a remote error)
    │   ├── FrameTooLarge                 a frame exceeds the size limit
    │   └── MalformedFrame                not JSON, not an object, or a field is missing or mistyped
    ├── CommandRejected                   a command failed verification, parsing or policy
    ├── AuditError                        the audit log cannot be written or read
    │   └── AuditIntegrityError           ``audit verify`` found a bad record
    ├── StateError                        the SQLite state store failed
    ├── DriverError                       a driver could not carry out a command
    ├── Handover                          not a failure: the command goes on in the next process
    ├── TunnelError (ConnectionError)     the connection to the control plane failed
    │   ├── TLSRejected                   a certificate was refused, by us or by the peer
    │   └── RedirectRefused               the peer answered with an HTTP redirect (never followed)
    └── ControlSocketError                a local approve/deny/status request failed

Errors carry a short machine-readable ``code`` where the protocol reports them to the peer,
and a human ``detail`` that goes to the audit log. Lower-level exceptions are translated at
layer boundaries with ``raise ... from exc``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of the agent's exception tree."""


class ConfigError(AgentError, ValueError):
    """The agent's configuration is invalid; the message names the key."""


class PolicyError(AgentError, ValueError):
    """The customer's policy file is invalid; the message names the key."""


class ProtocolError(AgentError):
    """The peer sent something that docs/PROTOCOL.md does not allow."""

    code = "protocol_error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.ref: str | None = None
        """The ``ref`` of the frame concerned, when it could be read."""
        if code is not None:
            self.code = code


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class MalformedFrame(ProtocolError):
    code = "malformed_frame"


class CommandRejected(AgentError):
    """A command was refused. ``code`` is reported to the control plane; ``detail`` is audited."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class AuditError(AgentError):
    """The audit log could not be written or read."""


class AuditIntegrityError(AuditError):
    """A record of the audit log is not what the chain says it must be.

    ``line`` is the 1-based line number of the first bad record.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


class StateError(AgentError):
    """The state store (SQLite) failed or holds something unexpected."""


class Handover(AgentError):
    """Not a failure: the agent is about to exit so that another version of it starts, and that
    version carries the command on and reports its final state (``update_agent``). The runner
    leaves the command ``running``."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class DriverError(AgentError):
    """A driver could not carry out a command.

    ``code`` is reported as the failure reason; ``result`` (JSON-serialisable) travels with the
    ``failed`` status, e.g. what was rolled back.
    """

    def __init__(self, code: str, detail: str, *, result: dict[str, object] | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.result = result or {}


class TunnelError(AgentError, ConnectionError):
    """The connection to the control plane could not be made or was lost."""


class TLSRejected(TunnelError):
    """A certificate was refused during the TLS handshake.

    ``by_peer`` is true when the control plane refused our client certificate, false when we
    refused the control plane's server certificate.
    """

    def __init__(self, detail: str, *, by_peer: bool) -> None:
        super().__init__(detail)
        self.by_peer = by_peer


class RedirectRefused(TunnelError):
    """A server answered a connection the agent opened with an HTTP redirect (3xx).

    The agent never follows one (docs/PROTOCOL.md §2): whoever answers could otherwise send it
    to any address inside the customer's network. ``location`` is what the server asked for,
    kept for the local log only, never dialed and never reported to the control plane."""

    def __init__(self, status: int, location: str | None) -> None:
        shown = "no Location" if location is None else f"Location {location[:200]!r}"
        super().__init__(f"HTTP {status} redirect ({shown}); redirects are never followed")
        self.status = status
        self.location = location


class ControlSocketError(AgentError):
    """A request on the local control socket (approve, deny, status) failed."""
