"""Command types and their typed parameters (docs/PROTOCOL.md §5.3).

A verified token carries ``cmd = {"type": ..., "params": {...}}``. :func:`parse_command` turns it
into one of the frozen dataclasses below or raises :class:`~agent.core.errors.CommandRejected` with
``unknown_command_type`` or ``invalid_params``. Parameters are strict: unknown keys, wrong types
and out-of-range values are refused, never coerced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from agent.core.errors import CommandRejected
from agent.core.targets import Target, TargetError, parse_target

MAX_REPLICAS: Final = 1000
VERSION_PATTERN: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
TARGET_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
DEFAULT_METRICS_TARGETS: Final = ("workload", "host")
MAX_STREAM_DURATION: Final = 86_400
"""The longest ``max_duration`` a grant may ask for (seconds); the policy usually allows less."""
BUNDLE_URL_PATTERN: Final = re.compile(
    r"https?://[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(?::[0-9]{1,5})?"
    r"(?:/[A-Za-z0-9._~+-]+)+"
)
"""An agent release bundle's URL: http(s), a host name or IPv4 address, an optional port and a
path of plain segments. No user information, query, fragment, percent-escapes or ``.``/``..``
segments (checked apart), so that the allow-list's prefix match means what it says."""
SHA256_PATTERN: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Scale:
    """Bring the workload to ``replicas`` healthy replicas."""

    type: ClassVar[str] = "scale"
    mutating: ClassVar[bool] = True
    replicas: int

    def params(self) -> dict[str, object]:
        return {"replicas": self.replicas}


@dataclass(frozen=True)
class Upgrade:
    """Move every replica to ``version``, rolling back if it is unhealthy."""

    type: ClassVar[str] = "upgrade"
    mutating: ClassVar[bool] = True
    version: str

    def params(self) -> dict[str, object]:
        return {"version": self.version}


@dataclass(frozen=True)
class CollectMetrics:
    """Scrape the named targets and return structured samples."""

    type: ClassVar[str] = "collect_metrics"
    mutating: ClassVar[bool] = False
    targets: tuple[str, ...]

    def params(self) -> dict[str, object]:
        return {"targets": list(self.targets)}


@dataclass(frozen=True)
class OpenStream:
    """A stream grant: carry one TCP connection to ``target`` through the agent for at most
    ``max_duration`` seconds (docs/PROTOCOL.md §13)."""

    type: ClassVar[str] = "open_stream"
    mutating: ClassVar[bool] = False
    target: Target
    max_duration: int

    def params(self) -> dict[str, object]:
        return {"target": str(self.target), "max_duration": self.max_duration}


@dataclass(frozen=True)
class UpdateAgent:
    """Update the agent itself to ``version`` from the release bundle at ``url``, whose SHA-256
    is ``sha256`` (README.md, "Updating the agent")."""

    type: ClassVar[str] = "update_agent"
    mutating: ClassVar[bool] = True
    version: str
    url: str
    sha256: str

    def params(self) -> dict[str, object]:
        return {"version": self.version, "url": self.url, "sha256": self.sha256}


Command = Scale | Upgrade | CollectMetrics | OpenStream | UpdateAgent
COMMAND_TYPES: Final = (
    Scale.type,
    Upgrade.type,
    CollectMetrics.type,
    OpenStream.type,
    UpdateAgent.type,
)


def _only_keys(params: Mapping[str, object], allowed: set[str], kind: str) -> None:
    extra = sorted(set(params) - allowed)
    if extra:
        raise CommandRejected("invalid_params", f"{kind}: unknown parameter(s) {extra}")


def _int(value: object, name: str, kind: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandRejected("invalid_params", f"{kind}: {name} must be an integer")
    return value


def _parse_scale(params: Mapping[str, object]) -> Scale:
    _only_keys(params, {"replicas"}, "scale")
    if "replicas" not in params:
        raise CommandRejected("invalid_params", "scale: missing parameter 'replicas'")
    replicas = _int(params["replicas"], "replicas", "scale")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise CommandRejected("invalid_params", f"scale: replicas must be in 0..{MAX_REPLICAS}")
    return Scale(replicas=replicas)


def _version(params: Mapping[str, object], kind: str) -> str:
    version = params.get("version")
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise CommandRejected(
            "invalid_params",
            f"{kind}: version must be a string matching {VERSION_PATTERN.pattern}",
        )
    return version


def _parse_upgrade(params: Mapping[str, object]) -> Upgrade:
    _only_keys(params, {"version"}, "upgrade")
    return Upgrade(version=_version(params, "upgrade"))


def _parse_update_agent(params: Mapping[str, object]) -> UpdateAgent:
    kind = UpdateAgent.type
    _only_keys(params, {"version", "url", "sha256"}, kind)
    version = _version(params, kind)
    url = params.get("url")
    if (
        not isinstance(url, str)
        or len(url) > 2048
        or not BUNDLE_URL_PATTERN.fullmatch(url)
        or any(segment in (".", "..") for segment in url.split("/")[3:])
    ):
        raise CommandRejected(
            "invalid_params",
            f"{kind}: url must be an http(s) URL of at most 2048 characters: a host, an optional "
            "port and a path of plain segments (no credentials, query, fragment, escapes, "
            "'.' or '..')",
        )
    digest = params.get("sha256")
    if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
        raise CommandRejected("invalid_params", f"{kind}: sha256 must be 64 lowercase hex digits")
    return UpdateAgent(version=version, url=url, sha256=digest)


def _parse_collect_metrics(params: Mapping[str, object]) -> CollectMetrics:
    _only_keys(params, {"targets"}, "collect_metrics")
    raw = params.get("targets", list(DEFAULT_METRICS_TARGETS))
    if not isinstance(raw, list) or not 1 <= len(raw) <= 8:
        raise CommandRejected("invalid_params", "collect_metrics: targets must be a list of 1..8")
    targets: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not TARGET_PATTERN.fullmatch(item):
            raise CommandRejected(
                "invalid_params", f"collect_metrics: target must match {TARGET_PATTERN.pattern}"
            )
        if item in targets:
            raise CommandRejected("invalid_params", f"collect_metrics: duplicate target {item!r}")
        targets.append(item)
    return CollectMetrics(targets=tuple(targets))


def _parse_open_stream(params: Mapping[str, object]) -> OpenStream:
    _only_keys(params, {"target", "max_duration"}, "open_stream")
    try:
        target = parse_target(params.get("target"))
    except TargetError as exc:
        raise CommandRejected("invalid_params", f"open_stream: {exc}") from exc
    if "max_duration" not in params:
        raise CommandRejected("invalid_params", "open_stream: missing parameter 'max_duration'")
    duration = _int(params["max_duration"], "max_duration", "open_stream")
    if not 1 <= duration <= MAX_STREAM_DURATION:
        raise CommandRejected(
            "invalid_params", f"open_stream: max_duration must be in 1..{MAX_STREAM_DURATION}"
        )
    return OpenStream(target=target, max_duration=duration)


_PARSERS: Final[dict[str, Callable[[Mapping[str, object]], Command]]] = {
    Scale.type: _parse_scale,
    Upgrade.type: _parse_upgrade,
    CollectMetrics.type: _parse_collect_metrics,
    OpenStream.type: _parse_open_stream,
    UpdateAgent.type: _parse_update_agent,
}


def parse_command(cmd: object) -> Command:
    """Parse the ``cmd`` claim of a verified token into a typed command."""
    if not isinstance(cmd, Mapping):
        raise CommandRejected("invalid_params", "claim 'cmd' must be an object")
    extra = sorted(set(cmd) - {"type", "params"})
    if extra:
        raise CommandRejected("invalid_params", f"cmd: unknown member(s) {extra}")
    kind = cmd.get("type")
    params = cmd.get("params", {})
    if not isinstance(kind, str):
        raise CommandRejected("invalid_params", "cmd.type must be a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise CommandRejected("unknown_command_type", f"unknown command type {kind[:64]!r}")
    if not isinstance(params, Mapping):
        raise CommandRejected("invalid_params", "cmd.params must be an object")
    return parser(params)
