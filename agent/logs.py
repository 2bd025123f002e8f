"""Operational logs: structlog, one JSON object per line on stdout.

These are for operators and are separate from the audit log. They never carry secrets: callers
log a token's SHA-256, never the token, and :class:`RedactSecrets` blanks any value whose key
looks sensitive as a second line of defence. Records from libraries that use the standard
``logging`` module (websockets, aiohttp) go through the same renderer.

Where the lines go decides their form (:func:`output_format`):

- ``journal``: stdout is the journal stream systemd set up for the unit (``$JOURNAL_STREAM``
  names its device and inode). Each JSON line starts with ``<N>``, its syslog priority, which
  journald takes as the entry's priority (``SyslogLevelPrefix=``, on by default) and strips, so
  ``journalctl -u byoc-agent -p err`` shows errors only;
- ``console``: a terminal, where a person reads them: structlog's console renderer;
- ``json``: anything else (a pipe, a file, a log shipper).

The level is ``[agent] log_level``, unless ``$BYOC_LOG_LEVEL`` is set (:func:`effective_level`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from agent.core.errors import ConfigError

LEVELS: Final = ("debug", "info", "warning", "error")
LEVEL_ENV: Final = "BYOC_LOG_LEVEL"
SYSLOG_PRIORITIES: Final = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}
"""structlog level -> syslog priority (sd-daemon(3): ``<7>`` debug ... ``<2>`` critical)."""

OutputFormat = Literal["journal", "console", "json"]

SENSITIVE_KEYS: Final = frozenset(
    {"token", "password", "secret", "private_key", "authorization", "cookie", "key_pem"}
)
REDACTED: Final = "[redacted]"


def _sensitive(key: object) -> bool:
    lowered = str(key).lower()
    return lowered in SENSITIVE_KEYS or lowered.endswith(("_token", "_secret", "_password"))


def _redact(value: object, depth: int = 0) -> object:
    if depth > 8:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if _sensitive(k) else _redact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(item, depth + 1) for item in value]
    return value


class RedactSecrets:
    """Blank values under sensitive keys (``token``, ``*_token``, ``password``, ...), also in
    nested mappings such as ``headers={"authorization": ...}``."""

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key in list(event_dict):
            event_dict[key] = REDACTED if _sensitive(key) else _redact(event_dict[key])
        return event_dict


def _processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        RedactSecrets(),
        structlog.processors.format_exc_info,
    ]


def effective_level(configured: str, environ: Mapping[str, str] | None = None) -> str:
    """``$BYOC_LOG_LEVEL`` if set (say in a systemd drop-in), else the configured level."""
    env = os.environ if environ is None else environ
    level = env.get(LEVEL_ENV, "").strip().lower() or configured
    if level not in LEVELS:
        raise ConfigError(f"{LEVEL_ENV}={level!r}: the log level must be one of {LEVELS}")
    return level


def output_format(stream: TextIO, environ: Mapping[str, str] | None = None) -> OutputFormat:
    """``journal`` when ``stream`` is the journal stream of ``$JOURNAL_STREAM`` (its
    ``device:inode``), ``console`` on a terminal, else ``json``."""
    env = os.environ if environ is None else environ
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO and friends
        return "json"
    journal = env.get("JOURNAL_STREAM", "")
    if journal:
        try:
            info = os.fstat(fd)
            device, inode = (int(part) for part in journal.split(":"))
        except (OSError, ValueError):
            pass
        else:
            if (info.st_dev, info.st_ino) == (device, inode):
                return "journal"
    return "console" if os.isatty(fd) else "json"


class SyslogPrefix:
    """Render with ``renderer``, then put the syslog priority in front: ``<3>{...}``."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        priority = SYSLOG_PRIORITIES.get(str(event_dict.get("level", method_name)), 6)
        rendered = self._renderer(logger, method_name, event_dict)
        if isinstance(rendered, bytes | bytearray):
            rendered = bytes(rendered).decode()
        return f"<{priority}>{rendered}"


def _renderer(form: OutputFormat) -> Processor:
    if form == "console":
        return structlog.dev.ConsoleRenderer(colors=True)
    if form == "journal":
        return SyslogPrefix(structlog.processors.JSONRenderer())
    return structlog.processors.JSONRenderer()


def configure_logging(
    level: str = "info", stream: TextIO | None = None, *, environ: Mapping[str, str] | None = None
) -> OutputFormat:
    """Send logs at ``level`` and above to ``stream`` (stdout), in the form that suits it;
    returns that form."""
    stream = stream or sys.stdout
    numeric = logging.getLevelNamesMapping()[level.upper()]
    form = output_format(stream, environ)
    structlog.configure(
        processors=[*_processors(), _renderer(form)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _renderer(form),
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_processors()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (each failed reconnect attempt, each handshake) stays out unless debugging.
    root.setLevel(logging.DEBUG if level == "debug" else max(numeric, logging.WARNING))
    return form


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger.bind(logger=name)
