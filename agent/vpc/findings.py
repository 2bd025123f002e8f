"""One finding per rule: its status, what was found, and how to fix it.

Findings are data; rendering them (text lines, JSON) is :mod:`agent.vpc.report`'s job. A rule
that does not apply (no endpoint named, say) is ``skip``, with the reason in ``found``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.StrEnum):
    PASS = "pass"  # noqa: S105  # not a password
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, kw_only=True)
class Finding:
    rule: str
    """A stable id (``vpc-cidr``, ``private-link-443``): for scripts, tests and docs."""
    title: str
    """What the rule requires, in a few words."""
    status: Status
    found: str
    """What the check saw, with resource ids, whatever the status."""
    fix: str = ""
    """How to fix a failure: an AWS CLI command where one exists, else one sentence."""

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL

    def as_dict(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "title": self.title,
            "status": str(self.status),
            "found": self.found,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Rule:
    """A requirement: a stable id and what it requires. Its methods make its findings."""

    id: str
    title: str

    def ok(self, found: str) -> Finding:
        return Finding(rule=self.id, title=self.title, status=Status.PASS, found=found)

    def fail(self, found: str, fix: str) -> Finding:
        return Finding(rule=self.id, title=self.title, status=Status.FAIL, found=found, fix=fix)

    def skip(self, reason: str) -> Finding:
        return Finding(rule=self.id, title=self.title, status=Status.SKIP, found=reason)
