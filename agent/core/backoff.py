"""Reconnection delays: capped exponential backoff with full jitter. Sans-I/O.

``delay = uniform(0, min(cap, base * 2**attempt))`` (the "full jitter" of the AWS architecture
blog), so that a fleet of agents that lost the control plane at the same moment comes back spread
over the whole window instead of in waves. A certificate rejection uses a separate, slow delay:
retrying it quickly cannot help and would hammer the control plane.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class BackoffSettings:
    base: float = 1.0
    cap: float = 60.0
    tls_rejected: float = 300.0
    """Delay after a certificate rejection (also jittered, between half and all of it)."""

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError("backoff: need 0 < base <= cap")
        if self.tls_rejected <= 0:
            raise ValueError("backoff: tls_rejected must be positive")


@dataclass
class Backoff:
    settings: BackoffSettings
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        # Cap the exponent too, so that a long outage cannot overflow a float.
        return min(self.settings.cap, self.settings.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """The delay before the next attempt after an ordinary failure."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def tls_rejected_delay(self) -> float:
        slow = self.settings.tls_rejected
        return self.rng.uniform(slow / 2, slow)

    def reset(self) -> None:
        """Called once a connection got as far as a ``welcome``."""
        self.attempt = 0
