"""Stream targets and the policy's rules about them (agent/core/targets.py, [open_stream])."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.core.commands import OpenStream, parse_command
from agent.core.errors import CommandRejected, PolicyError
from agent.core.policy import Policy, Verdict
from agent.core.targets import (
    TargetError,
    check_resolved,
    forbidden,
    parse_rule,
    parse_target,
)


@pytest.mark.parametrize(
    ("text", "host", "port", "literal"),
    [
        ("127.0.0.1:9091", "127.0.0.1", 9091, True),
        ("[::1]:443", "::1", 443, True),
        ("[::ffff:10.0.0.1]:5432", "10.0.0.1", 5432, True),  # judged as the IPv4 it carries
        ("DB.Internal.:5432", "db.internal", 5432, False),
        ("localhost:1", "localhost", 1, False),
    ],
)
def test_targets_parse(text: str, host: str, port: int, literal: bool) -> None:
    target = parse_target(text)
    assert (target.host, target.port, target.address is not None) == (host, port, literal)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        ":80",
        "host:0",
        "host:65536",
        "host:080",
        "::1:80",
        "[::1]80",
        "[db]:80",
        "bad_name:80",
        "-x.example:80",
        "a" * 300 + ":1",
        "host:-1",
        "host: 80",
        80,
    ],
)
def test_bad_targets_are_refused(text: object) -> None:
    with pytest.raises(TargetError):
        parse_target(text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("10.0.0.0/8:5432", "10.0.0.0/8:5432"),
        ("192.0.2.7:80", "192.0.2.7/32:80"),
        ("[fd00::/64]:8000-8100", "[fd00::/64]:8000-8100"),
        ("db.internal:5432", "db.internal:5432"),
    ],
)
def test_rules_parse(text: str, shown: str) -> None:
    assert str(parse_rule(text)) == shown


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1/8:5432", "10.0.0.0/33:1", "host:2-1", "[::ffff:0:0/96]:1", "[db]:1", "x y:1"],
)
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(TargetError):
        parse_rule(text)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
@example(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))
@example(ipaddress.ip_address("64:ff9b:1::a9fe:1"))
@example(ipaddress.ip_address("::169.254.169.254"))
@example(ipaddress.ip_address("::ffff:0:a9fe:a9fe"))
@example(ipaddress.ip_address("64:ff9b::a00:1"))
def test_forbidden_is_exactly_link_local_and_the_metadata_service(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    """Link-local and the metadata service, also inside the IPv6 forms that carry an IPv4
    address in their last 32 bits and reach it (mapped, NAT64 /96, compatible, translated)."""
    link_local = ipaddress.ip_network("169.254.0.0/16")
    if address.version == 4:
        expected = address in link_local
    else:
        carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        carrier = int(address) >> 32
        carriers = {0xFFFF, 0x64FF9B << 64, (0x64FF9B << 64) | (1 << 48), 0, 0xFFFF << 16}
        expected = (
            (carrier in carriers and carried in link_local)
            or address in ipaddress.ip_network("fe80::/10")
            or address == ipaddress.ip_address("fd00:ec2::254")
        )
    assert forbidden(address) is expected


@pytest.mark.parametrize(
    "host",
    ["2852039166", "127.1", "0xa9.0xfe.0xa9.0xfe", "0251.0376.0251.0376", "010.0.0.1", "0x7f000001",
     "169.254.43518", "db.123", "1.2.3.4.5", "127.0.0.1."],
)  # fmt: skip
def test_numeric_host_forms_are_not_host_names(host: str) -> None:
    """What a resolver reads as an IPv4 address is refused as a host name, in a grant and in a
    rule alike: ``2852039166`` is 169.254.169.254 (docs/PROTOCOL.md §13.1)."""
    with pytest.raises(TargetError, match="dotted-decimal"):
        parse_target(f"{host}:80")
    with pytest.raises(TargetError, match="dotted-decimal"):
        parse_rule(f"{host}:80")


@pytest.mark.parametrize("host", ["1e100.net", "0x.example", "db-1.internal", "123abc.example"])
def test_names_with_digits_are_still_host_names(host: str) -> None:
    assert parse_target(f"{host}:80").address is None
    assert parse_rule(f"{host}:80").name == host


def _policy(*rules: str, max_duration: int = 600, approval: bool = False) -> Policy:
    quoted = ", ".join(f'"{r}"' for r in rules)
    return Policy.from_toml(
        f"version = 1\n[open_stream]\ntargets = [{quoted}]\nmax_duration = {max_duration}\n"
        f"require_approval = {'true' if approval else 'false'}\n".encode()
    )


def _grant(target: str, max_duration: int = 60) -> OpenStream:
    command = parse_command(
        {"type": "open_stream", "params": {"target": target, "max_duration": max_duration}}
    )
    assert isinstance(command, OpenStream)
    return command


@pytest.mark.parametrize(
    ("rules", "target", "verdict"),
    [
        (("127.0.0.1:9091",), "127.0.0.1:9091", Verdict.ALLOW),
        (("127.0.0.1:9091",), "127.0.0.1:9092", Verdict.DENY),
        (("10.0.0.0/8:5000-6000",), "10.9.8.7:5432", Verdict.ALLOW),
        (("10.0.0.0/8:5000-6000",), "11.0.0.1:5432", Verdict.DENY),
        (("0.0.0.0/0:1-65535",), "169.254.169.254:80", Verdict.DENY),
        (("0.0.0.0/0:1-65535", "169.254.169.254/32:80"), "169.254.169.254:80", Verdict.ALLOW),
        (("[::/0]:1-65535",), "[fd00:ec2::254]:80", Verdict.DENY),
        (("[::/0]:1-65535",), "[fe80::1]:80", Verdict.DENY),
        (("0.0.0.0/0:80",), "[::ffff:169.254.169.254]:80", Verdict.DENY),
        (("[::/0]:1-65535",), "[64:ff9b::a9fe:a9fe]:80", Verdict.DENY),  # NAT64
        (("[::/0]:1-65535",), "[::169.254.169.254]:80", Verdict.DENY),  # IPv4-compatible
        (("[64:ff9b::a9fe:a9fe/128]:80",), "[64:ff9b::a9fe:a9fe]:80", Verdict.ALLOW),  # named
        (("db.internal:5432",), "DB.internal:5432", Verdict.ALLOW),
        (("db.internal:5432",), "db.internal.evil.example:5432", Verdict.DENY),
        (("10.0.0.0/8:5432",), "db.internal:5432", Verdict.DENY),  # names need name rules
        ((), "127.0.0.1:9091", Verdict.DENY),
    ],
)
def test_policy_decides_on_targets(rules: tuple[str, ...], target: str, verdict: Verdict) -> None:
    assert _policy(*rules).decide(_grant(target)).verdict is verdict


def test_policy_bounds_duration_and_can_require_approval() -> None:
    assert _policy("127.0.0.1:1", max_duration=60).decide(_grant("127.0.0.1:1", 61)).verdict is (
        Verdict.DENY
    )
    decision = _policy("127.0.0.1:1", approval=True).decide(_grant("127.0.0.1:1"))
    assert decision.verdict is Verdict.REQUIRE_APPROVAL
    assert Policy.from_toml(b"version = 1\n").decide(_grant("127.0.0.1:1")).verdict is (
        Verdict.DENY
    )


def test_a_bad_rule_makes_the_policy_unusable() -> None:
    with pytest.raises(PolicyError, match=r"open_stream\.targets"):
        _policy("10.0.0.1/8:80")


def test_a_name_that_resolves_to_the_metadata_service_is_refused_at_connect_time() -> None:
    """DNS can point an allowed name anywhere: the resolved addresses are checked too."""
    policy = _policy("metadata.internal:80")
    grant = _grant("metadata.internal:80")
    assert policy.decide(grant).verdict is Verdict.ALLOW
    metadata = ipaddress.ip_address("169.254.169.254")
    with pytest.raises(CommandRejected, match="link-local or instance-metadata") as caught:
        policy.stream_addresses(grant, [metadata])
    assert caught.value.code == "target_forbidden"
    ordinary = ipaddress.ip_address("10.0.0.5")
    assert policy.stream_addresses(grant, [metadata, ordinary]) == [ordinary]
    explicit = _policy("metadata.internal:80", "169.254.169.254/32:80")
    assert explicit.stream_addresses(grant, [metadata]) == [metadata]


def test_check_resolved_names_every_refused_address() -> None:
    rules = [parse_rule("10.0.0.0/8:80")]
    with pytest.raises(CommandRejected, match=r"192\.0\.2\.1"):
        check_resolved(parse_target("192.0.2.1:80"), [ipaddress.ip_address("192.0.2.1")], rules)
