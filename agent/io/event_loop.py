"""Which event loop runs the agent (and the stub): the standard library's, or uvloop.

uvloop (libuv, in C) is an optional speed-up: on the benchmark machine it cut a stream's
small-message round trip by about a third and raised stream throughput (docs/BENCHMARKS.md).
It is installed with the ``fast`` extra (``pip install 'byoc-agent[fast]'``) and chosen with
``[agent] event_loop = "uvloop"`` (``cp-stub serve --event-loop uvloop``). Nothing else changes:
the code is plain asyncio either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from agent.core.errors import ConfigError

EVENT_LOOPS: Final = ("asyncio", "uvloop")
T = TypeVar("T")


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner``; None for the standard loop."""
    if kind == "asyncio":
        return None
    if kind != "uvloop":
        raise ConfigError(f"event_loop must be one of {EVENT_LOOPS}, not {kind!r}")
    try:
        import uvloop  # noqa: PLC0415  # optional: only when asked for
    except ImportError as exc:
        raise ConfigError(
            "event_loop = 'uvloop' needs the uvloop package: pip install 'byoc-agent[fast]'"
        ) from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], kind: str = "asyncio") -> T:
    """``asyncio.run(main)`` on the chosen event loop."""
    try:
        factory = loop_factory(kind)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
