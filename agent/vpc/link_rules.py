"""Rules on the optional private link: the interface endpoint (``--endpoint``), and the two
judgements of :mod:`agent.vpc.private_link` fed from AWS's description of the VPC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from agent.vpc import private_link
from agent.vpc.dns import Answer, Source, VpcResolver, probe_name
from agent.vpc.findings import Finding, Rule
from agent.vpc.layout import Layout
from agent.vpc.model import Endpoint
from agent.vpc.private_link import INGRESS, RESOLUTION, DialTarget, Holder
from agent.vpc.requirements import HTTPS_PORT

ENDPOINT: Final = Rule("endpoint", "an available interface endpoint in this VPC")
ENDPOINT_PRIVATE_DNS: Final = Rule("endpoint-private-dns", "private DNS enabled on the endpoint")
ENDPOINT_SUBNETS: Final = Rule("endpoint-subnets", "the endpoint in the private subnets")
ENDPOINT_GROUP: Final = Rule("endpoint-security-group", "the endpoint uses the security group")
RULES: Final = (ENDPOINT, ENDPOINT_PRIVATE_DNS, ENDPOINT_SUBNETS, ENDPOINT_GROUP)


def endpoint_rules(layout: Layout) -> list[Finding]:
    wanted = layout.request.endpoint_id
    endpoint = layout.endpoint
    if wanted is None:
        return [rule.skip("no --endpoint given") for rule in RULES]
    if endpoint is None:
        return [
            ENDPOINT.fail(
                f"{wanted} is not an endpoint of {layout.facts.vpc.id}",
                "create an interface endpoint to the vendor's endpoint service in this VPC "
                "(`byoc-agent vpc template --endpoint-service`)",
            ),
            *(rule.skip(f"no endpoint {wanted}") for rule in RULES[1:]),
        ]
    return [
        _endpoint_state(endpoint),
        _endpoint_private_dns(endpoint),
        _endpoint_subnets(layout, endpoint),
        _endpoint_group(layout, endpoint),
    ]


def _endpoint_state(endpoint: Endpoint) -> Finding:
    found = f"{endpoint.id} {endpoint.type} to {endpoint.service_name}, {endpoint.state}"
    if endpoint.type != "Interface":
        return ENDPOINT.fail(found, "create an Interface endpoint to the vendor's service")
    if endpoint.state != "available":
        return ENDPOINT.fail(
            found,
            "wait until it is available; if it stays pendingAcceptance, ask the vendor to "
            "accept the endpoint connection",
        )
    return ENDPOINT.ok(found)


def _endpoint_private_dns(endpoint: Endpoint) -> Finding:
    if endpoint.private_dns_enabled:
        return ENDPOINT_PRIVATE_DNS.ok(f"enabled on {endpoint.id}")
    return ENDPOINT_PRIVATE_DNS.fail(
        f"disabled on {endpoint.id}",
        f"aws ec2 modify-vpc-endpoint --vpc-endpoint-id {endpoint.id} --private-dns-enabled",
    )


def _endpoint_subnets(layout: Layout, endpoint: Endpoint) -> Finding:
    private = [subnet.id for subnet in layout.private]
    absent = [i for i in private if i not in endpoint.subnet_ids]
    extra = [i for i in endpoint.subnet_ids if i not in private]
    found = f"{endpoint.id} in {', '.join(endpoint.subnet_ids) or 'no subnet'}"
    if not absent and not extra:
        return ENDPOINT_SUBNETS.ok(found)
    command = f"aws ec2 modify-vpc-endpoint --vpc-endpoint-id {endpoint.id}"
    if absent:
        found += f"; not in private {', '.join(absent)}"
        command += f" --add-subnet-ids {' '.join(absent)}"
    if extra:
        found += f"; in non-private {', '.join(extra)}"
        command += f" --remove-subnet-ids {' '.join(extra)}"
    return ENDPOINT_SUBNETS.fail(found, command)


def _endpoint_group(layout: Layout, endpoint: Endpoint) -> Finding:
    found = f"{endpoint.id} uses {', '.join(endpoint.security_group_ids) or 'no security group'}"
    if not layout.groups:
        return ENDPOINT_GROUP.skip(f"no security group to compare{layout.groups_chosen}")
    lacking = [sg.id for sg in layout.groups if sg.id not in endpoint.security_group_ids]
    if lacking:
        return ENDPOINT_GROUP.fail(
            f"{found}, not {', '.join(lacking)}",
            f"aws ec2 modify-vpc-endpoint --vpc-endpoint-id {endpoint.id} "
            f"--add-security-group-ids {' '.join(lacking)}",
        )
    return ENDPOINT_GROUP.ok(found + layout.groups_chosen)


def private_link_rules(layout: Layout) -> list[Finding]:
    facts, endpoint = layout.facts, layout.endpoint
    resolver = VpcResolver(
        zones=facts.private_zones,
        endpoints=facts.endpoints,
        services=facts.endpoint_services,
        interfaces=facts.network_interfaces,
        private_dns=facts.vpc.dns_support and facts.vpc.dns_hostnames,
    )
    cidrs = layout.vpc_cidrs
    targets = list(layout.request.targets)
    if not targets and endpoint is not None:
        # Nothing named: judge every name in the VPC's private DNS that leads to the endpoint.
        targets = [
            DialTarget(host=probe_name(name), port=HTTPS_PORT, source=f"record {name}")
            for name in resolver.names_leading_to(endpoint)
        ]
        if not targets:
            return [
                RESOLUTION.fail(
                    f"nothing in {facts.vpc.id}'s private DNS leads to {endpoint.id}",
                    "enable private DNS on the endpoint (if the vendor's service has a private "
                    "DNS name), or create a private hosted zone associated with the VPC with a "
                    "CNAME to the endpoint's DNS name (`byoc-agent vpc template "
                    "--private-zone`); or name the host with --domain",
                ),
                _ingress(layout, []),
            ]
    if not targets:
        reason = "no private link to check (--endpoint, --domain or --config)"
        return [RESOLUTION.skip(reason), INGRESS.skip(reason)]
    judgements: list[Finding] = []
    reached: list[tuple[str, int]] = []
    for target in targets:
        if target.is_address:
            judgements.append(private_link.judge_resolution(target, [], cidrs))
            reached.append((target.host, target.port))
            continue
        answer = resolver.resolve(target.host)
        addresses = answer.addresses if answer.source is Source.PRIVATE else ()
        judgements.append(
            private_link.judge_resolution(
                target, addresses, cidrs, route=answer.describe(), fix=_dns_fix(answer)
            )
        )
        reached.extend((address, target.port) for address in addresses)
    return [_merge(judgements), _ingress(layout, reached)]


def _dns_fix(answer: Answer) -> str:
    if answer.source is not Source.NXDOMAIN:
        return ""
    zone = answer.chain[-1].partition(" [")[2].rstrip("]")
    return (
        f"add a record for {answer.name} to {zone}: a CNAME to the endpoint's DNS name (or a "
        "wildcard record covering it)"
    )


def _ingress(layout: Layout, reached: Sequence[tuple[str, int]]) -> Finding:
    """Rule 2 over every address the names reached and, with ``--endpoint``, every address of
    the endpoint itself (so that a broken record does not hide a closed security group)."""
    facts = layout.facts
    pairs = list(dict.fromkeys(reached))
    if layout.endpoint is not None:
        for interface in facts.network_interfaces:
            if interface.id in layout.endpoint.network_interface_ids:
                pairs.extend(
                    (address, HTTPS_PORT)
                    for address in interface.addresses
                    if all(address != seen for seen, _ in pairs)
                )
    holders = []
    for address, port in pairs:
        eni = facts.interface_with(address)
        if eni is None:
            holders.append(Holder(address=address, port=port))
            continue
        owner = next((e.id for e in facts.endpoints if eni.id in e.network_interface_ids), "")
        groups = tuple(sg for i in eni.security_group_ids if (sg := facts.security_group(i)))
        label = f"{eni.id} of {owner}" if owner else eni.id
        holders.append(Holder(address=address, port=port, holder=label, groups=groups))
    return private_link.judge_ingress(holders, layout.vpc_cidrs)


def _merge(findings: Sequence[Finding]) -> Finding:
    """Several names judged by one rule make one line, failing if any failed."""
    if len(findings) == 1:
        return findings[0]
    bad = [f for f in findings if f.failed]
    if bad:
        return RESOLUTION.fail(
            "; ".join(f.found for f in bad), " && ".join(dict.fromkeys(f.fix for f in bad))
        )
    return RESOLUTION.ok("; ".join(f.found for f in findings))
