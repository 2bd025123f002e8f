"""Rules on the security group: inbound 443 (from anywhere or a chosen CIDR), outbound HTTPS.

The group judged is the one named with ``--security-group``; else the endpoint's; else the
VPC's groups tagged with the vendor tag (:class:`agent.vpc.layout.Layout`). That 443 is open
*from the VPC's CIDR* on the private link is ``private-link-443`` (:mod:`agent.vpc.private_link`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from agent.vpc.findings import Finding, Rule
from agent.vpc.layout import Layout
from agent.vpc.model import Permission
from agent.vpc.private_link import ingress_fix
from agent.vpc.requirements import ANYWHERE, HTTPS_PORT, VENDOR_TAG_KEY

SG_INGRESS: Final = Rule("sg-ingress-443", f"security group opens inbound TCP {HTTPS_PORT}")
SG_EGRESS: Final = Rule("sg-egress-https", f"security group allows outbound TCP {HTTPS_PORT}")
RULES: Final = (SG_INGRESS, SG_EGRESS)


def _sources(permissions: Sequence[Permission], port: int) -> list[str]:
    return sorted(
        {cidr for p in permissions if p.allows_tcp(port) for cidr in (*p.cidrs, *p.ipv6_cidrs)}
    )


def _no_group(layout: Layout, rule: Rule) -> Finding | None:
    if layout.missing_groups:
        return rule.fail(
            f"{', '.join(layout.missing_groups)} not found in {layout.facts.vpc.id}",
            "name a security group of this VPC with --security-group",
        )
    if not layout.groups:
        return rule.fail(
            f"no security group to check{layout.groups_chosen}",
            "name the agent's security group with --security-group, or tag it "
            f"{VENDOR_TAG_KEY}={layout.request.vendor}",
        )
    return None


def security_group_ingress(layout: Layout) -> Finding:
    if missing := _no_group(layout, SG_INGRESS):
        return missing
    closed = [sg for sg in layout.groups if not _sources(sg.ingress, HTTPS_PORT)]
    if closed:
        cidr = layout.vpc_cidrs[0] if layout.vpc_cidrs else ANYWHERE
        return SG_INGRESS.fail(
            f"no inbound TCP {HTTPS_PORT} in {', '.join(sg.id for sg in closed)}"
            + layout.groups_chosen,
            " && ".join(ingress_fix(sg.id, HTTPS_PORT, cidr) for sg in closed),
        )
    return SG_INGRESS.ok(
        "; ".join(
            f"{sg.id}: from {', '.join(_sources(sg.ingress, HTTPS_PORT))}" for sg in layout.groups
        )
        + layout.groups_chosen
    )


def security_group_egress(layout: Layout) -> Finding:
    if missing := _no_group(layout, SG_EGRESS):
        return missing
    closed = [sg for sg in layout.groups if not _sources(sg.egress, HTTPS_PORT)]
    if closed:
        return SG_EGRESS.fail(
            f"no outbound TCP {HTTPS_PORT} in {', '.join(sg.id for sg in closed)}"
            + layout.groups_chosen,
            " && ".join(
                f"aws ec2 authorize-security-group-egress --group-id {sg.id} --ip-permissions "
                f"IpProtocol=tcp,FromPort={HTTPS_PORT},ToPort={HTTPS_PORT},"
                f"IpRanges=[{{CidrIp={ANYWHERE}}}]"
                for sg in closed
            ),
        )
    parts = []
    for sg in layout.groups:
        allowed = _sources(sg.egress, HTTPS_PORT)
        narrow = "" if ANYWHERE in allowed else " (not 0.0.0.0/0: only a private link is reachable)"
        parts.append(f"{sg.id}: to {', '.join(allowed)}{narrow}")
    return SG_EGRESS.ok("; ".join(parts) + layout.groups_chosen)
