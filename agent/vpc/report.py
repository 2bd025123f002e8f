"""Findings for people (one line per rule) and for programs (JSON)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from agent.vpc.findings import Finding, Status


def lines(vpc_id: str, region: str, findings: Sequence[Finding]) -> list[str]:
    """``PASS rule  found`` / ``FAIL rule  found -> fix: …`` / ``SKIP rule  reason``, then a
    summary line."""
    width = max((len(f.rule) for f in findings), default=0)
    out = [f"vpc check: {vpc_id} in {region}"]
    for finding in findings:
        line = f"{finding.status.upper():4}  {finding.rule:<{width}}  {finding.found}"
        if finding.failed:
            line += f"  -> fix: {finding.fix}"
        out.append(line)
    counts = Counter(finding.status for finding in findings)
    verdict = "FAILED" if counts[Status.FAIL] else "OK"
    out.append(
        f"{verdict}: {counts[Status.PASS]} passed, {counts[Status.FAIL]} failed, "
        f"{counts[Status.SKIP]} skipped"
    )
    return out


def as_json(vpc_id: str, region: str, findings: Sequence[Finding]) -> dict[str, Any]:
    return {
        "vpc_id": vpc_id,
        "region": region,
        "ok": not any(finding.failed for finding in findings),
        "findings": [finding.as_dict() for finding in findings],
    }
