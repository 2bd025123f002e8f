"""What a check is asked (:class:`CheckRequest`) and how the VPC's parts are read before any
rule runs (:class:`Layout`): which subnets are public, which private, which NAT gateways are
live, which security groups the rules judge.

A subnet is *public* when its route table (its explicit association, else the VPC's main
table) sends traffic to an internet gateway; every other subnet is *private*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from agent.vpc.model import Endpoint, NatGateway, SecurityGroup, Subnet, VpcFacts
from agent.vpc.private_link import DialTarget
from agent.vpc.requirements import DEFAULT_VENDOR, VENDOR_TAG_KEY

TEMPLATE_HINT: Final = "`byoc-agent vpc template` builds a VPC that meets every rule"
LIVE_NAT_STATES: Final = frozenset({"pending", "available"})


@dataclass(frozen=True, kw_only=True)
class CheckRequest:
    vpc_id: str
    security_group_ids: tuple[str, ...] = ()
    """The agent's security group(s); if none, the endpoint's, else those with the vendor tag."""
    endpoint_id: str | None = None
    vendor: str = DEFAULT_VENDOR
    targets: tuple[DialTarget, ...] = ()
    """What the agent dials over the private link (``--domain``, ``--config``)."""


@dataclass(frozen=True)
class Layout:
    facts: VpcFacts
    request: CheckRequest
    public: tuple[Subnet, ...]
    private: tuple[Subnet, ...]
    nats: tuple[NatGateway, ...]
    """NAT gateways that are pending or available (not deleted or failed)."""
    groups: tuple[SecurityGroup, ...]
    """The security groups the rules judge."""
    groups_chosen: str
    """How they were chosen, when not named on the command line (for the report)."""
    missing_groups: tuple[str, ...]
    """Named on the command line but not in this VPC."""
    endpoint: Endpoint | None

    @classmethod
    def of(cls, facts: VpcFacts, request: CheckRequest) -> Layout:
        public: list[Subnet] = []
        private: list[Subnet] = []
        for subnet in facts.subnets:
            table = facts.route_table_of(subnet.id)
            to_igw = table is not None and any(
                route.target.startswith("igw-") and route.state == "active"
                for route in table.routes
            )
            (public if to_igw else private).append(subnet)
        endpoint = facts.endpoint(request.endpoint_id) if request.endpoint_id else None
        if request.security_group_ids:
            ids, how = request.security_group_ids, ""
        elif endpoint is not None and endpoint.security_group_ids:
            ids, how = endpoint.security_group_ids, " (the endpoint's; no --security-group given)"
        else:
            ids = tuple(
                sg.id
                for sg in facts.security_groups
                if sg.tags.get(VENDOR_TAG_KEY) == request.vendor
            )
            how = f" (tagged {VENDOR_TAG_KEY}={request.vendor}; no --security-group given)"
        return cls(
            facts=facts,
            request=request,
            public=tuple(public),
            private=tuple(private),
            nats=tuple(nat for nat in facts.nat_gateways if nat.state in LIVE_NAT_STATES),
            groups=tuple(sg for i in ids if (sg := facts.security_group(i))),
            groups_chosen=how,
            missing_groups=tuple(i for i in ids if facts.security_group(i) is None),
            endpoint=endpoint,
        )

    @property
    def vpc_cidrs(self) -> list[str]:
        return [block.cidr for block in self.facts.vpc.cidr_blocks]


def describe_subnets(subnets: Sequence[Subnet]) -> str:
    return ", ".join(f"{s.id} {s.cidr} ({s.availability_zone})" for s in subnets) or "none"
