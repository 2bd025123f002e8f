"""The errors of agent self-update (see the package docstring for the tree)."""

from __future__ import annotations

from agent.core.errors import DriverError, Handover


class UpdateError(DriverError):
    """An update step failed: ``code`` becomes the command's ``failed`` reason, ``detail`` the
    audited explanation, ``result`` what is running now."""


class BundleRejected(UpdateError):
    """The release bundle is not what it must be (checksum, signature, format, contents); it is
    refused before anything in it is unpacked or run."""


__all__ = ["BundleRejected", "Handover", "UpdateError"]
