"""The update guard (agent/update/guard.py): the decision at each start of a release on trial,
on real files and symlinks, run the way the unit runs it (``python3 -I`` on the script); and
that it stays a standalone Python 3.9 script (it runs with the host's Python, outside every
release, e.g. 3.9 on Amazon Linux 2023)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest

from agent.core.commands import VERSION_PATTERN
from agent.update import guard

NOW: Final = 1_700_000_000.0
SCRIPT: Final = Path(guard.__file__)


def trial(**changes: Any) -> dict[str, Any]:
    journal: dict[str, Any] = {
        "format": 1,
        "jti": "j-1",
        "from": "0.1.0",
        "to": "0.2.0",
        "stage": "trial",
        "switched_at": NOW - 10,
        "deadline": NOW + 290,
        "attempts": 0,
        "max_attempts": 3,
    }
    journal.update(changes)
    return journal


def test_each_start_on_trial_is_counted_until_the_last_allowed() -> None:
    journal: dict[str, Any] | None = trial()
    said = []
    for _ in range(3):
        journal, text = guard.check_trial(journal, "0.2.0", NOW)
        assert journal is not None
        assert journal["stage"] == "trial"
        said.append(text)
    assert said == [f"trial of 0.2.0: start {n} of 3" for n in (1, 2, 3)]
    journal, text = guard.check_trial(journal, "0.2.0", NOW)
    assert journal is not None
    assert (journal["stage"], journal["reason"], journal["by"]) == (
        "rolled_back",
        "crashed",
        "guard",
    )
    assert journal["attempts"] == 3
    assert text == "0.2.0 failed 3 starts: back to 0.1.0"
    assert (
        "0.2.0 was started 3 times without reaching a connected, healthy session"
        in (journal["detail"])
    )


def test_a_trial_past_its_deadline_is_rolled_back_at_the_next_start() -> None:
    journal, text = guard.check_trial(trial(deadline=NOW - 1), "0.2.0", NOW)
    assert journal is not None
    assert (journal["stage"], journal["reason"]) == ("rolled_back", "trial_deadline")
    assert text == "trial of 0.2.0 is past its deadline: back to 0.1.0"


def test_a_switch_that_never_happened_is_not_a_trial() -> None:
    journal, text = guard.check_trial(trial(), "0.1.0", NOW)
    assert journal is not None
    assert (journal["stage"], journal["reason"]) == ("aborted", "not_switched")
    assert text == "0.2.0 was never switched to; 0.1.0 starts"


@pytest.mark.parametrize("stage", ["installing", "confirmed", "failed", "aborted"])
def test_other_stages_are_left_alone(stage: str) -> None:
    assert guard.check_trial(trial(stage=stage), "0.2.0", NOW)[0] is None
    assert guard.check_trial(None, "0.1.0", NOW) == (None, "no update in progress")


def test_a_rollback_interrupted_before_its_switch_is_finished() -> None:
    journal = trial(stage="rolled_back", reason="crashed")
    assert guard.check_trial(journal, "0.2.0", NOW)[0] == journal
    assert guard.check_trial(journal, "0.1.0", NOW)[0] is None


def layout(tmp_path: Path, current: str) -> tuple[Path, Path]:
    root, state = tmp_path / "opt", tmp_path / "state"
    for version in ("0.1.0", "0.2.0"):
        (root / "releases" / version / "bin").mkdir(parents=True)
    (root / "current").symlink_to(f"releases/{current}")
    state.mkdir()
    return root, state


def run_guard(root: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """As the unit does: ``python3 -I update-guard --state-dir ... --root ...``."""
    return subprocess.run(
        [sys.executable, "-I", str(SCRIPT), "--state-dir", str(state), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )


def test_the_script_rolls_back_on_disk(tmp_path: Path) -> None:
    root, state = layout(tmp_path, "0.2.0")
    guard.write_journal(guard.journal_path(state), trial(attempts=3, deadline=2e12))

    done = run_guard(root, state)

    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == "byoc-agent-update-guard: 0.2.0 failed 3 starts: back to 0.1.0\n"
    assert os.readlink(root / "current") == "releases/0.1.0"
    journal = guard.read_journal(guard.journal_path(state))
    assert journal is not None
    assert journal["stage"] == "rolled_back"
    assert oct(guard.journal_path(state).stat().st_mode & 0o777) == "0o600"
    assert not list(root.glob(".current.*"))  # no temporary link left behind
    # again: nothing more to do
    assert run_guard(root, state).stderr == "byoc-agent-update-guard: update j-1 is rolled_back\n"


def test_the_script_never_keeps_the_agent_from_starting(tmp_path: Path) -> None:
    root, state = layout(tmp_path, "0.2.0")
    path = guard.journal_path(state)
    path.parent.mkdir()
    for text in ("{not json", json.dumps({**trial(), "to": "../../etc"}), json.dumps([1])):
        path.write_text(text)
        done = run_guard(root, state)
        assert done.returncode == 0
        assert done.stderr.startswith("byoc-agent-update-guard: cannot check the update trial: ")
        assert os.readlink(root / "current") == "releases/0.2.0"
    # the release to go back to is gone: said, and the agent still starts
    path.write_text(json.dumps(trial(attempts=3, deadline=2e12, **{"from": "0.0.9"})))
    done = run_guard(root, state)
    assert done.returncode == 0
    assert done.stderr.endswith(
        f"back to 0.0.9: impossible, {root}/releases/0.0.9 does not exist\n"
    )
    assert os.readlink(root / "current") == "releases/0.2.0"
    assert guard.read_journal(path) == trial(attempts=3, deadline=2e12, **{"from": "0.0.9"})


def test_switch_refuses_what_is_not_a_release(tmp_path: Path) -> None:
    root, _ = layout(tmp_path, "0.1.0")
    for version in ("0.3.0", "../0.1.0", ""):
        with pytest.raises(guard.JournalError):
            guard.switch_current(root, version)
    assert os.readlink(root / "current") == "releases/0.1.0"
    assert guard.current_version(root) == "0.1.0"
    (root / "current").unlink()
    assert guard.current_version(root) is None


def test_the_guard_is_a_standalone_python_3_9_script() -> None:
    source = SCRIPT.read_text()
    ast.parse(source, feature_version=(3, 9))  # no match, no X | Y outside annotations, ...
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    assert guard.VERSION.pattern == VERSION_PATTERN.pattern
