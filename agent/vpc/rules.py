"""Every requirement on a customer-managed VPC, and :func:`check`, which judges them all in the
order a person reads them. The rules themselves are pure functions in ``network_rules``,
``group_rules``, ``link_rules`` and ``private_link``; this module only puts them in order."""

from __future__ import annotations

from typing import Final

from agent.vpc import group_rules, link_rules, network_rules, private_link
from agent.vpc.findings import Finding, Rule
from agent.vpc.layout import CheckRequest, Layout
from agent.vpc.model import VpcFacts

RULES: Final[tuple[Rule, ...]] = (
    *network_rules.RULES,
    *group_rules.RULES,
    network_rules.VENDOR_TAG,
    *link_rules.RULES,
    *private_link.RULES,
)
"""Every rule, in report order (README.md "Onboarding" lists them)."""


def check(facts: VpcFacts, request: CheckRequest) -> list[Finding]:
    layout = Layout.of(facts, request)
    return [
        *network_rules.network_rules(layout),
        group_rules.security_group_ingress(layout),
        group_rules.security_group_egress(layout),
        network_rules.vendor_tag(layout),
        *link_rules.endpoint_rules(layout),
        *link_rules.private_link_rules(layout),
    ]


__all__ = ["RULES", "CheckRequest", "check"]
