"""What the check knows about a VPC: plain frozen dataclasses, filled in by :mod:`agent.vpc.aws`
from Describe/List answers (or by a test, or later by ``doctor``), read by the pure rules.

Only the fields a rule reads are kept. Names follow the EC2 and Route 53 APIs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

Tags = Mapping[str, str]

ALL_PROTOCOLS: Final = "-1"
TCP_PROTOCOLS: Final = frozenset({"tcp", "6"})


@dataclass(frozen=True, kw_only=True)
class CidrBlock:
    cidr: str
    association_id: str = ""
    """Needed to disassociate a secondary block (the fix for an extra or IPv6 block)."""


@dataclass(frozen=True, kw_only=True)
class Vpc:
    id: str
    cidr_blocks: tuple[CidrBlock, ...]
    """IPv4 blocks in the ``associated`` state, primary first."""
    ipv6_cidr_blocks: tuple[CidrBlock, ...] = ()
    dns_support: bool
    dns_hostnames: bool
    tags: Tags = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Subnet:
    id: str
    cidr: str
    availability_zone: str
    tags: Tags = field(default_factory=dict)

    @property
    def prefix(self) -> int:
        return ipaddress.IPv4Network(self.cidr).prefixlen


@dataclass(frozen=True, kw_only=True)
class Route:
    destination: str
    """An IPv4 or IPv6 CIDR, or a prefix-list id."""
    target: str
    """``local``, ``igw-…``, ``nat-…``, ``vpce-…``, ``eni-…``, ``tgw-…``, ``pcx-…``."""
    state: str = "active"
    """``active`` or ``blackhole`` (the target is gone)."""

    @property
    def is_default(self) -> bool:
        return self.destination == "0.0.0.0/0"


@dataclass(frozen=True, kw_only=True)
class RouteTable:
    id: str
    main: bool
    """The VPC's main table: it routes every subnet not explicitly associated elsewhere."""
    subnet_ids: tuple[str, ...]
    routes: tuple[Route, ...]
    tags: Tags = field(default_factory=dict)

    def default_route(self) -> Route | None:
        return next((route for route in self.routes if route.is_default), None)


@dataclass(frozen=True, kw_only=True)
class NatGateway:
    id: str
    subnet_id: str
    state: str
    """``pending``, ``available``, ``deleting``, ``deleted`` or ``failed``."""
    connectivity: str = "public"
    tags: Tags = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class InternetGateway:
    id: str
    tags: Tags = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Permission:
    """One entry of a security group's ``IpPermissions`` (inbound) or ``IpPermissionsEgress``."""

    protocol: str
    """``tcp``, ``udp``, ``icmp``, a protocol number, or ``-1`` (all traffic)."""
    from_port: int | None = None
    to_port: int | None = None
    cidrs: tuple[str, ...] = ()
    ipv6_cidrs: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    prefix_lists: tuple[str, ...] = ()

    def allows_tcp(self, port: int) -> bool:
        if self.protocol == ALL_PROTOCOLS:
            return True
        if self.protocol.lower() not in TCP_PROTOCOLS:
            return False
        if self.from_port is None or self.to_port is None:
            return False  # AWS always reports a TCP rule's ports; without them, assume nothing
        return self.from_port <= port <= self.to_port


@dataclass(frozen=True, kw_only=True)
class SecurityGroup:
    id: str
    name: str
    ingress: tuple[Permission, ...]
    egress: tuple[Permission, ...]
    tags: Tags = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    id: str
    type: str
    """``Interface``, ``Gateway``, ``GatewayLoadBalancer``, …"""
    service_name: str
    state: str
    private_dns_enabled: bool
    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    network_interface_ids: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    """The endpoint's own names (``DnsEntries``): regional and zonal."""
    tags: Tags = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EndpointService:
    name: str
    private_dns_names: tuple[str, ...] = ()
    """What private DNS, once enabled on an endpoint, makes resolve to it (may be ``*.x``)."""


@dataclass(frozen=True, kw_only=True)
class NetworkInterface:
    id: str
    subnet_id: str
    addresses: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class Record:
    name: str
    type: str
    values: tuple[str, ...] = ()
    alias_target: str | None = None
    """An alias record's target DNS name (answered like a CNAME that Route 53 follows)."""


@dataclass(frozen=True, kw_only=True)
class HostedZone:
    """A Route 53 private hosted zone associated with the VPC."""

    id: str
    name: str
    records: tuple[Record, ...]


@dataclass(frozen=True, kw_only=True)
class VpcFacts:
    """Everything the rules read about one VPC, fetched at one time."""

    region: str
    vpc: Vpc
    subnets: tuple[Subnet, ...] = ()
    route_tables: tuple[RouteTable, ...] = ()
    nat_gateways: tuple[NatGateway, ...] = ()
    internet_gateways: tuple[InternetGateway, ...] = ()
    security_groups: tuple[SecurityGroup, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    endpoint_services: tuple[EndpointService, ...] = ()
    network_interfaces: tuple[NetworkInterface, ...] = ()
    private_zones: tuple[HostedZone, ...] = ()

    def route_table_of(self, subnet_id: str) -> RouteTable | None:
        """The table that routes a subnet: its explicit association, else the main table."""
        for table in self.route_tables:
            if subnet_id in table.subnet_ids:
                return table
        return next((table for table in self.route_tables if table.main), None)

    def security_group(self, group_id: str) -> SecurityGroup | None:
        return next((sg for sg in self.security_groups if sg.id == group_id), None)

    def endpoint(self, endpoint_id: str) -> Endpoint | None:
        return next((ep for ep in self.endpoints if ep.id == endpoint_id), None)

    def interface_with(self, address: str) -> NetworkInterface | None:
        return next((eni for eni in self.network_interfaces if address in eni.addresses), None)
