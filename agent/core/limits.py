"""Rate limits and error budgets. Sans-I/O: the caller passes ``now`` (monotonic seconds).

- :class:`TokenBucket` bounds how fast commands may be delivered (``commands.rate`` per second,
  with bursts up to ``commands.burst``); a delivery over the rate is refused as ``rate_limited``
  (transient: deliver again later).
- :class:`ErrorBudget` bounds how many refused frames and refused deliveries one connection may
  cause in a window; a peer over budget is disconnected (close code 4005), which also bounds how
  fast it can make the agent write audit records. A second, larger one bounds the refusals that
  are no fault of the peer's (redeliveries, ``rate_limited``, key set re-offers), which are
  audited too (agent/core/session.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    """Tokens added per second."""
    burst: float
    """The most tokens the bucket holds (and the initial amount)."""
    _tokens: float = field(init=False)
    _updated: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("token bucket: need rate > 0 and burst >= 1")
        self._tokens = self.burst

    def take(self, now: float) -> bool:
        """Take one token if there is one. False means: over the rate, refuse."""
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass
class ErrorBudget:
    limit: int
    """Errors allowed within ``window`` seconds; one more exhausts the budget."""
    window: float
    _times: deque[float] = field(init=False, default_factory=deque)

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= 0:
            raise ValueError("error budget: need limit >= 1 and window > 0")

    def spend(self, now: float) -> bool:
        """Record one error. True when this one exhausts the budget."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        self._times.append(now)
        return len(self._times) > self.limit

    @property
    def spent(self) -> int:
        return len(self._times)
