"""Reading an audit log file line by line, and following it as it grows (``byoc-agent audit
show -f``). What the lines mean is :mod:`agent.core.audit_view`'s business; this module only
owns the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from agent.core.errors import AuditError

FOLLOW_POLL: Final = 0.25
"""Seconds between looks at a followed log that has not grown (``tail -f`` polls too)."""


class LineReader:
    """An open log. :meth:`lines` gives the whole lines written so far and stops at the end,
    keeping a line still being written (no newline yet) for the next call: call it again
    later to follow the log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle = path.open("rb")
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from exc
        self.pending = b""
        """The start of a line without its newline, at the end of what was read."""

    def lines(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = self._handle.readline()
            except OSError as exc:
                raise AuditError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
            if not chunk:
                return
            self.pending += chunk
            if self.pending.endswith(b"\n"):
                line, self.pending = self.pending, b""
                yield line

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
