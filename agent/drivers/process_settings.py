"""Settings of the ``process`` driver: the ``[driver.process]`` table and its argv templates.

Pure configuration parsing: :class:`ProcessDriverSettings` validates the table (see
:mod:`agent.drivers.process` for its keys) and :func:`render_argv` fills an argv template.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

from agent.core.errors import ConfigError

PLACEHOLDERS = frozenset({"python", "port", "host", "version", "replica", "state_dir"})
_PREFIX = "driver.process"


@dataclass(frozen=True, kw_only=True)
class ProcessDriverSettings:
    """The validated ``[driver.process]`` table."""

    versions: Mapping[str, tuple[str, ...]]
    """version -> argv template."""
    initial_version: str
    host: str = "127.0.0.1"
    port_range: tuple[int, int] = (20000, 20999)
    health_path: str = "/healthz"
    metrics_path: str = "/metrics"
    start_timeout: float = 15.0
    health_poll_interval: float = 0.1
    stop_timeout: float = 10.0
    supervise_interval: float = 2.0
    stop_on_close: bool = False

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> ProcessDriverSettings:
        """Validate ``raw``; raise :class:`ConfigError` naming the first bad key."""
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigError(f"{_PREFIX}.{key}: unknown setting (known: {', '.join(known)})")
        for key in ("versions", "initial_version"):
            if key not in raw:
                raise ConfigError(f"{_PREFIX}.{key}: required")
        versions = _versions(raw["versions"])
        initial_version = _string(raw, "initial_version", "")
        if initial_version not in versions:
            raise ConfigError(
                f"{_PREFIX}.initial_version: {initial_version!r} is not one of the versions "
                f"({', '.join(versions)})"
            )
        return cls(
            versions=MappingProxyType(versions),
            initial_version=initial_version,
            host=_string(raw, "host", cls.host),
            port_range=_port_range(raw.get("port_range", cls.port_range)),
            health_path=_url_path(raw, "health_path", cls.health_path),
            metrics_path=_url_path(raw, "metrics_path", cls.metrics_path),
            start_timeout=_seconds(raw, "start_timeout", cls.start_timeout),
            health_poll_interval=_seconds(raw, "health_poll_interval", cls.health_poll_interval),
            stop_timeout=_seconds(raw, "stop_timeout", cls.stop_timeout),
            supervise_interval=_seconds(raw, "supervise_interval", cls.supervise_interval),
            stop_on_close=_boolean(raw, "stop_on_close", cls.stop_on_close),
        )


def _string(raw: Mapping[str, object], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_PREFIX}.{key}: expected a non-empty string, got {value!r}")
    return value


def _url_path(raw: Mapping[str, object], key: str, default: str) -> str:
    value = _string(raw, key, default)
    if not value.startswith("/"):
        raise ConfigError(f"{_PREFIX}.{key}: expected a path starting with '/', got {value!r}")
    return value


def _seconds(raw: Mapping[str, object], key: str, default: float) -> float:
    value = raw.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{_PREFIX}.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _boolean(raw: Mapping[str, object], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_PREFIX}.{key}: expected true or false, got {value!r}")
    return value


def _port_range(value: object) -> tuple[int, int]:
    where = f"{_PREFIX}.port_range"
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"{where}: expected [first, last], got {value!r}")
    first, last = value
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in (first, last)):
        raise ConfigError(f"{where}: expected two integers, got {value!r}")
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"{where}: expected 1 <= first <= last <= 65535, got {value!r}")
    return first, last


def _versions(value: object) -> dict[str, tuple[str, ...]]:
    where = f"{_PREFIX}.versions"
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: expected a non-empty table of versions, got {value!r}")
    versions: dict[str, tuple[str, ...]] = {}
    for version, spec in value.items():
        here = f"{where}.{json.dumps(version)}"
        if not isinstance(version, str) or not version:
            raise ConfigError(f"{here}: a version must be a non-empty string")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{here}: expected a table with argv, got {spec!r}")
        for key in spec:
            if key != "argv":
                raise ConfigError(f"{here}.{key}: unknown setting (known: argv)")
        argv = spec.get("argv")
        if (
            not isinstance(argv, list | tuple)
            or not argv
            or not all(isinstance(item, str) for item in argv)
        ):
            raise ConfigError(f"{here}.argv: expected a non-empty list of strings, got {argv!r}")
        for item in argv:
            _check_template(item, f"{here}.argv")
        versions[version] = tuple(argv)
    return versions


def _check_template(item: str, where: str) -> None:
    try:
        parsed = list(string.Formatter().parse(item))
    except ValueError as exc:
        raise ConfigError(f"{where}: {item!r}: {exc} (write {{{{ and }}}} for braces)") from exc
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            raise ConfigError(
                f"{where}: {item!r}: unknown placeholder {{{field}}} "
                f"(known: {', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))})"
            )


def render_argv(
    template: Sequence[str],
    *,
    python: str,
    host: str,
    port: int,
    version: str,
    replica: int,
    state_dir: Path,
) -> list[str]:
    """Fill the placeholders of a validated argv template."""
    values = {
        "python": python,
        "host": host,
        "port": str(port),
        "version": version,
        "replica": str(replica),
        "state_dir": str(state_dir),
    }
    return [item.format_map(values) for item in template]
