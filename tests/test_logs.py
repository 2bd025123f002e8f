"""Tests of operational logging (agent.logs): JSON lines, redaction of secrets, syslog priorities on
the journal stream, a console format on a terminal, the level from the environment."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TextIO

import pytest
import structlog
from structlog.testing import capture_logs

from agent.core.errors import ConfigError
from agent.logs import REDACTED, RedactSecrets, configure_logging, effective_level, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes global state: structlog and the root logger."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    level = root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line(stream: io.StringIO) -> None:
    configure_logging(stream=stream)
    log = get_logger("agent.test")
    log.info("tunnel_connected", url="wss://cp.example.com", attempt=3)
    log.warning("heartbeat_late", seconds=12.5)
    records = lines(stream)
    assert len(records) == 2
    first, second = records
    assert first["event"] == "tunnel_connected"
    assert first["level"] == "info"
    assert first["logger"] == "agent.test"
    assert first["url"] == "wss://cp.example.com"
    assert first["attempt"] == 3
    assert second["event"] == "heartbeat_late"
    assert second["level"] == "warning"
    assert second["seconds"] == 12.5
    for record in records:
        timestamp = record["timestamp"]
        assert isinstance(timestamp, str)
        assert timestamp.endswith("Z")
        offset = datetime.fromisoformat(timestamp).utcoffset()
        assert offset is not None
        assert offset.total_seconds() == 0


def test_level_filtering(stream: io.StringIO) -> None:
    configure_logging("warning", stream=stream)
    log = get_logger("agent.test")
    log.debug("hidden_debug")
    log.info("hidden_info")
    log.error("shown_error")
    assert [r["event"] for r in lines(stream)] == ["shown_error"]


def test_debug_level_shows_debug(stream: io.StringIO) -> None:
    configure_logging("debug", stream=stream)
    get_logger("agent.test").debug("detail", n=1)
    assert lines(stream)[0]["level"] == "debug"
    assert logging.getLogger().level == logging.DEBUG


def test_unknown_level_refused(stream: io.StringIO) -> None:
    with pytest.raises(KeyError):
        configure_logging("loud", stream=stream)


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "password",
        "secret",
        "private_key",
        "authorization",
        "cookie",
        "key_pem",
        "Token",
        "PASSWORD",
        "api_token",
        "refresh_token",
        "client_secret",
        "db_password",
    ],
)
def test_sensitive_keys_redacted(stream: io.StringIO, key: str) -> None:
    configure_logging(stream=stream)
    get_logger("agent.test").info("event_with_secret", **{key: "s3cr3t-value"}, jti="j-1")
    (record,) = lines(stream)
    assert record[key] == REDACTED
    assert record["jti"] == "j-1"
    assert "s3cr3t-value" not in stream.getvalue()


@pytest.mark.parametrize("key", ["token_sha256", "jti", "tokens_seen", "kid", "keyring", "state"])
def test_other_keys_kept(stream: io.StringIO, key: str) -> None:
    configure_logging(stream=stream)
    get_logger("agent.test").info("event", **{key: "visible"})
    (record,) = lines(stream)
    assert record[key] == "visible"


def test_redact_processor_directly() -> None:
    event = {"event": "x", "token": "t", "auth_token": "a", "user": "bob", "token_sha256": "h"}
    result = RedactSecrets()(None, "info", event)
    assert result == {
        "event": "x",
        "token": REDACTED,
        "auth_token": REDACTED,
        "user": "bob",
        "token_sha256": "h",
    }


def test_bound_context_redacted(stream: io.StringIO) -> None:
    configure_logging(stream=stream)
    log = get_logger("agent.test").bind(password="hunter2")
    log.info("login")
    assert lines(stream)[0]["password"] == REDACTED
    assert "hunter2" not in stream.getvalue()


def test_contextvars_merged_and_redacted(stream: io.StringIO) -> None:
    configure_logging(stream=stream)
    structlog.contextvars.bind_contextvars(agent_id="agent-1", session_token="abc123")
    try:
        get_logger("agent.test").info("ctx")
    finally:
        structlog.contextvars.clear_contextvars()
    (record,) = lines(stream)
    assert record["agent_id"] == "agent-1"
    assert record["session_token"] == REDACTED


def test_exception_rendered(stream: io.StringIO) -> None:
    configure_logging(stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("agent.test").exception("failed")
    (record,) = lines(stream)
    assert record["level"] == "error"
    assert isinstance(record["exception"], str)
    assert "ValueError: boom" in record["exception"]


def test_stdlib_records_rendered_as_json(stream: io.StringIO) -> None:
    configure_logging(stream=stream)
    library = logging.getLogger("websockets.client")
    library.info("chatter stays out")
    library.warning("connection %s lost", "cp-1")
    (record,) = lines(stream)
    assert record["event"] == "connection cp-1 lost"
    assert record["level"] == "warning"
    assert record["logger"] == "websockets.client"
    assert "timestamp" in record
    assert "_record" not in record
    assert "_from_structlog" not in record


def test_capture_logs() -> None:
    with capture_logs() as captured:
        get_logger("agent.test").info("command_received", jti="j-1")
    assert captured == [
        {"event": "command_received", "logger": "agent.test", "jti": "j-1", "log_level": "info"}
    ]


def test_nested_secrets_are_redacted(stream: io.StringIO) -> None:
    configure_logging("info", stream=stream)
    structlog.get_logger().info("request", headers={"Authorization": "Bearer s3cr3t", "x": 1})
    (record,) = lines(stream)
    assert record["headers"] == {"Authorization": "[redacted]", "x": 1}
    assert "s3cr3t" not in stream.getvalue()


# -- where the lines go: the journal, a terminal, anything else ---------------------------------


def journal_stream(path: Path) -> tuple[TextIO, dict[str, str]]:
    """A file opened as stdout would be, and the ``$JOURNAL_STREAM`` systemd would set for it."""
    out = path.open("w", encoding="utf-8")
    info = os.fstat(out.fileno())
    return out, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def test_on_the_journal_stream_each_line_carries_its_syslog_priority(tmp_path: Path) -> None:
    out, environ = journal_stream(tmp_path / "journal")
    with out:
        assert configure_logging("debug", stream=out, environ=environ) == "journal"
        log = get_logger("agent.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("x")
        logging.getLogger("websockets.client").error("library %s", "trouble")
    prefixes = []
    for line in (tmp_path / "journal").read_text().splitlines():
        prefix, sep, rest = line.partition(">")
        assert sep
        prefixes.append((prefix + sep, json.loads(rest)["event"]))
    assert prefixes == [
        ("<7>", "d"),
        ("<6>", "i"),
        ("<4>", "w"),
        ("<3>", "e"),
        ("<3>", "x"),
        ("<3>", "library trouble"),
    ]


def test_another_files_journal_stream_is_not_ours(tmp_path: Path) -> None:
    """``$JOURNAL_STREAM`` is inherited: a child whose stdout was redirected must not prefix."""
    other, environ = journal_stream(tmp_path / "elsewhere")
    other.close()
    with (tmp_path / "redirected").open("w", encoding="utf-8") as out:
        assert configure_logging(stream=out, environ=environ) == "json"
        get_logger("agent.test").info("plain")
    assert json.loads((tmp_path / "redirected").read_text())["event"] == "plain"


def test_on_a_terminal_lines_are_for_people() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w", encoding="utf-8") as tty:
        assert configure_logging(stream=tty, environ={}) == "console"
        get_logger("agent.test").warning("disk_nearly_full", free_mb=12)
        tty.flush()
        text = os.read(leader, 4096).decode()
    os.close(leader)
    assert "disk_nearly_full" in text
    assert "free_mb" in text
    assert "warn" in text
    assert not text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("environ", "configured", "expected"),
    [
        ({}, "info", "info"),
        ({"BYOC_LOG_LEVEL": "debug"}, "info", "debug"),
        ({"BYOC_LOG_LEVEL": " ERROR "}, "debug", "error"),
        ({"BYOC_LOG_LEVEL": ""}, "warning", "warning"),
    ],
)
def test_the_environment_overrides_the_configured_level(
    environ: dict[str, str], configured: str, expected: str
) -> None:
    assert effective_level(configured, environ) == expected


def test_an_unknown_level_in_the_environment_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="BYOC_LOG_LEVEL='loud'"):
        effective_level("info", {"BYOC_LOG_LEVEL": "loud"})
