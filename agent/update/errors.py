"""The errors of agent self-update (see the package docstring for the tree)."""

from __future__ import annotations

from agent.core.errors import AgentError, DriverError


class UpdateError(DriverError):
    """An update step failed: ``code`` becomes the command's ``failed`` reason, ``detail`` the
    audited explanation, ``result`` what is running now."""


class BundleRejected(UpdateError):
    """The release bundle is not what it must be (checksum, signature, format, contents); it is
    refused before anything in it is unpacked or run."""


class Handover(AgentError):
    """Not a failure: the agent is about to exit so that another version of it starts, and that
    version reports the command's final state. The runner leaves the command ``running``."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
