"""``byoc-agent doctor``'s judgements: facts in (file modes, a certificate, what a connection
attempt showed, a clock offset), one :class:`Check` out, with the fix when it is not a pass.
Sans-I/O: the facts are gathered by :mod:`agent.doctor`, which owns the files and sockets.

Statuses: ``pass``; ``warn`` (works now, will not for long, or cannot be judged from here);
``fail`` (the agent cannot work like this); ``skip`` (an earlier failure makes it moot).
"""

from __future__ import annotations

import enum
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtensionOID, NameOID

from agent.core.diagnosis import Diagnosis

CLOCK_GOOD: Final = 5.0
"""Seconds of clock offset below which the clock passes; above, a warning until the commands'
``clock_skew`` allowance, then a failure (tokens would be refused)."""
RENEWAL_OVERDUE: Final = 1 / 3
"""A certificate is renewed at two thirds of its life; with less than this share left, the
renewal is overdue."""


class Status(enum.StrEnum):
    PASS = "pass"  # noqa: S105  # not a password
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    """A stable id (``tls``, ``clock``, ``key``): for scripts, tests and the README."""
    status: Status
    found: str
    """What doctor saw, whatever the status."""
    fix: str = ""
    """What to do when it is not a pass."""

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.name,
            "status": str(self.status),
            "found": self.found,
            "fix": self.fix,
        }


def passed(name: str, found: str) -> Check:
    return Check(name, Status.PASS, found)


def warned(name: str, found: str, fix: str) -> Check:
    return Check(name, Status.WARN, found, fix)


def failed(name: str, found: str, fix: str) -> Check:
    return Check(name, Status.FAIL, found, fix)


def skipped(name: str, why: str) -> Check:
    return Check(name, Status.SKIP, why)


def from_diagnosis(name: str, found: str, diagnosis: Diagnosis) -> Check:
    """A failure explained by :func:`agent.core.diagnosis.diagnose`: what happened, its cause,
    and the action as the fix."""
    return failed(name, f"{found}: {diagnosis.cause}", diagnosis.action)


# -- files ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FileFacts:
    path: str
    exists: bool
    is_dir: bool = False
    mode: int = 0
    owner: str = ""
    group: str = ""


def _mode(facts: FileFacts) -> str:
    return f"{stat.S_IMODE(facts.mode):04o} {facts.owner}:{facts.group}"


def judge_key(facts: FileFacts, *, agent_user: str) -> Check:
    """The private key: there, 0600 (or stricter), the agent's user's."""
    if not facts.exists:
        return failed(
            "key",
            f"{facts.path} does not exist",
            "enroll this agent (byoc-agent enroll), or correct control_plane.client_key",
        )
    if facts.mode & 0o077:
        return failed(
            "key",
            f"{facts.path} is {_mode(facts)}: other users can read it, so the agent refuses it",
            f"chmod 600 {facts.path}",
        )
    if agent_user and facts.owner != agent_user:
        return failed(
            "key",
            f"{facts.path} is {_mode(facts)}: the agent's user {agent_user} cannot read it",
            f"chown {agent_user} {facts.path}",
        )
    return passed("key", f"{facts.path} {_mode(facts)}")


def judge_public_file(name: str, what: str, facts: FileFacts, *, agent_user: str) -> Check:
    """A certificate or CA bundle: there, readable by the agent's user, writable by nobody
    else (a CA bundle others can write is a way to make the agent trust anyone)."""
    if not facts.exists:
        return failed(
            name,
            f"{what} {facts.path} does not exist",
            "enroll this agent (byoc-agent enroll), which writes it, or correct the path in "
            "agent.toml [control_plane]",
        )
    if facts.mode & 0o022:
        return failed(
            name,
            f"{what} {facts.path} is {_mode(facts)}: writable by other users",
            f"chmod go-w {facts.path}",
        )
    readable = facts.mode & 0o004 or (facts.owner == agent_user and facts.mode & 0o400)
    if agent_user and not readable and facts.owner != agent_user:
        return warned(
            name,
            f"{what} {facts.path} is {_mode(facts)}: can {agent_user} read it (its group)?",
            f"chmod 644 {facts.path}",
        )
    return passed(name, f"{what} {facts.path} {_mode(facts)}")


def judge_directory(name: str, what: str, facts: FileFacts, *, agent_user: str) -> Check:
    """The state directory (and the audit log's): the agent's user's, not open to others."""
    if not facts.exists:
        return failed(
            name,
            f"{what} {facts.path} does not exist",
            f"install -d -o {agent_user or 'AGENT_USER'} -m 0750 {facts.path} (make install "
            "makes it)",
        )
    if not facts.is_dir:
        return failed(name, f"{what} {facts.path} is not a directory", "correct the path")
    if facts.mode & 0o002:
        return failed(
            name,
            f"{what} {facts.path} is {_mode(facts)}: anyone can write in it",
            f"chmod o-w {facts.path}",
        )
    if agent_user and facts.owner != agent_user:
        return failed(
            name,
            f"{what} {facts.path} is {_mode(facts)}, not owned by the agent's user {agent_user}",
            f"chown {agent_user} {facts.path}",
        )
    return passed(name, f"{what} {facts.path} {_mode(facts)}")


# -- the agent's certificate ----------------------------------------------------------------


def _cn(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if len(values) == 1 else name.rfc4514_string()


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def _issuer_in(cert: x509.Certificate, bundle: Sequence[x509.Certificate]) -> str | None:
    """``signed``/``bad signature`` when the bundle holds the issuer; None when it does not."""
    for ca in bundle:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return "bad signature"
        return "signed"
    return None


def judge_certificate(
    cert: x509.Certificate,
    *,
    key_matches: bool,
    configured_id: str | None,
    bundle: Sequence[x509.Certificate],
    now: datetime,
) -> Check:
    """The agent's own certificate: its id, its validity now, the key that goes with it, and
    who issued it (checked against the CA bundle when the bundle holds the issuer; the agent
    CA is usually the control plane's to check, not in the agent's bundle)."""
    agent_id = _cn(cert.subject)
    issuer = _cn(cert.issuer)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    left = (end - now).total_seconds()
    life = max((end - start).total_seconds(), 1.0)
    if not key_matches:
        return failed(
            "certificate",
            f"{agent_id}'s certificate does not belong to the private key next to it",
            "enroll again (byoc-agent enroll --force) so that key and certificate are a pair",
        )
    if configured_id is not None and configured_id != agent_id:
        return failed(
            "certificate",
            f"the certificate is {agent_id}'s, but agent.id in agent.toml says {configured_id}",
            "remove agent.id from agent.toml (the certificate decides), or enroll as "
            f"{configured_id}",
        )
    if now < start:
        return failed(
            "certificate",
            f"{agent_id}'s certificate is valid only from {start:%Y-%m-%dT%H:%M:%SZ}",
            "check this host's clock (timedatectl; see the clock check)",
        )
    if left <= 0:
        return failed(
            "certificate",
            f"{agent_id}'s certificate expired at {end:%Y-%m-%dT%H:%M:%SZ}",
            "enroll again with a new token: byoc-agent enroll --force --control-plane URL "
            "--token -",
        )
    chain = _issuer_in(cert, bundle)
    if chain == "bad signature":
        return failed(
            "certificate",
            f"{agent_id}'s certificate names {issuer} as issuer, but its signature does not "
            "verify against that CA in ca_bundle",
            "enroll again (byoc-agent enroll --force)",
        )
    issued = f"issued by {issuer}" + (
        " (chains to ca_bundle)" if chain else " (the control plane checks it)"
    )
    found = f"{agent_id}, {issued}, expires {end:%Y-%m-%dT%H:%M:%SZ} ({_days(left)} left)"
    if left < life * RENEWAL_OVERDUE:
        return warned(
            "certificate",
            found + ": renewal is overdue (it is renewed over the tunnel at two thirds of its "
            "life)",
            "check that the agent runs and stays connected (byoc-agent status); if it cannot "
            "renew before expiry, enroll again",
        )
    return passed("certificate", found)


# -- the connection -------------------------------------------------------------------------


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    assert isinstance(san, x509.SubjectAlternativeName)  # noqa: S101  # by its OID
    return [
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    ]


def describe_server_certificate(cert: x509.Certificate) -> str:
    names = ", ".join(names_of(cert)[:6]) or "no names"
    return (
        f"{_cn(cert.subject)} [{names}] issued by {_cn(cert.issuer)}, expires "
        f"{cert.not_valid_after_utc:%Y-%m-%d}"
    )


def judge_clock(offset: float, *, uncertainty: float, allowance: float) -> Check:
    """``offset``: the control plane's clock minus ours (seconds), known to ``uncertainty``.
    Commands are accepted within ``allowance`` (``commands.clock_skew``); certificates
    and renewal depend on the clock too."""
    size = abs(offset)
    direction = "behind" if offset > 0 else "ahead of"
    found = (
        f"this host's clock is {size:.1f} s {direction} the control plane's "
        f"(±{uncertainty:.1f} s; the commands' allowance is {allowance:g} s)"
    )
    fix = (
        "synchronise the clock: timedatectl set-ntp true (systemd-timesyncd or chrony; on EC2 "
        "the Amazon Time Sync Service, 169.254.169.123)"
    )
    if size - uncertainty > allowance:
        return failed("clock", found + ": signed commands will be refused as expired or early", fix)
    if size - uncertainty > CLOCK_GOOD:
        return warned("clock", found, fix)
    return passed("clock", found)


def judge_answer(status: int, location: str | None) -> Check:
    """The control plane's HTTP answer to a plain request made with the agent's certificate
    (no WebSocket upgrade: no session is opened, the running agent is not disturbed). Any
    answer but 403 or a redirect means the certificate was accepted."""
    if status == 403:
        return failed(
            "identity",
            "the control plane refuses this agent's certificate (HTTP 403): it was revoked",
            "ask the vendor why; then enroll again with a new token: byoc-agent enroll --force "
            "--control-plane URL --token -",
        )
    if 300 <= status < 400:
        return failed(
            "identity",
            f"the control plane answered HTTP {status} with a redirect"
            + (f" to {location[:120]!r}" if location else "")
            + ", which the agent never follows",
            "use the URL the vendor gave you in control_plane.url",
        )
    return passed(
        "identity", f"the control plane accepts the agent's certificate (HTTP {status} to a GET)"
    )


# -- the report -----------------------------------------------------------------------------


def report_lines(title: str, checks: Sequence[Check], seconds: float) -> list[str]:
    """``PASS  name  found`` / ``FAIL  name  found  -> fix: ...`` one per check, then a
    summary line."""
    width = max((len(check.name) for check in checks), default=0)
    out = [title]
    for check in checks:
        line = f"{check.status.upper():4}  {check.name:<{width}}  {check.found}"
        if check.fix and check.status in (Status.FAIL, Status.WARN):
            line += f"  -> fix: {check.fix}"
        out.append(line)
    counts = Counter(check.status for check in checks)
    verdict = "FAILED" if counts[Status.FAIL] else "OK"
    out.append(
        f"{verdict}: {counts[Status.PASS]} passed, {counts[Status.WARN]} warnings, "
        f"{counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped ({seconds:.2f} s)"
    )
    return out


def report_json(config: str, checks: Sequence[Check], seconds: float) -> dict[str, object]:
    return {
        "config": config,
        "ok": not any(check.status is Status.FAIL for check in checks),
        "seconds": round(seconds, 3),
        "checks": [check.as_dict() for check in checks],
    }
