"""README "The stub control plane", "Streams" and "Operating it on the host", run as written:
the blocks marked ``<!-- readme-test: demo -->`` in order, then those marked ``operate``, in one
shell against a fresh demo pair (``make demo KEEP=1`` is the first block), as a reader does.

The reader's working directory is a fresh directory that holds what a clone offers the README's
commands (the Makefile, its inputs, the built ``.venv``, by symlink), so that ``.demo``,
``./pki``, ``cp-stub.db`` and ``token`` are made there, not in the checkout. Everything runs in
a network namespace of its own (``unshare --net``, loopback only): the README's fixed ports
(8443, 8080, 9000, 9464) are free there whatever else runs on this machine. Background blocks
(``cp-stub serve``, ``cp-stub forward``) run in shells of their own in the same namespace and
must stop cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from byoc_demo.scenario import stop_kept
from tests.ci import unavailable
from tests.conftest import scaled
from tests.readme_blocks import Block, Terminal, blocks

REPO = Path(__file__).resolve().parent.parent
CLONE_FILES = ("Makefile", "pyproject.toml", "setup.py", "constraints.txt", ".venv")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace of its own needs root (unshare --net)"
    for tool in ("unshare", "nsenter", "ip", "curl", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    stamp = REPO / ".venv" / ".installed"
    inputs = [REPO / name for name in ("pyproject.toml", "setup.py", "constraints.txt")]
    if not stamp.exists() or any(path.stat().st_mtime > stamp.stat().st_mtime for path in inputs):
        # `make demo` would rebuild the venv, from this test's directory: never let it.
        return "the venv is older than pyproject.toml, setup.py or constraints.txt: make venv"
    return None


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[Terminal]:
    why = _unavailable()
    if why is not None:
        unavailable(why)
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in CLONE_FILES:
        (clone / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BYOC_", "CP_STUB_"))}
    env.pop("VIRTUAL_ENV", None)
    terminal = Terminal(clone, env, prefix=["unshare", "--net", "--"])
    terminal.background_prefix = ["nsenter", f"--net=/proc/{terminal.shell.pid}/ns/net", "--"]
    try:
        terminal.send("ip link set lo up")  # the namespace's loopback (not a README command)
        yield terminal
    finally:
        terminal.close(timeout=scaled(30))
        stop_kept(clone / ".demo")  # what make demo KEEP=1 left, if the test did not stop it


def run_all(terminal: Terminal, suite: list[Block]) -> list[str]:
    return [terminal.run(block, timeout=scaled(240)) for block in suite]


def test_the_stub_and_operating_sections_run_as_written(reader: Terminal) -> None:
    demo, operate = blocks("demo"), blocks("operate")
    assert [b.background for b in demo].count(True) == 2  # cp-stub serve, cp-stub forward
    out = run_all(reader, demo)
    assert "Demo complete in" in out[0]
    commands = out[1]
    assert "agent-1                  connected" in commands
    assert commands.count("-> succeeded") >= 6, commands
    assert "-> pending_approval" in commands
    assert '"event": "stub_listening"' in out[3]  # cp-stub serve's first line: it listens
    assert "no agents have connected yet" in out[4]
    assert out[5].startswith("forwarding 127.0.0.1:9000 -> agent agent-1 -> 127.0.0.1:")
    assert out[6].startswith("demo_workload_info{")  # the workload answered, through the agent

    checks, health = run_all(reader, operate)
    assert "\nOK: 15 passed, 0 warnings, 0 failed, 0 skipped" in checks, checks
    assert "agent-1 (version 0.1.0) runs and is connected" in checks
    assert "(scale); state: " in checks  # approved
    assert " command_rejected " in checks  # the demo's refused scale to 10, in audit show
    assert "chain verified" in checks
    assert ": OK, " in checks  # audit verify
    assert "byoc_agent_connected 1.0" in health

    ended = reader.close(timeout=scaled(30))
    assert {block.line: code for block, (code, _) in ended.items()} == {
        block.line: 0 for block in demo if block.background
    }, ended  # Ctrl-C stops them cleanly
    (forward,) = [output for block, (_, output) in ended.items() if "forward" in block.text]
    assert "stopped: 1 connection(s)" in forward
    stopped = stop_kept(reader.cwd / ".demo")
    assert [line.split(" (")[0] for line in stopped] == ["stopped byoc-agent", "stopped cp-stub"]
