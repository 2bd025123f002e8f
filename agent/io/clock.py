"""The clocks the agent's I/O layer reads, injected everywhere (the core is given times as
arguments): wall-clock time for tokens, certificates and audit records, monotonic time for
timeouts and rates. Tests pass a skewed or stepped clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the Unix epoch (the host's clock)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for durations)."""


@dataclass(frozen=True)
class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class OffsetClock:
    """The system clock shifted by ``offset`` seconds (a host whose clock is wrong)."""

    offset: float

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()
