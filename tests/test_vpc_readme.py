"""README "Onboarding", run as written: its ``<!-- readme-test: vpc -->`` blocks, in order, in
one shell, against the AWS stand-in (moto's server; tests/aws_moto.py), with the real AWS CLI
and ``byoc-agent`` on the PATH.

A ``sh`` block is run (``set -eu``: every command must succeed, so every check must pass); a
``toml`` block is a file the reader writes, named by its first line (``# agent.toml``).
(A local extractor; the shared one is tests/readme_blocks.py once it lands.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.aws_moto import REPO, MotoServer, tool
from tests.conftest import scaled

BLOCK = re.compile(
    r"<!-- readme-test: (?P<suite>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)```", re.S
)


def blocks(suite: str) -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(m["lang"], m["body"]) for m in BLOCK.finditer(text) if m["suite"] == suite]


def test_the_onboarding_section_runs_as_written(moto_server: MotoServer, tmp_path: Path) -> None:
    found = blocks("vpc")
    assert [lang for lang, _ in found] == ["sh", "sh", "sh", "toml", "sh"]
    script = ["set -eu"]
    for lang, body in found:
        if lang == "toml":
            name = body.splitlines()[0].removeprefix("# ").strip()
            (tmp_path / name).write_text(body, encoding="utf-8")
        else:
            script.append(body)
    path = os.pathsep.join(
        [str(Path(sys.executable).parent), str(tool("aws").parent), os.environ["PATH"]]
    )
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        env={**os.environ, **moto_server.env, "PATH": path},
        capture_output=True,
        text=True,
        check=False,
        timeout=scaled(300),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summaries = [line for line in done.stdout.splitlines() if line.startswith(("OK:", "FAILED:"))]
    # the plain VPC (endpoint rules skipped), the VPC with a private link, its agent.toml
    assert summaries == ["OK: 13 passed, 0 failed, 6 skipped", "OK: 19 passed, 0 failed, 0 skipped",
                         "OK: 19 passed, 0 failed, 0 skipped"]  # fmt: skip
    assert "byoc-agent vpc check --region us-east-1 --vpc-id vpc-" in done.stdout  # CheckCommand
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] is True
    assert json.loads((tmp_path / "vpc-check-policy.json").read_text())["Statement"]
