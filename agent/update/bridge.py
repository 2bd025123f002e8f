"""How the agent reaches the updater: :func:`build_updater` makes one for the daemon
(agent/daemon.py), which wires it in:

1. the runner dispatches ``update_agent`` to :meth:`Updater.run` like a driver method (it raises
   DriverError subclasses for a failure; without an updater the command fails
   ``not_supported``);
2. when it raises :class:`~agent.core.errors.Handover`, the runner leaves the command
   ``running``: no final state, no ``interrupted``; the agent is draining to restart;
3. at start, the lifecycle takes an ``update_agent`` command found ``running`` up again (acted
   or not): the runner calls :meth:`Updater.run` with the same command and ``jti``, and it
   continues from its journal;
4. the updater gets ``restart(exit_code, reason)`` (drain, then exit with that status), the
   release keys in force, and the tunnel's link as its session; :meth:`Updater.supervise`
   runs as a background task from the start.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog

from agent.config import AgentConfig
from agent.core.verifier import TrustedKeys
from agent.daemon import load_trusted_keys
from agent.update.updater import Updater


def build_updater(
    config: AgentConfig,
    *,
    keyset_release_keys: Callable[[], TrustedKeys | None],
    restart: Callable[[int, str], None],
    clock: Callable[[], float],
    log: structlog.typing.FilteringBoundLogger,
) -> Updater | None:
    """The updater of an agent configured with ``[update]`` (None without it: a pod's image is
    rolled out instead). ``keyset_release_keys()``: the release keys the key set in force
    names, if it names any; they replace the configured ones while it is in force."""
    if config.update is None:
        return None
    configured = load_trusted_keys(config.update.release_keys, "update.release_keys")

    def release_keys() -> TrustedKeys:
        return keyset_release_keys() or configured

    return Updater(
        config.update,
        config_path=config.source,
        state_dir=config.state_dir,
        release_keys=release_keys,
        restart=restart,
        under_systemd="INVOCATION_ID" in os.environ,
        log=log,
        clock=clock,
    )
