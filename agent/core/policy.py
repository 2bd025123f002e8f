"""The customer's policy: which commands may run here, within which bounds, and which need a
person on the host to approve them.

The policy is a TOML file owned by the customer. Anything it does not allow is refused, however
validly signed. Sans-I/O: :meth:`Policy.from_toml` takes the file's bytes, :meth:`Policy.decide`
takes a typed command and returns a :class:`Decision`.

Example (the full reference is in README.md, "Policy")::

    version = 1

    [scale]
    allow = true
    min_replicas = 1
    max_replicas = 6
    approval_above = 4          # scaling to more than 4 replicas needs local approval

    [upgrade]
    allow = true
    versions = ["1.0.0", "2.0.0"]
    require_approval = false

    [collect_metrics]
    allow = true
    targets = ["workload", "host"]

    [open_stream]               # streams: TCP connections carried through the agent
    allow = true
    targets = ["127.0.0.1:9091", "10.0.0.0/8:5432", "db.internal:5432"]
    max_duration = 3600         # seconds; a grant asking for longer is refused
    require_approval = false

    [update_agent]              # the agent updating itself (README "Updating the agent")
    allow = true
    versions = ["0.*"]          # patterns: * is any run of version characters
    sources = ["https://releases.vendor.example/byoc-agent/"]   # where bundles may come from
    require_approval = true     # the default: a person on the host approves every update
    allow_downgrade = false     # the default: never to a version older than the running one

    [approvals]                 # who may approve or deny on the host
    users = ["alice"]
    groups = ["byoc-operators"]

A command type without a section is not allowed. Without ``[approvals]``, any local user except
the agent's own may approve (the workload the agent supervises may run as that user); with it,
only the users and members of the groups listed, the agent's own user only if listed by name.
Unknown sections and keys are errors, so a typo cannot silently widen or narrow the policy.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent import __version__
from agent.core.commands import (
    MAX_REPLICAS,
    MAX_STREAM_DURATION,
    TARGET_PATTERN,
    VERSION_PATTERN,
    CollectMetrics,
    Command,
    OpenStream,
    Scale,
    UpdateAgent,
    Upgrade,
)
from agent.core.errors import CommandRejected, PolicyError
from agent.core.targets import (
    IPAddress,
    TargetError,
    TargetRule,
    allowed_by_name,
    check_resolved,
    forbidden,
    parse_rule,
)
from agent.core.toml_tables import Table

POLICY_FORMAT_VERSION: Final = 1
_SECTIONS: Final = (
    "scale",
    "upgrade",
    "collect_metrics",
    "open_stream",
    "update_agent",
    "approvals",
)
VERSION_GLOB: Final = re.compile(r"[0-9A-Za-z*][0-9A-Za-z.+_*-]{0,63}")
"""A pattern of allowed agent versions: version characters, ``*`` matching any run of them."""
SOURCE_PREFIX: Final = re.compile(
    r"https?://[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(?::[0-9]{1,5})?"
    r"/(?:[A-Za-z0-9._~+-]+/)*"
)
"""Where agent release bundles may come from: an http(s) URL prefix ending with ``/``, so that
``https://releases.example/agent/`` does not also allow ``https://releases.example/agent-evil``."""
_NUMERIC_PREFIX: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str
    """The policy key that decided, e.g. ``scale.max_replicas``."""
    reason: str
    """A sentence for the audit log and the control plane."""


@dataclass(frozen=True, kw_only=True)
class ScaleRules:
    allow: bool = True
    min_replicas: int = 0
    max_replicas: int = 1
    approval_above: int | None = None
    require_approval: bool = False


@dataclass(frozen=True, kw_only=True)
class UpgradeRules:
    allow: bool = True
    versions: frozenset[str] = frozenset()
    require_approval: bool = False


@dataclass(frozen=True, kw_only=True)
class UpdateAgentRules:
    allow: bool = True
    versions: tuple[str, ...] = ()
    """Patterns (``*`` = any run of version characters)."""
    sources: tuple[str, ...] = ()
    """URL prefixes a bundle may be downloaded from."""
    require_approval: bool = True
    """Unlike other sections, on unless switched off: a person approves each update."""
    allow_downgrade: bool = False

    def version_allowed(self, version: str) -> str | None:
        """The first pattern that allows ``version``, or None."""
        for pattern in self.versions:
            if _glob(pattern).fullmatch(version):
                return pattern
        return None


@dataclass(frozen=True, kw_only=True)
class ApprovalRules:
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class CollectMetricsRules:
    allow: bool = True
    targets: frozenset[str] = frozenset()
    require_approval: bool = False


@dataclass(frozen=True, kw_only=True)
class OpenStreamRules:
    allow: bool = True
    targets: tuple[TargetRule, ...] = ()
    max_duration: int = 3600
    require_approval: bool = False


_COMMON = {"allow", "require_approval"}


@dataclass(frozen=True, kw_only=True)
class Policy:
    scale: ScaleRules | None = None
    upgrade: UpgradeRules | None = None
    collect_metrics: CollectMetricsRules | None = None
    open_stream: OpenStreamRules | None = None
    update_agent: UpdateAgentRules | None = None
    approvals: ApprovalRules | None = None
    sha256: str = ""
    """SHA-256 of the file's bytes: audit records name the policy that decided."""

    @classmethod
    def from_toml(cls, data: bytes) -> Policy:
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"not valid TOML: {exc}") from exc
        except (RecursionError, ValueError) as exc:  # absurd nesting, 5,000-digit integers
            raise PolicyError(f"not a usable policy: {type(exc).__name__}") from exc
        unknown = sorted(set(doc) - {"version", *_SECTIONS})
        if unknown:
            raise PolicyError(f"unknown top-level key(s) {unknown}")
        version = doc.get("version")
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or version != POLICY_FORMAT_VERSION
        ):
            raise PolicyError(f"version must be {POLICY_FORMAT_VERSION}")
        return cls(
            scale=_scale_rules(doc["scale"]) if "scale" in doc else None,
            upgrade=_upgrade_rules(doc["upgrade"]) if "upgrade" in doc else None,
            collect_metrics=(
                _metrics_rules(doc["collect_metrics"]) if "collect_metrics" in doc else None
            ),
            open_stream=_stream_rules(doc["open_stream"]) if "open_stream" in doc else None,
            update_agent=_update_rules(doc["update_agent"]) if "update_agent" in doc else None,
            approvals=_approval_rules(doc["approvals"]) if "approvals" in doc else None,
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def decide(self, command: Command) -> Decision:
        match command:
            case Scale():
                return _decide_scale(self.scale, command)
            case Upgrade():
                return _decide_upgrade(self.upgrade, command)
            case CollectMetrics():
                return _decide_metrics(self.collect_metrics, command)
            case OpenStream():
                return _decide_stream(self.open_stream, command)
            case UpdateAgent():
                return decide_update_agent(self.update_agent, command, running=__version__)

    def stream_addresses(self, command: OpenStream, resolved: list[IPAddress]) -> list[IPAddress]:
        """Of the addresses a stream's target resolved to, the ones it may connect to (the
        second half of the decision, made at connect time). Raises CommandRejected
        (``target_forbidden``) when none is allowed, or the policy no longer allows streams."""
        rules = self.open_stream
        if rules is None or not rules.allow:
            raise CommandRejected("policy_denied", _disabled("open_stream", rules).reason)
        return check_resolved(command.target, resolved, rules.targets)

    def may_approve(
        self, *, user: str, uid: int, groups: Iterable[str], agent_uid: int
    ) -> tuple[bool, str]:
        """May this local user approve or deny commands? Returns (allowed, why)."""
        rules = self.approvals
        if rules is None:
            if uid == agent_uid:
                return False, (
                    f"{user} is the agent's own user (which its workload may share); the policy "
                    "has no [approvals] section naming who may approve"
                )
            return True, "any local user other than the agent's may approve"
        if user in rules.users:
            return True, f"{user} is listed in approvals.users"
        member_of = sorted(rules.groups.intersection(groups))
        if member_of:
            return True, f"{user} is a member of {member_of[0]} (approvals.groups)"
        return False, f"{user} is not listed in approvals.users or approvals.groups"

    def summary(self) -> Mapping[str, object]:
        """What is allowed, for ``byoc-agent policy check`` and the audit log."""
        out: dict[str, object] = {}
        if self.scale is not None:
            out["scale"] = {
                "allow": self.scale.allow,
                "replicas": [self.scale.min_replicas, self.scale.max_replicas],
                "approval_above": self.scale.approval_above,
                "require_approval": self.scale.require_approval,
            }
        if self.upgrade is not None:
            out["upgrade"] = {
                "allow": self.upgrade.allow,
                "versions": sorted(self.upgrade.versions),
                "require_approval": self.upgrade.require_approval,
            }
        if self.open_stream is not None:
            out["open_stream"] = {
                "allow": self.open_stream.allow,
                "targets": [str(rule) for rule in self.open_stream.targets],
                "max_duration": self.open_stream.max_duration,
                "require_approval": self.open_stream.require_approval,
            }
        if self.update_agent is not None:
            out["update_agent"] = {
                "allow": self.update_agent.allow,
                "versions": list(self.update_agent.versions),
                "sources": list(self.update_agent.sources),
                "require_approval": self.update_agent.require_approval,
                "allow_downgrade": self.update_agent.allow_downgrade,
            }
        if self.approvals is not None:
            out["approvals"] = {
                "users": sorted(self.approvals.users),
                "groups": sorted(self.approvals.groups),
            }
        if self.collect_metrics is not None:
            out["collect_metrics"] = {
                "allow": self.collect_metrics.allow,
                "targets": sorted(self.collect_metrics.targets),
                "require_approval": self.collect_metrics.require_approval,
            }
        return out


def _section(name: str, table: object, extra: set[str]) -> Table:
    return Table(name, table, _COMMON | extra, PolicyError)


def _replicas(s: Table, key: str) -> int | None:
    return s.optional_integer(key, low=0, high=MAX_REPLICAS)


def _scale_rules(table: object) -> ScaleRules:
    s = _section("scale", table, {"min_replicas", "max_replicas", "approval_above"})
    if not s.has("max_replicas"):
        raise PolicyError("scale.max_replicas is required")
    rules = ScaleRules(
        allow=s.boolean("allow", True),
        min_replicas=_replicas(s, "min_replicas") or 0,
        max_replicas=s.integer("max_replicas", 0, low=0, high=MAX_REPLICAS),
        approval_above=_replicas(s, "approval_above"),
        require_approval=s.boolean("require_approval", False),
    )
    if rules.min_replicas > rules.max_replicas:
        raise PolicyError("scale.min_replicas must not exceed scale.max_replicas")
    return rules


def _upgrade_rules(table: object) -> UpgradeRules:
    s = _section("upgrade", table, {"versions"})
    return UpgradeRules(
        allow=s.boolean("allow", True),
        versions=frozenset(s.strings("versions", pattern=VERSION_PATTERN)),
        require_approval=s.boolean("require_approval", False),
    )


def _metrics_rules(table: object) -> CollectMetricsRules:
    s = _section("collect_metrics", table, {"targets"})
    return CollectMetricsRules(
        allow=s.boolean("allow", True),
        targets=frozenset(s.strings("targets", pattern=TARGET_PATTERN)),
        require_approval=s.boolean("require_approval", False),
    )


def _stream_rules(table: object) -> OpenStreamRules:
    s = _section("open_stream", table, {"targets", "max_duration"})
    rules: list[TargetRule] = []
    for text in s.strings("targets", pattern=re.compile(r"[^\s]{1,300}")):
        try:
            rules.append(parse_rule(text))
        except TargetError as exc:
            raise PolicyError(f"open_stream.targets: {exc}") from exc
    return OpenStreamRules(
        allow=s.boolean("allow", True),
        targets=tuple(rules),
        max_duration=s.integer("max_duration", 3600, low=1, high=MAX_STREAM_DURATION),
        require_approval=s.boolean("require_approval", False),
    )


def _update_rules(table: object) -> UpdateAgentRules:
    s = _section("update_agent", table, {"versions", "sources", "allow_downgrade"})
    sources = s.strings("sources", pattern=SOURCE_PREFIX)
    for source in sources:
        if any(segment in (".", "..") for segment in source.split("/")[3:]):
            raise PolicyError(f"update_agent.sources: {source!r} has a '.' or '..' segment")
    return UpdateAgentRules(
        allow=s.boolean("allow", True),
        versions=s.strings("versions", pattern=VERSION_GLOB),
        sources=sources,
        require_approval=s.boolean("require_approval", True),
        allow_downgrade=s.boolean("allow_downgrade", False),
    )


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join("[0-9A-Za-z.+_-]*" if char == "*" else re.escape(char) for char in pattern)
    )


def is_older(version: str, than: str) -> bool:
    """Is ``version`` older than ``than``? Compared by their leading dotted numbers (0.10.0 is
    newer than 0.9.1; 1.2 and 1.2.0 are the same); a version that does not start with a number
    is never older."""
    mine, theirs = _NUMERIC_PREFIX.match(version), _NUMERIC_PREFIX.match(than)
    if mine is None or theirs is None:
        return False

    def key(found: re.Match[str]) -> tuple[int, ...]:
        numbers = [int(part) for part in found.group(0).split(".")]
        while numbers and numbers[-1] == 0:
            numbers.pop()
        return tuple(numbers)

    return key(mine) < key(theirs)


_ACCOUNT = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._$-]{0,63}")


def _approval_rules(table: object) -> ApprovalRules:
    s = Table("approvals", table, {"users", "groups"}, PolicyError)
    return ApprovalRules(
        users=frozenset(s.strings("users", pattern=_ACCOUNT)),
        groups=frozenset(s.strings("groups", pattern=_ACCOUNT)),
    )


def _disabled(kind: str, rules: object | None) -> Decision:
    if rules is None:
        return Decision(Verdict.DENY, kind, f"the policy has no [{kind}] section")
    return Decision(Verdict.DENY, f"{kind}.allow", f"{kind} is disabled by the policy")


def _approval(kind: str, require: bool) -> Decision:
    if require:
        return Decision(
            Verdict.REQUIRE_APPROVAL, f"{kind}.require_approval", f"{kind} needs local approval"
        )
    return Decision(Verdict.ALLOW, kind, f"{kind} is within the policy")


def _decide_scale(rules: ScaleRules | None, command: Scale) -> Decision:
    if rules is None or not rules.allow:
        return _disabled("scale", rules)
    n = command.replicas
    if n < rules.min_replicas:
        return Decision(
            Verdict.DENY,
            "scale.min_replicas",
            f"{n} replicas is below the policy minimum of {rules.min_replicas}",
        )
    if n > rules.max_replicas:
        return Decision(
            Verdict.DENY,
            "scale.max_replicas",
            f"{n} replicas is above the policy maximum of {rules.max_replicas}",
        )
    if rules.approval_above is not None and n > rules.approval_above:
        return Decision(
            Verdict.REQUIRE_APPROVAL,
            "scale.approval_above",
            f"scaling to {n} replicas (more than {rules.approval_above}) needs local approval",
        )
    return _approval("scale", rules.require_approval)


def _decide_upgrade(rules: UpgradeRules | None, command: Upgrade) -> Decision:
    if rules is None or not rules.allow:
        return _disabled("upgrade", rules)
    if command.version not in rules.versions:
        return Decision(
            Verdict.DENY,
            "upgrade.versions",
            f"version {command.version!r} is not in the policy's allowed versions",
        )
    return _approval("upgrade", rules.require_approval)


def decide_update_agent(
    rules: UpdateAgentRules | None, command: UpdateAgent, *, running: str
) -> Decision:
    """The policy's word on updating the agent, running version ``running``, to
    ``command.version`` from ``command.url``."""
    kind = UpdateAgent.type
    if rules is None or not rules.allow:
        return _disabled(kind, rules)
    if rules.version_allowed(command.version) is None:
        return Decision(
            Verdict.DENY,
            f"{kind}.versions",
            f"agent version {command.version!r} matches none of the policy's patterns",
        )
    if not any(command.url.startswith(source) for source in rules.sources):
        return Decision(
            Verdict.DENY,
            f"{kind}.sources",
            f"{command.url} is not under any of the policy's sources",
        )
    if not rules.allow_downgrade and is_older(command.version, running):
        return Decision(
            Verdict.DENY,
            f"{kind}.allow_downgrade",
            f"{command.version} is older than the running {running} (downgrades are not allowed)",
        )
    return _approval(kind, rules.require_approval)


def _decide_metrics(rules: CollectMetricsRules | None, command: CollectMetrics) -> Decision:
    if rules is None or not rules.allow:
        return _disabled("collect_metrics", rules)
    refused = [t for t in command.targets if t not in rules.targets]
    if refused:
        return Decision(
            Verdict.DENY,
            "collect_metrics.targets",
            f"metrics target(s) {refused} not allowed by the policy",
        )
    return _approval("collect_metrics", rules.require_approval)


def _decide_stream(rules: OpenStreamRules | None, command: OpenStream) -> Decision:
    if rules is None or not rules.allow:
        return _disabled("open_stream", rules)
    if command.max_duration > rules.max_duration:
        return Decision(
            Verdict.DENY,
            "open_stream.max_duration",
            f"a stream of {command.max_duration}s is longer than the policy maximum of "
            f"{rules.max_duration}s",
        )
    rule = allowed_by_name(command.target, rules.targets)
    if rule is None:
        return Decision(
            Verdict.DENY,
            "open_stream.targets",
            f"target {command.target} is not allowed by the policy"
            + (" (link-local or instance-metadata address)" if _forbidden(command) else ""),
        )
    if rules.require_approval:
        return Decision(
            Verdict.REQUIRE_APPROVAL,
            "open_stream.require_approval",
            f"a stream to {command.target} needs local approval",
        )
    return Decision(Verdict.ALLOW, "open_stream.targets", f"{command.target} matches {rule}")


def _forbidden(command: OpenStream) -> bool:
    return command.target.address is not None and forbidden(command.target.address)
