"""The only module of :mod:`agent.vpc` that talks to AWS: read-only Describe/List calls made
with boto3, turned into :class:`agent.vpc.model.VpcFacts`; and the least-privilege IAM policy
those calls need (:func:`policy_document`, shipped as ``deploy/aws/vpc-check-policy.json``).

boto3 is the optional ``aws`` extra: it is imported when a check runs, never by the agent.
Errors are translated here (``raise ... from``): see the tree in :mod:`agent.vpc`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from agent.vpc.errors import AwsAccessError, AwsUnavailable, VpcNotFound
from agent.vpc.layout import CheckRequest
from agent.vpc.model import (
    CidrBlock,
    Endpoint,
    EndpointService,
    HostedZone,
    InternetGateway,
    NatGateway,
    NetworkInterface,
    Permission,
    Record,
    Route,
    RouteTable,
    SecurityGroup,
    Subnet,
    Tags,
    Vpc,
    VpcFacts,
)

if TYPE_CHECKING:
    from boto3.session import Session
    from types_boto3_ec2.client import EC2Client
    from types_boto3_ec2.type_defs import FilterTypeDef, IpPermissionOutputTypeDef, TagTypeDef
    from types_boto3_route53.client import Route53Client
    from types_boto3_route53.literals import VPCRegionType

READ_ACTIONS: Final = (
    "ec2:DescribeInternetGateways",
    "ec2:DescribeNatGateways",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcAttribute",
    "ec2:DescribeVpcEndpointServices",
    "ec2:DescribeVpcEndpoints",
    "ec2:DescribeVpcs",
    "route53:ListHostedZonesByVPC",
    "route53:ListResourceRecordSets",
)
"""Every API operation :func:`fetch_facts` may call, as IAM actions (tests hold it to that)."""
POLICY_FILE: Final = "deploy/aws/vpc-check-policy.json"
ACCESS_DENIED: Final = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure"}
)
NOT_FOUND: Final = frozenset(
    {"InvalidVpcID.NotFound", "InvalidVpcId.NotFound", "InvalidVpcId.Malformed"}
)


def policy_document() -> dict[str, Any]:
    """The IAM policy ``vpc check`` needs: read-only, nothing else. EC2's Describe actions and
    Route 53's ListHostedZonesByVPC take no resource-level restriction, hence ``*``."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ByocVpcCheckReadOnly",
                "Effect": "Allow",
                "Action": list(READ_ACTIONS),
                "Resource": "*",
            }
        ],
    }


def session(region: str | None = None) -> Session:
    """A boto3 session (credentials and region from the usual chain: environment, profile,
    instance role). Raises :class:`AwsUnavailable` without the ``aws`` extra."""
    try:
        boto3 = importlib.import_module("boto3")
    except ImportError as exc:
        raise AwsUnavailable(
            "boto3 is not installed: pip install 'byoc-agent[aws]' (only `vpc check` needs it)"
        ) from exc
    with _translated("the AWS session"):  # e.g. an AWS_PROFILE that does not exist
        made: Session = boto3.session.Session(region_name=region)
    return made


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """botocore's exceptions become the package's, with a sentence a person can act on."""
    botocore = importlib.import_module("botocore.exceptions")
    try:
        yield
    except botocore.ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        operation = exc.operation_name
        if code in NOT_FOUND:
            raise VpcNotFound(f"{what}: {message or code}") from exc
        if code in ACCESS_DENIED:
            raise AwsAccessError(
                f"{operation}: access denied ({code}); the check needs the read-only actions "
                f"in {POLICY_FILE} (`byoc-agent vpc policy`)"
            ) from exc
        raise AwsAccessError(f"{operation}: {code}: {message}") from exc
    except botocore.NoCredentialsError as exc:
        raise AwsAccessError(
            "no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or "
            "run where an instance role applies"
        ) from exc
    except botocore.BotoCoreError as exc:  # endpoint unreachable, bad region, ...
        raise AwsAccessError(f"{what}: {exc}") from exc


def fetch_facts(aws: Session, request: CheckRequest) -> VpcFacts:
    region = aws.region_name
    if not region:
        raise AwsAccessError("no AWS region: pass --region or set AWS_REGION")
    with _translated(f"{request.vpc_id} in {region}"):
        ec2: EC2Client = aws.client("ec2")
        route53: Route53Client = aws.client("route53")
        vpc_filter: list[FilterTypeDef] = [{"Name": "vpc-id", "Values": [request.vpc_id]}]
        vpc = _vpc(ec2, request.vpc_id)
        endpoints = [
            _endpoint(e)
            for page in ec2.get_paginator("describe_vpc_endpoints").paginate(Filters=vpc_filter)
            for e in page.get("VpcEndpoints", [])
        ]
        return VpcFacts(
            region=region,
            vpc=vpc,
            subnets=tuple(
                Subnet(
                    id=s["SubnetId"],
                    cidr=s["CidrBlock"],
                    availability_zone=s["AvailabilityZone"],
                    tags=_tags(s.get("Tags")),
                )
                for page in ec2.get_paginator("describe_subnets").paginate(Filters=vpc_filter)
                for s in page["Subnets"]
            ),
            route_tables=tuple(
                _route_table(t)
                for page in ec2.get_paginator("describe_route_tables").paginate(Filters=vpc_filter)
                for t in page["RouteTables"]
            ),
            nat_gateways=tuple(
                NatGateway(
                    id=n["NatGatewayId"],
                    subnet_id=n.get("SubnetId", ""),
                    state=n.get("State", ""),
                    connectivity=n.get("ConnectivityType", "public"),
                    tags=_tags(n.get("Tags")),
                )
                # botocore's model calls this one parameter Filter (the stubs say Filters)
                for page in ec2.get_paginator("describe_nat_gateways").paginate(
                    Filter=vpc_filter  # type: ignore[call-arg]
                )
                for n in page["NatGateways"]
            ),
            internet_gateways=tuple(
                InternetGateway(id=g["InternetGatewayId"], tags=_tags(g.get("Tags")))
                for page in ec2.get_paginator("describe_internet_gateways").paginate(
                    Filters=[{"Name": "attachment.vpc-id", "Values": [request.vpc_id]}]
                )
                for g in page["InternetGateways"]
            ),
            security_groups=tuple(
                SecurityGroup(
                    id=g["GroupId"],
                    name=g.get("GroupName", ""),
                    ingress=_permissions(g.get("IpPermissions", [])),
                    egress=_permissions(g.get("IpPermissionsEgress", [])),
                    tags=_tags(g.get("Tags")),
                )
                for page in ec2.get_paginator("describe_security_groups").paginate(
                    Filters=vpc_filter
                )
                for g in page["SecurityGroups"]
            ),
            endpoints=tuple(endpoints),
            endpoint_services=tuple(_services(ec2, endpoints)),
            network_interfaces=tuple(
                NetworkInterface(
                    id=i["NetworkInterfaceId"],
                    subnet_id=i.get("SubnetId", ""),
                    addresses=tuple(
                        a["PrivateIpAddress"]
                        for a in i.get("PrivateIpAddresses", [])
                        if "PrivateIpAddress" in a
                    ),
                    security_group_ids=tuple(g["GroupId"] for g in i.get("Groups", [])),
                    description=i.get("Description", ""),
                )
                for page in ec2.get_paginator("describe_network_interfaces").paginate(
                    Filters=vpc_filter
                )
                for i in page["NetworkInterfaces"]
            ),
            private_zones=tuple(_private_zones(route53, request.vpc_id, region)),
        )


def _tags(tags: Iterable[TagTypeDef] | None) -> Tags:
    return {tag["Key"]: tag.get("Value", "") for tag in tags or () if "Key" in tag}


def _vpc(ec2: EC2Client, vpc_id: str) -> Vpc:
    found = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"]
    if not found:
        raise VpcNotFound(f"{vpc_id} not found")
    vpc = found[0]
    primary = vpc.get("CidrBlock", "")
    blocks = sorted(
        (
            CidrBlock(cidr=b["CidrBlock"], association_id=b.get("AssociationId", ""))
            for b in vpc.get("CidrBlockAssociationSet", [])
            if b.get("CidrBlockState", {}).get("State") == "associated"
        ),
        key=lambda block: block.cidr != primary,
    )
    ipv6 = tuple(
        CidrBlock(cidr=b.get("Ipv6CidrBlock", ""), association_id=b.get("AssociationId", ""))
        for b in vpc.get("Ipv6CidrBlockAssociationSet", [])
        if b.get("Ipv6CidrBlockState", {}).get("State") == "associated"
    )
    support = ec2.describe_vpc_attribute(VpcId=vpc_id, Attribute="enableDnsSupport")
    hostnames = ec2.describe_vpc_attribute(VpcId=vpc_id, Attribute="enableDnsHostnames")
    return Vpc(
        id=vpc_id,
        cidr_blocks=tuple(blocks),
        ipv6_cidr_blocks=ipv6,
        dns_support=bool(support.get("EnableDnsSupport", {}).get("Value")),
        dns_hostnames=bool(hostnames.get("EnableDnsHostnames", {}).get("Value")),
        tags=_tags(vpc.get("Tags")),
    )


ROUTE_TARGETS: Final = (
    "GatewayId",
    "NatGatewayId",
    "NetworkInterfaceId",
    "TransitGatewayId",
    "VpcPeeringConnectionId",
    "InstanceId",
    "EgressOnlyInternetGatewayId",
    "LocalGatewayId",
    "CarrierGatewayId",
    "CoreNetworkArn",
)


def _route_table(table: Mapping[str, Any]) -> RouteTable:
    associations = [
        a
        for a in table.get("Associations", [])
        if a.get("AssociationState", {}).get("State", "associated") == "associated"
    ]
    routes = []
    for route in table.get("Routes", []):
        destination = (
            route.get("DestinationCidrBlock")
            or route.get("DestinationIpv6CidrBlock")
            or route.get("DestinationPrefixListId", "")
        )
        target = next((str(route[key]) for key in ROUTE_TARGETS if route.get(key)), "")
        routes.append(Route(destination=destination, target=target, state=route.get("State", "")))
    return RouteTable(
        id=table["RouteTableId"],
        main=any(a.get("Main") for a in associations),
        subnet_ids=tuple(a["SubnetId"] for a in associations if a.get("SubnetId")),
        routes=tuple(routes),
        tags=_tags(table.get("Tags")),
    )


def _permissions(entries: Sequence[IpPermissionOutputTypeDef]) -> tuple[Permission, ...]:
    return tuple(
        Permission(
            protocol=str(entry.get("IpProtocol", "")),
            from_port=entry.get("FromPort"),
            to_port=entry.get("ToPort"),
            cidrs=tuple(r["CidrIp"] for r in entry.get("IpRanges", []) if "CidrIp" in r),
            ipv6_cidrs=tuple(r["CidrIpv6"] for r in entry.get("Ipv6Ranges", []) if "CidrIpv6" in r),
            groups=tuple(p["GroupId"] for p in entry.get("UserIdGroupPairs", []) if "GroupId" in p),
            prefix_lists=tuple(
                p["PrefixListId"] for p in entry.get("PrefixListIds", []) if "PrefixListId" in p
            ),
        )
        for entry in entries
    )


def _endpoint(endpoint: Mapping[str, Any]) -> Endpoint:
    return Endpoint(
        id=endpoint["VpcEndpointId"],
        type=str(endpoint.get("VpcEndpointType", "")),
        service_name=endpoint.get("ServiceName", ""),
        state=str(endpoint.get("State", "")),
        private_dns_enabled=bool(endpoint.get("PrivateDnsEnabled")),
        subnet_ids=tuple(endpoint.get("SubnetIds", [])),
        security_group_ids=tuple(g["GroupId"] for g in endpoint.get("Groups", [])),
        network_interface_ids=tuple(endpoint.get("NetworkInterfaceIds", [])),
        dns_names=tuple(e["DnsName"] for e in endpoint.get("DnsEntries", []) if "DnsName" in e),
        tags=_tags(endpoint.get("Tags")),
    )


def _services(ec2: EC2Client, endpoints: Sequence[Endpoint]) -> Iterator[EndpointService]:
    """The private DNS names of the services behind interface endpoints with private DNS on.
    A service this account may not describe is skipped: its names are then not modelled."""
    botocore = importlib.import_module("botocore.exceptions")
    names = sorted({e.service_name for e in endpoints if e.private_dns_enabled and e.service_name})
    for name in names:
        try:
            details = ec2.describe_vpc_endpoint_services(ServiceNames=[name])["ServiceDetails"]
        except botocore.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidServiceName":
                continue
            raise
        for detail in details:
            private = {
                n["PrivateDnsName"]
                for n in detail.get("PrivateDnsNames", [])
                if n.get("PrivateDnsName")
            }
            if detail.get("PrivateDnsName"):
                private.add(detail["PrivateDnsName"])
            yield EndpointService(
                name=detail.get("ServiceName", name), private_dns_names=tuple(sorted(private))
            )


def _private_zones(route53: Route53Client, vpc_id: str, region: str) -> Iterator[HostedZone]:
    zones: list[tuple[str, str]] = []
    token: str | None = None
    while True:
        page = route53.list_hosted_zones_by_vpc(
            VPCId=vpc_id,
            VPCRegion=cast("VPCRegionType", region),
            **({"NextToken": token} if token else {}),
        )
        zones.extend((z["HostedZoneId"], z["Name"]) for z in page.get("HostedZoneSummaries", []))
        token = page.get("NextToken")
        if not token:
            break
    for zone_id, name in zones:
        records = [
            Record(
                name=r["Name"],
                type=r["Type"],
                values=tuple(v["Value"] for v in r.get("ResourceRecords", [])),
                alias_target=r["AliasTarget"]["DNSName"] if "AliasTarget" in r else None,
            )
            for page in route53.get_paginator("list_resource_record_sets").paginate(
                HostedZoneId=zone_id
            )
            for r in page["ResourceRecordSets"]
        ]
        yield HostedZone(id=zone_id.rsplit("/", 1)[-1], name=name, records=tuple(records))
