"""Stream targets and the customer's rules about them (sans-I/O).

A stream grant names a target ``HOST:PORT`` (``[v6]:PORT`` for IPv6 literals). The policy's
``[open_stream] targets`` list holds rules of two kinds:

- a host-name rule ``db.internal:5432`` matches that name (case-insensitive) and nothing else;
- a network rule ``10.0.0.0/8:5432``, ``192.0.2.7:80``, ``[fd00::/64]:8000-8100`` matches IP
  literals in the network, and every address a host name resolves to at connect time.

The port part is one port or an inclusive range ``LOW-HIGH``.

Some addresses are never reachable through a broad rule: link-local and instance-metadata
addresses (``169.254.0.0/16``, ``fe80::/10``, ``fd00:ec2::254``). Only a network rule that
lies entirely inside one of those ranges (``169.254.169.254/32:80``) allows them: a customer
must name the metadata service to expose it. IPv4-mapped IPv6 addresses are judged as the IPv4
address they carry; the other IPv6 forms that carry a link-local IPv4 address (NAT64,
IPv4-compatible, IPv4-translated) are forbidden too.

An *IP literal* is a dotted-decimal IPv4 address (``a.b.c.d``, no leading zeros) or an IPv6
address (in brackets with a port). Anything else is a host name, and a host name must not be a
numeric form of an IPv4 address (``2852039166``, ``127.1``, hex or octal parts, or an
all-digit last label): resolvers read those as addresses, so they are refused, in grants and
in rules alike.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.core.errors import CommandRejected

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FORBIDDEN_NETWORKS: Final[tuple[IPNetwork, ...]] = (
    ipaddress.ip_network("169.254.0.0/16"),  # IPv4 link-local, including 169.254.169.254
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("fd00:ec2::254/128"),  # the EC2 instance metadata service over IPv6
    # IPv6 forms that carry an IPv4 link-local address in their last 32 bits and can reach it:
    ipaddress.ip_network("64:ff9b::a9fe:0/112"),  # NAT64, well-known prefix (RFC 6052)
    ipaddress.ip_network("64:ff9b:1::a9fe:0/112"),  # NAT64, local-use prefix /96 (RFC 8215)
    ipaddress.ip_network("::a9fe:0/112"),  # IPv4-compatible (RFC 4291 §2.5.5.1, deprecated)
    ipaddress.ip_network("::ffff:0:a9fe:0/112"),  # IPv4-translated (SIIT, RFC 2765)
)
"""IPv4-mapped addresses (``::ffff:a.b.c.d``) need no entry: they are judged as the IPv4
address they carry (:func:`unmapped`)."""
MAX_TARGET_CHARS: Final = 261  # a 253-character name, brackets, colon, five digits
_NUMERIC_LABEL: Final = re.compile(r"0[xX][0-9A-Fa-f]*|[0-9]+")
_HOST_NAME: Final = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class TargetError(ValueError):
    """A target or a rule that cannot be parsed (the message says why)."""


@dataclass(frozen=True)
class Target:
    """Where a stream goes: a host name or an IP literal, and a port."""

    host: str
    port: int
    address: IPAddress | None = None
    """Set when ``host`` is an IP literal."""

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class TargetRule:
    """One entry of ``[open_stream] targets``."""

    ports: PortRange
    name: str | None = None
    network: IPNetwork | None = None

    @property
    def inside_forbidden(self) -> bool:
        """True if this rule names (part of) a forbidden range explicitly."""
        return self.network is not None and any(
            self.network.version == f.version and self.network.subnet_of(f)  # type: ignore[arg-type]
            for f in FORBIDDEN_NETWORKS
        )

    def matches_name(self, target: Target) -> bool:
        return (
            self.name is not None
            and target.address is None
            and target.port in self.ports
            and self.name == target.host.lower().rstrip(".")
        )

    def matches_address(self, address: IPAddress, port: int) -> bool:
        return (
            self.network is not None
            and port in self.ports
            and address.version == self.network.version
            and address in self.network
        )

    def __str__(self) -> str:
        if self.name is not None:
            return f"{self.name}:{self.ports}"
        assert self.network is not None  # noqa: S101  # one of the two is always set
        net = str(self.network)
        return f"[{net}]:{self.ports}" if self.network.version == 6 else f"{net}:{self.ports}"


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(text: str, what: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` -> (host, port text)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise TargetError(f"{what} {text!r}: write an IPv6 address as [address]:port")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise TargetError(f"{what} {text!r} must be host:port")
    if ":" in host:
        raise TargetError(f"{what} {text!r}: write an IPv6 address as [address]:port")
    return host, port


def _numeric_host(host: str) -> bool:
    """A host that is not a canonical IP literal but would still be read as an IPv4 address:
    what inet_aton accepts (1..4 parts, each decimal, octal or hex: ``2852039166``, ``127.1``,
    ``0xa9.0xfe.0xa9.0xfe``, ``010.0.0.1``), or any name whose last label is all digits
    (RFC 3696 §2: a top-level domain is never all-numeric). Resolvers turn such names into
    addresses, so they are refused as host names: an IP address is written dotted-decimal."""
    labels = host.rstrip(".").split(".")
    return labels[-1].isdigit() or (
        len(labels) <= 4 and all(_NUMERIC_LABEL.fullmatch(label) for label in labels)
    )


def _host_name(host: str, what: str) -> str:
    """A valid host name, normalised (lower case, no trailing dot); TargetError otherwise."""
    if _numeric_host(host):
        raise TargetError(
            f"{what}: {host!r} is not a host name: resolvers read it as an IPv4 address (a "
            "number, octal or hex parts, or an all-digit last label); write IP addresses "
            "dotted-decimal (a.b.c.d)"
        )
    if not _HOST_NAME.fullmatch(host):
        raise TargetError(f"{what}: {host!r} is not a valid host name")
    return host.lower().rstrip(".")


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535 or (len(text) > 1 and text[0] == "0"):
        raise TargetError(f"{what}: port {text!r} must be a number in 1..65535")
    return int(text)


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unmapped(address)


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_target(text: object) -> Target:
    """The ``target`` parameter of a grant."""
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_TARGET_CHARS:
        raise TargetError(f"target must be a string of 1..{MAX_TARGET_CHARS} characters")
    host, port_text = _split(text, "target")
    port = _port(port_text, f"target {text!r}")
    address = _address(host)
    if address is None:
        if text.startswith("["):
            raise TargetError(f"target {text!r}: {host!r} is not an IPv6 address")
        return Target(host=_host_name(host, f"target {text!r}"), port=port)
    return Target(host=str(address), port=port, address=address)


def parse_rule(text: str) -> TargetRule:
    """One entry of ``[open_stream] targets`` (see the module docstring)."""
    host, port_text = _split(text, "target rule")
    low_text, dash, high_text = port_text.partition("-")
    low = _port(low_text, f"target rule {text!r}")
    high = _port(high_text, f"target rule {text!r}") if dash else low
    if high < low:
        raise TargetError(f"target rule {text!r}: port range {low}-{high} is empty")
    ports = PortRange(low, high)
    try:
        network = ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        if "/" in host or _address(host.split("/")[0]) is not None:
            raise TargetError(f"target rule {text!r}: {exc}") from exc
        if text.startswith("["):
            raise TargetError(
                f"target rule {text!r}: {host!r} is not a host name or network"
            ) from None
        return TargetRule(ports=ports, name=_host_name(host, f"target rule {text!r}"))
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        raise TargetError(f"target rule {text!r}: write IPv4-mapped networks as IPv4")
    return TargetRule(ports=ports, network=network)


def parse_listen(text: str) -> tuple[str, int]:
    """An address to listen on: ``host:port`` or ``[v6]:port``, port 0 (any free port) to
    65535. The host is not checked beyond being present."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TargetError(f"{text!r} is not host:port")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def forbidden(address: IPAddress) -> bool:
    address = unmapped(address)
    return any(address.version == f.version and address in f for f in FORBIDDEN_NETWORKS)


def allowed_by_name(target: Target, rules: Iterable[TargetRule]) -> TargetRule | None:
    """The rule that allows ``target`` before any resolution, if any.

    A host name needs a host-name rule; an IP literal needs a network rule that covers it,
    one inside the forbidden range if the address is forbidden."""
    for rule in rules:
        if target.address is None:
            if rule.matches_name(target):
                return rule
        elif address_rule(target.address, target.port, [rule]) is not None:
            return rule
    return None


def address_rule(address: IPAddress, port: int, rules: Sequence[TargetRule]) -> TargetRule | None:
    """The network rule that allows connecting to ``address:port``, if any."""
    address = unmapped(address)
    is_forbidden = forbidden(address)
    for rule in rules:
        if rule.matches_address(address, port) and (not is_forbidden or rule.inside_forbidden):
            return rule
    return None


def check_resolved(
    target: Target, addresses: Sequence[IPAddress], rules: Sequence[TargetRule]
) -> list[IPAddress]:
    """Of the addresses ``target`` resolved to, those the stream may connect to.

    A host name allowed by a host-name rule may connect to any address it resolves to except
    a forbidden one (unless a network rule names it); a name not covered by a host-name rule
    only to addresses a network rule covers. Raises CommandRejected (``target_forbidden``)
    when none is left, naming why."""
    by_name = allowed_by_name(target, rules) is not None
    usable: list[IPAddress] = []
    refused: list[str] = []
    for raw in addresses:
        address = unmapped(raw)
        named = by_name and not forbidden(address)
        if named or address_rule(address, target.port, rules) is not None:
            usable.append(address)
        else:
            refused.append(str(address))
    if not usable:
        why = (
            "link-local or instance-metadata address"
            if any(forbidden(unmapped(a)) for a in addresses)
            else "not covered by open_stream.targets"
        )
        raise CommandRejected(
            "target_forbidden",
            f"{target} resolved to {', '.join(refused) or 'no address'} ({why})",
        )
    return usable
