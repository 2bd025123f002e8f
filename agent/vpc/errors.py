"""The exception tree of :mod:`agent.vpc` (drawn in the package docstring)."""

from __future__ import annotations

from agent.core.errors import AgentError


class VpcError(AgentError):
    """``byoc-agent vpc check`` could not look at the VPC. Failed rules are findings, not this."""


class AwsUnavailable(VpcError, ImportError):
    """boto3 (the ``aws`` extra) is not installed."""


class AwsAccessError(VpcError):
    """No credentials, access denied, throttled beyond retries, or an endpoint unreachable."""


class VpcNotFound(VpcError, LookupError):
    """A resource named on the command line does not exist in that region."""


class TemplateError(VpcError, ValueError):
    """Template options that cannot produce a VPC meeting the requirements."""
