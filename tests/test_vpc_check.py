"""``byoc-agent vpc check`` against VPCs built by ``byoc-agent vpc template``, deployed through
CloudFormation into the AWS stand-in: moto's server in a separate process on loopback
(tests/aws_moto.py), with the CloudFormation behaviours moto drops restored and themselves
tested (tests/aws_stand_in.py, tests/test_vpc_stand_in.py).

The template deployed as generated passes every rule; each broken variant (the template edited
the way a customer's VPC goes wrong) fails with exactly the rules it breaks, and each fix that
is a command is run as printed (with the real AWS CLI, against the stand-in) and makes the
rule pass.

Where moto does not model what the check needs (README "Onboarding" lists these):

- moto accepts ``PrivateDnsEnabled`` for any service (AWS refuses it for a service without a
  private DNS name, and when the VPC's DNS hostnames are off), and ignores
  ``ModifyVpcEndpoint --private-dns-enabled``: the private-DNS fix is not run here;
- moto accepts an interface endpoint with two subnets in one zone (AWS refuses it), so that
  variant is deployed without the endpoint, as AWS would require;
- moto does not validate ``AllowedPattern`` (the /20 variant edits the pattern too, as a
  customer's own template would) nor ``Fn::Cidr`` (the template does not use it).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.vpc import aws, rules, template
from agent.vpc.layout import CheckRequest
from agent.vpc.template import TemplateOptions, cidr_pattern
from tests.aws_moto import ZONES, MotoServer, deploy, run_cli, tool, vendor_service
from tests.conftest import scaled

SERVICE_DNS = "cp.vendor.example"
PRIVATE_ZONE = "byoc.vendor.example"
Template = dict[str, Any]


@pytest.fixture(scope="module")
def service(moto_server: MotoServer) -> str:
    return vendor_service(moto_server.session(), moto_server.url, "vendor-cp", SERVICE_DNS)


def options(service: str | None) -> TemplateOptions:
    if service is None:
        return TemplateOptions(availability_zones=ZONES)
    return TemplateOptions(
        availability_zones=ZONES, endpoint_service=service, private_zone=PRIVATE_ZONE
    )


@pytest.fixture(scope="module")
def good_vpc(moto_server: MotoServer, service: str) -> dict[str, str]:
    built = template.build(options(service))
    return deploy(moto_server.session(), moto_server.url, "good", built)


Check = Callable[..., dict[str, Any]]


@pytest.fixture
def check(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Check:
    """``byoc-agent vpc check --json`` on a deployed stack, in this process (the CLI's own
    process is exercised by the tests that use ``run_cli``)."""
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)

    def run(outputs: dict[str, str], *extra: str) -> dict[str, Any]:
        args = ["vpc", "check", "--json", "--vpc-id", outputs["VpcId"]]
        args += ["--security-group", outputs["SecurityGroupId"]]
        if "VpcEndpointId" in outputs:
            args += ["--endpoint", outputs["VpcEndpointId"]]
        code = main([*args, *extra])
        captured = capsys.readouterr()
        report: dict[str, Any] = json.loads(captured.out)
        assert code == (0 if report["ok"] else 1), captured.err
        return report

    return run


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {finding["rule"]: finding["status"] for finding in report["findings"]}


def failures(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {f["rule"]: f for f in report["findings"] if f["status"] == "fail"}


def test_the_template_as_generated_passes_every_rule(
    moto_server: MotoServer, good_vpc: dict[str, str], check: Check
) -> None:
    report = check(good_vpc)
    assert statuses(report) == {rule.id: "pass" for rule in rules.RULES}
    by_rule = {f["rule"]: f["found"] for f in report["findings"]}
    assert "10.0.0.0/16" in by_rule["vpc-cidr"]
    assert SERVICE_DNS in by_rule["private-link-dns"]  # the service's private DNS name
    assert f"*.{PRIVATE_ZONE}" in by_rule["private-link-dns"]  # and the zone's wildcard CNAME

    text = run_cli(moto_server, *check_args(good_vpc))
    lines = text.stdout.splitlines()
    assert text.returncode == 0, text.stderr
    assert lines[0] == f"vpc check: {good_vpc['VpcId']} in us-east-1"
    assert [line.split()[:2] for line in lines[1:-1]] == [["PASS", r.id] for r in rules.RULES]
    assert lines[-1] == f"OK: {len(rules.RULES)} passed, 0 failed, 0 skipped"


def check_args(outputs: dict[str, str]) -> list[str]:
    return [
        "vpc", "check", "--region", "us-east-1", "--vpc-id", outputs["VpcId"],
        "--security-group", outputs["SecurityGroupId"], "--endpoint", outputs["VpcEndpointId"],
    ]  # fmt: skip


def test_the_stack_prints_the_check_command_that_passes(
    moto_server: MotoServer, good_vpc: dict[str, str]
) -> None:
    command = good_vpc["CheckCommand"].split()
    assert command[:3] == ["byoc-agent", "vpc", "check"]
    done = run_cli(moto_server, *command[1:])
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_calls_only_what_the_shipped_policy_allows(
    moto_server: MotoServer, good_vpc: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every API call the check makes is recorded through botocore's ``before-call`` event and
    compared with the IAM policy in deploy/aws/: equal, so the policy holds nothing unused and
    the check needs nothing more. (moto's own IAM enforcement cannot be used instead: it
    rejects every correctly signed Route 53 request with SignatureDoesNotMatch.)"""
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    called: list[str] = []

    def record(model: Any, **_: Any) -> None:
        called.append(f"{model.service_model.signing_name}:{model.name}")

    session = aws.session("us-east-1")
    session.events.register("before-call", record)
    request = CheckRequest(
        vpc_id=good_vpc["VpcId"],
        security_group_ids=(good_vpc["SecurityGroupId"],),
        endpoint_id=good_vpc["VpcEndpointId"],
    )
    findings = rules.check(aws.fetch_facts(session, request), request)
    assert not any(finding.failed for finding in findings)

    shipped = json.loads((Path(aws.__file__).parents[2] / aws.POLICY_FILE).read_text())
    (statement,) = shipped["Statement"]
    assert statement["Effect"] == "Allow"
    assert set(called) == set(statement["Action"]) == set(aws.READ_ACTIONS)
    assert all(c.split(":")[1].startswith(("Describe", "List", "Get")) for c in called)


@dataclass(frozen=True)
class Variant:
    """A VPC gone wrong: the template edited, and the rules that must then fail, each with a
    text its fix must contain (``{Key}`` is filled from the stack's outputs)."""

    name: str
    edit: Callable[[Template], None]
    fails: dict[str, str]
    endpoint: bool = True
    run_fixes: tuple[str, ...] = ()
    """Rules whose printed fix is run, as printed, before checking again."""
    resources: dict[str, str] = field(default_factory=dict)


def resource(built: Template, name: str) -> dict[str, Any]:
    properties: dict[str, Any] = built["Resources"][name]["Properties"]
    return properties


def vpc_20(built: Template) -> None:
    parameters = built["Parameters"]
    for key, cidr, prefix in (
        ("VpcCidr", "10.0.0.0/20", 20),
        ("PrivateSubnet1Cidr", "10.0.0.0/22", 22),
        ("PrivateSubnet2Cidr", "10.0.4.0/22", 22),
        ("PrivateSubnet3Cidr", "10.0.8.0/22", 22),
        ("PublicSubnetCidr", "10.0.12.0/24", 24),
    ):
        parameters[key].update(Default=cidr, AllowedPattern=cidr_pattern(prefix))


def same_zone(built: Template) -> None:
    resource(built, "PrivateSubnet2")["AvailabilityZone"]["Fn::Select"][0] = 0


def untagged(built: Template) -> None:
    tags = resource(built, "PrivateSubnet3")["Tags"]
    tags[:] = [tag for tag in tags if tag["Key"] != "kubernetes.io/role/internal-elb"]


def hostnames_off(built: Template) -> None:
    resource(built, "Vpc")["EnableDnsHostnames"] = False


def https_closed(built: Template) -> None:
    for rule in resource(built, "SecurityGroup")["SecurityGroupIngress"]:
        rule["FromPort"] = rule["ToPort"] = 8443


def https_from_one_subnet(built: Template) -> None:
    built["Parameters"]["HttpsIngressCidr"]["Default"] = "10.0.0.0/18"


def no_nat_route(built: Template) -> None:
    del built["Resources"]["PrivateSubnet2Routes"]


def no_private_dns(built: Template) -> None:
    resource(built, "VpcEndpoint")["PrivateDnsEnabled"] = False


VARIANTS = [
    Variant(
        "a /20 VPC",
        vpc_20,
        {"vpc-cidr": "create a VPC with one /16 block", "private-subnets": "private /18"},
        endpoint=False,
    ),
    Variant(
        "two private subnets in one zone",
        same_zone,
        {"private-subnet-azs": "availability zone that has none"},
        endpoint=False,  # AWS refuses an interface endpoint with two subnets in one zone
    ),
    Variant(
        "a private subnet without the internal-elb tag",
        untagged,
        {
            "internal-elb-tag": "aws ec2 create-tags --resources {PrivateSubnet3} "
            "--tags Key=kubernetes.io/role/internal-elb,Value=1"
        },
        run_fixes=("internal-elb-tag",),
    ),
    Variant(
        "DNS hostnames off",
        hostnames_off,
        {
            "dns-hostnames": "aws ec2 modify-vpc-attribute --vpc-id {VpcId} "
            "--enable-dns-hostnames Value=true"
        },
        endpoint=False,  # AWS refuses private DNS on an endpoint in such a VPC
        run_fixes=("dns-hostnames",),
    ),
    Variant(
        "a security group without 443 (the FAQ's timing-out private link)",
        https_closed,
        {
            "sg-ingress-443": "aws ec2 authorize-security-group-ingress --group-id "
            "{SecurityGroupId} --protocol tcp --port 443 --cidr 10.0.0.0/16",
            "private-link-443": "aws ec2 authorize-security-group-ingress --group-id "
            "{SecurityGroupId} --protocol tcp --port 443 --cidr 10.0.0.0/16",
        },
        run_fixes=("sg-ingress-443",),
    ),
    Variant(
        "443 open from one subnet only, not the VPC's CIDR",
        https_from_one_subnet,
        {
            "private-link-443": "aws ec2 authorize-security-group-ingress --group-id "
            "{SecurityGroupId} --protocol tcp --port 443 --cidr 10.0.0.0/16"
        },
        run_fixes=("private-link-443",),
    ),
    Variant(
        "a private subnet without the NAT route",
        no_nat_route,
        {
            "private-nat-route": "aws ec2 associate-route-table --route-table-id "
            "{PrivateRouteTable} --subnet-id {PrivateSubnet2}"
        },
        run_fixes=("private-nat-route",),
    ),
    Variant(
        "an endpoint without private DNS",
        no_private_dns,
        {
            "endpoint-private-dns": "aws ec2 modify-vpc-endpoint --vpc-endpoint-id "
            "{VpcEndpointId} --private-dns-enabled"
        },
    ),
]


def physical_ids(server: MotoServer, stack: str) -> dict[str, str]:
    cfn = server.session().client("cloudformation", endpoint_url=server.url)
    listed = cfn.describe_stack_resources(StackName=stack)["StackResources"]
    # moto also lists the resources a false Condition left out, as empty entries
    return {
        r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed if "LogicalResourceId" in r
    }


def run_fix(server: MotoServer, command: str, tmp: Path) -> None:
    """A printed fix, run as printed, with the AWS CLI from ``make tools``."""
    tools = tool("aws").parent
    done = subprocess.run(
        ["sh", "-c", command],
        env={**os.environ, **server.env, "PATH": f"{tools}:{os.environ['PATH']}"},
        cwd=tmp,
        capture_output=True,
        text=True,
        check=False,
        timeout=scaled(120),
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"


@pytest.fixture
def deployed(
    moto_server: MotoServer, service: str, request: pytest.FixtureRequest
) -> tuple[Variant, dict[str, str]]:
    variant: Variant = request.param
    built = copy.deepcopy(template.build(options(service if variant.endpoint else None)))
    variant.edit(built)
    stack = "v-" + "".join(c if c.isalnum() else "-" for c in variant.name)[:40].strip("-")
    outputs = deploy(moto_server.session(), moto_server.url, stack, built)
    return variant, {**outputs, **physical_ids(moto_server, stack)}


@pytest.mark.parametrize("deployed", VARIANTS, ids=[v.name for v in VARIANTS], indirect=True)
def test_each_broken_variant_fails_with_its_rule_and_fix(
    moto_server: MotoServer, deployed: tuple[Variant, dict[str, str]], check: Check, tmp_path: Path
) -> None:
    variant, ids = deployed
    report = check(ids)
    failed = failures(report)
    assert set(failed) == set(variant.fails), json.dumps(report, indent=1)
    for rule, fix in variant.fails.items():
        assert fix.format(**ids) in failed[rule]["fix"], failed[rule]
    for rule in variant.run_fixes:
        run_fix(moto_server, failed[rule]["fix"], tmp_path)
    if variant.run_fixes:
        again = failures(check(ids))
        assert not set(variant.run_fixes) & set(again), again


def agent_config(tmp_path: Path, **control_plane: str) -> Path:
    lines = [f'{key} = "{value}"' for key, value in control_plane.items()]
    path = tmp_path / "agent.toml"
    path.write_text(
        "[control_plane]\n" + "\n".join(lines) + "\n"
        'ca_bundle = "ca.pem"\nclient_cert = "agent.pem"\nclient_key = "agent.key"\n'
        '[commands]\ntrusted_keys = ["cmd.pub"]\nissuers = ["cp"]\n'
    )
    return path


def test_the_agent_configuration_is_checked_against_the_vpc(
    good_vpc: dict[str, str], check: Check, tmp_path: Path
) -> None:
    """``--config``: the host the agent dials (``connect_to``, else the URL's) is judged by the
    same definition ``doctor`` uses (agent/vpc/private_link.py)."""
    private = agent_config(tmp_path, url=f"wss://cp.{PRIVATE_ZONE}/v1/agent")
    report = check(good_vpc, "--config", str(private))
    assert report["ok"], json.dumps(report, indent=1)
    found = {f["rule"]: f["found"] for f in report["findings"]}
    assert found["private-link-dns"].startswith(f"cp.{PRIVATE_ZONE} [zone {PRIVATE_ZONE}] -> vpce-")
    assert found["private-link-dns"].endswith("(in 10.0.0.0/16; control_plane.url)")

    public = agent_config(
        tmp_path, url="wss://cp.vendor.example/v1/agent", connect_to="203.0.113.7:443"
    )
    failed = failures(check(good_vpc, "--config", str(public)))
    assert set(failed) == {"private-link-dns", "private-link-443"}
    assert "outside the VPC's 10.0.0.0/16" in failed["private-link-dns"]["found"]
    assert (
        "no network interface in the VPC holds 203.0.113.7" in failed["private-link-443"]["found"]
    )


def test_a_name_outside_the_private_zone_fails_resolution(
    good_vpc: dict[str, str], check: Check
) -> None:
    failed = failures(check(good_vpc, "--domain", "api.vendor.example"))
    assert set(failed) == {"private-link-dns"}
    assert "public DNS" in failed["private-link-dns"]["found"]


def test_errors_are_one_line_not_tracebacks(moto_server: MotoServer) -> None:
    missing = run_cli(moto_server, "vpc", "check", "--vpc-id", "vpc-0123456789abcdef0")
    assert missing.returncode == 1
    assert missing.stderr.startswith("byoc-agent: error: vpc-0123456789abcdef0 in us-east-1")
    assert "Traceback" not in missing.stderr
    malformed = run_cli(moto_server, "vpc", "check", "--vpc-id", "sg-0123")
    assert malformed.returncode == 2
    assert "expected vpc-<hex id>" in malformed.stderr
