"""Every error the development PKI raises on purpose derives from :class:`PKIError`::

    PKIError                    root: bad input, or a file that cannot be read or written
    ├── PKIExistsError          refusing to overwrite an existing (or partial) PKI
    └── PKIIncompleteError      ``load_pki()`` found files missing

Lower-level ``OSError`` and ``ValueError`` are translated at the module boundary with
``raise PKIError(...) from exc``, so callers (and the CLI) need to catch only ``PKIError``.
"""

from __future__ import annotations


class PKIError(Exception):
    """Root of the PKI's exception tree; the message is meant for a human."""


class PKIExistsError(PKIError):
    """The target already holds PKI files and ``overwrite`` was not requested."""


class PKIIncompleteError(PKIError):
    """A PKI directory lacks one or more CA, server or signing-key files."""
