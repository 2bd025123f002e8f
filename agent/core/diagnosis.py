"""What a failed connection to the control plane means, in words, and what to do about it.

``byoc-agent status`` shows the tunnel's last error, and ``byoc-agent doctor`` the failure of
each step it tries; both turn the error text into a :class:`Diagnosis` here, so that one
failure is explained the same way wherever it is seen. Sans-I/O: text in, words out.

    diagnose(error, Where(ca_bundle=..., client_cert=..., host=..., port=...)) -> Diagnosis

``error`` is the text the tunnel keeps (``Tunnel.last_error``): its own sentences (a refused
certificate, a proxy's or the control plane's HTTP status, a redirect) or
``"<ExceptionType>: <message>"`` for anything else (a refused connection, a timeout, DNS).
A close code the control plane sent (``4006``: revoked) may be given as ``"closed 4006: ..."``.
``Where`` names the files and address of the configuration, so that the action names them too;
every member is optional.

Codes (``Diagnosis.code``, stable, for scripts and tests)::

    server_ca_unknown          the control plane's certificate is not from a CA in ca_bundle
    server_name_mismatch       ... nor for the name the agent checks
    server_certificate_expired ... or out of its validity period (a clock, or the vendor)
    client_certificate_refused the control plane refused the agent's certificate
    client_certificate_expired ... because it has expired
    certificate_revoked        the control plane revoked it (HTTP 403, close 4006)
    proxy_auth / proxy_forbidden / proxy_failed / proxy_unsupported   the HTTP proxy
    redirect_refused           a redirect answered the upgrade (never followed)
    http_refused               another 4xx answered the upgrade
    connection_refused / timeout / dns / network_unreachable   reaching the address
    key_permissions / tls_files   the agent's own key, certificate or CA files
    unknown                    none of the above: the text itself, and doctor
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Diagnosis:
    code: str
    cause: str
    """What is wrong, in a sentence."""
    action: str
    """What to do, in a sentence (a command where one exists)."""


@dataclass(frozen=True, kw_only=True)
class Where:
    """What the words may name. Empty members are left out of the sentences."""

    host: str = ""
    """The host the agent dials (or verifies)."""
    port: int | None = None
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""

    @property
    def address(self) -> str:
        if not self.host:
            return "the control plane"
        return f"{self.host}:{self.port}" if self.port else self.host


_STATUS: Final = re.compile(r"HTTP (\d{3})", re.IGNORECASE)
_ENROLL_AGAIN: Final = (
    "enroll again with a new one-time token from the vendor: byoc-agent enroll --force "
    "--control-plane URL --token - (the agent uses the new certificate at its next attempt)"
)


def _status(error: str) -> int | None:
    found = _STATUS.search(error)
    return int(found.group(1)) if found else None


def _ca(where: Where) -> str:
    return f"ca_bundle ({where.ca_bundle})" if where.ca_bundle else "the CA bundle (ca_bundle)"


def diagnose(error: str, where: Where | None = None) -> Diagnosis:
    """The cause of a failed connection attempt, and what to do; see the module docstring."""
    where = where or Where()
    text = error.lower()
    checks = (
        _proxy,
        _certificates_refused_by_agent,
        _certificates_refused_by_control_plane,
        _http,
        _local_files,
        _network,
    )
    for check in checks:
        found = check(text, where)
        if found is not None:
            return found
    return Diagnosis(
        "unknown",
        f"the connection failed: {error}",
        "run byoc-agent doctor: it tries each step (DNS, TCP, proxy, TLS, certificate, clock) "
        "and says which one fails",
    )


def _proxy(text: str, where: Where) -> Diagnosis | None:
    if "socks" in text:
        return Diagnosis(
            "proxy_unsupported",
            "a SOCKS proxy is configured (or set in the environment); the agent speaks HTTP "
            "CONNECT only",
            "set control_plane.proxy to an http:// proxy, or unset SOCKS_PROXY / WSS_PROXY",
        )
    if "proxy" not in text:
        return None
    status = _status(text)
    if status in (401, 407):
        return Diagnosis(
            "proxy_auth",
            f"the HTTP proxy wants credentials, or refused those given (HTTP {status})",
            "put user:password in control_plane.proxy_credentials_file (one line, mode 0600)",
        )
    if status == 403:
        return Diagnosis(
            "proxy_forbidden",
            f"the HTTP proxy refuses CONNECT to {where.address} (its access rules)",
            f"have CONNECT to {where.address} allowed on the proxy, or list the host in NO_PROXY "
            "if it is reachable directly",
        )
    if status is not None or "refused the connection" in text:
        return Diagnosis(
            "proxy_failed",
            f"the HTTP proxy could not open a tunnel to {where.address}"
            + (f" (HTTP {status})" if status else ""),
            "check that the proxy itself can resolve and reach the control plane on port 443",
        )
    return None


def _certificates_refused_by_agent(text: str, where: Where) -> Diagnosis | None:
    if "control plane certificate refused" not in text and "certificate verify failed" not in text:
        return None
    if "mismatch" in text or "not valid for" in text:
        return Diagnosis(
            "server_name_mismatch",
            f"the control plane's certificate is not for the name the agent checks "
            f"({where.host or 'the URL host'})",
            "use the host name the vendor gave you in control_plane.url, or set "
            "control_plane.server_name to a name in the certificate (byoc-agent doctor shows "
            "the names it holds)",
        )
    if "expired" in text or "not yet valid" in text:
        return Diagnosis(
            "server_certificate_expired",
            "the control plane's certificate is outside its validity period, as this host's "
            "clock sees it",
            "check this host's clock first (timedatectl; byoc-agent doctor measures the offset); "
            "if the clock is right, the vendor must renew its certificate",
        )
    return Diagnosis(
        "server_ca_unknown",
        f"the control plane's certificate is not signed by a CA in {_ca(where)}: a wrong or "
        "outdated bundle, or a TLS-inspecting proxy presenting its own certificate",
        f"install the vendor's CA bundle at {where.ca_bundle or 'the ca_bundle path'} "
        "(byoc-agent doctor shows who issued the certificate this host sees); a TLS-inspecting "
        "proxy must pass the control plane's host through untouched",
    )


def _certificates_refused_by_control_plane(text: str, where: Where) -> Diagnosis | None:
    if "revoked" in text or "4006" in text:
        return Diagnosis(
            "certificate_revoked",
            "the control plane revoked this agent's certificate",
            f"ask the vendor why; then {_ENROLL_AGAIN}",
        )
    refused = "refused our client certificate" in text or "right after the tls handshake" in text
    if not refused:
        return None
    if "expired" in text:
        return Diagnosis(
            "client_certificate_expired",
            "the control plane says the agent's certificate has expired (it is renewed over "
            "the tunnel: was the agent stopped or cut off for longer than its lifetime?)",
            _ENROLL_AGAIN,
        )
    cert = f" ({where.client_cert})" if where.client_cert else ""
    return Diagnosis(
        "client_certificate_refused",
        f"the control plane refused the agent's certificate{cert}: not from its agent CA, "
        "expired, or issued by another environment",
        f"check it with byoc-agent doctor; if it is not the vendor's, {_ENROLL_AGAIN}",
    )


def _http(text: str, where: Where) -> Diagnosis | None:
    status = _status(text)
    if "redirect" in text:
        return Diagnosis(
            "redirect_refused",
            f"the control plane answered with a redirect{f' (HTTP {status})' if status else ''}"
            ", which the agent never follows",
            "use the URL the vendor gave you in control_plane.url (a moved endpoint is moved "
            "with DNS, not redirects)",
        )
    if status == 403:
        return Diagnosis(
            "certificate_revoked",
            "the control plane refuses this agent's certificate (HTTP 403): it was revoked",
            f"ask the vendor why; then {_ENROLL_AGAIN}",
        )
    if status is not None and 400 <= status < 500:
        return Diagnosis(
            "http_refused",
            f"the control plane refused the connection (HTTP {status})"
            + (": the path of control_plane.url is not served" if status == 404 else ""),
            "check control_plane.url against what the vendor gave you (wss://HOST/v1/agent)",
        )
    return None


def _local_files(text: str, where: Where) -> Diagnosis | None:
    if "accessible by group or others" in text:
        key = where.client_key or "the key"
        return Diagnosis(
            "key_permissions",
            f"the private key {key} can be read by other users, so the agent will not use it",
            f"chmod 600 {key} (and chown it to the agent's user)",
        )
    markers = (
        "cannot read the",
        "cannot be used together",
        "holds no usable certificate",
        "tls material",
        "private key",
        "no such file",
    )
    if any(marker in text for marker in markers):
        return Diagnosis(
            "tls_files",
            "the agent cannot use its key, certificate or CA bundle: " + text.split(": ", 1)[-1],
            "enroll (byoc-agent enroll) if it never was, or correct the paths in agent.toml "
            "[control_plane] (byoc-agent doctor checks each file)",
        )
    return None


def _network(text: str, where: Where) -> Diagnosis | None:
    if "connectionrefused" in text or "connection refused" in text or "connect call failed" in text:
        return Diagnosis(
            "connection_refused",
            f"nothing accepts connections at {where.address}: a wrong port, the control plane "
            "down, or a firewall that rejects",
            "check the port in control_plane.url (443 by default) and connect_to; "
            "byoc-agent doctor tries the route step by step",
        )
    if "timeout" in text or "timed out" in text:
        return Diagnosis(
            "timeout",
            f"connections to {where.address} get no answer: a firewall or security group drops "
            "them, or the route (NAT gateway, private link) is missing",
            "allow outbound TCP 443 to the control plane (security group, network ACL, "
            "NetworkPolicy); with a private link, the endpoint's security group must admit TCP "
            "443 from the VPC's CIDR (byoc-agent vpc check, byoc-agent doctor)",
        )
    if "name or service not known" in text or "gaierror" in text or "nodename nor" in text:
        return Diagnosis(
            "dns",
            f"{where.host or 'the control plane name'} does not resolve on this host",
            "check the host's resolver (/etc/resolv.conf); with a private link, the private "
            "hosted zone or the endpoint's private DNS must answer inside the VPC",
        )
    if "network is unreachable" in text or "no route to host" in text:
        return Diagnosis(
            "network_unreachable",
            f"this host has no route to {where.address}",
            "check the subnet's route table (0.0.0.0/0 to the NAT gateway) or the private link",
        )
    return None


__all__ = ["Diagnosis", "Where", "diagnose"]
