"""The AWS stand-in for the VPC tests: moto's server as a separate process on loopback
(``tests/aws_stand_in.py``, run with the ``.tools`` Python from ``make tools``), one per test
session, and helpers to deploy CloudFormation templates into it through the CloudFormation API.

Nothing here patches boto3 or botocore in the test process: every call goes over HTTP to the
server, as it would to AWS, signed with throwaway credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import boto3

from tests.ci import unavailable
from tests.conftest import scaled

if TYPE_CHECKING:
    from boto3.session import Session

REPO: Final = Path(__file__).resolve().parent.parent
TOOLS_BIN: Final = REPO / ".tools" / "bin"
REGION: Final = "us-east-1"
ZONES: Final = ("us-east-1a", "us-east-1b", "us-east-1c")


def tool(name: str) -> Path:
    """A program from ``make tools``; skips the test without it, fails it under CI=true."""
    path = TOOLS_BIN / name
    if not path.exists():
        unavailable(f"{path} is missing: run `make tools`")
    return path


@dataclass(frozen=True)
class MotoServer:
    url: str

    @property
    def env(self) -> dict[str, str]:
        """What a process (the CLI, the README's commands) needs to talk to the stand-in."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def session(self) -> Session:
        made: Session = boto3.session.Session(
            region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        return made


@contextlib.contextmanager
def running_moto() -> Iterator[MotoServer]:
    python = tool("python")
    process = subprocess.Popen(
        [str(python), str(REPO / "tests" / "aws_stand_in.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=scaled(60)):
                raise RuntimeError("the AWS stand-in did not start within 60 s")
        line = process.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the AWS stand-in did not start (exit {process.poll()}): {line!r}")
        yield MotoServer(url=f"http://127.0.0.1:{int(line.split()[1])}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def deploy(
    session: Session,
    url: str,
    stack: str,
    template: Mapping[str, Any],
    parameters: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Create a stack through the CloudFormation API; its outputs once complete."""
    cfn = session.client("cloudformation", endpoint_url=url)
    cfn.create_stack(
        StackName=stack,
        TemplateBody=json.dumps(template),
        Parameters=[
            {"ParameterKey": key, "ParameterValue": value}
            for key, value in (parameters or {}).items()
        ],
    )
    cfn.get_waiter("stack_create_complete").wait(
        StackName=stack, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    (described,) = cfn.describe_stacks(StackName=stack)["Stacks"]
    return {out["OutputKey"]: out["OutputValue"] for out in described.get("Outputs", [])}


def vendor_service(session: Session, url: str, name: str, private_dns_name: str) -> str:
    """The vendor's side of the private link, in a VPC of its own: a network load balancer
    behind an endpoint service whose private DNS name is ``private_dns_name``."""
    ec2 = session.client("ec2", endpoint_url=url)
    vpc = ec2.create_vpc(CidrBlock="172.31.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="172.31.0.0/24", AvailabilityZone=ZONES[0])
    elb = session.client("elbv2", endpoint_url=url)
    balancer = elb.create_load_balancer(
        Name=name, Subnets=[subnet["Subnet"]["SubnetId"]], Type="network", Scheme="internal"
    )["LoadBalancers"][0]["LoadBalancerArn"]
    service = ec2.create_vpc_endpoint_service_configuration(
        NetworkLoadBalancerArns=[balancer], PrivateDnsName=private_dns_name
    )
    return service["ServiceConfiguration"]["ServiceName"]


def run_cli(server: MotoServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``byoc-agent ARGS`` as a separate process, talking to the stand-in."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "byoc-agent"), *args],
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        check=False,
        timeout=scaled(120),
    )
