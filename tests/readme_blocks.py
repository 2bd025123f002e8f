"""The README's runnable blocks, so that a test runs exactly what a reader is told to run.

A block belongs to a suite when the line right before its opening fence is
``<!-- readme-test: SUITE -->`` (``ec2``, ``demo``, ``eks``, ...)::

    <!-- readme-test: ec2 -->
    ```sh
    make install DRIVER=systemd
    ```

:func:`blocks` returns a suite's blocks in the order they appear, with the line each starts on
(for error messages). A marker that is not followed by a fence, or a fence that is never
closed, is an error: a marker must not silently stop covering a block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

README: Final = Path(__file__).resolve().parent.parent / "README.md"
MARKER: Final = re.compile(r"^<!--\s*readme-test:\s*([\w.-]+)\s*-->\s*$")
FENCE: Final = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")


class ReadmeError(ValueError):
    """A marker without a block, or a block without its closing fence."""


@dataclass(frozen=True)
class Block:
    suite: str
    language: str
    text: str
    line: int
    """1-based line of the opening fence."""

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
                found.append(Block(marker.group(1), language, text, line=start))
                index = end + 1
                break
        else:
            raise ReadmeError(f"line {start}: the fenced block is never closed")
    return found


def blocks(suite: str, readme: Path = README) -> list[Block]:
    """The blocks marked ``<!-- readme-test: suite -->`` in ``readme``, in order."""
    return [block for block in parse(readme.read_text(encoding="utf-8")) if block.suite == suite]


__all__ = ["README", "Block", "ReadmeError", "blocks", "parse"]
