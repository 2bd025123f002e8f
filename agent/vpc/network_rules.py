"""Rules on the VPC itself, its subnets, its routes and its tags: pure functions of a
:class:`Layout`."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Final

from agent.vpc.findings import Finding, Rule
from agent.vpc.layout import TEMPLATE_HINT, Layout, describe_subnets
from agent.vpc.model import CidrBlock
from agent.vpc.requirements import (
    INTERNAL_ELB_TAG,
    PRIVATE_SUBNET_COUNT,
    PRIVATE_SUBNET_PREFIX,
    PUBLIC_SUBNET_PREFIX,
    VENDOR_TAG_KEY,
    VPC_PREFIX,
)

VPC_CIDR: Final = Rule("vpc-cidr", f"one IPv4 /{VPC_PREFIX} CIDR block")
IPV4_ONLY: Final = Rule("ipv4-only", "no IPv6 CIDR block (IPv4 only)")
DNS_RESOLUTION: Final = Rule("dns-resolution", "DNS resolution enabled")
DNS_HOSTNAMES: Final = Rule("dns-hostnames", "DNS hostnames enabled")
PUBLIC_SUBNET: Final = Rule(
    "public-subnet", f"one public /{PUBLIC_SUBNET_PREFIX} subnet (for the NAT gateway)"
)
NAT_GATEWAY: Final = Rule("nat-gateway", "one NAT gateway, in the public subnet")
PRIVATE_SUBNETS: Final = Rule(
    "private-subnets", f"{PRIVATE_SUBNET_COUNT} private /{PRIVATE_SUBNET_PREFIX} subnets"
)
PRIVATE_SUBNET_AZS: Final = Rule(
    "private-subnet-azs", "each private subnet in a different availability zone"
)
INTERNAL_ELB: Final = Rule(
    "internal-elb-tag", "private subnets tagged {}={}".format(*INTERNAL_ELB_TAG)
)
PRIVATE_NAT_ROUTE: Final = Rule(
    "private-nat-route", "private subnets route 0.0.0.0/0 to the NAT gateway"
)
VENDOR_TAG: Final = Rule("vendor-tag", f"the {VENDOR_TAG_KEY} tag on what was created for it")

RULES: Final = (
    VPC_CIDR,
    IPV4_ONLY,
    DNS_RESOLUTION,
    DNS_HOSTNAMES,
    PUBLIC_SUBNET,
    NAT_GATEWAY,
    PRIVATE_SUBNETS,
    PRIVATE_SUBNET_AZS,
    INTERNAL_ELB,
    PRIVATE_NAT_ROUTE,
)
"""In report order; :data:`VENDOR_TAG` comes after the security group's rules."""
NO_PRIVATE_SUBNET: Final = ("no private subnet", f"create the private subnets; {TEMPLATE_HINT}")


def _disassociate(blocks: tuple[CidrBlock, ...]) -> str:
    return " && ".join(
        f"aws ec2 disassociate-vpc-cidr-block --association-id {block.association_id}"
        for block in blocks
    )


def vpc_cidr(layout: Layout) -> Finding:
    blocks = layout.facts.vpc.cidr_blocks
    found = ", ".join(block.cidr for block in blocks) or "no IPv4 block"
    if not blocks or ipaddress.IPv4Network(blocks[0].cidr).prefixlen != VPC_PREFIX:
        return VPC_CIDR.fail(
            f"{found}: the VPC must be a /{VPC_PREFIX}",
            f"a VPC's primary CIDR cannot be changed: create a VPC with one /{VPC_PREFIX} "
            f"block (e.g. 10.0.0.0/{VPC_PREFIX}); {TEMPLATE_HINT}",
        )
    if len(blocks) > 1:
        return VPC_CIDR.fail(
            f"{found}: {len(blocks)} IPv4 blocks, the requirement is one",
            _disassociate(blocks[1:]),
        )
    return VPC_CIDR.ok(found)


def ipv4_only(layout: Layout) -> Finding:
    blocks = layout.facts.vpc.ipv6_cidr_blocks
    if blocks:
        return IPV4_ONLY.fail(f"IPv6 {', '.join(b.cidr for b in blocks)}", _disassociate(blocks))
    return IPV4_ONLY.ok("no IPv6 block")


def _attribute(layout: Layout, rule: Rule, on: bool, option: str) -> Finding:
    vpc = layout.facts.vpc.id
    if on:
        return rule.ok(f"enabled on {vpc}")
    return rule.fail(
        f"disabled on {vpc}", f"aws ec2 modify-vpc-attribute --vpc-id {vpc} --{option} Value=true"
    )


def dns_resolution(layout: Layout) -> Finding:
    return _attribute(layout, DNS_RESOLUTION, layout.facts.vpc.dns_support, "enable-dns-support")


def dns_hostnames(layout: Layout) -> Finding:
    return _attribute(layout, DNS_HOSTNAMES, layout.facts.vpc.dns_hostnames, "enable-dns-hostnames")


def public_subnet(layout: Layout) -> Finding:
    found = describe_subnets(layout.public)
    if len(layout.public) != 1:
        return PUBLIC_SUBNET.fail(
            f"{len(layout.public)} subnets routed to an internet gateway: {found}",
            f"keep exactly one subnet routed to the internet gateway, a /{PUBLIC_SUBNET_PREFIX} "
            f"holding the NAT gateway; {TEMPLATE_HINT}",
        )
    if layout.public[0].prefix != PUBLIC_SUBNET_PREFIX:
        return PUBLIC_SUBNET.fail(
            f"{found} is a /{layout.public[0].prefix}",
            f"a subnet's CIDR cannot be changed: create a /{PUBLIC_SUBNET_PREFIX} public subnet, "
            "move the NAT gateway there and delete this one",
        )
    return PUBLIC_SUBNET.ok(found)


def nat_gateway(layout: Layout) -> Finding:
    nats = layout.nats
    public = sorted(subnet.id for subnet in layout.public)
    found = ", ".join(f"{n.id} ({n.state}, {n.connectivity}) in {n.subnet_id}" for n in nats)
    if not nats:
        return NAT_GATEWAY.fail(
            "no NAT gateway",
            "aws ec2 allocate-address --domain vpc, then aws ec2 create-nat-gateway "
            f"--subnet-id {public[0] if public else '<public-subnet>'} --allocation-id <eipalloc>",
        )
    if len(nats) > 1:
        return NAT_GATEWAY.fail(f"{len(nats)} NAT gateways: {found}", "keep exactly one")
    nat = nats[0]
    if nat.connectivity != "public":
        return NAT_GATEWAY.fail(
            f"{found}: a private NAT gateway does not reach the internet",
            "create a public NAT gateway (with an Elastic IP) in the public subnet",
        )
    if nat.subnet_id not in public:
        return NAT_GATEWAY.fail(
            f"{found}: {nat.subnet_id} is not the public subnet",
            "create the NAT gateway in the public subnet (the one routed to the internet gateway)",
        )
    if nat.state != "available":
        return NAT_GATEWAY.fail(
            found, f"aws ec2 wait nat-gateway-available --nat-gateway-ids {nat.id}"
        )
    return NAT_GATEWAY.ok(found)


def private_subnets(layout: Layout) -> Finding:
    private = layout.private
    wrong = [s.id for s in private if s.prefix != PRIVATE_SUBNET_PREFIX]
    found = f"{len(private)} private: {describe_subnets(private)}"
    if len(private) != PRIVATE_SUBNET_COUNT or wrong:
        return PRIVATE_SUBNETS.fail(
            found + (f"; not /{PRIVATE_SUBNET_PREFIX}: {', '.join(wrong)}" if wrong else ""),
            f"a subnet's CIDR cannot be changed: create {PRIVATE_SUBNET_COUNT} private "
            f"/{PRIVATE_SUBNET_PREFIX} subnets, one per availability zone, and delete the others; "
            + TEMPLATE_HINT,
        )
    return PRIVATE_SUBNETS.ok(found)


def private_subnet_zones(layout: Layout) -> Finding:
    if not layout.private:
        return PRIVATE_SUBNET_AZS.fail(*NO_PRIVATE_SUBNET)
    zones = Counter(subnet.availability_zone for subnet in layout.private)
    shared = sorted(zone for zone, count in zones.items() if count > 1)
    if shared:
        return PRIVATE_SUBNET_AZS.fail(
            f"{describe_subnets(layout.private)}: more than one in {', '.join(shared)}",
            "a subnet cannot move: create the extra private subnet again in an availability "
            "zone that has none, then delete it here",
        )
    return PRIVATE_SUBNET_AZS.ok(f"{len(zones)} zones: {', '.join(sorted(zones))}")


def internal_elb_tag(layout: Layout) -> Finding:
    if not layout.private:
        return INTERNAL_ELB.fail(*NO_PRIVATE_SUBNET)
    key, value = INTERNAL_ELB_TAG
    missing = [s.id for s in layout.private if s.tags.get(key) != value]
    if missing:
        return INTERNAL_ELB.fail(
            f"not on {', '.join(missing)}",
            f"aws ec2 create-tags --resources {' '.join(missing)} --tags Key={key},Value={value}",
        )
    return INTERNAL_ELB.ok(f"on {', '.join(s.id for s in layout.private)}")


def private_nat_route(layout: Layout) -> Finding:
    if not layout.private:
        return PRIVATE_NAT_ROUTE.fail(*NO_PRIVATE_SUBNET)
    facts = layout.facts
    nat_ids = {nat.id for nat in layout.nats}
    nat = min(nat_ids, default="<nat-gateway-id>")
    routed_tables = [
        table.id
        for table in facts.route_tables
        if (route := table.default_route()) and route.target in nat_ids and route.state == "active"
    ]
    problems: list[str] = []
    fixes: list[str] = []
    routed: list[str] = []
    for subnet in layout.private:
        table = facts.route_table_of(subnet.id)
        if table is None:
            problems.append(f"{subnet.id}: no route table")
            continue
        route = table.default_route()
        if route is not None and route.target in nat_ids and route.state == "active":
            routed.append(f"{subnet.id} via {table.id}")
            continue
        sent = f"to {route.target} ({route.state})" if route else "nowhere"
        problems.append(
            f"{subnet.id}: {table.id}{' (main)' if table.main else ''} sends 0.0.0.0/0 {sent}"
        )
        if table.main and routed_tables:  # give it the table its siblings use
            fixes.append(
                f"aws ec2 associate-route-table --route-table-id {routed_tables[0]} "
                f"--subnet-id {subnet.id}"
            )
        else:
            fixes.append(
                f"aws ec2 {'replace-route' if route else 'create-route'} --route-table-id "
                f"{table.id} --destination-cidr-block 0.0.0.0/0 --nat-gateway-id {nat}"
            )
    if problems:
        return PRIVATE_NAT_ROUTE.fail("; ".join(problems), " && ".join(dict.fromkeys(fixes)))
    return PRIVATE_NAT_ROUTE.ok(", ".join(routed))


def vendor_tag(layout: Layout) -> Finding:
    """On what the project created: the VPC, subnets, route tables (not the main one, which AWS
    makes), internet and NAT gateways, the judged security groups and the endpoint."""
    facts, vendor = layout.facts, layout.request.vendor
    resources = [
        (facts.vpc.id, facts.vpc.tags),
        *((s.id, s.tags) for s in facts.subnets),
        *((t.id, t.tags) for t in facts.route_tables if not t.main),
        *((g.id, g.tags) for g in facts.internet_gateways),
        *((n.id, n.tags) for n in layout.nats),
        *((g.id, g.tags) for g in layout.groups),
        *([(layout.endpoint.id, layout.endpoint.tags)] if layout.endpoint else []),
    ]
    missing = [rid for rid, tags in resources if tags.get(VENDOR_TAG_KEY) != vendor]
    if missing:
        return VENDOR_TAG.fail(
            f"{VENDOR_TAG_KEY}={vendor} not on {', '.join(missing)}",
            f"aws ec2 create-tags --resources {' '.join(missing)} "
            f"--tags Key={VENDOR_TAG_KEY},Value={vendor}",
        )
    return VENDOR_TAG.ok(f"{VENDOR_TAG_KEY}={vendor} on all {len(resources)} resources")


def network_rules(layout: Layout) -> list[Finding]:
    return [
        vpc_cidr(layout),
        ipv4_only(layout),
        dns_resolution(layout),
        dns_hostnames(layout),
        public_subnet(layout),
        nat_gateway(layout),
        private_subnets(layout),
        private_subnet_zones(layout),
        internal_elb_tag(layout),
        private_nat_route(layout),
    ]
