"""The update journal, the ``current`` switch, and the trial guard that systemd runs before
every start of the agent. Standard library only, Python 3.9+.

A release on trial may be unable to run at all (it fails to import, crashes at start, hangs):
then nothing of it can be trusted to roll itself back. So ``make install`` copies this file to
``/usr/libexec/byoc-agent/update-guard`` (root's, outside any release) and the unit runs it as
``ExecStartPre=`` with the system's Python, as the agent's user, before each start::

    python3 -I /usr/libexec/byoc-agent/update-guard --state-dir /var/lib/byoc-agent \\
        --root /opt/byoc-agent

If the journal says a release is on trial and ``current`` points at it, each start counts as one
attempt; once its trial deadline has passed, or it was started more than ``max_attempts`` times
without confirming a connected, healthy session, the guard points ``current`` back at the
previous release and writes ``rolled_back`` in the journal: the ``ExecStart=`` that follows
runs the previous release, which reports the command ``failed`` (``rolled_back``). A release
that runs but cannot connect rolls itself back at its deadline (agent/update/updater.py); one
that hangs is killed by the watchdog (``WatchdogSec=``) or the start timeout, and the next start
comes here. The guard never stops the agent from starting: any problem of its own is printed
(the journal) and it exits 0.

The journal (``<state_dir>/update/journal.json``, replaced atomically)::

    {"format": 1, "jti": "...", "from": "0.1.0", "to": "0.1.1",
     "stage": "installing" | "trial" | "confirmed" | "rolled_back" | "aborted" | "failed",
     "step": "downloaded", "switched_at": ..., "deadline": ..., "attempts": 0,
     "max_attempts": 3, "reason": null, "detail": null, "by": null, "updated_at": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

JOURNAL_FORMAT = 1
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
"""agent.core.commands.VERSION_PATTERN (a test keeps them equal)."""
STAGES = ("installing", "trial", "confirmed", "rolled_back", "aborted", "failed")
Journal = dict[str, Any]  # Python 3.9: no X | Y outside annotations


class JournalError(Exception):
    """The journal cannot be read or written."""


def journal_path(state_dir: Path) -> Path:
    return state_dir / "update" / "journal.json"


def read_journal(path: Path) -> Journal | None:
    """The journal, or None when there is none. A journal that is not ours (unknown format,
    stage or version names) is an error, never guessed at."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JournalError(f"cannot read {path}: {exc}") from exc
    if (
        not isinstance(data, dict)
        or data.get("format") != JOURNAL_FORMAT
        or data.get("stage") not in STAGES
        or not all(
            isinstance(data.get(key), str) and VERSION.fullmatch(data[key])
            for key in ("from", "to")
        )
        or not isinstance(data.get("jti"), str)
    ):
        raise JournalError(f"{path} is not an update journal this agent understands")
    return data


def write_journal(path: Path, journal: Journal) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json(path, journal, 0o600)


def write_json(path: Path, value: object, mode: int) -> None:
    """Replace ``path`` atomically: a temporary file with ``mode``, fsync'd, renamed, the
    directory fsync'd."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(value, sort_keys=True, indent=1).encode("utf-8") + b"\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_version(root: Path) -> str | None:
    """The release ``root/current`` points at (``releases/<version>``), or None."""
    try:
        target = os.readlink(root / "current")
    except OSError:
        return None
    name = Path(target).name
    return name if VERSION.fullmatch(name) else None


def switch_current(root: Path, version: str) -> None:
    """Point ``root/current`` at ``releases/<version>`` atomically: a process starting now runs
    the old release or the new one, never neither (a new symlink renamed over the old)."""
    if not VERSION.fullmatch(version):
        raise JournalError(f"not a version: {version!r}")
    if not (root / "releases" / version).is_dir():
        raise JournalError(f"{root / 'releases' / version} does not exist")
    temporary = root / f".current.{os.getpid()}.new"
    if temporary.is_symlink():
        temporary.unlink()
    os.symlink(f"releases/{version}", temporary)
    os.replace(temporary, root / "current")
    _fsync_dir(root)


def check_trial(
    journal: Journal | None, current: str | None, now: float
) -> tuple[Journal | None, str]:
    """The guard's decision at one start (pure): the journal to write (None: leave it) and what
    to say. A journal whose stage is ``rolled_back`` while ``current`` still names the failed
    release was interrupted half way: the switch back is made again."""
    if journal is None:
        return None, "no update in progress"
    stage, old, new = journal["stage"], journal["from"], journal["to"]
    if stage == "rolled_back" and current == new:
        return dict(journal), f"finishing the rollback from {new} to {old}"
    if stage != "trial":
        return None, f"update {journal['jti']} is {stage}"
    if current != new:
        return _changed(
            journal,
            now,
            stage="aborted",
            reason="not_switched",
            detail=f"current is {current}, not {new}: the switch to {new} never completed",
            by="guard",
        ), f"{new} was never switched to; {current} starts"
    attempts = int(journal.get("attempts", 0)) + 1
    limit = int(journal.get("max_attempts", 3))
    deadline = float(journal.get("deadline", 0))
    if now >= deadline:
        window = deadline - float(journal.get("switched_at", deadline))
        return _changed(
            journal,
            now,
            stage="rolled_back",
            reason="trial_deadline",
            detail=(
                f"{new} did not reach a connected, healthy session within its {window:.0f}s "
                f"trial; back to {old}"
            ),
            by="guard",
        ), f"trial of {new} is past its deadline: back to {old}"
    if attempts > limit:
        return _changed(
            journal,
            now,
            stage="rolled_back",
            reason="crashed",
            detail=(
                f"{new} was started {limit} times without reaching a connected, healthy "
                f"session; back to {old}"
            ),
            by="guard",
            attempts=attempts - 1,
        ), f"{new} failed {limit} starts: back to {old}"
    return _changed(journal, now, attempts=attempts), f"trial of {new}: start {attempts} of {limit}"


def _changed(journal: Journal, now: float, **changes: Any) -> Journal:
    updated = dict(journal)
    updated.update(changes)
    updated["updated_at"] = now
    return updated


def guard(state_dir: Path, root: Path, now: float) -> str:
    """Run the guard once: read, decide, write the journal first, then switch ``current``."""
    path = journal_path(state_dir)
    journal = read_journal(path)
    updated, said = check_trial(journal, current_version(root), now)
    if updated is None:
        return said
    if updated["stage"] == "rolled_back" and not (root / "releases" / updated["from"]).is_dir():
        return f"{said}: impossible, {root / 'releases' / updated['from']} does not exist"
    write_journal(path, updated)
    if updated["stage"] == "rolled_back":
        switch_current(root, updated["from"])
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc-agent-update-guard", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/byoc-agent"))
    parser.add_argument("--root", type=Path, default=Path("/opt/byoc-agent"))
    args = parser.parse_args(argv)
    try:
        said = guard(args.state_dir, args.root, time.time())
    except (OSError, JournalError, KeyError, TypeError, ValueError) as exc:
        print(f"byoc-agent-update-guard: cannot check the update trial: {exc}", file=sys.stderr)
        return 0  # never keep the agent from starting
    print(f"byoc-agent-update-guard: {said}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
