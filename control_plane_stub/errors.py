"""The stub control plane's exception tree (drawn in :mod:`control_plane_stub`)."""

from __future__ import annotations


class StubError(Exception):
    """Root of the stub's exception tree."""


class StubConfigError(StubError, ValueError):
    """Bad flags, or key/certificate files that cannot be used."""


class CannotListen(StubError, OSError):
    """A listener could not be opened (its address is in use, say); the message names it."""


class UnknownAgent(StubError, LookupError):
    pass


class UnknownCommand(StubError, LookupError):
    pass


class UnknownForward(StubError, LookupError):
    pass


class BadRequest(StubError, ValueError):
    pass


class IdempotencyKeyReused(BadRequest):
    """An Idempotency-Key sent again with another request than the one it first came with."""


class IdempotencyKeyTaken(StubError):
    """A command is stored under this Idempotency-Key already (the store's answer; the API
    replays that command, or refuses a different request with IdempotencyKeyReused)."""

    def __init__(self, ref: str, fingerprint: str) -> None:
        super().__init__(f"a command is stored under this key already: {ref}")
        self.ref = ref
        self.fingerprint = fingerprint


class ApiError(StubError):
    """The operator API answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
