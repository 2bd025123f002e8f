"""The ``process`` driver's state file: ``<state_dir>/process-driver.json``.

The record types it holds (:class:`DriverState`, :class:`ProcessRecord`) and their atomic
reading and writing (:func:`load_state`, :func:`save_state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast

from agent.core.errors import DriverError
from agent.io.files import write_atomic

STATE_FILE = "process-driver.json"
_STATE_FORMAT = 1
Role = Literal["serving", "starting", "stopping"]
_ROLES: tuple[Role, ...] = ("serving", "starting", "stopping")
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    """One process as the state file names it."""

    index: int
    pid: int
    port: int
    version: str
    create_time: float
    """psutil's create time: with ``pid``, identifies the process across pid reuse."""
    role: Role = "serving"


@dataclass(frozen=True, kw_only=True)
class DriverState:
    version: str
    processes: tuple[ProcessRecord, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "format": _STATE_FORMAT,
            "version": self.version,
            "replicas": [
                {
                    "index": p.index,
                    "pid": p.pid,
                    "port": p.port,
                    "version": p.version,
                    "create_time": p.create_time,
                    "role": p.role,
                }
                for p in self.processes
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> DriverState:
        """Raise ``ValueError`` if ``data`` is not a state this module wrote."""
        doc = _typed(data, dict, "state")
        if doc.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported format {doc.get('format')!r}")
        processes = []
        for item in _typed(doc.get("replicas"), list, "replicas"):
            entry = _typed(item, dict, "replica")
            role = entry.get("role", "serving")
            if role not in _ROLES:
                raise ValueError(f"bad role {role!r}")
            create_time = entry.get("create_time")
            if isinstance(create_time, bool) or not isinstance(create_time, int | float):
                raise ValueError(f"bad create_time {create_time!r}")
            processes.append(
                ProcessRecord(
                    index=_typed(entry.get("index"), int, "index"),
                    pid=_typed(entry.get("pid"), int, "pid"),
                    port=_typed(entry.get("port"), int, "port"),
                    version=_typed(entry.get("version"), str, "version"),
                    create_time=float(create_time),
                    role=cast(Role, role),
                )
            )
        return cls(version=_typed(doc.get("version"), str, "version"), processes=tuple(processes))


def _typed(value: object, kind: type[_T], what: str) -> _T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"bad {what}: {value!r}")
    return value


def load_state(path: Path) -> DriverState | None:
    """Read the state file; ``None`` if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DriverError("state_unreadable", f"{path}: {exc}") from exc
    try:
        return DriverState.from_json(json.loads(text))
    except ValueError as exc:
        raise DriverError("state_unreadable", f"{path}: {exc}") from exc


def save_state(path: Path, state: DriverState) -> None:
    """Replace the state file atomically (temporary file, fsync, rename, fsync directory)."""
    write_atomic(path, (json.dumps(state.to_json(), indent=2) + "\n").encode())
