"""How today's agent reaches the updater, until the runner (agent/io/runner.py) wires it.

What the agent must do for ``update_agent`` (the interface, whoever implements it):

1. dispatch the command to :meth:`Updater.run` like a driver method (it raises DriverError
   subclasses for a failure);
2. when it raises :class:`~agent.update.errors.Handover`, leave the command ``running``: no
   final state, no ``interrupted``; the agent is draining to restart (``restart`` below);
3. at start, take an ``update_agent`` command found ``running`` up again by calling
   :meth:`Updater.run` with the same command and ``jti`` (it continues from its journal),
   instead of reporting it ``interrupted``;
4. give the updater ``restart(exit_code, reason)`` (drain, then exit with that status), the
   release keys in force, and the tunnel's session, and run :meth:`Updater.supervise` as a
   background task from the start.

Here: :func:`install` builds the updater for an :class:`~agent.daemon.Agent` (agent/cli.py),
:func:`run` and :func:`resumes` are what agent/executor.py calls (marked ``update bridge``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.config import AgentConfig
from agent.core.commands import UpdateAgent
from agent.core.errors import ConfigError, DriverError
from agent.core.verifier import TrustedKeys
from agent.drivers.base import ExecContext
from agent.update.updater import Updater

if TYPE_CHECKING:  # agent.daemon imports agent.executor, which imports this module
    from agent.daemon import Agent

NOT_CONFIGURED: Final = (
    "this agent does not update itself here (no [update] in its configuration); on Kubernetes "
    "its image is updated by a rollout of its Deployment (README 'Updating the agent')"
)

_updater: Updater | None = None


def install(config: AgentConfig, agent: Agent) -> Updater | None:
    """Build the updater for ``agent`` (None without ``[update]``) and make it the one
    :func:`run` uses."""
    global _updater  # noqa: PLW0603  # one agent per process; the runner replaces this
    if config.update is None:
        _updater = None
        return None
    configured = load_release_keys(config.update.release_keys)

    def release_keys() -> TrustedKeys:
        ring = agent._keyring  # the key set in force (the Trust class, later)
        current = ring.current if ring is not None else None
        if current is not None and current.release_keys.by_kid:
            return current.trusted_release_keys()
        return configured

    def restart(exit_code: int, reason: str) -> None:
        agent.exit_code = exit_code
        agent.request_stop(reason)

    _updater = Updater(
        config.update,
        config_path=config.source,
        state_dir=config.state_dir,
        release_keys=release_keys,
        restart=restart,
        under_systemd="INVOCATION_ID" in os.environ,
        log=agent.log.bind(component="update"),
    )
    return _updater


def load_release_keys(paths: tuple[Path, ...]) -> TrustedKeys:
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"update.release_keys: cannot load {path}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"update.release_keys: {path} is not an Ed25519 public key")
        keys.append(key)
    return TrustedKeys.of(keys)


async def run(command: UpdateAgent, ctx: ExecContext) -> dict[str, object]:
    if _updater is None:
        raise DriverError("not_supported", NOT_CONFIGURED)
    return await _updater.run(command, ctx)


def resumes(command_type: str) -> bool:
    """Is a command of this type found ``running`` at start taken up again (not interrupted)?"""
    return command_type == UpdateAgent.type and _updater is not None
