"""The customer's policy file on disk: loaded at start, re-read when it changes or on SIGHUP.

A new version that does not parse is refused loudly (operational log and audit record) and the
last good policy stays in force: a typo must never open or close the door by accident.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.core.errors import ConfigError, PolicyError
from agent.core.policy import Policy


def read_policy(path: Path) -> Policy:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from exc
    try:
        return Policy.from_toml(data)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from exc


class PolicyFile:
    def __init__(
        self,
        path: Path,
        record: Callable[..., object],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """``record(event, **fields)`` writes an audit record (the journal's current batch)."""
        self.path = path
        self._record = record
        self._log = log
        try:
            self._policy = read_policy(path)
        except PolicyError as exc:
            raise ConfigError(str(exc)) from exc
        self._stamp = self._file_stamp()
        self._audit_loaded("start")

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _audit_loaded(self, trigger: str) -> None:
        self._record(
            "policy_loaded",
            path=str(self.path),
            policy_sha256=self._policy.sha256,
            trigger=trigger,
            allows=dict(self._policy.summary()),
        )
        self._log.info("policy_loaded", policy_sha256=self._policy.sha256, trigger=trigger)

    @property
    def current(self) -> Policy:
        """The policy in force, re-read first if the file changed since the last look."""
        if self._file_stamp() != self._stamp:
            self.reload("file_changed")
        return self._policy

    def reload(self, trigger: str = "sighup") -> bool:
        self._stamp = self._file_stamp()
        try:
            policy = read_policy(self.path)
        except PolicyError as exc:
            self._record(
                "policy_reload_failed",
                path=str(self.path),
                trigger=trigger,
                error=str(exc),
                kept_policy_sha256=self._policy.sha256,
            )
            self._log.error("policy_reload_failed", error=str(exc), kept=self._policy.sha256)
            return False
        if policy.sha256 != self._policy.sha256:
            self._policy = policy
            self._audit_loaded(trigger)
        else:  # nothing to audit, but whoever sent the SIGHUP looks for an answer in the log
            self._log.info("policy_unchanged", policy_sha256=policy.sha256, trigger=trigger)
        return True
