"""The optional uvloop event loop (agent/io/event_loop.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import load_config
from agent.core.errors import ConfigError
from agent.io import event_loop
from byoc_demo.layout import write_agent_files


async def _loop_class() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_runs_a_coroutine_on_a_uvloop_loop() -> None:
    assert event_loop.run(_loop_class(), "uvloop").startswith("uvloop")
    assert event_loop.run(_loop_class(), "asyncio").startswith("asyncio")


def test_an_unknown_event_loop_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="event_loop"):
        event_loop.run(_loop_class(), "trio")


def test_the_config_file_chooses_the_event_loop(tmp_path: Path) -> None:
    paths = write_agent_files(tmp_path / "a", pki=tmp_path / "pki", control_plane_port=1)
    assert load_config(paths.config).event_loop == "asyncio"
    text = paths.config.read_text().replace(
        "[control_plane]", 'event_loop = "uvloop"\n\n[control_plane]', 1
    )
    paths.config.write_text(text)
    assert load_config(paths.config).event_loop == "uvloop"
    paths.config.write_text(text.replace('"uvloop"', '"tokio"'))
    with pytest.raises(ConfigError, match="event_loop"):
        load_config(paths.config)
