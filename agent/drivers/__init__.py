"""Drivers carry out commands on the workload the agent manages.

A driver is found by name through the ``byoc_agent.drivers`` entry-point group, so a driver for
systemd hosts or Kubernetes is a package that registers a factory there; the core never changes.
See :mod:`agent.drivers.base` for the interface.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from agent.core.errors import ConfigError
from agent.drivers.base import Driver, DriverEnvironment, DriverFactory

ENTRY_POINT_GROUP = "byoc_agent.drivers"


def load_driver_factory(kind: str) -> DriverFactory:
    """Return the factory registered for ``kind``, or raise :class:`ConfigError`."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=kind)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(f"driver.kind: unknown driver {kind!r} (installed: {', '.join(known)})")
    (ep,) = tuple(found)[:1]
    factory: DriverFactory = ep.load()
    return factory


__all__ = ["Driver", "DriverEnvironment", "DriverFactory", "load_driver_factory"]
