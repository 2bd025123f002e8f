"""Failpoints: places in the durable path where a test can have the agent kill itself.

``BYOC_AGENT_FAILPOINT=<name>`` makes :func:`reach` (and :func:`reach_batch`) send SIGKILL to
this process there, the first time: a crash at an exact moment of a command's life, for the
crash-window tests (tests/test_crash_windows.py). Unset, every point costs one comparison.
The names, in the order a command passes them:

- ``accepted_written``: the audit lines of the batch that accepted a command are in the file,
  the transaction not committed;
- ``accepted_committed``: committed (in the operating system's hands), not synced yet;
- ``before_execute``: durable, the driver not called yet;
- ``driver_returned``: the driver did its work, the outcome not recorded yet;
- ``finish_written``: the outcome's audit lines are in the file, not committed;
- ``finish_committed``: the outcome is durable, its status not sent yet.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Final

POINTS: Final = (
    "accepted_written",
    "accepted_committed",
    "before_execute",
    "driver_returned",
    "finish_written",
    "finish_committed",
)


def _armed() -> str | None:
    name = os.environ.get("BYOC_AGENT_FAILPOINT", "")
    if name and name not in POINTS:
        raise ValueError(f"BYOC_AGENT_FAILPOINT: unknown point {name!r} (known: {POINTS})")
    return name or None


_ARMED: Final = _armed()


def reach(name: str) -> None:
    """Kill this process here if ``name`` is the armed failpoint."""
    if _ARMED is not None and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)


def reach_batch(stage: str, records: Sequence[tuple[str, Mapping[str, object]]]) -> None:
    """A batch is ``written`` or ``committed``: the point is the command stage it holds."""
    if _ARMED is None:
        return
    events = {event for event, _fields in records}
    if "execution_finished" in events:
        reach(f"finish_{stage}")
    elif "execution_started" in events:
        reach(f"accepted_{stage}")
