"""``byoc-agent vpc template`` and ``vpc policy``: the shipped files are what the commands write,
the template passes cfn-lint and checkov, its parameter patterns (which moto does not enforce)
hold, the IAM policy is read-only by AWS's own action catalogue, and the agent runs without
boto3. Deploying the template is tests/test_vpc_check.py."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.vpc import aws, template
from agent.vpc.errors import TemplateError
from agent.vpc.requirements import PRIVATE_SUBNET_PREFIX, PUBLIC_SUBNET_PREFIX
from agent.vpc.template import SubnetPlan, TemplateOptions, cidr_pattern
from tests.aws_moto import REPO, ZONES, tool

SHIPPED_TEMPLATE = REPO / "deploy" / "aws" / "vpc.template.json"
SHIPPED_POLICY = REPO / aws.POLICY_FILE
FULL = TemplateOptions(
    name="acme",
    availability_zones=ZONES,
    cidr="10.20.0.0/16",
    vendor="acme-db",
    https_ingress_cidr="0.0.0.0/0",
    endpoint_service="com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
    private_zone="byoc.vendor.example",
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "byoc-agent"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_shipped_files_are_what_the_commands_write(tmp_path: Path) -> None:
    written = tmp_path / "vpc.json"
    assert cli("vpc", "template", "--output", str(written)).returncode == 0
    assert written.read_text() == SHIPPED_TEMPLATE.read_text()
    policy = cli("vpc", "policy")
    assert policy.returncode == 0
    assert json.loads(policy.stdout) == json.loads(SHIPPED_POLICY.read_text())


@pytest.mark.parametrize("options", [None, FULL], ids=["shipped", "every-option"])
def test_cfn_lint_is_clean(tmp_path: Path, options: TemplateOptions | None) -> None:
    path = tmp_path / "vpc.json"
    path.write_text(template.render(template.build(options)))
    done = subprocess.run(
        [str(tool("cfn-lint")), str(path)], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_checkov_finds_nothing_unjustified(tmp_path: Path) -> None:
    built = template.build(FULL)
    path = tmp_path / "vpc.json"
    path.write_text(template.render(built))
    done = subprocess.run(
        [str(tool("checkov")), "-f", str(path), "--framework", "cloudformation",
         "--skip-download", "--output", "json"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    summary = result["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] == len(built["Resources"])  # it read every resource
    assert summary["passed"] > 0
    assert result["results"]["failed_checks"] == [], result["results"]["failed_checks"]
    for skipped in result["results"]["skipped_checks"]:  # each one justified in Metadata
        assert skipped["check_result"].get("suppress_comment"), skipped["check_id"]
    assert done.returncode == 0


def test_the_parameter_patterns_admit_the_requirements_only() -> None:
    """CloudFormation enforces AllowedPattern at deploy time; moto does not, so the patterns
    are checked here (they use no syntax where Java's and Python's regexes differ)."""
    parameters = template.build(FULL)["Parameters"]

    def admits(name: str, value: str) -> bool:
        return re.fullmatch(parameters[name]["AllowedPattern"], value) is not None

    for name, spec in parameters.items():
        if "AllowedPattern" in spec:
            assert admits(name, str(spec["Default"])), name
    assert not admits("VpcCidr", "10.0.0.0/20")
    assert not admits("VpcCidr", "10.0.0.256/16")
    assert not admits("PrivateSubnet1Cidr", "10.0.0.0/17")
    assert not admits("PublicSubnetCidr", "10.0.192.0/23")
    assert admits("HttpsIngressCidr", "")
    assert not admits("HttpsIngressCidr", "anywhere")
    assert not admits("EndpointServiceName", "com.amazonaws.us-east-1.s3")
    assert not admits("PrivateZoneName", "Vendor..example")


@given(st.integers(min_value=0, max_value=2**16 - 1))
def test_every_slash_16_gets_a_compliant_subnet_plan(high: int) -> None:
    vpc = ipaddress.IPv4Network((high << 16, 16))
    plan = SubnetPlan.of(str(vpc))
    private = [ipaddress.IPv4Network(cidr) for cidr in plan.private]
    public = ipaddress.IPv4Network(plan.public)
    assert len(private) == 3
    assert {p.prefixlen for p in private} == {PRIVATE_SUBNET_PREFIX}
    assert public.prefixlen == PUBLIC_SUBNET_PREFIX
    everything = [*private, public]
    assert all(subnet.subnet_of(vpc) for subnet in everything)
    assert not any(a.overlaps(b) for i, a in enumerate(everything) for b in everything[i + 1 :])
    assert re.fullmatch(cidr_pattern(16), str(vpc))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cidr": "10.0.0.0/20"}, "must be a /16"),
        ({"availability_zones": ("us-east-1a", "us-east-1a", "us-east-1b")}, "3 different"),
        ({"availability_zones": ("us-east-1a", "us-east-1b")}, "3 different"),
        ({"private_zone": "byoc.vendor.example"}, "needs the endpoint service"),
        ({"endpoint_service": "s3"}, "endpoint service name"),
        ({"name": "-x"}, "name"),
    ],
)
def test_options_that_cannot_build_a_compliant_vpc_are_refused(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(TemplateError, match=message):
        TemplateOptions(**options)


def test_the_cli_refuses_them_with_a_usage_error() -> None:
    done = cli("vpc", "template", "--azs", "us-east-1a,us-east-1b")
    assert done.returncode == 2
    assert done.stderr.startswith("byoc-agent vpc template: give 3 different availability zones")
    assert done.stdout == ""


def test_the_policy_is_read_only_by_aws_own_catalogue() -> None:
    """policy_sentry (installed with checkov) carries AWS's service authorization reference:
    every action must exist, be of access level List or Read, and need no action outside it."""
    script = (
        "import json, sys\n"
        "from policy_sentry.querying.actions import get_action_data\n"
        "out = {}\n"
        "for action in json.load(sys.stdin):\n"
        "    service, name = action.split(':')\n"
        "    out[action] = get_action_data(service, name).get(service, [])\n"
        "print(json.dumps(out))\n"
    )
    actions = json.loads(SHIPPED_POLICY.read_text())["Statement"][0]["Action"]
    done = subprocess.run(
        [str(tool("python")), "-c", script],
        input=json.dumps(actions),
        capture_output=True,
        text=True,
        check=True,
    )
    catalogue: dict[str, list[dict[str, Any]]] = json.loads(done.stdout)
    for action in actions:
        entries = catalogue[action]
        assert entries, f"{action} is not an IAM action"
        assert {entry["access_level"] for entry in entries} <= {"List", "Read"}, action
        needs = {dep for entry in entries for dep in entry.get("dependent_actions") or []}
        assert needs <= set(actions), (action, needs)


def test_the_agent_runs_without_boto3() -> None:
    """boto3 is the optional ``aws`` extra: the daemon and the CLI import without it, the
    template and policy commands work, and ``vpc check`` says what to install."""
    script = (
        "import sys\n"
        "sys.modules['boto3'] = None  # as if not installed: import raises ImportError\n"
        "import agent.daemon, agent.cli, agent.vpc.rules, agent.vpc.template\n"
        "assert agent.cli.main(['vpc', 'policy']) == 0\n"
        "code = agent.cli.main(['vpc', 'check', '--vpc-id', 'vpc-0123456789abcdef0'])\n"
        "print('check exit', code)\n"
        "print('botocore loaded', 'botocore' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "check exit 1" in done.stdout
    assert "botocore loaded False" in done.stdout
    assert "boto3 is not installed: pip install 'byoc-agent[aws]'" in done.stderr
