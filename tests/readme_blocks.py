"""The README's runnable blocks, so that a test runs exactly what a reader is told to run.

A block belongs to a suite when the line right before its opening fence is
``<!-- readme-test: SUITE -->`` (``ec2``, ``demo``, ``eks``, ...)::

    <!-- readme-test: ec2 -->
    ```sh
    make install DRIVER=systemd
    ```

``<!-- readme-test: SUITE background -->`` marks a command that runs until Ctrl-C (a server, a
forward): the reader starts it in a terminal of its own and goes on. ``<!-- readme-test: SUITE
as-operator -->`` marks commands the README gives to the host's operators (not root): a suite
that has such a user runs them as that user. A block that is not run
says why: ``<!-- readme-test: skip (needs a real EKS cluster) -->``; every shell block of the
README is one or the other (:func:`unmarked` finds those that are neither).

:func:`blocks` returns a suite's blocks in the order they appear, with the line each starts on
(for error messages). A marker that is not followed by a fence, or a fence that is never
closed, is an error: a marker must not silently stop covering a block.

:class:`Terminal` runs blocks as a reader does: in order, in one shell (what one block sets,
the next sees), each command required to succeed (``set -eu``); a background block in a shell
of its own with the environment the first one has at that point (a second terminal set up the
same way), started once it has printed its first line, stopped at the end with SIGINT (Ctrl-C)
and required to exit 0 then.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

README: Final = Path(__file__).resolve().parent.parent / "README.md"
MARKER: Final = re.compile(
    r"^<!--\s*readme-test:\s*(?:skip\s*\((?P<reason>[^)]+)\)|(?P<suite>[\w.-]+)"
    r"(?P<background>\s+background)?(?P<operator>\s+as-operator)?)\s*-->\s*$"
)
FENCE: Final = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")
SHELLS: Final = frozenset({"sh", "bash", "shell", "console"})
"""Fenced block languages that a reader runs in a shell."""
SKIP: Final = "skip"


class ReadmeError(ValueError):
    """A marker without a block, or a block without its closing fence."""


@dataclass(frozen=True)
class Block:
    suite: str
    """The suite, or ``skip`` for a block marked not to run."""
    language: str
    text: str
    line: int
    """1-based line of the opening fence."""
    background: bool = False
    """Runs until Ctrl-C, in a terminal of its own."""
    as_operator: bool = False
    """Run as the host's operator (the README gives it to them, not to root)."""
    reason: str = ""
    """Why a ``skip`` block is not run."""

    def __str__(self) -> str:
        return f"README line {self.line} ({self.language or 'text'})"


def parse(markdown: str) -> list[Block]:
    """Every marked block of ``markdown``, in order."""
    lines = markdown.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        marker = MARKER.match(lines[index].strip())
        index += 1
        if marker is None:
            continue
        opening = FENCE.match(lines[index]) if index < len(lines) else None
        if opening is None:
            raise ReadmeError(f"line {index}: readme-test marker not followed by a fenced block")
        fence, language = opening.groups()
        start = index + 1
        for end in range(start, len(lines)):
            if lines[end].strip() == fence:
                text = "\n".join(lines[start:end]) + "\n"
                found.append(
                    Block(
                        marker.group("suite") or SKIP,
                        language,
                        text,
                        line=start,
                        background=bool(marker.group("background")),
                        as_operator=bool(marker.group("operator")),
                        reason=(marker.group("reason") or "").strip(),
                    )
                )
                index = end + 1
                break
        else:
            raise ReadmeError(f"line {start}: the fenced block is never closed")
    return found


def unmarked(markdown: str) -> list[int]:
    """The opening lines (1-based) of the shell blocks that no marker covers: neither run by a
    suite nor marked ``skip (why)``."""
    marked = {block.line for block in parse(markdown)}
    lines = markdown.splitlines()
    found: list[int] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        fence, language = opening.groups()
        if language in SHELLS and index not in marked:
            found.append(index)
        while index < len(lines) and lines[index].strip() != fence:
            index += 1
        index += 1
    return found


def blocks(suite: str, readme: Path = README) -> list[Block]:
    """The blocks marked ``<!-- readme-test: suite -->`` in ``readme``, in order."""
    return [block for block in parse(readme.read_text(encoding="utf-8")) if block.suite == suite]


# -- running blocks as a reader does --------------------------------------------------------------


class BlockFailed(AssertionError):
    """A block did not run to its end (a command failed, or it took too long)."""


def _pump(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


@dataclass
class Background:
    block: Block
    process: subprocess.Popen[bytes]
    lines: queue.Queue[bytes | None]
    pump: threading.Thread
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.output.append(line.decode(errors="replace"))
        return "".join(self.output)


class Terminal:
    """One shell (``bash``, ``set -eu``) that runs blocks in order; ``prefix`` runs it and the
    background shells through something (``nsenter --net=...``, to stay in a namespace)."""

    def __init__(self, cwd: Path, env: Mapping[str, str], *, prefix: Sequence[str] = ()) -> None:
        self.cwd = cwd
        self.prefix = list(prefix)
        self.shell = subprocess.Popen(
            [*self.prefix, "bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
        )
        assert self.shell.stdout is not None
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._pump = threading.Thread(
            target=_pump, args=(self.shell.stdout, self._lines), daemon=True
        )
        self._pump.start()
        self.background: list[Background] = []
        self.background_prefix = self.prefix
        """How background shells are started (e.g. ``nsenter`` into the first one's network
        namespace)."""
        self.transcript: list[str] = []
        self.send("set -eu")

    def send(self, text: str, *, timeout: float = 60.0, what: str = "set-up") -> str:
        """Run ``text`` in the shell; its output (stdout and stderr). Raises
        :class:`BlockFailed` when the shell exits (a command failed) or time runs out."""
        stdin = self.shell.stdin
        assert stdin is not None
        done = f"__block_done_{uuid.uuid4().hex}__"
        stdin.write(f"{text}\nprintf '\\n%s\\n' {done}\n".encode())
        stdin.flush()
        output: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise BlockFailed(
                    f"{what} took more than {timeout:g} s:\n{''.join(output)}"
                ) from None
            if line is None:
                code = self.shell.wait()
                raise BlockFailed(f"{what} failed (exit status {code}):\n{''.join(output)}")
            decoded = line.decode(errors="replace")
            if decoded.strip() == done:
                break
            output.append(decoded)
        text_out = "".join(output)
        if text_out.endswith("\n") and output:  # the newline printf put before the marker
            text_out = text_out[:-1]
        self.transcript.append(text_out)
        return text_out

    def run(self, block: Block, *, timeout: float = 60.0) -> str:
        """Run a block (a background one: see :meth:`start`)."""
        if block.background:
            return self.start(block, timeout=timeout)
        return self.send(block.text, timeout=timeout, what=str(block))

    def environment(self) -> dict[str, str]:
        """The shell's exported environment now."""
        dump = self.send("env -0 | od -An -v -tx1 | tr -d ' \\n'")
        pairs = bytes.fromhex(dump.strip()).split(b"\0")
        return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)

    def start(self, block: Block, *, timeout: float = 60.0) -> str:
        """Start a background block in a shell of its own; return its first line of output,
        which a long-running command prints once it is ready (a server listening)."""
        process = subprocess.Popen(
            [*self.background_prefix, "bash", "--noprofile", "--norc", "-euc", block.text],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.environment(),
            start_new_session=True,  # its own process group: Ctrl-C reaches it alone
        )
        assert process.stdout is not None
        lines: queue.Queue[bytes | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
        pump.start()
        running = Background(block, process, lines, pump)
        self.background.append(running)
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            raise BlockFailed(f"{block} printed nothing in {timeout:g} s") from None
        if first is None:
            raise BlockFailed(f"{block} ended at once (status {process.wait()}):\n{running.text()}")
        running.output.append(first.decode(errors="replace"))
        return running.output[0]

    def close(self, *, timeout: float = 30.0) -> dict[Block, tuple[int, str]]:
        """Ctrl-C to every background block (its process group), then end the shell; each
        background block's exit status and output."""
        ended: dict[Block, tuple[int, str]] = {}
        background, self.background = self.background, []  # closing twice stops nothing twice
        for running in background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGINT)
            try:
                code = running.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(running.process.pid, signal.SIGKILL)
                code = running.process.wait()
            running.pump.join(timeout)
            ended[running.block] = (code, running.text())
            assert running.process.stdout is not None
            running.process.stdout.close()
        assert self.shell.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.shell.stdin.close()
        try:
            self.shell.wait(timeout)
        except subprocess.TimeoutExpired:
            self.shell.kill()
            self.shell.wait()
        self._pump.join(timeout)
        assert self.shell.stdout is not None
        self.shell.stdout.close()
        return ended


__all__ = [
    "README",
    "SHELLS",
    "Background",
    "Block",
    "BlockFailed",
    "ReadmeError",
    "Terminal",
    "blocks",
    "parse",
    "unmarked",
]
