"""What the vendor requires of a customer-managed VPC: one definition, used by the rules
(:mod:`agent.vpc.rules`) and by the template (:mod:`agent.vpc.template`), so that the two
cannot drift apart."""

from __future__ import annotations

from typing import Final

VPC_PREFIX: Final = 16
"""The VPC has exactly one IPv4 CIDR block, with this netmask (and no IPv6 block)."""
PUBLIC_SUBNET_PREFIX: Final = 24
"""One public subnet of this size holds the single NAT gateway."""
PRIVATE_SUBNET_PREFIX: Final = 18
PRIVATE_SUBNET_COUNT: Final = 3
"""Private subnets of this size, each in a different availability zone."""
INTERNAL_ELB_TAG: Final = ("kubernetes.io/role/internal-elb", "1")
"""On every private subnet, so that EKS places internal load balancers there."""
HTTPS_PORT: Final = 443
ANYWHERE: Final = "0.0.0.0/0"
VENDOR_TAG_KEY: Final = "Vendor"
DEFAULT_VENDOR: Final = "byoc"
"""The vendor tag (``Vendor=<value>``) goes on everything created for the project."""
