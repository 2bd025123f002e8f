"""What a correct private link to the control plane is: one definition, shared by
``byoc-agent vpc check`` and ``doctor``. Pure functions; no DNS, sockets or AWS calls here.

A private link is correct when both hold:

1. **Resolution** (:func:`judge_resolution`, rule ``private-link-dns``): inside the VPC, the
   host the agent dials resolves, and only to addresses within the VPC's IPv4 CIDR blocks.
2. **Reachability** (:func:`judge_ingress`, rule ``private-link-443``): whatever holds each of
   those addresses (the endpoint's network interfaces) has a security group with an inbound
   rule for TCP on the dialled port (443) from a source containing the whole VPC CIDR. The
   vendor's FAQ: a private link that always times out is almost always a security group
   without inbound 443 from the VPC's CIDR.

What the agent dials (:func:`dial_target`): ``control_plane.connect_to`` when it is set (an
address, or a name to resolve), else the host of ``control_plane.url``. ``server_name`` only
changes the name TLS verifies, never where the agent connects.

How each caller gathers the inputs:

- ``vpc check`` resolves with :class:`agent.vpc.dns.VpcResolver` (the VPC's private hosted
  zones and endpoints as AWS describes them) and reads the security groups of the network
  interfaces that hold the addresses.
- ``doctor`` (on the host, inside the VPC) resolves with the host's resolver (getaddrinfo),
  takes the VPC's CIDR blocks from the instance metadata
  (``network/interfaces/macs/<mac>/vpc-ipv4-cidr-blocks``) and calls :func:`judge_resolution`.
  Without AWS credentials it cannot read security groups, so when a TCP connection to an
  address that passed resolution times out, it reports :func:`diagnose_timeout`: the same rule,
  the same fix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from agent.config import ControlPlaneConfig
from agent.vpc.findings import Finding, Rule
from agent.vpc.model import SecurityGroup

RESOLUTION: Final = Rule(
    "private-link-dns", "the control plane's name resolves to private addresses in the VPC"
)
INGRESS: Final = Rule("private-link-443", "the private link accepts 443 from the VPC's CIDR")
RULES: Final = (RESOLUTION, INGRESS)


@dataclass(frozen=True, kw_only=True)
class DialTarget:
    host: str
    port: int
    source: str
    """Where the host came from: ``control_plane.connect_to``, ``control_plane.url``, …"""

    @property
    def is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def dial_target(control_plane: ControlPlaneConfig) -> DialTarget:
    """The host and port the agent connects to (when it does not go through a proxy)."""
    if control_plane.connect_to is not None:
        host, port = control_plane.connect_to
        return DialTarget(host=host, port=port, source="control_plane.connect_to")
    return DialTarget(host=control_plane.host, port=control_plane.port, source="control_plane.url")


def private_endpoint_configured(control_plane: ControlPlaneConfig) -> bool:
    """Whether the configuration dials a private endpoint (``connect_to``): ``doctor`` then runs
    both judgements; ``vpc check --config`` runs them whatever the configuration says."""
    return control_plane.connect_to is not None


def _networks(vpc_cidrs: Sequence[str]) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(cidr) for cidr in vpc_cidrs]


def _inside(address: str, networks: Sequence[ipaddress.IPv4Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)


def judge_resolution(
    target: DialTarget,
    addresses: Sequence[str],
    vpc_cidrs: Sequence[str],
    *,
    route: str = "",
    fix: str = "",
) -> Finding:
    """Rule 1. ``addresses`` is what ``target.host`` resolved to inside the VPC (the host itself
    when it is an address); ``route`` says how (a CNAME chain, for the report); ``fix`` replaces
    the generic advice when the caller knows more (which zone lacks which record)."""
    networks = _networks(vpc_cidrs)
    cidrs = ", ".join(vpc_cidrs)
    what = f"{target.host} ({target.source})"
    how = f": {route}" if route else ""
    generic = (
        f"make {target.host} resolve inside the VPC to the endpoint's addresses: a private "
        "hosted zone associated with the VPC with a CNAME to the endpoint's DNS name "
        "(`byoc-agent vpc template --private-zone`), or private DNS enabled on the endpoint"
    )
    if target.is_address:
        addresses = [target.host]
    if not addresses:
        return RESOLUTION.fail(f"{what} does not resolve in the VPC{how}", fix or generic)
    outside = [address for address in addresses if not _inside(address, networks)]
    if outside:
        return RESOLUTION.fail(
            f"{what} resolves to {', '.join(outside)}, outside the VPC's {cidrs}{how}",
            fix
            or (
                f"point {target.source} at the endpoint's private address"
                if target.is_address
                else generic
            ),
        )
    shown = route or f"{target.host} -> {', '.join(addresses)}"
    return RESOLUTION.ok(f"{shown} (in {cidrs}; {target.source})")


@dataclass(frozen=True, kw_only=True)
class Holder:
    """An address the private link resolves to, and the security groups of whatever holds it
    (``None``: nothing in the VPC holds that address)."""

    address: str
    port: int
    holder: str = ""
    """The network interface (and endpoint) holding it, for the report."""
    groups: tuple[SecurityGroup, ...] | None = None


def _covers(group: SecurityGroup, port: int, network: ipaddress.IPv4Network) -> bool:
    return any(
        permission.allows_tcp(port)
        and any(network.subnet_of(ipaddress.IPv4Network(cidr)) for cidr in permission.cidrs)
        for permission in group.ingress
    )


def judge_ingress(holders: Sequence[Holder], vpc_cidrs: Sequence[str]) -> Finding:
    """Rule 2: every address the link resolves to accepts TCP on its port from the whole VPC
    CIDR (every block of it), through at least one of the holder's security groups. A rule
    whose source is another security group or a prefix list does not count: the requirement
    is the CIDR, which is also what admits an agent anywhere in the VPC."""
    networks = _networks(vpc_cidrs)
    problems: list[str] = []
    fixes: list[str] = []
    seen: list[str] = []
    for holder in holders:
        if holder.groups is None:
            problems.append(f"no network interface in the VPC holds {holder.address}")
            continue
        seen.append(
            f"{holder.address}:{holder.port} {holder.holder} "
            f"[{', '.join(group.id for group in holder.groups) or 'no security group'}]"
        )
        for network in networks:
            if not any(_covers(group, holder.port, network) for group in holder.groups):
                opened = _opened_sources(holder.groups, holder.port)
                problems.append(
                    f"{holder.address}:{holder.port} ({holder.holder}) does not accept TCP "
                    f"{holder.port} from {network}"
                    + (f" (only from {', '.join(opened)})" if opened else "")
                )
                if holder.groups:
                    fixes.append(ingress_fix(holder.groups[0].id, holder.port, str(network)))
                else:
                    fixes.append(
                        f"attach a security group to {holder.holder} that allows TCP "
                        f"{holder.port} from {network}"
                    )
    if not holders:
        problems.append("the private link resolves to no address")
    if problems:
        fix = " && ".join(dict.fromkeys(fixes)) or (
            "point the name at the endpoint's network interfaces (the CNAME to its DNS name)"
        )
        return INGRESS.fail("; ".join(problems), fix)
    return INGRESS.ok(
        f"{'; '.join(seen)} accept{'s' if len(seen) == 1 else ''} TCP from {', '.join(vpc_cidrs)}",
    )


def _opened_sources(groups: Sequence[SecurityGroup], port: int) -> list[str]:
    return sorted(
        {
            source
            for group in groups
            for permission in group.ingress
            if permission.allows_tcp(port)
            for source in (*permission.cidrs, *permission.groups, *permission.prefix_lists)
        }
    )


def ingress_fix(group_id: str, port: int, cidr: str) -> str:
    return (
        f"aws ec2 authorize-security-group-ingress --group-id {group_id} "
        f"--protocol tcp --port {port} --cidr {cidr}"
    )


def diagnose_timeout(target: DialTarget, address: str, vpc_cidrs: Sequence[str]) -> Finding:
    """For ``doctor``: TCP connections to ``address`` (which passed :func:`judge_resolution`)
    time out. The same rule as :func:`judge_ingress`, with the fix it would give."""
    cidrs = ", ".join(vpc_cidrs)
    return INGRESS.fail(
        f"TCP connections to {address}:{target.port} ({target.host}) time out",
        f"allow inbound TCP {target.port} from the VPC's CIDR ({cidrs}) in the endpoint's "
        f"security group: {ingress_fix('<endpoint-sg>', target.port, vpc_cidrs[0])}",
    )
