"""tests/readme_blocks.py: the extractor every README-running test relies on."""

from __future__ import annotations

import pytest

from tests.readme_blocks import ReadmeError, blocks, parse

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
