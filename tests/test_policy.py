"""Tests of the customer's policy (agent.core.policy): strict parsing and decisions."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.commands import MAX_REPLICAS, CollectMetrics, Scale, Upgrade
from agent.core.errors import PolicyError
from agent.core.policy import (
    CollectMetricsRules,
    Decision,
    Policy,
    ScaleRules,
    UpgradeRules,
    Verdict,
)

FULL = b"""
version = 1

[scale]
allow = true
min_replicas = 1
max_replicas = 6
approval_above = 4

[upgrade]
allow = true
versions = ["1.0.0", "2.0.0"]
require_approval = false

[collect_metrics]
allow = true
targets = ["workload", "host"]
"""


def policy(text: str) -> Policy:
    return Policy.from_toml(text.encode("utf-8"))


def policy_error(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    with pytest.raises(PolicyError) as info:
        Policy.from_toml(data)
    return str(info.value)


# -- parsing --------------------------------------------------------------------------------------


def test_full_policy() -> None:
    parsed = Policy.from_toml(FULL)
    assert parsed.scale == ScaleRules(
        allow=True, min_replicas=1, max_replicas=6, approval_above=4, require_approval=False
    )
    assert parsed.upgrade == UpgradeRules(
        allow=True, versions=frozenset({"1.0.0", "2.0.0"}), require_approval=False
    )
    assert parsed.collect_metrics == CollectMetricsRules(
        allow=True, targets=frozenset({"workload", "host"}), require_approval=False
    )


def test_sha256_of_the_bytes() -> None:
    assert Policy.from_toml(FULL).sha256 == hashlib.sha256(FULL).hexdigest()
    # A comment changes the bytes, hence the hash, but not the rules.
    commented = FULL + b"# reviewed\n"
    assert Policy.from_toml(commented).sha256 == hashlib.sha256(commented).hexdigest()
    assert Policy.from_toml(commented).sha256 != Policy.from_toml(FULL).sha256
    assert Policy.from_toml(commented).scale == Policy.from_toml(FULL).scale


def test_minimal_policy_has_no_sections() -> None:
    parsed = policy("version = 1\n")
    assert (parsed.scale, parsed.upgrade, parsed.collect_metrics) == (None, None, None)
    assert parsed.summary() == {}


def test_defaults() -> None:
    parsed = policy("version = 1\n[scale]\nmax_replicas = 3\n[upgrade]\n[collect_metrics]\n")
    assert parsed.scale == ScaleRules(
        allow=True, min_replicas=0, max_replicas=3, approval_above=None, require_approval=False
    )
    assert parsed.upgrade == UpgradeRules(allow=True, versions=frozenset(), require_approval=False)
    assert parsed.collect_metrics == CollectMetricsRules(
        allow=True, targets=frozenset(), require_approval=False
    )


def test_summary() -> None:
    assert Policy.from_toml(FULL).summary() == {
        "scale": {
            "allow": True,
            "replicas": [1, 6],
            "approval_above": 4,
            "require_approval": False,
        },
        "upgrade": {"allow": True, "versions": ["1.0.0", "2.0.0"], "require_approval": False},
        "collect_metrics": {
            "allow": True,
            "targets": ["host", "workload"],
            "require_approval": False,
        },
    }


def test_unknown_section_named() -> None:
    message = policy_error("version = 1\n[reboot]\nallow = true\n")
    assert "unknown top-level key" in message
    assert "'reboot'" in message


def test_unknown_top_level_key_named() -> None:
    assert "'allow_all'" in policy_error("version = 1\nallow_all = true\n")


@pytest.mark.parametrize(
    ("section", "body", "key"),
    [
        ("scale", "max_replicas = 3\nmax_replica = 4", "max_replica"),
        ("upgrade", "version = ['1.0.0']", "version"),
        ("collect_metrics", "target = ['host']", "target"),
        ("collect_metrics", "approval_above = 2", "approval_above"),
    ],
)
def test_unknown_key_named(section: str, body: str, key: str) -> None:
    message = policy_error(f"version = 1\n[{section}]\n{body}\n")
    assert f"[{section}]" in message
    assert repr(key) in message


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("[scale]\nallow = 1\nmax_replicas = 3", "scale.allow"),
        ("[scale]\nallow = 'yes'\nmax_replicas = 3", "scale.allow"),
        ("[scale]\nmax_replicas = '3'", "scale.max_replicas"),
        ("[scale]\nmax_replicas = 3.0", "scale.max_replicas"),
        ("[scale]\nmax_replicas = true", "scale.max_replicas"),
        ("[scale]\nmax_replicas = 3\nmin_replicas = 1.5", "scale.min_replicas"),
        ("[scale]\nmax_replicas = 3\nmin_replicas = false", "scale.min_replicas"),
        ("[scale]\nmax_replicas = 3\napproval_above = '2'", "scale.approval_above"),
        ("[scale]\nmax_replicas = 3\nrequire_approval = 'no'", "scale.require_approval"),
        ("[upgrade]\nversions = '1.0.0'", "upgrade.versions"),
        ("[upgrade]\nversions = [1, 2]", "upgrade.versions"),
        ("[upgrade]\nversions = ['bad version']", "upgrade.versions"),
        ("[upgrade]\nrequire_approval = 0", "upgrade.require_approval"),
        ("[collect_metrics]\ntargets = 'host'", "collect_metrics.targets"),
        ("[collect_metrics]\ntargets = ['Host']", "collect_metrics.targets"),
        ("[collect_metrics]\nallow = 'true'", "collect_metrics.allow"),
    ],
)
def test_wrong_types_name_the_key(body: str, named: str) -> None:
    assert named in policy_error(f"version = 1\n{body}\n")


@pytest.mark.parametrize("section", ["scale", "upgrade", "collect_metrics"])
def test_section_must_be_a_table(section: str) -> None:
    message = policy_error(f"version = 1\n{section} = true\n")
    assert f"[{section}] must be a table" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_replicas", -1),
        ("max_replicas", MAX_REPLICAS + 1),
        ("min_replicas", -1),
        ("approval_above", MAX_REPLICAS + 1),
    ],
)
def test_replica_bounds_out_of_range(key: str, value: int) -> None:
    body = {"max_replicas": 3, key: value}
    text = "version = 1\n[scale]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())
    message = policy_error(text)
    assert f"scale.{key}" in message
    assert f"0..{MAX_REPLICAS}" in message


def test_min_greater_than_max() -> None:
    message = policy_error("version = 1\n[scale]\nmin_replicas = 5\nmax_replicas = 4\n")
    assert "scale.min_replicas" in message
    assert "scale.max_replicas" in message


def test_min_equal_to_max_accepted() -> None:
    rules = policy("version = 1\n[scale]\nmin_replicas = 4\nmax_replicas = 4\n").scale
    assert rules is not None
    assert (rules.min_replicas, rules.max_replicas) == (4, 4)


def test_missing_max_replicas() -> None:
    assert "scale.max_replicas is required" in policy_error("version = 1\n[scale]\nallow = true\n")


def test_missing_version() -> None:
    assert "version" in policy_error("[scale]\nmax_replicas = 3\n")


@pytest.mark.parametrize("value", ["0", "2", "'1'", "[1]"])
def test_unknown_version(value: str) -> None:
    assert "version must be 1" in policy_error(f"version = {value}\n")


@pytest.mark.parametrize("value", ["true", "1.0"])
def test_version_must_be_the_integer_one(value: str) -> None:
    # `true == 1` and `1.0 == 1` in Python; the file format version must not be coerced.
    assert "version" in policy_error(f"version = {value}\n")


@pytest.mark.parametrize(
    "data",
    [b"version = ", b"[scale\nmax_replicas = 1", b"version = 1\nversion = 1\n", b"\xff\xfe"],
)
def test_invalid_toml(data: bytes) -> None:
    assert "not valid TOML" in policy_error(data)


# -- decisions ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full() -> Policy:
    return Policy.from_toml(FULL)


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_scale_allowed(full: Policy, replicas: int) -> None:
    assert full.decide(Scale(replicas)) == Decision(
        Verdict.ALLOW, "scale", "scale is within the policy"
    )


@pytest.mark.parametrize("replicas", [5, 6])
def test_scale_above_approval_threshold(full: Policy, replicas: int) -> None:
    decision = full.decide(Scale(replicas))
    assert decision.verdict is Verdict.REQUIRE_APPROVAL
    assert decision.rule == "scale.approval_above"
    assert str(replicas) in decision.reason


def test_scale_below_min(full: Policy) -> None:
    decision = full.decide(Scale(0))
    assert decision.verdict is Verdict.DENY
    assert decision.rule == "scale.min_replicas"
    assert "minimum of 1" in decision.reason


@pytest.mark.parametrize("replicas", [7, MAX_REPLICAS])
def test_scale_above_max(full: Policy, replicas: int) -> None:
    decision = full.decide(Scale(replicas))
    assert decision.verdict is Verdict.DENY
    assert decision.rule == "scale.max_replicas"
    assert "maximum of 6" in decision.reason


def test_scale_require_approval() -> None:
    rules = policy("version = 1\n[scale]\nmax_replicas = 3\nrequire_approval = true\n")
    decision = rules.decide(Scale(2))
    assert decision.verdict is Verdict.REQUIRE_APPROVAL
    assert decision.rule == "scale.require_approval"
    # Bounds still deny before approval is considered.
    assert rules.decide(Scale(4)).verdict is Verdict.DENY


def test_upgrade_decisions(full: Policy) -> None:
    assert full.decide(Upgrade("2.0.0")) == Decision(
        Verdict.ALLOW, "upgrade", "upgrade is within the policy"
    )
    denied = full.decide(Upgrade("3.0.0"))
    assert denied.verdict is Verdict.DENY
    assert denied.rule == "upgrade.versions"
    assert "'3.0.0'" in denied.reason


def test_upgrade_version_match_is_exact(full: Policy) -> None:
    assert full.decide(Upgrade("2.0")).verdict is Verdict.DENY
    assert full.decide(Upgrade("2.0.0-rc1")).verdict is Verdict.DENY
    assert full.decide(Upgrade("v2.0.0")).verdict is Verdict.DENY


def test_upgrade_with_empty_version_list_denies_everything() -> None:
    rules = policy("version = 1\n[upgrade]\nallow = true\n")
    assert rules.decide(Upgrade("1.0.0")).rule == "upgrade.versions"


def test_upgrade_require_approval() -> None:
    rules = policy("version = 1\n[upgrade]\nversions = ['1.0.0']\nrequire_approval = true\n")
    assert rules.decide(Upgrade("1.0.0")) == Decision(
        Verdict.REQUIRE_APPROVAL, "upgrade.require_approval", "upgrade needs local approval"
    )
    assert rules.decide(Upgrade("9.9.9")).verdict is Verdict.DENY


def test_metrics_decisions(full: Policy) -> None:
    assert full.decide(CollectMetrics(("workload",))).verdict is Verdict.ALLOW
    assert full.decide(CollectMetrics(("host", "workload"))).rule == "collect_metrics"
    denied = full.decide(CollectMetrics(("host", "db", "cache")))
    assert denied.verdict is Verdict.DENY
    assert denied.rule == "collect_metrics.targets"
    assert "['db', 'cache']" in denied.reason


def test_metrics_require_approval() -> None:
    rules = policy("version = 1\n[collect_metrics]\ntargets = ['host']\nrequire_approval = true\n")
    decision = rules.decide(CollectMetrics(("host",)))
    assert decision.verdict is Verdict.REQUIRE_APPROVAL
    assert decision.rule == "collect_metrics.require_approval"


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        (Scale(1), "scale"),
        (Upgrade("1.0.0"), "upgrade"),
        (CollectMetrics(("host",)), "collect_metrics"),
    ],
)
def test_missing_section_denies(command: Scale | Upgrade | CollectMetrics, kind: str) -> None:
    decision = policy("version = 1\n").decide(command)
    assert decision.verdict is Verdict.DENY
    assert decision.rule == kind
    assert f"no [{kind}] section" in decision.reason


def test_allow_false_denies() -> None:
    rules = policy(
        "version = 1\n"
        "[scale]\nallow = false\nmax_replicas = 5\n"
        "[upgrade]\nallow = false\nversions = ['1.0.0']\n"
        "[collect_metrics]\nallow = false\ntargets = ['host']\n"
    )
    for command, kind in (
        (Scale(1), "scale"),
        (Upgrade("1.0.0"), "upgrade"),
        (CollectMetrics(("host",)), "collect_metrics"),
    ):
        decision = rules.decide(command)
        assert decision.verdict is Verdict.DENY
        assert decision.rule == f"{kind}.allow"
        assert "disabled" in decision.reason


def test_verdict_values() -> None:
    assert [v.value for v in Verdict] == ["allow", "deny", "require_approval"]


# -- property -------------------------------------------------------------------------------------


@st.composite
def _scale_rules(draw: st.DrawFn) -> ScaleRules:
    low = draw(st.integers(min_value=0, max_value=MAX_REPLICAS))
    high = draw(st.integers(min_value=low, max_value=MAX_REPLICAS))
    approval = draw(st.none() | st.integers(min_value=0, max_value=MAX_REPLICAS))
    return ScaleRules(
        allow=True,
        min_replicas=low,
        max_replicas=high,
        approval_above=approval,
        require_approval=draw(st.booleans()),
    )


@settings(max_examples=500, deadline=None)
@given(_scale_rules(), st.integers(min_value=0, max_value=MAX_REPLICAS))
def test_scale_verdict_property(rules: ScaleRules, replicas: int) -> None:
    decision = Policy(scale=rules).decide(Scale(replicas))
    outside = not rules.min_replicas <= replicas <= rules.max_replicas
    needs_approval = rules.require_approval or (
        rules.approval_above is not None and replicas > rules.approval_above
    )
    assert (decision.verdict is Verdict.DENY) == outside
    if not outside:
        expected = Verdict.REQUIRE_APPROVAL if needs_approval else Verdict.ALLOW
        assert decision.verdict is expected


@settings(max_examples=200, deadline=None)
@given(_scale_rules(), st.integers(min_value=0, max_value=MAX_REPLICAS))
def test_scale_verdict_property_through_toml(rules: ScaleRules, replicas: int) -> None:
    lines = [
        "version = 1",
        "[scale]",
        f"min_replicas = {rules.min_replicas}",
        f"max_replicas = {rules.max_replicas}",
        f"require_approval = {'true' if rules.require_approval else 'false'}",
    ]
    if rules.approval_above is not None:
        lines.append(f"approval_above = {rules.approval_above}")
    parsed = policy("\n".join(lines) + "\n")
    assert parsed.scale == rules
    assert parsed.decide(Scale(replicas)) == Policy(scale=rules).decide(Scale(replicas))
