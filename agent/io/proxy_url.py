"""Proxy URLs: the one normal form the agent uses, and how they are shown (never with their
credentials).

A proxy URL can come from the configuration, from ``HTTPS_PROXY`` (whatever an operator typed)
or be built from ``proxy_credentials_file``; any of them may hold a user name and a password.
Every text that shows one (the route in audit records and ``byoc-agent status``, error texts,
logs) goes through :func:`redact_url`, and every error text that could quote one (a library's
exception, say) through :func:`scrub`.

The normal form is ``http(s)://[user:password@]host[:port]``:

- a value without a scheme (``proxy.corp:3128``, ``alice:pw@proxy.corp:3128``) means
  ``http://`` as it does for curl;
- any other scheme is refused: SOCKS is not supported, and anything else is a typing error;
- a user name without a password is refused (HTTP Basic needs both; websockets would refuse it
  later with the whole URL in its error text).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

from agent.core.errors import ConfigError

REDACTED: Final = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_MIN_SCRUBBED = 4
"""Credential pieces shorter than this are not scrubbed from free text on their own (they
would mangle unrelated words); the URL and the whole ``user:password`` still are."""


def redact_url(url: str) -> str:
    """The URL with its user information (user name and password) replaced by ``***``.

    Works on anything, a malformed or scheme-less URL included: everything up to the last
    ``@`` after the scheme is hidden, even where a URL parser would disagree about where the
    authority ends (an unencoded ``/`` in a password, for instance)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        scheme, sep, rest = "", "", url
    if "@" in rest:
        rest = f"{REDACTED}@{rest.rpartition('@')[2]}"
    return f"{scheme}{sep}{rest}"


def normalize_proxy_url(url: str, *, source: str, credentials_replaced: bool = False) -> str:
    """The proxy URL in normal form (see the module docstring), or :class:`ConfigError`.

    ``source`` names where the value came from (``control_plane.proxy``, ``HTTPS_PROXY``...)
    for the error text, which shows the URL redacted only. ``credentials_replaced``: the URL's
    own credentials will be replaced (``proxy_credentials_file``), so a lone user name is no
    error."""
    value = url.strip()
    if "://" not in value:
        value = f"http://{value}"
    shown = redact_url(value)
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{source}: {shown} is not a valid proxy URL") from exc
    scheme = parts.scheme.lower()
    if scheme.startswith("socks"):
        raise ConfigError(
            f"{source}: {shown} is a SOCKS proxy; only HTTP CONNECT proxies "
            "(http:// or https://) are supported"
        )
    if scheme not in ("http", "https"):
        raise ConfigError(f"{source}: {shown} must be an http:// or https:// proxy URL (host:port)")
    if not parts.hostname:
        raise ConfigError(f"{source}: {shown} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{source}: {shown} must not have a path, query or fragment")
    if port == 0:
        raise ConfigError(f"{source}: {shown} has port 0")
    if parts.username is not None and not credentials_replaced:
        if parts.password is None:
            raise ConfigError(
                f"{source}: {shown} has a user name but no password "
                "(write user:password@, or use control_plane.proxy_credentials_file)"
            )
        try:
            urllib.parse.unquote(parts.username, errors="strict")
            urllib.parse.unquote(parts.password, errors="strict")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{source}: {shown} has credentials that are not valid percent-encoded UTF-8"
            ) from exc
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme, path=""))


def scrub(text: str, url: str | None) -> str:
    """``text`` (an error message, say) with ``url`` and its credentials hidden.

    Hides the URL (as written and percent-decoded) by its redacted form, then the whole user
    information and each of the user name and password (as written and decoded) if it is long
    enough to be told apart from ordinary words."""
    if url is None:
        return text
    for form in sorted({url, urllib.parse.unquote(url)}, key=len, reverse=True):
        text = text.replace(form, redact_url(form))
    _, sep, rest = url.partition("://")
    userinfo = (rest if sep else url).rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    pieces = {
        form
        for piece in (userinfo, user, password)
        for form in (piece, urllib.parse.unquote(piece))
        if len(form) >= _MIN_SCRUBBED
    }
    for piece in sorted(pieces, key=len, reverse=True):  # the whole before its parts
        text = text.replace(piece, REDACTED)
    return text
