"""moto's server (``moto_server``), with the CloudFormation semantics ``vpc check`` depends on
made to match AWS. Run with the tools' Python, never imported by the project:

    .tools/bin/python tests/aws_stand_in.py        # prints "port N" once listening on loopback

moto is the accepted stand-in for AWS here (README "Tests"). Where its CloudFormation support
drops what AWS does, a stand-in *kinder* than AWS would hide bugs (a template that forgets
``EnableDnsHostnames`` would still "pass"), and one *harsher* would fail a correct template.
Each patch below restores one documented AWS behaviour, and ``tests/test_vpc_stand_in.py``
checks each one through the API, so a moto upgrade that changes them is noticed:

1. ``AWS::EC2::VPC``: ``EnableDnsSupport`` (default true) and ``EnableDnsHostnames`` (default
   false) are applied (moto ignores both: hostnames stay off whatever the template says).
2. ``Tags`` on NAT gateways, route tables, internet gateways, Elastic IPs and VPC endpoints are
   applied (moto drops them).
3. ``AWS::EC2::SecurityGroup``: ``SecurityGroupEgress`` replaces the default allow-all egress
   rule, as in AWS (moto ignores the property, leaving all egress open).
4. Interface endpoints: their network interfaces get addresses from their own subnets and the
   endpoint's security groups (moto picks any 10.x address and no group), and
   ``Fn::GetAtt …DnsEntries`` answers ``HOSTEDZONEID:dnsname`` strings (moto has no attribute).
5. ``AWS::Route53::HostedZone``: ``VPCs`` makes the zone private and associates it,
   ``HostedZoneTags`` are applied (moto makes every zone public and unassociated).
6. ``AWS::EC2::SubnetRouteTableAssociation`` associates the subnet with the table, as
   ``DescribeRouteTables`` shows it (moto records it apart, so every subnet seems to use the
   main table).
7. The ``Default`` of a list-typed parameter (``List<AWS::EC2::AvailabilityZone::Name>``) is a
   list, as when the value is given (moto keeps the string, so ``Fn::Select`` picks a letter).
8. A stack created by executing a change set (``aws cloudformation deploy``) has its outputs
   (moto evaluates them before the resources exist and never again, so there are none).

Not restored (so not tested against moto; README "Onboarding" lists them): parameter
``AllowedPattern`` validation, ``Fn::Cidr``, AWS refusing private DNS for a service without a
private DNS name (or in a VPC without DNS hostnames) and an endpoint with two subnets in one
zone, ``ModifyVpcEndpoint --private-dns-enabled``, IAM enforcement of Route 53 calls (moto
rejects their signatures). Harmless and worked around in the tests: ``DescribeStackResources``
also lists, as empty entries, the resources a false ``Condition`` left out.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from moto.cloudformation.models import CloudFormationBackend
from moto.cloudformation.parsing import ResourceMap
from moto.ec2.models import ec2_backends
from moto.ec2.models.elastic_ip_addresses import ElasticAddress
from moto.ec2.models.internet_gateways import InternetGateway
from moto.ec2.models.nat_gateways import NatGateway
from moto.ec2.models.route_tables import RouteTable
from moto.ec2.models.security_groups import SecurityGroup
from moto.ec2.models.subnets import SubnetRouteTableAssociation
from moto.ec2.models.vpcs import VPC, VPCEndPoint
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.route53.models import FakeZone, route53_backends
from moto.utilities.utils import get_partition
from werkzeug.serving import make_server


def _flag(value: Any, default: bool) -> bool:
    if value is None:
        return default
    return str(value).lower() == "true"


def _after_create(cls: Any, then: Any) -> None:
    """Run ``then(resource, properties, account_id, region)`` after moto's own CFN create."""
    original = cls.create_from_cloudformation_json.__func__

    def create(klass: Any, /, name: str, cfn: Any, account_id: str, region: str, **kw: Any) -> Any:
        resource = original(klass, name, cfn, account_id, region, **kw)
        then(resource, cfn.get("Properties", {}), account_id, region)
        return resource

    cls.create_from_cloudformation_json = classmethod(create)


def _vpc_dns(vpc: Any, properties: dict[str, Any], account_id: str, region: str) -> None:
    vpc.enable_dns_support = _flag(properties.get("EnableDnsSupport"), default=True)
    vpc.enable_dns_hostnames = _flag(properties.get("EnableDnsHostnames"), default=False)


def _tags(resource: Any, properties: dict[str, Any], account_id: str, region: str) -> None:
    for tag in properties.get("Tags", []):
        resource.add_tag(tag["Key"], tag["Value"])


def _egress(group: Any, properties: dict[str, Any], account_id: str, region: str) -> None:
    if "SecurityGroupEgress" not in properties:
        return
    backend = ec2_backends[account_id][region]
    backend.revoke_security_group_egress(
        group.id, "", "", "", [], security_rule_ids=[rule.id for rule in group.egress_rules]
    )
    for rule in properties["SecurityGroupEgress"]:
        ranges = [{"CidrIp": rule["CidrIp"]}] if "CidrIp" in rule else []
        backend.authorize_security_group_egress(
            group.id,
            rule["IpProtocol"],
            rule.get("FromPort"),
            rule.get("ToPort"),
            ranges,
            vpc_id=properties.get("VpcId"),
        )


def _associate(_: Any, properties: dict[str, Any], account_id: str, region: str) -> None:
    ec2_backends[account_id][region].associate_route_table(
        properties["RouteTableId"], subnet_id=properties["SubnetId"]
    )


def _endpoint(endpoint: Any, properties: dict[str, Any], account_id: str, region: str) -> None:
    _tags(endpoint, properties, account_id, region)
    backend = ec2_backends[account_id][region]
    groups = [backend.get_security_group_from_id(i) for i in endpoint.security_group_ids]
    for eni_id in endpoint.network_interface_ids:
        eni = backend.get_network_interface(eni_id)
        address = eni.subnet.get_available_subnet_ip(eni)
        eni.private_ip_address = address
        eni.private_ip_addresses = [{"Primary": True, "PrivateIpAddress": address}]
        eni._group_set = [group for group in groups if group is not None]
        eni.description = f"VPC Endpoint Interface {endpoint.id}"
        eni.interface_type = "vpc_endpoint"
        eni.requester_managed = True


def _endpoint_attribute(self: Any, attribute_name: str) -> Any:
    if attribute_name == "DnsEntries":
        return [f"{e['hosted_zone_id']}:{e['dns_name']}" for e in self.dns_entries or []]
    if attribute_name == "NetworkInterfaceIds":
        return list(self.network_interface_ids)
    if attribute_name == "Id":
        return self.id
    raise NotImplementedError(attribute_name)


def _zone(zone: Any, properties: dict[str, Any], account_id: str, region: str) -> None:
    vpcs = properties.get("VPCs", [])
    if vpcs:
        zone.private_zone = True
        for vpc in vpcs:
            zone.add_vpc(vpc["VPCId"], vpc["VPCRegion"])
    comment = properties.get("HostedZoneConfig", {}).get("Comment")
    if comment:
        zone.comment = comment
    tags = properties.get("HostedZoneTags", [])
    if tags:
        route53_backends[account_id][get_partition(region)].change_tags_for_resource(
            "hostedzone", zone.resource_id, tags, []
        )


def _split_list_defaults() -> None:
    original = ResourceMap.load_parameters

    def load_parameters(self: Any) -> None:
        original(self)
        for name, slot in self._template.get("Parameters", {}).items():
            value = self.resolved_parameters.get(name)
            kind = slot.get("Type", "String")
            listed = kind == "CommaDelimitedList" or kind.startswith("List")
            if listed and isinstance(value, str) and name not in self.input_parameters:
                self._parsed_resources[name] = value.split(",")

    ResourceMap.load_parameters = load_parameters


def _outputs_after_change_sets() -> None:
    original = CloudFormationBackend.execute_change_set

    def execute_change_set(self: Any, change_set_name: str, stack_name: str | None = None) -> None:
        original(self, change_set_name, stack_name)
        change_set = self.change_sets.get(change_set_name) or next(
            cs for cs in self.change_sets.values() if cs.change_set_name == change_set_name
        )
        stack = self.stacks[change_set.stack_id]
        stack._parse_template()  # the change set's template, set by the original
        stack.output_map = stack._create_output_map()

    CloudFormationBackend.execute_change_set = execute_change_set


def patch() -> None:
    _split_list_defaults()
    _outputs_after_change_sets()
    _after_create(VPC, _vpc_dns)
    for cls in (NatGateway, RouteTable, InternetGateway, ElasticAddress):
        _after_create(cls, _tags)
    _after_create(SecurityGroup, _egress)
    _after_create(SubnetRouteTableAssociation, _associate)
    _after_create(VPCEndPoint, _endpoint)
    VPCEndPoint.get_cfn_attribute = _endpoint_attribute
    _after_create(FakeZone, _zone)


def main() -> None:
    patch()
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    print(f"port {server.server_port}", flush=True)  # listening already: make_server binds
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
