"""The VPC rules, the VPC's DNS model and the shared private-link definition, as the pure
functions they are: facts in, findings out, no AWS (the moto tests are tests/test_vpc_check.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.vpc import report, rules
from agent.vpc.dns import Source, VpcResolver, normalize, probe_name
from agent.vpc.findings import Finding, Status
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
    Vpc,
    VpcFacts,
)
from agent.vpc.private_link import (
    INGRESS,
    DialTarget,
    Holder,
    diagnose_timeout,
    dial_target,
    judge_ingress,
    judge_resolution,
    private_endpoint_configured,
)

TAGS = {"Vendor": "byoc"}
ELB = {**TAGS, "kubernetes.io/role/internal-elb": "1"}
HTTPS_IN = Permission(protocol="tcp", from_port=443, to_port=443, cidrs=("10.0.0.0/16",))
HTTPS_OUT = Permission(protocol="tcp", from_port=443, to_port=443, cidrs=("0.0.0.0/0",))
ENDPOINT_NAME = "vpce-1-abc.vpce-svc-1.us-east-1.vpce.amazonaws.com"


def compliant(*, endpoint: bool = True) -> VpcFacts:
    """A VPC as `byoc-agent vpc template` builds it (with its private link, if asked)."""
    subnets = (
        Subnet(id="subnet-pub", cidr="10.0.192.0/24", availability_zone="az-a", tags=TAGS),
        Subnet(id="subnet-1", cidr="10.0.0.0/18", availability_zone="az-a", tags=ELB),
        Subnet(id="subnet-2", cidr="10.0.64.0/18", availability_zone="az-b", tags=ELB),
        Subnet(id="subnet-3", cidr="10.0.128.0/18", availability_zone="az-c", tags=ELB),
    )
    local = Route(destination="10.0.0.0/16", target="local")
    tables = (
        RouteTable(id="rtb-main", main=True, subnet_ids=(), routes=(local,)),
        RouteTable(
            id="rtb-pub",
            main=False,
            subnet_ids=("subnet-pub",),
            routes=(local, Route(destination="0.0.0.0/0", target="igw-1")),
            tags=TAGS,
        ),
        RouteTable(
            id="rtb-priv",
            main=False,
            subnet_ids=("subnet-1", "subnet-2", "subnet-3"),
            routes=(local, Route(destination="0.0.0.0/0", target="nat-1")),
            tags=TAGS,
        ),
    )
    group = SecurityGroup(
        id="sg-1", name="https", ingress=(HTTPS_IN,), egress=(HTTPS_OUT,), tags=TAGS
    )
    interfaces = tuple(
        NetworkInterface(
            id=f"eni-{i}",
            subnet_id=f"subnet-{i}",
            addresses=(address,),
            security_group_ids=("sg-1",),
        )
        for i, address in ((1, "10.0.0.4"), (2, "10.0.64.4"), (3, "10.0.128.4"))
    )
    link = Endpoint(
        id="vpce-1",
        type="Interface",
        service_name="com.amazonaws.vpce.us-east-1.vpce-svc-1",
        state="available",
        private_dns_enabled=True,
        subnet_ids=("subnet-1", "subnet-2", "subnet-3"),
        security_group_ids=("sg-1",),
        network_interface_ids=("eni-1", "eni-2", "eni-3"),
        dns_names=(ENDPOINT_NAME,),
        tags=TAGS,
    )
    zone = HostedZone(
        id="Z1",
        name="byoc.vendor.example.",
        records=(
            Record(name="byoc.vendor.example.", type="SOA", values=("ns. host. 1 2 3 4 5",)),
            Record(name="\\052.byoc.vendor.example.", type="CNAME", values=(ENDPOINT_NAME,)),
        ),
    )
    return VpcFacts(
        region="us-east-1",
        vpc=Vpc(
            id="vpc-1",
            cidr_blocks=(CidrBlock(cidr="10.0.0.0/16", association_id="vpc-cidr-assoc-1"),),
            dns_support=True,
            dns_hostnames=True,
            tags=TAGS,
        ),
        subnets=subnets,
        route_tables=tables,
        nat_gateways=(
            NatGateway(id="nat-1", subnet_id="subnet-pub", state="available", tags=TAGS),
        ),
        internet_gateways=(InternetGateway(id="igw-1", tags=TAGS),),
        security_groups=(group,),
        endpoints=(link,) if endpoint else (),
        network_interfaces=interfaces if endpoint else (),
        private_zones=(zone,) if endpoint else (),
    )


REQUEST = CheckRequest(vpc_id="vpc-1", security_group_ids=("sg-1",), endpoint_id="vpce-1")


def findings(facts: VpcFacts, request: CheckRequest = REQUEST) -> dict[str, Finding]:
    found = rules.check(facts, request)
    assert [f.rule for f in found] == [rule.id for rule in rules.RULES]  # one each, in order
    return {f.rule: f for f in found}


def failing(facts: VpcFacts, request: CheckRequest = REQUEST) -> dict[str, Finding]:
    return {rule: f for rule, f in findings(facts, request).items() if f.failed}


def test_a_compliant_vpc_passes_everything() -> None:
    assert {f.status for f in findings(compliant()).values()} == {Status.PASS}


def test_without_a_private_link_its_rules_are_skipped_with_the_reason() -> None:
    result = findings(compliant(endpoint=False), CheckRequest(vpc_id="vpc-1"))
    skipped = {rule for rule, f in result.items() if f.status is Status.SKIP}
    assert skipped == {
        "endpoint", "endpoint-private-dns", "endpoint-subnets", "endpoint-security-group",
        "private-link-dns", "private-link-443",
    }  # fmt: skip
    assert not any(f.failed for f in result.values())
    # no --security-group: the group tagged with the vendor tag is judged, and the report says so
    assert (
        result["sg-ingress-443"].found
        == "sg-1: from 10.0.0.0/16 (tagged Vendor=byoc; no --security-group given)"
    )


def replace_vpc(facts: VpcFacts, **changes: object) -> VpcFacts:
    return dataclasses.replace(facts, vpc=dataclasses.replace(facts.vpc, **changes))  # type: ignore[arg-type]


def test_the_vpc_cidr_rules() -> None:
    small = replace_vpc(compliant(endpoint=False), cidr_blocks=(CidrBlock(cidr="10.0.0.0/20"),))
    failed = failing(small, CheckRequest(vpc_id="vpc-1"))
    assert set(failed) == {"vpc-cidr"}
    assert failed["vpc-cidr"].found == "10.0.0.0/20: the VPC must be a /16"
    assert "cannot be changed" in failed["vpc-cidr"].fix

    blocks = (CidrBlock(cidr="10.0.0.0/16"), CidrBlock(cidr="10.1.0.0/16", association_id="a-2"))
    failed = failing(replace_vpc(compliant(), cidr_blocks=blocks))
    assert failed["vpc-cidr"].fix == "aws ec2 disassociate-vpc-cidr-block --association-id a-2"

    v6 = replace_vpc(
        compliant(), ipv6_cidr_blocks=(CidrBlock(cidr="2600::/56", association_id="a-6"),)
    )
    assert set(failing(v6)) == {"ipv4-only"}
    assert failing(v6)["ipv4-only"].fix.endswith("--association-id a-6")


def test_dns_attributes() -> None:
    failed = failing(replace_vpc(compliant(), dns_support=False, dns_hostnames=False))
    # without them the VPC's private zones do not answer: the private link breaks too
    assert set(failed) == {"dns-resolution", "dns-hostnames", "private-link-dns"}
    assert failed["private-link-dns"].found.endswith(
        "-> (public DNS: private zones need DNS resolution and hostnames on)"
    )
    assert failed["dns-hostnames"].fix == (
        "aws ec2 modify-vpc-attribute --vpc-id vpc-1 --enable-dns-hostnames Value=true"
    )
    assert failed["dns-resolution"].fix.endswith("--enable-dns-support Value=true")


def with_subnet(facts: VpcFacts, subnet_id: str, **changes: object) -> VpcFacts:
    subnets = tuple(
        dataclasses.replace(s, **changes) if s.id == subnet_id else s  # type: ignore[arg-type]
        for s in facts.subnets
    )
    return dataclasses.replace(facts, subnets=subnets)


def test_subnet_layout_rules() -> None:
    facts = compliant(endpoint=False)
    request = CheckRequest(vpc_id="vpc-1")
    same_zone = failing(with_subnet(facts, "subnet-3", availability_zone="az-a"), request)
    assert set(same_zone) == {"private-subnet-azs"}
    assert "more than one in az-a" in same_zone["private-subnet-azs"].found

    untagged = failing(with_subnet(facts, "subnet-2", tags=TAGS), request)
    assert set(untagged) == {"internal-elb-tag"}
    assert untagged["internal-elb-tag"].fix == (
        "aws ec2 create-tags --resources subnet-2 "
        "--tags Key=kubernetes.io/role/internal-elb,Value=1"
    )

    wide_public = failing(with_subnet(facts, "subnet-pub", cidr="10.0.192.0/23"), request)
    assert set(wide_public) == {"public-subnet"}

    extra = dataclasses.replace(
        facts,
        subnets=(
            *facts.subnets,
            Subnet(id="subnet-4", cidr="10.0.193.0/24", availability_zone="az-d", tags=ELB),
        ),
    )
    failed = failing(extra, request)
    assert set(failed) == {"private-subnets", "private-nat-route"}
    assert failed["private-subnets"].found.startswith("4 private: ")
    # subnet-4 falls back to the main table: give it the table its siblings use
    assert failed["private-nat-route"].fix == (
        "aws ec2 associate-route-table --route-table-id rtb-priv --subnet-id subnet-4"
    )


def with_tables(facts: VpcFacts, table_id: str, routes: tuple[Route, ...]) -> VpcFacts:
    tables = tuple(
        dataclasses.replace(t, routes=routes) if t.id == table_id else t for t in facts.route_tables
    )
    return dataclasses.replace(facts, route_tables=tables)


def test_nat_and_routes() -> None:
    facts = compliant(endpoint=False)
    request = CheckRequest(vpc_id="vpc-1")
    local = Route(destination="10.0.0.0/16", target="local")
    blackhole = with_tables(
        facts,
        "rtb-priv",
        (local, Route(destination="0.0.0.0/0", target="nat-1", state="blackhole")),
    )
    failed = failing(blackhole, request)
    assert set(failed) == {"private-nat-route"}
    assert failed["private-nat-route"].fix == (
        "aws ec2 replace-route --route-table-id rtb-priv --destination-cidr-block 0.0.0.0/0 "
        "--nat-gateway-id nat-1"
    )
    no_default = failing(with_tables(facts, "rtb-priv", (local,)), request)
    assert no_default["private-nat-route"].fix.startswith(
        "aws ec2 create-route --route-table-id rtb-priv"
    )

    def nat(**changes: object) -> dict[str, Finding]:
        gateway = dataclasses.replace(facts.nat_gateways[0], **changes)  # type: ignore[arg-type]
        return failing(dataclasses.replace(facts, nat_gateways=(gateway,)), request)

    assert "not the public subnet" in nat(subnet_id="subnet-1")["nat-gateway"].found
    assert "private NAT gateway" in nat(connectivity="private")["nat-gateway"].found
    assert (
        nat(state="pending")["nat-gateway"].fix
        == "aws ec2 wait nat-gateway-available --nat-gateway-ids nat-1"
    )
    gone = nat(state="deleted")  # a deleted gateway neither counts nor routes
    assert set(gone) == {"nat-gateway", "private-nat-route"}
    assert gone["nat-gateway"].found == "no NAT gateway"


def with_group(facts: VpcFacts, **changes: object) -> VpcFacts:
    group = dataclasses.replace(facts.security_groups[0], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(facts, security_groups=(group,))


def test_security_group_rules_and_the_faq() -> None:
    closed = failing(with_group(compliant(), ingress=()))
    # the FAQ: no inbound 443 from the VPC's CIDR is what makes a private link time out
    assert set(closed) == {"sg-ingress-443", "private-link-443"}
    fix = (
        "aws ec2 authorize-security-group-ingress --group-id sg-1 --protocol tcp --port 443 "
        "--cidr 10.0.0.0/16"
    )
    assert closed["sg-ingress-443"].fix == closed["private-link-443"].fix == fix

    narrow = Permission(protocol="tcp", from_port=443, to_port=443, cidrs=("10.0.0.0/18",))
    failed = failing(with_group(compliant(), ingress=(narrow,)))
    assert set(failed) == {"private-link-443"}  # 443 is open, but not from the whole VPC
    assert "(only from 10.0.0.0/18)" in failed["private-link-443"].found

    anywhere = Permission(protocol="-1", cidrs=("0.0.0.0/0",))
    assert not failing(with_group(compliant(), ingress=(anywhere,)))

    no_egress = failing(with_group(compliant(), egress=()))
    assert set(no_egress) == {"sg-egress-https"}
    assert (
        "IpProtocol=tcp,FromPort=443,ToPort=443,IpRanges=[{CidrIp=0.0.0.0/0}]"
        in no_egress["sg-egress-https"].fix
    )

    inside = Permission(protocol="tcp", from_port=443, to_port=443, cidrs=("10.0.0.0/16",))
    found = findings(with_group(compliant(), egress=(inside,)))["sg-egress-https"]
    assert found.status is Status.PASS
    assert "only a private link is reachable" in found.found

    missing = failing(compliant(), dataclasses.replace(REQUEST, security_group_ids=("sg-9",)))
    assert "sg-9 not found in vpc-1" in missing["sg-ingress-443"].found


def test_vendor_tag() -> None:
    facts = compliant()
    untagged = dataclasses.replace(facts, internet_gateways=(InternetGateway(id="igw-1"),))
    failed = failing(untagged)
    assert set(failed) == {"vendor-tag"}
    assert (
        failed["vendor-tag"].fix
        == "aws ec2 create-tags --resources igw-1 --tags Key=Vendor,Value=byoc"
    )
    other = failing(facts, dataclasses.replace(REQUEST, vendor="acme"))
    assert set(other) == {"vendor-tag"}


def with_endpoint(facts: VpcFacts, **changes: object) -> VpcFacts:
    link = dataclasses.replace(facts.endpoints[0], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(facts, endpoints=(link,))


def test_endpoint_rules() -> None:
    facts = compliant()
    assert failing(with_endpoint(facts, private_dns_enabled=False))["endpoint-private-dns"].fix == (
        "aws ec2 modify-vpc-endpoint --vpc-endpoint-id vpce-1 --private-dns-enabled"
    )
    subnets = failing(with_endpoint(facts, subnet_ids=("subnet-1", "subnet-pub")))
    assert subnets["endpoint-subnets"].fix == (
        "aws ec2 modify-vpc-endpoint --vpc-endpoint-id vpce-1 --add-subnet-ids subnet-2 subnet-3 "
        "--remove-subnet-ids subnet-pub"
    )
    pending = failing(with_endpoint(facts, state="pendingAcceptance"))
    assert set(pending) == {"endpoint"}
    assert "ask the vendor to accept" in pending["endpoint"].fix
    absent = findings(facts, dataclasses.replace(REQUEST, endpoint_id="vpce-9"))
    assert absent["endpoint"].failed
    assert absent["endpoint-subnets"].status is Status.SKIP
    other_group = failing(with_endpoint(facts, security_group_ids=("sg-2",)))
    assert "endpoint-security-group" in other_group


def test_private_link_resolution_paths() -> None:
    facts = compliant()
    # no record leading to the endpoint, and no private DNS name: nothing resolves to it
    bare = dataclasses.replace(facts, private_zones=())
    failed = failing(bare)
    assert set(failed) == {"private-link-dns"}
    assert "nothing in vpc-1's private DNS leads to vpce-1" in failed["private-link-dns"].found

    # the service's private DNS name does it, once private DNS is on
    named = dataclasses.replace(
        bare,
        endpoint_services=(
            EndpointService(
                name=facts.endpoints[0].service_name, private_dns_names=("cp.vendor.example",)
            ),
        ),
    )
    assert findings(named)["private-link-dns"].status is Status.PASS
    assert "cp.vendor.example [private DNS of vpce-1]" in findings(named)["private-link-dns"].found

    # a name the agent dials that the VPC's private DNS does not know
    asked = dataclasses.replace(
        REQUEST, targets=(DialTarget(host="cp.elsewhere.example", port=443, source="--domain"),)
    )
    failed = failing(facts, asked)
    assert set(failed) == {"private-link-dns"}
    assert "public DNS" in failed["private-link-dns"].found
    # ... the endpoint's own addresses are still judged for 443
    assert findings(facts, asked)["private-link-443"].status is Status.PASS


def test_an_address_that_nothing_holds_fails_ingress() -> None:
    facts = compliant()
    zone = HostedZone(
        id="Z2",
        name="cp.example",
        records=(Record(name="cp.example", type="A", values=("10.0.9.9",)),),
    )
    asked = dataclasses.replace(
        REQUEST, targets=(DialTarget(host="cp.example", port=443, source="--domain"),)
    )
    failed = failing(dataclasses.replace(facts, private_zones=(zone,)), asked)
    assert set(failed) == {"private-link-443"}  # resolves inside the VPC, to a dead address
    assert "no network interface in the VPC holds 10.0.9.9" in failed["private-link-443"].found


# -- the VPC's DNS model -------------------------------------------------------------------


def resolver(
    *zones: HostedZone,
    endpoints: tuple[Endpoint, ...] = (),
    services: tuple[EndpointService, ...] = (),
) -> VpcResolver:
    interfaces = (
        NetworkInterface(id="eni-1", subnet_id="s", addresses=("10.0.0.4",), security_group_ids=()),
    )
    return VpcResolver(zones=zones, endpoints=endpoints, services=services, interfaces=interfaces)


def zone(name: str, *records: Record) -> HostedZone:
    return HostedZone(id=name, name=name, records=records)


def test_the_most_specific_zone_answers_and_never_falls_back() -> None:
    broad = zone("example.", Record(name="cp.vendor.example", type="A", values=("10.0.0.1",)))
    narrow = zone(
        "vendor.example.", Record(name="www.vendor.example", type="A", values=("10.0.0.2",))
    )
    answer = resolver(broad, narrow).resolve("cp.vendor.example")
    assert answer.source is Source.NXDOMAIN  # vendor.example is more specific and has no record
    assert resolver(broad).resolve("cp.vendor.example.").addresses == ("10.0.0.1",)
    assert resolver(narrow).resolve("api.other.example").source is Source.PUBLIC


def test_wildcards_cnames_aliases_and_loops() -> None:
    records = zone(
        "z.example",
        Record(name="\\052.z.example.", type="CNAME", values=("target.z.example",)),
        Record(name="*.deep.z.example", type="A", values=("10.0.0.3",)),
        Record(name="target.z.example", type="A", values=("10.0.0.1", "10.0.0.2")),
        Record(name="alias.z.example", type="A", alias_target="target.z.example."),
        Record(name="loop.z.example", type="CNAME", values=("loop.z.example",)),
    )
    found = resolver(records)
    assert found.resolve("a.b.z.example").addresses == ("10.0.0.1", "10.0.0.2")  # *.z.example
    assert found.resolve("x.deep.z.example").addresses == ("10.0.0.3",)  # the nearest wildcard
    assert found.resolve("alias.z.example").addresses == ("10.0.0.1", "10.0.0.2")
    assert found.resolve("loop.z.example").source is Source.LOOP
    assert normalize("\\052.Z.Example.") == "*.z.example"
    assert probe_name("*.z.example") == "byoc-check.z.example"


def test_endpoint_names_and_private_dns() -> None:
    link = Endpoint(
        id="vpce-1", type="Interface", service_name="svc", state="available",
        private_dns_enabled=True, network_interface_ids=("eni-1",),
        dns_names=("vpce-1.aws.example",),
    )  # fmt: skip
    services = (EndpointService(name="svc", private_dns_names=("*.vendor.example",)),)
    found = resolver(endpoints=(link,), services=services)
    assert found.resolve("vpce-1.aws.example").addresses == ("10.0.0.4",)
    assert found.resolve("cp.vendor.example").addresses == ("10.0.0.4",)
    assert found.resolve("vendor.example").source is Source.NXDOMAIN
    off = resolver(
        endpoints=(dataclasses.replace(link, private_dns_enabled=False),), services=services
    )
    assert off.resolve("cp.vendor.example").source is Source.PUBLIC
    assert off.names_leading_to(link) == []


# -- the shared private-link definition (what `doctor` will call) --------------------------


def config(tmp_path: Path, extra: str = "") -> bytes:
    return (
        '[control_plane]\nurl = "wss://cp.vendor.example/v1/agent"\n' + extra +
        'ca_bundle = "ca.pem"\nclient_cert = "a.pem"\nclient_key = "a.key"\n'
        '[commands]\ntrusted_keys = ["k.pub"]\nissuers = ["cp"]\n'
    ).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "host", "port", "source", "private"),
    [
        ("", "cp.vendor.example", 443, "control_plane.url", False),
        ('connect_to = "10.0.0.4"\n', "10.0.0.4", 443, "control_plane.connect_to", True),
        (
            'connect_to = "vpce-1.aws.example:8443"\n',
            "vpce-1.aws.example",
            8443,
            "control_plane.connect_to",
            True,
        ),
        ('server_name = "cp.internal"\n', "cp.vendor.example", 443, "control_plane.url", False),
    ],
)
def test_what_the_agent_dials(
    tmp_path: Path, extra: str, host: str, port: int, source: str, private: bool
) -> None:
    control_plane = parse_config(
        config(tmp_path, extra), source=tmp_path / "agent.toml"
    ).control_plane
    assert dial_target(control_plane) == DialTarget(host=host, port=port, source=source)
    assert private_endpoint_configured(control_plane) is private


def test_judge_resolution() -> None:
    name = DialTarget(host="cp.vendor.example", port=443, source="control_plane.url")
    assert judge_resolution(name, ["10.0.1.5"], ["10.0.0.0/16"]).status is Status.PASS
    outside = judge_resolution(name, ["10.0.1.5", "52.1.2.3"], ["10.0.0.0/16"])
    assert outside.failed
    assert outside.found == (
        "cp.vendor.example (control_plane.url) resolves to 52.1.2.3, outside the VPC's 10.0.0.0/16"
    )
    assert judge_resolution(name, [], ["10.0.0.0/16"]).failed
    address = DialTarget(host="10.1.0.4", port=443, source="control_plane.connect_to")
    assert judge_resolution(address, [], ["10.0.0.0/16"]).failed  # an address: nothing to resolve
    assert judge_resolution(address, [], ["10.0.0.0/16", "10.1.0.0/16"]).status is Status.PASS


def group(*ingress: Permission) -> SecurityGroup:
    return SecurityGroup(id="sg-e", name="e", ingress=ingress, egress=())


def test_judge_ingress_requires_every_vpc_block_and_a_cidr_source() -> None:
    by_group = Permission(protocol="tcp", from_port=443, to_port=443, groups=("sg-agent",))
    holder = Holder(address="10.0.0.4", port=443, holder="eni-1", groups=(group(by_group),))
    assert judge_ingress([holder], ["10.0.0.0/16"]).failed  # a group reference is not the CIDR
    wide = Permission(protocol="tcp", from_port=0, to_port=65535, cidrs=("10.0.0.0/8",))
    holder = dataclasses.replace(holder, groups=(group(wide),))
    assert judge_ingress([holder], ["10.0.0.0/16"]).status is Status.PASS
    assert judge_ingress([holder], ["10.0.0.0/16", "100.64.0.0/16"]).failed  # a second block
    wrong_port = dataclasses.replace(holder, port=8443, groups=(group(HTTPS_IN),))
    assert judge_ingress([wrong_port], ["10.0.0.0/16"]).failed
    assert judge_ingress([], ["10.0.0.0/16"]).failed


def test_doctor_and_vpc_check_give_the_same_rule_and_fix_for_a_timeout() -> None:
    target = DialTarget(host="cp.vendor.example", port=443, source="control_plane.url")
    timeout = diagnose_timeout(target, "10.0.0.4", ["10.0.0.0/16"])
    closed = judge_ingress(
        [Holder(address="10.0.0.4", port=443, holder="eni-1", groups=(group(),))], ["10.0.0.0/16"]
    )
    assert timeout.rule == closed.rule == INGRESS.id
    assert closed.fix.replace("sg-e", "<endpoint-sg>") in timeout.fix


def test_permission_ports() -> None:
    assert Permission(protocol="6", from_port=400, to_port=500).allows_tcp(443)
    assert not Permission(protocol="udp", from_port=443, to_port=443).allows_tcp(443)
    assert not Permission(protocol="tcp").allows_tcp(443)  # no ports reported: nothing assumed
    assert Permission(protocol="-1").allows_tcp(443)


def test_the_report_formats() -> None:
    found = rules.check(compliant(), REQUEST)
    lines = report.lines("vpc-1", "us-east-1", found)
    assert lines[0] == "vpc check: vpc-1 in us-east-1"
    assert lines[-1] == f"OK: {len(found)} passed, 0 failed, 0 skipped"
    broken = rules.check(replace_vpc(compliant(), dns_hostnames=False), REQUEST)
    text = report.lines("vpc-1", "us-east-1", broken)
    (line,) = [line for line in text if " dns-hostnames " in line]
    assert line == (
        "FAIL  dns-hostnames            disabled on vpc-1  -> fix: aws ec2 modify-vpc-attribute "
        "--vpc-id vpc-1 --enable-dns-hostnames Value=true"
    )
    assert text[-1] == f"FAILED: {len(broken) - 2} passed, 2 failed, 0 skipped"
    document = report.as_json("vpc-1", "us-east-1", broken)
    assert document["ok"] is False
    assert json.loads(json.dumps(document))["findings"][3] == {
        "rule": "dns-hostnames", "title": "DNS hostnames enabled", "status": "fail",
        "found": "disabled on vpc-1",
        "fix": "aws ec2 modify-vpc-attribute --vpc-id vpc-1 --enable-dns-hostnames Value=true",
    }  # fmt: skip
