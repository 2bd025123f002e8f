"""How the agent reaches the control plane: directly, to another address (a private endpoint),
or through an HTTP CONNECT proxy.

Chosen afresh for every connection attempt (so a changed environment or credentials file is
picked up), from ``[control_plane]``:

- ``proxy = "environment"`` (the default): the standard ``HTTPS_PROXY`` / ``https_proxy``
  variables, with ``NO_PROXY`` / ``no_proxy`` exceptions;
- ``proxy = "none"``: always direct;
- ``proxy = "http://host:port"`` (or ``https://``): this proxy.

Whatever its source, the proxy URL is put in normal form first
(:func:`agent.io.proxy_url.normalize_proxy_url`): a scheme-less value means ``http://``, and a SOCKS
or other scheme is refused with a :class:`ConfigError` rather than failing obscurely later.

Proxy credentials come from the proxy URL or, better, from ``proxy_credentials_file`` (one line
``user:password``, mode 0600 or it is refused), and never reach a log: :func:`redact_url` hides
the user name and the password, :meth:`Route.scrub` hides them in error texts.
TLS is end to end through the proxy: the proxy sees only the host name in ``CONNECT``.

``connect_to`` dials another address than the URL's host (a VPC/PrivateLink endpoint); the
certificate is still verified for the URL's host or ``server_name``. It applies to direct
connections only: through a proxy, the proxy resolves the URL's host.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from agent.config import ControlPlaneConfig
from agent.core.errors import ConfigError
from agent.io.proxy_url import normalize_proxy_url, redact_url, scrub
from agent.io.tls import check_private_key_file

__all__ = ["Route", "redact_url", "route_for"]


@dataclass(frozen=True)
class Route:
    proxy: str | None
    """The proxy URL to use (credentials included), or None for a direct connection."""
    host: str | None = None
    """The address to dial instead of the URL's host (direct connections only)."""
    port: int | None = None

    def describe(self) -> str:
        if self.proxy is not None:
            return f"via proxy {redact_url(self.proxy)}"
        if self.host is not None:
            return f"direct to {self.host}:{self.port}"
        return "direct"

    def scrub(self, text: str) -> str:
        """``text`` (an error message) without this route's proxy URL or credentials."""
        return scrub(text, self.proxy)


def _with_credentials(proxy: str, file: Path) -> str:
    check_private_key_file(file)  # same rule as a key: readable by the agent's user only
    try:
        user, sep, password = file.read_text(encoding="utf-8").strip().partition(":")
    except OSError as exc:
        raise ConfigError(f"cannot read proxy credentials {file}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"proxy credentials {file} are not UTF-8 text") from exc
    if not sep or not user:
        raise ConfigError(f"proxy credentials {file} must hold one line 'user:password'")
    parts = urllib.parse.urlsplit(proxy)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    quote = urllib.parse.quote
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def route_for(cp: ControlPlaneConfig) -> Route:
    """The route for the next connection attempt (reads the environment and files now)."""
    replaced = cp.proxy_credentials_file is not None
    if cp.proxy == "none":
        proxy = None
    elif cp.proxy == "environment":
        proxy = _from_environment(cp.url, credentials_replaced=replaced)
    else:
        proxy = normalize_proxy_url(
            cp.proxy, source="control_plane.proxy", credentials_replaced=replaced
        )
    if proxy is not None:
        if cp.proxy_credentials_file is not None:
            proxy = _with_credentials(proxy, cp.proxy_credentials_file)
        return Route(proxy=proxy)
    if cp.connect_to is not None:
        host, port = cp.connect_to
        return Route(proxy=None, host=host, port=port)
    return Route(proxy=None)


_ENVIRONMENT_NAMES = {"wss": "WSS_PROXY", "socks": "SOCKS_PROXY", "https": "HTTPS_PROXY"}
"""The variables websockets' ``get_proxy`` reads for a wss:// URL, in its order of priority
(either case; lower case wins when both are set)."""


def proxy_variable() -> str | None:
    """The environment variable that names the proxy for a wss:// URL, if one is set."""
    found = urllib.request.getproxies()
    return next((name for key, name in _ENVIRONMENT_NAMES.items() if key in found), None)


def _from_environment(url: str, *, credentials_replaced: bool) -> str | None:
    """The proxy the environment selects for ``url`` (honouring ``NO_PROXY``), normalised."""
    proxy = get_proxy(parse_uri(url))
    if proxy is None:
        return None
    name = proxy_variable() or "HTTPS_PROXY"
    return normalize_proxy_url(
        proxy,
        source=f"the proxy from the environment ({name})",
        credentials_replaced=credentials_replaced,
    )
