"""Reconnection delays (agent.core.backoff): capped exponential backoff with full jitter."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from agent.core.backoff import Backoff, BackoffSettings

SETTINGS = BackoffSettings(base=1.0, cap=60.0, tls_rejected=300.0)


def test_defaults() -> None:
    assert BackoffSettings() == SETTINGS


def test_delays_within_window_and_attempt_increments() -> None:
    backoff = Backoff(SETTINGS, random.Random(1234))
    for attempt in range(20):
        assert backoff.attempt == attempt
        ceiling = min(60.0, 1.0 * 2**attempt)
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
    assert backoff.attempt == 20


def test_ceiling_doubles_then_caps() -> None:
    backoff = Backoff(BackoffSettings(base=0.5, cap=10.0), random.Random(0))
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_cap_reached_and_delays_stay_below_it() -> None:
    backoff = Backoff(SETTINGS, random.Random(7))
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.0 <= d <= 60.0 for d in delays)
    # After the cap is reached, delays use the whole capped window.
    assert max(delays[10:]) > 50.0
    assert backoff.ceiling() == 60.0


def test_seeded_backoff_is_reproducible() -> None:
    first = Backoff(SETTINGS, random.Random(99))
    second = Backoff(SETTINGS, random.Random(99))
    assert [first.next_delay() for _ in range(10)] == [second.next_delay() for _ in range(10)]


def test_reset() -> None:
    backoff = Backoff(SETTINGS, random.Random(3))
    for _ in range(8):
        backoff.next_delay()
    assert backoff.ceiling() == 60.0
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.ceiling() == 1.0
    assert 0.0 <= backoff.next_delay() <= 1.0
    assert backoff.attempt == 1


def test_no_overflow_after_many_attempts() -> None:
    backoff = Backoff(SETTINGS, random.Random(5))
    for _ in range(10_000):
        delay = backoff.next_delay()
        assert math.isfinite(delay)
        assert 0.0 <= delay <= 60.0
    assert backoff.attempt == 10_000
    assert backoff.ceiling() == 60.0


def test_no_overflow_with_huge_attempt_and_cap() -> None:
    backoff = Backoff(BackoffSettings(base=1.0, cap=1e300), random.Random(5), attempt=10**9)
    assert math.isfinite(backoff.ceiling())
    assert backoff.ceiling() == 2.0**62
    assert 0.0 <= backoff.next_delay() <= 2.0**62


def test_tls_rejected_delay_window() -> None:
    backoff = Backoff(SETTINGS, random.Random(11))
    delays = [backoff.tls_rejected_delay() for _ in range(1000)]
    assert all(150.0 <= d <= 300.0 for d in delays)
    assert min(delays) < 160.0
    assert max(delays) > 290.0
    # A certificate rejection does not advance the ordinary backoff.
    assert backoff.attempt == 0


def test_full_jitter_spreads_a_fleet() -> None:
    """1,000 agents that failed five times come back spread over the whole window."""
    seeds = random.Random(2024)
    delays = []
    for _ in range(1000):
        agent = Backoff(SETTINGS, random.Random(seeds.getrandbits(64)), attempt=5)
        assert agent.ceiling() == 32.0
        delays.append(agent.next_delay())
    ceiling = 32.0
    assert all(0.0 <= d <= ceiling for d in delays)
    assert min(delays) < 0.1 * ceiling
    assert max(delays) > 0.9 * ceiling
    # Roughly uniform: each quarter of the window gets a fair share.
    quarters = [0, 0, 0, 0]
    for delay in delays:
        quarters[min(3, int(delay / ceiling * 4))] += 1
    assert all(150 <= count <= 350 for count in quarters), quarters
    assert 0.4 * ceiling < sum(delays) / len(delays) < 0.6 * ceiling


def test_default_rng_is_independent_per_instance() -> None:
    first = Backoff(SETTINGS, attempt=10)
    second = Backoff(SETTINGS, attempt=10)
    assert first.rng is not second.rng


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0.0},
        {"base": -1.0},
        {"base": 10.0, "cap": 5.0},
        {"tls_rejected": 0.0},
        {"tls_rejected": -5.0},
    ],
)
def test_settings_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        BackoffSettings(**kwargs)


def test_base_equal_to_cap_accepted() -> None:
    backoff = Backoff(BackoffSettings(base=5.0, cap=5.0), random.Random(1))
    assert backoff.ceiling() == 5.0
    backoff.next_delay()
    assert backoff.ceiling() == 5.0


class _NoJitter(random.Random):
    """Always the top of the window: what a fleet without jitter would do."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _reconnections(rngs: list[random.Random], *, back_at: float) -> list[float]:
    """When each agent of a fleet reconnects: all lose the control plane at 0, dial at once,
    and wait their delay after every failed attempt (an attempt takes no time here); the first
    attempt at or after ``back_at`` succeeds."""
    settings = BackoffSettings(base=0.2, cap=5.0)
    out = []
    for rng in rngs:
        backoff, moment = Backoff(settings, rng=rng), 0.0
        while moment < back_at:
            moment += backoff.next_delay()
        out.append(moment)
    return out


def test_the_backoff_spreads_a_fleet_over_the_window() -> None:
    """docs/PROTOCOL.md §4.4, the arithmetic behind tests/test_reconnect_storm.py: 200 agents,
    the control plane back after 2 s. With full jitter their reconnections spread over more than
    a second and no 100 ms slice holds more than 20 % of them; without jitter all land in one."""
    clients, back_at, slice_s = 200, 2.0, 0.1
    jittered = _reconnections([random.Random(20_240_611 + n) for n in range(clients)], back_at=2.0)
    busiest = max(Counter(int((t - back_at) // slice_s) for t in jittered).values())
    assert max(jittered) - min(jittered) > 1.0
    assert busiest <= 0.2 * clients
    lockstep = _reconnections([_NoJitter() for _ in range(clients)], back_at=2.0)
    assert max(Counter(int((t - back_at) // slice_s) for t in lockstep).values()) == clients
