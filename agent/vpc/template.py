"""The CloudFormation template that builds a VPC meeting every rule (``byoc-agent vpc template``).

The template is JSON (CloudFormation reads it natively; no YAML library at run time). Its
parameters: a name, the region's three availability zones, the VPC's CIDR and the subnets'
(computed here from the VPC's: three /18 private, one /24 public in the fourth quarter), the
vendor tag, where inbound 443 comes from, and the optional endpoint service and private zone.
Options given to :func:`build` become the parameters' defaults; the structure never changes.

Subnet CIDRs are parameters rather than ``Fn::Cidr``: CloudFormation supports ``Fn::Cidr``,
but moto (the AWS stand-in the tests deploy this template into) does not.

Checkov reports no finding on it; one that it may report later is either fixed or justified in
the resource's ``Metadata.checkov.skip`` (``id`` and ``comment``), which the tests require.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from agent.vpc.errors import TemplateError
from agent.vpc.requirements import (
    ANYWHERE,
    DEFAULT_VENDOR,
    HTTPS_PORT,
    INTERNAL_ELB_TAG,
    PRIVATE_SUBNET_COUNT,
    PRIVATE_SUBNET_PREFIX,
    PUBLIC_SUBNET_PREFIX,
    VENDOR_TAG_KEY,
    VPC_PREFIX,
)

OCTET: Final = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
NAME_PATTERN: Final = r"^[a-zA-Z][a-zA-Z0-9-]{0,31}$"
TAG_PATTERN: Final = r"^[a-zA-Z0-9 _.:/=+@-]{1,256}$"
SERVICE_PATTERN: Final = r"^$|^com\.amazonaws\.vpce\.[a-z0-9-]+\.vpce-svc-[0-9a-f]{8,17}$"
ZONE_PATTERN: Final = r"^$|^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
AZ_PATTERN: Final = re.compile(r"[a-z]{2}(-[a-z]+)+-\d[a-z]")


def cidr_pattern(prefix: int | None) -> str:
    """An AllowedPattern for an IPv4 CIDR with this prefix length (any length: ``None``)."""
    length = r"(3[0-2]|[12]?[0-9])" if prefix is None else str(prefix)
    return rf"^({OCTET}\.){{3}}{OCTET}/{length}$"


@dataclass(frozen=True, kw_only=True)
class SubnetPlan:
    public: str
    private: tuple[str, ...]

    @classmethod
    def of(cls, vpc_cidr: str) -> SubnetPlan:
        """Three /18 private subnets (the first three quarters of the /16) and a /24 public one
        (the first /24 of the fourth quarter)."""
        try:
            network = ipaddress.IPv4Network(vpc_cidr)
        except ValueError as exc:
            raise TemplateError(f"{vpc_cidr!r} is not an IPv4 network: {exc}") from exc
        if network.prefixlen != VPC_PREFIX:
            raise TemplateError(f"the VPC must be a /{VPC_PREFIX}, not {vpc_cidr}")
        quarters = list(network.subnets(new_prefix=PRIVATE_SUBNET_PREFIX))
        public = next(quarters[PRIVATE_SUBNET_COUNT].subnets(new_prefix=PUBLIC_SUBNET_PREFIX))
        return cls(
            public=str(public), private=tuple(str(q) for q in quarters[:PRIVATE_SUBNET_COUNT])
        )


@dataclass(frozen=True, kw_only=True)
class TemplateOptions:
    """Defaults for the template's parameters (all can still be changed at deploy time)."""

    name: str = "byoc"
    availability_zones: tuple[str, ...] = ()
    """Three zones of the region; none: chosen at deploy time."""
    cidr: str = f"10.0.0.0/{VPC_PREFIX}"
    vendor: str = DEFAULT_VENDOR
    https_ingress_cidr: str = ""
    """Where inbound 443 may come from; empty: the VPC's CIDR (what the private link needs)."""
    endpoint_service: str = ""
    private_zone: str = ""

    def __post_init__(self) -> None:
        checks = [
            (NAME_PATTERN, self.name, "name"),
            (TAG_PATTERN, self.vendor, "vendor tag"),
            (SERVICE_PATTERN, self.endpoint_service, "endpoint service name"),
            (ZONE_PATTERN, self.private_zone, "private zone"),
            (f"^$|{cidr_pattern(None)}", self.https_ingress_cidr, "HTTPS ingress CIDR"),
        ]
        for pattern, value, what in checks:
            if not re.fullmatch(pattern, value):
                raise TemplateError(f"{what} {value!r} does not match {pattern}")
        zones = self.availability_zones
        if zones and (len(set(zones)) != PRIVATE_SUBNET_COUNT or len(zones) != len(set(zones))):
            raise TemplateError(
                f"give {PRIVATE_SUBNET_COUNT} different availability zones, not {','.join(zones)}"
            )
        if any(not AZ_PATTERN.fullmatch(zone) for zone in zones):
            raise TemplateError(f"not availability zone names: {','.join(zones)}")
        if self.private_zone and not self.endpoint_service:
            raise TemplateError("a private zone needs the endpoint service it points at")
        SubnetPlan.of(self.cidr)


def _ref(name: str) -> dict[str, Any]:
    return {"Ref": name}


def _tags(name: str, *extra: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"Key": "Name", "Value": {"Fn::Sub": f"${{Name}}-{name}"}},
        {"Key": VENDOR_TAG_KEY, "Value": _ref("VendorTag")},
        *({"Key": key, "Value": value} for key, value in extra),
    ]


def _parameters(options: TemplateOptions) -> dict[str, Any]:
    plan = SubnetPlan.of(options.cidr)
    zones: dict[str, Any] = {
        "Type": "List<AWS::EC2::AvailabilityZone::Name>",
        "Description": f"{PRIVATE_SUBNET_COUNT} availability zones of the region: one private "
        "subnet in each (the public subnet goes in the first)",
    }
    if options.availability_zones:
        zones["Default"] = ",".join(options.availability_zones)

    def cidr(default: str, prefix: int, what: str) -> dict[str, Any]:
        return {
            "Type": "String",
            "Default": default,
            "AllowedPattern": cidr_pattern(prefix),
            "Description": f"{what} (a /{prefix})",
        }

    return {
        "Name": {
            "Type": "String",
            "Default": options.name,
            "AllowedPattern": NAME_PATTERN,
            "Description": "Prefix of every resource's Name tag",
        },
        "AvailabilityZones": zones,
        "VpcCidr": cidr(options.cidr, VPC_PREFIX, "The VPC's only CIDR block"),
        "PublicSubnetCidr": cidr(plan.public, PUBLIC_SUBNET_PREFIX, "The public subnet (NAT)"),
        **{
            f"PrivateSubnet{index}Cidr": cidr(
                block, PRIVATE_SUBNET_PREFIX, f"Private subnet {index}, inside the VPC's CIDR"
            )
            for index, block in enumerate(plan.private, start=1)
        },
        "VendorTag": {
            "Type": "String",
            "Default": options.vendor,
            "AllowedPattern": TAG_PATTERN,
            "Description": f"Value of the {VENDOR_TAG_KEY} tag put on everything created here",
        },
        "HttpsIngressCidr": {
            "Type": "String",
            "Default": options.https_ingress_cidr,
            "AllowedPattern": f"^$|{cidr_pattern(None)}",
            "Description": f"Where inbound {HTTPS_PORT} may come from: empty for the VPC's "
            f"CIDR (what a private link needs), {ANYWHERE} for anywhere, or a CIDR",
        },
        "EndpointServiceName": {
            "Type": "String",
            "Default": options.endpoint_service,
            "AllowedPattern": SERVICE_PATTERN,
            "Description": "The vendor's endpoint service (com.amazonaws.vpce.REGION."
            "vpce-svc-ID); empty: no private link",
        },
        "PrivateZoneName": {
            "Type": "String",
            "Default": options.private_zone,
            "AllowedPattern": ZONE_PATTERN,
            "Description": "A private hosted zone whose names all resolve to the endpoint inside "
            "the VPC (a wildcard CNAME); empty: none. Needs EndpointServiceName",
        },
    }


def _network() -> dict[str, Any]:
    azs = _ref("AvailabilityZones")
    resources: dict[str, Any] = {
        "Vpc": {
            "Type": "AWS::EC2::VPC",
            "Properties": {
                "CidrBlock": _ref("VpcCidr"),
                "EnableDnsSupport": True,
                "EnableDnsHostnames": True,
                "Tags": _tags("vpc"),
            },
        },
        "InternetGateway": {
            "Type": "AWS::EC2::InternetGateway",
            "Properties": {"Tags": _tags("igw")},
        },
        "GatewayAttachment": {
            "Type": "AWS::EC2::VPCGatewayAttachment",
            "Properties": {"VpcId": _ref("Vpc"), "InternetGatewayId": _ref("InternetGateway")},
        },
        "PublicSubnet": {
            "Type": "AWS::EC2::Subnet",
            "Properties": {
                "VpcId": _ref("Vpc"),
                "CidrBlock": _ref("PublicSubnetCidr"),
                "AvailabilityZone": {"Fn::Select": [0, azs]},
                "MapPublicIpOnLaunch": False,
                "Tags": _tags("public"),
            },
        },
        "PublicRouteTable": {
            "Type": "AWS::EC2::RouteTable",
            "Properties": {"VpcId": _ref("Vpc"), "Tags": _tags("public")},
        },
        "PublicDefaultRoute": {
            "Type": "AWS::EC2::Route",
            "DependsOn": "GatewayAttachment",
            "Properties": {
                "RouteTableId": _ref("PublicRouteTable"),
                "DestinationCidrBlock": ANYWHERE,
                "GatewayId": _ref("InternetGateway"),
            },
        },
        "PublicSubnetRoutes": {
            "Type": "AWS::EC2::SubnetRouteTableAssociation",
            "Properties": {
                "SubnetId": _ref("PublicSubnet"),
                "RouteTableId": _ref("PublicRouteTable"),
            },
        },
        "NatAddress": {
            "Type": "AWS::EC2::EIP",
            "DependsOn": "GatewayAttachment",
            "Properties": {"Domain": "vpc", "Tags": _tags("nat")},
        },
        "NatGateway": {
            "Type": "AWS::EC2::NatGateway",
            "Properties": {
                "AllocationId": {"Fn::GetAtt": ["NatAddress", "AllocationId"]},
                "SubnetId": _ref("PublicSubnet"),
                "Tags": _tags("nat"),
            },
        },
        "PrivateRouteTable": {
            "Type": "AWS::EC2::RouteTable",
            "Properties": {"VpcId": _ref("Vpc"), "Tags": _tags("private")},
        },
        "PrivateDefaultRoute": {
            "Type": "AWS::EC2::Route",
            "Properties": {
                "RouteTableId": _ref("PrivateRouteTable"),
                "DestinationCidrBlock": ANYWHERE,
                "NatGatewayId": _ref("NatGateway"),
            },
        },
    }
    for index in range(1, PRIVATE_SUBNET_COUNT + 1):
        resources[f"PrivateSubnet{index}"] = {
            "Type": "AWS::EC2::Subnet",
            "Properties": {
                "VpcId": _ref("Vpc"),
                "CidrBlock": _ref(f"PrivateSubnet{index}Cidr"),
                "AvailabilityZone": {"Fn::Select": [index - 1, azs]},
                "MapPublicIpOnLaunch": False,
                "Tags": _tags(f"private-{index}", INTERNAL_ELB_TAG),
            },
        }
        resources[f"PrivateSubnet{index}Routes"] = {
            "Type": "AWS::EC2::SubnetRouteTableAssociation",
            "Properties": {
                "SubnetId": _ref(f"PrivateSubnet{index}"),
                "RouteTableId": _ref("PrivateRouteTable"),
            },
        }
    return resources


def _private_subnets() -> list[dict[str, Any]]:
    return [_ref(f"PrivateSubnet{index}") for index in range(1, PRIVATE_SUBNET_COUNT + 1)]


def _security_and_link() -> dict[str, Any]:
    https = {"IpProtocol": "tcp", "FromPort": HTTPS_PORT, "ToPort": HTTPS_PORT}
    return {
        "SecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupDescription": "BYOC agent and private link: HTTPS in and out",
                "VpcId": _ref("Vpc"),
                "SecurityGroupIngress": [
                    {
                        **https,
                        "CidrIp": {
                            "Fn::If": ["IngressFromVpc", _ref("VpcCidr"), _ref("HttpsIngressCidr")]
                        },
                        "Description": "HTTPS to the private link (and agent health) from the VPC",
                    }
                ],
                "SecurityGroupEgress": [
                    {
                        **https,
                        "CidrIp": ANYWHERE,
                        "Description": "HTTPS to the control plane (NAT or private link)",
                    }
                ],
                "Tags": _tags("https"),
            },
        },
        "VpcEndpoint": {
            "Type": "AWS::EC2::VPCEndpoint",
            "Condition": "HasEndpoint",
            "Properties": {
                "VpcEndpointType": "Interface",
                "ServiceName": _ref("EndpointServiceName"),
                "VpcId": _ref("Vpc"),
                "SubnetIds": _private_subnets(),
                "SecurityGroupIds": [_ref("SecurityGroup")],
                "PrivateDnsEnabled": True,
                "Tags": _tags("endpoint"),
            },
        },
        "PrivateZone": {
            "Type": "AWS::Route53::HostedZone",
            "Condition": "HasPrivateZone",
            "Properties": {
                "Name": _ref("PrivateZoneName"),
                "VPCs": [{"VPCId": _ref("Vpc"), "VPCRegion": _ref("AWS::Region")}],
                "HostedZoneConfig": {"Comment": "The vendor's names resolve to the endpoint"},
                "HostedZoneTags": [
                    {"Key": VENDOR_TAG_KEY, "Value": _ref("VendorTag")},
                ],
            },
        },
        "PrivateZoneRecord": {
            "Type": "AWS::Route53::RecordSet",
            "Condition": "HasPrivateZone",
            "Properties": {
                "HostedZoneId": _ref("PrivateZone"),
                "Name": {"Fn::Sub": "*.${PrivateZoneName}"},
                "Type": "CNAME",
                "TTL": "300",
                "ResourceRecords": [
                    {
                        "Fn::Select": [
                            1,
                            {
                                "Fn::Split": [
                                    ":",
                                    {
                                        "Fn::Select": [
                                            0,
                                            {"Fn::GetAtt": ["VpcEndpoint", "DnsEntries"]},
                                        ]
                                    },
                                ]
                            },
                        ]
                    }
                ],
            },
        },
    }


def _outputs() -> dict[str, Any]:
    check = (
        "byoc-agent vpc check --region ${AWS::Region} --vpc-id ${Vpc} "
        "--security-group ${SecurityGroup} --vendor-tag ${VendorTag}"
    )
    return {
        "VpcId": {"Value": _ref("Vpc")},
        "PublicSubnetId": {"Value": _ref("PublicSubnet")},
        "PrivateSubnetIds": {"Value": {"Fn::Join": [",", _private_subnets()]}},
        "NatGatewayId": {"Value": _ref("NatGateway")},
        "SecurityGroupId": {"Value": _ref("SecurityGroup")},
        "VpcEndpointId": {"Condition": "HasEndpoint", "Value": _ref("VpcEndpoint")},
        "PrivateZoneId": {"Condition": "HasPrivateZone", "Value": _ref("PrivateZone")},
        "CheckCommand": {
            "Description": "Run this to check the VPC (byoc-agent[aws])",
            "Value": {
                "Fn::If": [
                    "HasEndpoint",
                    {"Fn::Sub": check + " --endpoint ${VpcEndpoint}"},
                    {"Fn::Sub": check},
                ]
            },
        },
    }


def build(options: TemplateOptions | None = None) -> dict[str, Any]:
    options = options or TemplateOptions()
    parameter_order = [
        "Name",
        "AvailabilityZones",
        "VpcCidr",
        "PublicSubnetCidr",
        *(f"PrivateSubnet{index}Cidr" for index in range(1, PRIVATE_SUBNET_COUNT + 1)),
        "VendorTag",
        "HttpsIngressCidr",
        "EndpointServiceName",
        "PrivateZoneName",
    ]
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "BYOC-I customer-managed VPC: one /16, a public /24 with one NAT gateway, "
        "three private /18 in three zones, HTTPS security group, optional private link "
        "(generated by `byoc-agent vpc template`; checked by `byoc-agent vpc check`)",
        "Metadata": {
            "AWS::CloudFormation::Interface": {
                "ParameterGroups": [
                    {"Label": {"default": "Network"}, "Parameters": parameter_order[:7]},
                    {"Label": {"default": "Access and tags"}, "Parameters": parameter_order[7:9]},
                    {
                        "Label": {"default": "Private link (optional)"},
                        "Parameters": parameter_order[9:],
                    },
                ]
            }
        },
        "Parameters": _parameters(options),
        "Conditions": {
            "IngressFromVpc": {"Fn::Equals": [_ref("HttpsIngressCidr"), ""]},
            "HasEndpoint": {"Fn::Not": [{"Fn::Equals": [_ref("EndpointServiceName"), ""]}]},
            "HasPrivateZone": {
                "Fn::And": [
                    {"Condition": "HasEndpoint"},
                    {"Fn::Not": [{"Fn::Equals": [_ref("PrivateZoneName"), ""]}]},
                ]
            },
        },
        "Resources": {**_network(), **_security_and_link()},
        "Outputs": _outputs(),
    }


def render(template: dict[str, Any]) -> str:
    return json.dumps(template, indent=2) + "\n"
