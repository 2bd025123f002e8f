"""Operational logs: structlog, one JSON object per line on stdout.

These are for operators and are separate from the audit log. They never carry secrets: callers
log a token's SHA-256, never the token, and :class:`RedactSecrets` blanks any value whose key
looks sensitive as a second line of defence. Records from libraries that use the standard
``logging`` module (websockets, aiohttp) go through the same JSON renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

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


def _processors() -> list[structlog.typing.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        RedactSecrets(),
        structlog.processors.format_exc_info,
    ]


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_processors(), structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_processors()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (each failed reconnect attempt, each handshake) stays out unless debugging.
    root.setLevel(logging.DEBUG if level == "debug" else max(numeric, logging.WARNING))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger.bind(logger=name)
