"""The AWS stand-in itself (tests/aws_stand_in.py: moto's server with the CloudFormation
behaviours moto drops restored), checked through the AWS API against what the CloudFormation
and EC2 documentation specify, without going through ``vpc check``. If a moto upgrade changes
one of these, this fails, rather than the VPC tests silently testing less."""

from __future__ import annotations

import ipaddress
import json
from typing import TYPE_CHECKING, Any

import pytest

from agent.vpc import template
from agent.vpc.template import TemplateOptions
from tests.aws_moto import ZONES, MotoServer, vendor_service

if TYPE_CHECKING:
    from types_boto3_ec2.client import EC2Client


@pytest.fixture(scope="module")
def stack(moto_server: MotoServer) -> dict[str, str]:
    """The template with a private link, its zones taken from the parameter's Default, created
    the way ``aws cloudformation deploy`` does: a change set, then executed."""
    session = moto_server.session()
    service = vendor_service(session, moto_server.url, "stand-in-cp", "cp.stand-in.example")
    options = TemplateOptions(
        availability_zones=ZONES, endpoint_service=service, private_zone="zone.stand-in.example"
    )
    cfn = session.client("cloudformation", endpoint_url=moto_server.url)
    cfn.create_change_set(
        StackName="stand-in",
        ChangeSetName="create",
        ChangeSetType="CREATE",
        TemplateBody=json.dumps(template.build(options)),
    )
    cfn.get_waiter("change_set_create_complete").wait(
        StackName="stand-in", ChangeSetName="create", WaiterConfig={"Delay": 1}
    )
    cfn.execute_change_set(StackName="stand-in", ChangeSetName="create")
    cfn.get_waiter("stack_create_complete").wait(StackName="stand-in", WaiterConfig={"Delay": 1})
    (described,) = cfn.describe_stacks(StackName="stand-in")["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    listed = cfn.describe_stack_resources(StackName="stand-in")["StackResources"]
    return {
        **outputs,
        **{
            r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in listed
            if "LogicalResourceId" in r
        },
    }


def ec2(server: MotoServer) -> EC2Client:
    client: EC2Client = server.session().client("ec2", endpoint_url=server.url)
    return client


def test_a_change_set_stack_has_its_outputs(stack: dict[str, str]) -> None:
    assert stack["VpcId"] == stack["Vpc"]
    assert stack["VpcEndpointId"] == stack["VpcEndpoint"]
    assert stack["CheckCommand"].endswith(f"--endpoint {stack['VpcEndpoint']}")


def test_list_parameter_defaults_are_lists(moto_server: MotoServer, stack: dict[str, str]) -> None:
    subnets = ec2(moto_server).describe_subnets(
        SubnetIds=[stack[f"PrivateSubnet{i}"] for i in (1, 2, 3)]
    )["Subnets"]
    assert sorted(s["AvailabilityZone"] for s in subnets) == list(ZONES)


def test_vpc_dns_attributes_follow_the_template_and_the_aws_defaults(
    moto_server: MotoServer, stack: dict[str, str]
) -> None:
    client = ec2(moto_server)

    def attribute(vpc: str, name: str) -> bool:
        answer: dict[str, Any] = dict(client.describe_vpc_attribute(VpcId=vpc, Attribute=name))  # type: ignore[arg-type]
        return bool(answer[name[0].upper() + name[1:]]["Value"])

    assert attribute(stack["Vpc"], "enableDnsHostnames") is True
    bare = {
        "Resources": {
            "Bare": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.9.0.0/16"}}
        },
        "Outputs": {"Id": {"Value": {"Ref": "Bare"}}},
    }
    cfn = moto_server.session().client("cloudformation", endpoint_url=moto_server.url)
    cfn.create_stack(StackName="bare-vpc", TemplateBody=json.dumps(bare))
    (described,) = cfn.describe_stacks(StackName="bare-vpc")["Stacks"]
    vpc = described["Outputs"][0]["OutputValue"]
    assert attribute(vpc, "enableDnsSupport") is True  # AWS::EC2::VPC: default true
    assert attribute(vpc, "enableDnsHostnames") is False  # default false


def test_tags_reach_every_resource_type_the_template_tags(
    moto_server: MotoServer, stack: dict[str, str]
) -> None:
    client = ec2(moto_server)
    ids = [
        stack[name]
        for name in ("NatGateway", "PrivateRouteTable", "InternetGateway", "VpcEndpoint")
    ]
    tags = client.describe_tags(
        Filters=[{"Name": "resource-id", "Values": ids}, {"Name": "key", "Values": ["Vendor"]}]
    )["Tags"]
    assert {t["ResourceId"] for t in tags} == set(ids)
    (address,) = client.describe_addresses(PublicIps=[stack["NatAddress"]])["Addresses"]
    assert {"Key": "Vendor", "Value": "byoc"} in address.get("Tags", [])


def test_security_group_egress_replaces_the_default_rule(
    moto_server: MotoServer, stack: dict[str, str]
) -> None:
    (group,) = ec2(moto_server).describe_security_groups(GroupIds=[stack["SecurityGroup"]])[
        "SecurityGroups"
    ]
    egress = [
        (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"), [r["CidrIp"] for r in p["IpRanges"]])
        for p in group["IpPermissionsEgress"]
    ]
    assert egress == [("tcp", 443, 443, ["0.0.0.0/0"])]


def test_subnet_associations_show_in_the_route_tables(
    moto_server: MotoServer, stack: dict[str, str]
) -> None:
    (table,) = ec2(moto_server).describe_route_tables(RouteTableIds=[stack["PrivateRouteTable"]])[
        "RouteTables"
    ]
    associated = {a.get("SubnetId") for a in table["Associations"]}
    assert associated == {stack[f"PrivateSubnet{i}"] for i in (1, 2, 3)}


def test_endpoint_interfaces_live_in_their_subnets_with_the_endpoint_groups(
    moto_server: MotoServer, stack: dict[str, str]
) -> None:
    client = ec2(moto_server)
    (endpoint,) = client.describe_vpc_endpoints(VpcEndpointIds=[stack["VpcEndpoint"]])[
        "VpcEndpoints"
    ]
    interfaces = client.describe_network_interfaces(
        NetworkInterfaceIds=endpoint["NetworkInterfaceIds"]
    )["NetworkInterfaces"]
    subnets = {
        s["SubnetId"]: ipaddress.ip_network(s["CidrBlock"])
        for s in client.describe_subnets(SubnetIds=endpoint["SubnetIds"])["Subnets"]
    }
    assert len(interfaces) == 3
    for eni in interfaces:
        assert ipaddress.ip_address(eni["PrivateIpAddress"]) in subnets[eni["SubnetId"]]
        assert [g["GroupId"] for g in eni["Groups"]] == [stack["SecurityGroup"]]
        assert eni["InterfaceType"] == "vpc_endpoint"


def test_the_private_zone_is_private_associated_and_points_at_the_endpoint(
    moto_server: MotoServer, stack: dict[str, str]
) -> None:
    route53 = moto_server.session().client("route53", endpoint_url=moto_server.url)
    zones = route53.list_hosted_zones_by_vpc(VPCId=stack["Vpc"], VPCRegion="us-east-1")
    assert [z["HostedZoneId"] for z in zones["HostedZoneSummaries"]] == [stack["PrivateZone"]]
    zone = route53.get_hosted_zone(Id=stack["PrivateZone"])["HostedZone"]
    assert zone["Config"]["PrivateZone"] is True
    tags = route53.list_tags_for_resource(
        ResourceType="hostedzone", ResourceId=stack["PrivateZone"]
    )
    assert {"Key": "Vendor", "Value": "byoc"} in tags["ResourceTagSet"]["Tags"]
    records = route53.list_resource_record_sets(HostedZoneId=stack["PrivateZone"])
    (cname,) = [r for r in records["ResourceRecordSets"] if r["Type"] == "CNAME"]
    (endpoint,) = ec2(moto_server).describe_vpc_endpoints(VpcEndpointIds=[stack["VpcEndpoint"]])[
        "VpcEndpoints"
    ]
    # Fn::GetAtt DnsEntries gives "HOSTEDZONEID:name"; the template keeps the name
    assert cname["ResourceRecords"] == [{"Value": endpoint["DnsEntries"][0]["DnsName"]}]
