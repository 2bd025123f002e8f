"""``byoc-agent doctor``: everything the agent needs, checked one step at a time, in seconds,
one line per check with the fix. For the on-call engineer at 3 a.m.: what is wrong, and what to
type.

The checks, in order (each network step has a short timeout; a step that cannot run because an
earlier one failed is skipped, saying which)::

    config, policy        the files parse
    key, cert-file,       present, modes and owners (the agent's user is the state
    ca-bundle, state-dir, directory's owner): the key 0600, nothing writable by others
    audit-dir
    certificate           the agent's own: its id, validity and days left, the key that goes
                          with it, its issuer (against ca_bundle when the bundle holds it)
    route                 direct, private endpoint (connect_to) or HTTP proxy, and why:
                          control_plane.proxy, HTTPS_PROXY and whether NO_PROXY matches
    dns                   the name resolves (the proxy's, through a proxy); with a private
    (private-link-dns)    endpoint, to addresses inside the VPC (agent/vpc/private_link.py)
    tcp                   TCP to the address (or the proxy); a timeout on a private endpoint is
    (private-link-443)    the FAQ's security group without inbound 443 from the VPC's CIDR
    proxy                 the proxy's answer to CONNECT
    tls                   the handshake with the agent's own settings: version, cipher, the
                          name verified, the server certificate and who issued it
    identity              the control plane accepts the agent's certificate (a plain GET with
                          it: revoked is HTTP 403)
    clock                 the offset from the control plane's clock
    agent                 the running agent answers on its control socket; its last error,
                          explained (agent/core/diagnosis.py)

The clock is read from the ``Date`` header of that plain GET rather than a WebSocket
hello/welcome (whose ``server_time`` is finer): opening a session would make the control plane
supersede the running agent's own session (one identity, one session). A ``Date`` has whole
seconds, and the uncertainty is said; against the commands' 60 s allowance that is ample.
"""

from __future__ import annotations

import grp
import http.client
import ipaddress
import json
import os
import pwd
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from agent import __version__
from agent.config import AgentConfig, ControlPlaneConfig, load_config
from agent.core import doctor_checks as judge
from agent.core.diagnosis import Where, diagnose
from agent.core.doctor_checks import Check, FileFacts, Status
from agent.core.errors import AgentError, ConfigError, PolicyError
from agent.io import probes
from agent.io.control_socket import request
from agent.io.egress import Route, proxy_variable, route_for
from agent.io.policy_file import read_policy
from agent.io.proxy_url import redact_url
from agent.io.tls import classify_tls_failure, client_context
from agent.vpc.findings import Finding
from agent.vpc.private_link import (
    DialTarget,
    diagnose_timeout,
    dial_target,
    judge_resolution,
    private_endpoint_configured,
)

DEFAULT_TIMEOUT: Final = 3.0
IMDS: Final = "http://169.254.169.254"
"""The EC2 instance metadata service (IMDSv2), asked for the VPC's CIDR blocks when a private
endpoint is configured and ``--vpc-cidr`` is not given."""


@dataclass(frozen=True, kw_only=True)
class Options:
    timeout: float = DEFAULT_TIMEOUT
    """Seconds for each network step."""
    vpc_cidrs: tuple[str, ...] = ()
    """The VPC's CIDR blocks, for the private-link judgement (default: the instance metadata)."""
    clock: Callable[[], float] = time.time
    imds: str = IMDS


def from_finding(finding: Finding) -> Check:
    """A private-link finding (shared with ``vpc check``) as a doctor check."""
    status = Status.PASS if finding.status == "pass" else Status.FAIL
    if finding.status == "skip":
        status = Status.SKIP
    return Check(finding.rule, status, finding.found, finding.fix)


# -- files ------------------------------------------------------------------------------------


def file_facts(path: Path) -> FileFacts:
    try:
        info = path.stat()
    except FileNotFoundError:
        return FileFacts(path=str(path), exists=False)
    except OSError as exc:  # a directory we may not enter: say so as a missing file would
        return FileFacts(path=f"{path} ({exc.strerror})", exists=False)
    return FileFacts(
        path=str(path),
        exists=True,
        is_dir=path.is_dir(),
        mode=info.st_mode,
        owner=_user(info.st_uid),
        group=_group(info.st_gid),
    )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def agent_user(config: AgentConfig) -> str:
    """The agent's user: the owner of its state directory (make install makes it so), else
    whoever runs doctor."""
    facts = file_facts(config.state_dir)
    return facts.owner if facts.exists else _user(os.getuid())


def file_checks(config: AgentConfig, user: str) -> list[Check]:
    cp = config.control_plane
    return [
        judge.judge_key(file_facts(cp.client_key), agent_user=user),
        judge.judge_public_file(
            "cert-file", "certificate", file_facts(cp.client_cert), agent_user=user
        ),
        judge.judge_public_file(
            "ca-bundle", "CA bundle", file_facts(cp.ca_bundle), agent_user=user
        ),
        judge.judge_directory(
            "state-dir", "state directory", file_facts(config.state_dir), agent_user=user
        ),
        judge.judge_directory(
            "audit-dir", "audit log directory", file_facts(config.audit_log.parent), agent_user=user
        ),
    ]


def certificate_check(config: AgentConfig, now: datetime) -> Check:
    cp = config.control_plane
    try:
        cert = x509.load_pem_x509_certificate(cp.client_cert.read_bytes())
    except OSError as exc:
        return judge.skipped("certificate", f"cannot read {cp.client_cert}: {exc.strerror}")
    except ValueError:
        return judge.failed(
            "certificate", f"{cp.client_cert} is not a PEM certificate", "enroll again"
        )
    try:
        key = load_pem_private_key(cp.client_key.read_bytes(), password=None)
        spki = PublicFormat.SubjectPublicKeyInfo
        matches = key.public_key().public_bytes(
            Encoding.DER, spki
        ) == cert.public_key().public_bytes(Encoding.DER, spki)
    except (OSError, ValueError, TypeError):
        matches = True  # the key check says what is wrong with the key itself
    try:
        bundle = x509.load_pem_x509_certificates(cp.ca_bundle.read_bytes())
    except (OSError, ValueError):
        bundle = []
    return judge.judge_certificate(
        cert, key_matches=matches, configured_id=config.agent_id, bundle=bundle, now=now
    )


# -- the route ----------------------------------------------------------------------------


def describe_route(cp: ControlPlaneConfig, route: Route) -> str:
    """How the agent goes out, and why (which setting or variable decided)."""
    if cp.proxy == "none":
        why = 'control_plane.proxy = "none"'
    elif cp.proxy != "environment":
        why = "control_plane.proxy"
    else:
        source = proxy_variable()
        no_proxy = urllib.request.getproxies().get("no", "")
        if source is None:
            why = "no HTTPS_PROXY in the environment"
        elif route.proxy is None:
            why = f"NO_PROXY={no_proxy!r} matches {cp.host}"
        else:
            why = f"{source} from the environment" + (
                f"; NO_PROXY={no_proxy!r} does not match {cp.host}" if no_proxy else ""
            )
    if route.proxy is not None:
        return f"via proxy {redact_url(route.proxy)} ({why})"
    if route.host is not None:
        return f"direct to {route.host}:{route.port}, a private endpoint (connect_to; {why})"
    return f"direct to {cp.host}:{cp.port} ({why})"


@dataclass
class Hop:
    """Where the TCP connection goes: the control plane (or its private endpoint), or the
    proxy."""

    host: str
    port: int
    proxy: str | None
    target: DialTarget


def _where(config: AgentConfig) -> Where:
    cp = config.control_plane
    return Where(
        host=cp.verify_name,
        port=cp.port,
        ca_bundle=str(cp.ca_bundle),
        client_cert=str(cp.client_cert),
        client_key=str(cp.client_key),
    )


class Doctor:
    def __init__(self, config: AgentConfig, options: Options) -> None:
        self.config = config
        self.options = options
        self.checks: list[Check] = []
        self.where = _where(config)
        self._cidrs: tuple[str, ...] | None = None

    def add(self, check: Check) -> bool:
        """Keep a check; True when the next steps can build on it."""
        self.checks.append(check)
        return check.status in (Status.PASS, Status.WARN)

    def skip(self, names: Sequence[str], why: str) -> None:
        for name in names:
            self.checks.append(judge.skipped(name, why))

    # -- network ---------------------------------------------------------------------------

    def network(self) -> None:
        cp = self.config.control_plane
        later = ["dns", "tcp", "tls", "identity", "clock"]
        try:
            route = route_for(cp)
        except ConfigError as exc:
            diagnosis = diagnose(str(exc), self.where)
            self.add(judge.failed("route", str(exc), diagnosis.action))
            self.skip(later, "no usable route")
            return
        found = describe_route(cp, route)
        if route.proxy is not None and cp.connect_to is not None:
            self.add(
                judge.warned(
                    "route",
                    found + "; connect_to is not used through a proxy",
                    'remove connect_to, or set proxy = "none" to use the private endpoint',
                )
            )
        else:
            self.add(judge.passed("route", found))
        if route.proxy is not None:
            parts = urllib.parse.urlsplit(route.proxy)
            host = parts.hostname or ""
            port = parts.port or (443 if parts.scheme == "https" else 80)
            target = DialTarget(host=host, port=port, source="the proxy")
        else:
            target = dial_target(cp)
        path = Hop(target.host, target.port, route.proxy, target)
        addresses = self._resolve(path)
        if addresses is None:
            self.skip(
                ["tcp", *(["proxy"] if path.proxy else []), "tls", "identity", "clock"],
                "the name does not resolve",
            )
            return
        sock = self._connect(path, addresses)
        if sock is None:
            self.skip(
                [*(["proxy"] if path.proxy else []), "tls", "identity", "clock"],
                "no TCP connection",
            )
            return
        if path.proxy is not None:
            tunnelled = self._proxy(sock, path)
            if tunnelled is None:
                self.skip(["tls", "identity", "clock"], "the proxy gave no tunnel")
                return
            sock = tunnelled
        self._tls(sock, path, addresses)

    def _private(self) -> bool:
        return private_endpoint_configured(self.config.control_plane) or bool(
            self.options.vpc_cidrs
        )

    def _vpc_cidrs(self) -> tuple[str, ...]:
        """``--vpc-cidr``, else the instance metadata's (asked once)."""
        if self._cidrs is None:
            self._cidrs = self.options.vpc_cidrs or vpc_cidrs_from_metadata(
                self.options.imds, self.options.timeout
            )
        return self._cidrs

    def _resolve(self, path: Hop) -> list[str] | None:
        try:
            addresses = probes.resolve(path.host, path.port, self.options.timeout)
        except (OSError, TimeoutError) as exc:
            diagnosis = diagnose(f"gaierror: {exc}", Where(host=path.host, port=path.port))
            self.add(judge.from_diagnosis("dns", f"{path.host} ({path.target.source})", diagnosis))
            return None
        if path.proxy is None and self._private():
            cidrs = self._vpc_cidrs()
            if not cidrs:
                self.add(
                    judge.warned(
                        "private-link-dns",
                        f"{path.host} -> {', '.join(addresses)}; the VPC's CIDR is unknown (no "
                        "instance metadata)",
                        "run doctor with --vpc-cidr CIDR to judge the private link",
                    )
                )
                return addresses
            finding = judge_resolution(path.target, addresses, cidrs)
            if not self.add(from_finding(finding)):
                return None
            return addresses
        self.add(
            judge.passed("dns", f"{path.host} -> {', '.join(addresses)} ({path.target.source})")
        )
        return addresses

    def _connect(self, path: Hop, addresses: Sequence[str]) -> socket.socket | None:
        first: OSError | None = None
        for address in addresses:
            try:
                sock, took = probes.connect(address, path.port, self.options.timeout)
            except OSError as exc:
                first = first or exc
                continue
            self.add(judge.passed("tcp", f"{address}:{path.port} accepts ({took * 1000:.0f} ms)"))
            return sock
        assert first is not None  # noqa: S101  # resolve() returned at least one address
        shown = f"{addresses[0]}:{path.port}"
        text = f"{type(first).__name__}: {first}"
        if isinstance(first, TimeoutError | socket.timeout):
            text = f"TimeoutError: timed out after {self.options.timeout:g} s"
            if path.proxy is None and self._private() and self._vpc_cidrs():
                self.add(
                    from_finding(diagnose_timeout(path.target, addresses[0], self._vpc_cidrs()))
                )
                return None
        where = Where(host=path.host, port=path.port)
        self.add(judge.from_diagnosis("tcp", f"{shown}: {text}", diagnose(text, where)))
        return None

    def _proxy(self, sock: socket.socket, path: Hop) -> socket.socket | None:
        cp = self.config.control_plane
        assert path.proxy is not None  # noqa: S101
        try:
            tunnel = probes.proxy_connect(sock, path.proxy, cp.host, cp.port, self.options.timeout)
        except probes.ProxyRefused as exc:
            sock.close()
            text = f"the proxy refused the connection: HTTP {exc.status}"
            found = f"CONNECT {cp.host}:{cp.port} via {redact_url(path.proxy)}: HTTP {exc.status}"
            self.add(judge.from_diagnosis("proxy", found, diagnose(text, self.where)))
            return None
        except OSError as exc:
            sock.close()
            found = f"CONNECT {cp.host}:{cp.port} via {redact_url(path.proxy)}"
            self.add(judge.from_diagnosis("proxy", found, diagnose(f"proxy: {exc}", self.where)))
            return None
        self.add(
            judge.passed(
                "proxy", f"CONNECT {cp.host}:{cp.port} answered 200 by {redact_url(path.proxy)}"
            )
        )
        return tunnel

    def _reopen(self, path: Hop, addresses: Sequence[str]) -> socket.socket:
        sock, _ = probes.connect(addresses[0], path.port, self.options.timeout)
        if path.proxy is not None:
            cp = self.config.control_plane
            sock = probes.proxy_connect(sock, path.proxy, cp.host, cp.port, self.options.timeout)
        return sock

    def _tls(self, sock: socket.socket, path: Hop, addresses: Sequence[str]) -> None:
        cp = self.config.control_plane
        try:
            context = client_context(ca_bundle=cp.ca_bundle, cert=cp.client_cert, key=cp.client_key)
        except ConfigError as exc:
            sock.close()
            self.add(
                judge.from_diagnosis(
                    "tls", "the agent's TLS settings", diagnose(str(exc), self.where)
                )
            )
            self.skip(["identity", "clock"], "no TLS settings")
            return
        sock.settimeout(self.options.timeout)
        try:
            tls = context.wrap_socket(sock, server_hostname=cp.verify_name)
        except ssl.SSLCertVerificationError as exc:
            self._tls_refused(exc, path, addresses)
            self.skip(["identity", "clock"], "no TLS session")
            return
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            self._tls_failed(exc)
            self.skip(["identity", "clock"], "no TLS session")
            return
        with tls:
            der = tls.getpeercert(binary_form=True)
            cipher = tls.cipher()
            server = (
                judge.describe_server_certificate(x509.load_der_x509_certificate(der))
                if der
                else "?"
            )
            self.add(
                judge.passed(
                    "tls",
                    f"{tls.version()} {cipher[0] if cipher else '?'}, verified for "
                    f"{cp.verify_name}: {server}",
                )
            )
            self._identity_and_clock(tls)

    def _tls_refused(
        self, exc: ssl.SSLCertVerificationError, path: Hop, addresses: Sequence[str]
    ) -> None:
        cp = self.config.control_plane
        text = f"control plane certificate refused: {exc.verify_message}"
        seen = ""
        try:
            der = probes.unverified_certificate(self._reopen(path, addresses), cp.verify_name)
        except OSError:
            der = None
        if der:
            presented = x509.load_der_x509_certificate(der)
            seen = f"; it presents {judge.describe_server_certificate(presented)}"
        diagnosis = diagnose(text, self.where)
        self.add(
            judge.failed("tls", f"{exc.verify_message}{seen}: {diagnosis.cause}", diagnosis.action)
        )

    def _tls_failed(self, exc: BaseException) -> None:
        rejected = classify_tls_failure(exc)
        text = str(rejected) if rejected is not None else f"{type(exc).__name__}: {exc}"
        self.add(
            judge.from_diagnosis("tls", "the TLS handshake failed", diagnose(text, self.where))
        )

    def _identity_and_clock(self, tls: ssl.SSLSocket) -> None:
        cp = self.config.control_plane
        path = urllib.parse.urlsplit(cp.url).path or "/"
        host = f"{cp.host}:{cp.port}" if cp.port != 443 else cp.host
        try:
            answer = probes.http_get(tls, host, path, f"byoc-agent-doctor/{__version__}")
        except (OSError, ssl.SSLError) as exc:
            rejected = classify_tls_failure(exc)
            if rejected is not None:
                text = str(rejected)
            elif isinstance(exc, ssl.SSLError):
                text = f"control plane refused our client certificate ({exc.reason})"
            elif isinstance(exc, probes.ProbeError | ConnectionResetError):
                # With TLS 1.3 the server checks the client's certificate after the client's
                # side of the handshake is done; one that refuses it may just close (Python's
                # asyncio servers do), so the first answer never comes.
                text = (
                    "the control plane closed the connection right after the TLS handshake, "
                    "without an answer: it most likely refused our client certificate"
                )
            else:
                text = f"{type(exc).__name__}: {exc}"
            diagnosis = diagnose(text, self.where)
            self.add(
                judge.from_diagnosis(
                    "identity", "no answer to a GET with the agent's certificate", diagnosis
                )
            )
            self.skip(["clock"], "no answer from the control plane")
            return
        self.add(judge.judge_answer(answer.status, answer.headers.get("location")))
        date = answer.date()
        if date is None:
            self.add(judge.warned("clock", "the control plane's answer has no Date", "none needed"))
            return
        # The Date is the server's time truncated to the second: on average half a second
        # earlier than the moment it answered, somewhere between sending and receiving.
        midpoint = (answer.sent + answer.received) / 2
        offset = date + 0.5 - midpoint
        uncertainty = 0.5 + (answer.received - answer.sent) / 2
        self.add(
            judge.judge_clock(
                offset, uncertainty=uncertainty, allowance=self.config.commands.clock_skew
            )
        )

    # -- the running agent -----------------------------------------------------------------

    def running_agent(self) -> None:
        path = self.config.control_socket
        try:
            answer = request(path, {"op": "status"}, timeout=self.options.timeout)
        except AgentError as exc:
            self.add(
                judge.warned(
                    "agent",
                    str(exc),
                    "start it (systemctl start byoc-agent) and see its log (journalctl -u "
                    "byoc-agent -p warning)",
                )
            )
            return
        status = answer.get("status") if answer.get("ok") else None
        if not isinstance(status, dict):
            self.add(judge.warned("agent", f"the agent answered {answer}", "see its log"))
            return
        if status.get("phase") == "enrolling":
            enrollment = status.get("enrollment") or {}
            self.add(
                judge.warned(
                    "agent",
                    f"not enrolled yet: {enrollment.get('message')}",
                    str(enrollment.get("action") or "enroll it"),
                )
            )
            return
        who = f"{status.get('agent_id')} (version {status.get('version')})"
        if status.get("connected"):
            self.add(
                judge.passed(
                    "agent", f"{who} runs and is connected to {status.get('control_plane')}"
                )
            )
            return
        error = str(status.get("last_error") or "no connection yet")
        diagnosis = diagnose(error, self.where)
        self.add(
            judge.failed(
                "agent",
                f"{who} runs but is not connected; last error: {error} ({diagnosis.cause})",
                diagnosis.action,
            )
        )


def vpc_cidrs_from_metadata(base: str, timeout: float) -> tuple[str, ...]:
    """The VPC's IPv4 CIDR blocks, from the EC2 instance metadata (IMDSv2: a session token,
    then ``network/interfaces/macs/<mac>/vpc-ipv4-cidr-blocks``); empty off EC2."""

    def get(path: str, token: str, method: str = "GET") -> str:
        headers = (
            {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
            if method == "PUT"
            else {"X-aws-ec2-metadata-token": token}
        )
        req = urllib.request.Request(f"{base}{path}", method=method, headers=headers)  # noqa: S310
        with urllib.request.urlopen(req, timeout=timeout) as answer:  # noqa: S310  # http only
            return str(answer.read().decode())

    try:
        token = get("/latest/api/token", "", "PUT")
        mac = get("/latest/meta-data/mac", token).strip()
        blocks = get(f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks", token)
    except (OSError, ValueError, http.client.HTTPException):
        return ()
    return tuple(line for line in map(str.strip, blocks.splitlines()) if _is_ipv4_network(line))


def _is_ipv4_network(text: str) -> bool:
    try:
        ipaddress.IPv4Network(text)
    except ValueError:
        return False
    return True


def examine(config_path: Path, options: Options | None = None) -> list[Check]:
    """Every check, in order (see the module docstring)."""
    options = options or Options()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [
            judge.failed(
                "config",
                str(exc),
                "correct it (systemd/agent.toml lists every key with its default)",
            )
        ]
    doctor = Doctor(config, options)
    doctor.add(
        judge.passed(
            "config",
            f"{config.source} parses (agent id {config.agent_id or 'from the certificate'}, "
            f"driver {config.driver_kind}, control plane {config.control_plane.url})",
        )
    )
    try:
        policy = read_policy(config.policy)
    except PolicyError as exc:
        doctor.add(
            judge.failed(
                "policy", str(exc), f"byoc-agent policy check {config.policy} shows the error"
            )
        )
    else:
        allowed = ", ".join(name for name, rules in policy.summary().items() if _allows(rules))
        doctor.add(
            judge.passed(
                "policy",
                f"{config.policy} parses (sha256 {policy.sha256[:12]}…): "
                f"allows {allowed or 'nothing'}",
            )
        )
    user = agent_user(config)
    for check in file_checks(config, user):
        doctor.add(check)
    now = datetime.fromtimestamp(options.clock(), UTC)
    doctor.add(certificate_check(config, now))
    doctor.network()
    doctor.running_agent()
    return doctor.checks


def _allows(rules: object) -> bool:
    return isinstance(rules, dict) and bool(rules.get("allow"))


def report(config_path: Path, checks: Sequence[Check], seconds: float, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(judge.report_json(str(config_path), checks, seconds), indent=2)
    title = f"byoc-agent doctor: {config_path}"
    return "\n".join(judge.report_lines(title, checks, seconds))
