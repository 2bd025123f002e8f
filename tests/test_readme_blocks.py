"""tests/readme_blocks.py: the extractor every README-running test relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.readme_blocks import (
    README,
    BlockFailed,
    ReadmeError,
    Terminal,
    blocks,
    parse,
    unmarked,
)

SAMPLE = """\
# Title

<!-- readme-test: ec2 -->
```sh
make install
```

Not marked:

```sh
rm -rf /
```

<!-- readme-test: demo -->
```
make demo
```

<!--readme-test:ec2-->
~~~bash
echo one
echo two
~~~
"""


def test_marked_blocks_of_each_suite_in_order() -> None:
    found = parse(SAMPLE)
    assert [(b.suite, b.language, b.text, b.line) for b in found] == [
        ("ec2", "sh", "make install\n", 4),
        ("demo", "", "make demo\n", 15),
        ("ec2", "bash", "echo one\necho two\n", 20),
    ]


def test_a_marker_must_be_followed_by_a_block() -> None:
    with pytest.raises(ReadmeError, match="line 1: readme-test marker not followed"):
        parse("<!-- readme-test: ec2 -->\n\n```sh\nls\n```\n")


def test_a_block_must_be_closed() -> None:
    with pytest.raises(ReadmeError, match="never closed"):
        parse("<!-- readme-test: ec2 -->\n```sh\nls\n")


def test_the_readme_has_an_ec2_section_to_run() -> None:
    ec2 = blocks("ec2")
    assert ec2, "README.md has no <!-- readme-test: ec2 --> blocks"
    assert any("make install" in b.text for b in ec2)
    assert any("byoc-agent enroll" in b.text for b in ec2)
    assert any("systemctl enable --now byoc-agent" in b.text for b in ec2)


def test_background_and_skip_markers() -> None:
    found = parse(
        "<!-- readme-test: demo background -->\n```sh\ncp-stub serve\n```\n"
        "<!-- readme-test: skip (needs a real EKS cluster) -->\n```sh\nkubectl get pods\n```\n"
        "<!-- readme-test: ec2 as-operator -->\n```sh\nbyoc-agent status\n```\n"
    )
    assert [(b.suite, b.background, b.reason, b.text) for b in found] == [
        ("demo", True, "", "cp-stub serve\n"),
        ("skip", False, "needs a real EKS cluster", "kubectl get pods\n"),
        ("ec2", False, "", "byoc-agent status\n"),
    ]
    assert [b.as_operator for b in found] == [False, False, True]


def test_a_shell_block_without_a_marker_is_found() -> None:
    assert unmarked(SAMPLE) == [10]  # `rm -rf /`: neither run nor skipped with a reason
    assert unmarked("```text\nnot a shell\n```\n<!-- readme-test: x -->\n```sh\nls\n```\n") == []


def test_every_shell_block_of_the_readme_is_run_or_says_why_not() -> None:
    """A README command a reader is meant to run is run by a suite's test; the others are
    marked ``<!-- readme-test: skip (why) -->`` (issue 13: blocks that failed as written)."""
    text = README.read_text(encoding="utf-8")
    lines = unmarked(text)
    assert lines == [], f"README.md lines {lines}: mark them readme-test: SUITE or skip (why)"
    skipped = [block for block in parse(text) if block.suite == "skip"]
    assert all(len(block.reason) > 20 for block in skipped), skipped
    suites = {block.suite for block in parse(text)}
    # each suite has its test (a misspelt marker would count as covered while nothing runs it)
    assert suites == {"vpc", "ec2", "eks", "update", "console", "demo", "operate", "skip"}


def test_a_terminal_runs_blocks_as_one_shell(tmp_path: Path) -> None:
    terminal = Terminal(tmp_path, {"PATH": os.environ["PATH"]})
    try:
        first, second, third, background = parse(
            "<!-- readme-test: t -->\n```sh\nGREETING=hello\nexport NAME=world\n```\n"
            '<!-- readme-test: t -->\n```sh\necho "$GREETING $NAME"\n```\n'
            "<!-- readme-test: t -->\n```sh\nfalse\necho never\n```\n"
            "<!-- readme-test: t background -->\n```sh\n"
            "trap 'echo stopped; exit 0' INT\n"
            'echo "ready for $NAME"\n'
            "while :; do sleep 0.1; done\n"
            "```\n"
        )
        assert terminal.run(first) == ""
        assert terminal.run(background) == "ready for world\n"  # the exported environment
        assert terminal.run(second) == "hello world\n"
        with pytest.raises(BlockFailed, match=r"failed \(exit status 1\)"):
            terminal.run(third)
    finally:
        ended = terminal.close()
    assert ended == {background: (0, "ready for world\nstopped\n")}
