"""A stand-in for ``systemctl``, for the systemd driver's tests.

systemd is not PID 1 on these machines (containers without an init), so the real systemctl
cannot manage units here. This stand-in speaks systemctl's command line for what the driver
uses (``enable --now``, ``disable --now``, ``start``, ``stop``, ``restart``, ``is-active``),
records every call in ``calls.jsonl`` and keeps unit state in ``units.json``, both in
``$FAKE_SYSTEMCTL_DIR``. Starting ``name@N.service`` really runs the release that the
``current`` symlink (``$FAKE_SYSTEMCTL_CURRENT``) points to: its ``run.json`` names an argv
(``{python}``, ``{port}`` = ``$FAKE_SYSTEMCTL_BASE_PORT`` + N), so health checks and metrics
are real HTTP against a real process, as they would be against a real unit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _state_dir() -> Path:
    return Path(os.environ["FAKE_SYSTEMCTL_DIR"])


def _load() -> dict[str, dict[str, object]]:
    path = _state_dir() / "units.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(units: dict[str, dict[str, object]]) -> None:
    path = _state_dir() / "units.json"
    path.with_suffix(".tmp").write_text(json.dumps(units))
    os.replace(path.with_suffix(".tmp"), path)


def _alive(pid: object) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    if not isinstance(pid, int):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(unit: str, units: dict[str, dict[str, object]]) -> None:
    state = units.setdefault(unit, {})
    if _alive(state.get("pid")):
        return
    index = int(unit.split("@", 1)[1].split(".", 1)[0])
    release = Path(os.environ["FAKE_SYSTEMCTL_CURRENT"]).resolve()
    spec = json.loads((release / "run.json").read_text())
    port = int(os.environ["FAKE_SYSTEMCTL_BASE_PORT"]) + index
    argv = [a.format(python=sys.executable, port=port) for a in spec["argv"]]
    log = (_state_dir() / f"{unit}.log").open("ab")
    process = subprocess.Popen(  # the test's own release
        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    state.update(pid=process.pid, active=True, release=release.name)


def _stop(unit: str, units: dict[str, dict[str, object]]) -> None:
    state = units.setdefault(unit, {})
    pid = state.get("pid")
    if isinstance(pid, int) and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    state.update(pid=None, active=False)


def main(argv: list[str]) -> int:
    with (_state_dir() / "calls.jsonl").open("a") as calls:
        calls.write(json.dumps(argv) + "\n")
    units = _load()
    verb, *rest = argv
    now = "--now" in rest
    names = [a for a in rest if not a.startswith("-")]
    for unit in names:
        if verb in ("start", "restart") or (verb == "enable" and now):
            if verb == "restart":
                _stop(unit, units)
            _start(unit, units)
        elif verb == "stop" or (verb == "disable" and now):
            _stop(unit, units)
        if verb in ("enable", "disable"):
            units.setdefault(unit, {})["enabled"] = verb == "enable"
        if verb == "is-active":
            active = _alive(units.get(unit, {}).get("pid"))
            print("active" if active else "inactive")
            _save(units)
            return 0 if active else 3
    _save(units)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
