"""The network steps of a connection to the control plane, one at a time and each with a short
timeout, for ``byoc-agent doctor``: resolve, connect, the proxy's ``CONNECT``, the TLS
handshake, one plain HTTP request. Blocking sockets (doctor is a short-lived command); what the
results mean is judged elsewhere (:mod:`agent.core.doctor_checks`).
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final

import h11

MAX_HEAD: Final = 64 * 1024
"""Bytes of an HTTP answer's head read at most (the body is never read)."""


class ProbeError(OSError):
    """A step failed in a way the socket layer does not say by itself (a proxy's refusal, an
    answer that is not HTTP)."""


class ProxyRefused(ProbeError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"the proxy refused CONNECT: HTTP {status} {reason}".strip())
        self.status = status


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to (TCP), in the resolver's order; ``TimeoutError``
    after ``timeout`` seconds (getaddrinfo itself has no timeout, so it runs in a thread that is
    left behind if it hangs)."""
    result: list[list[str] | BaseException] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result.append(list(dict.fromkeys(str(info[4][0]) for info in infos)))
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=lookup, name="doctor-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise TimeoutError(f"resolving {host} took more than {timeout:g} s")
    found = result[0]
    if isinstance(found, BaseException):
        raise found
    return found


def connect(address: str, port: int, timeout: float) -> tuple[socket.socket, float]:
    """A TCP connection and how long it took (seconds)."""
    started = time.monotonic()
    sock = socket.create_connection((address, port), timeout=timeout)
    return sock, time.monotonic() - started


def proxy_connect(
    sock: socket.socket, proxy_url: str, host: str, port: int, timeout: float
) -> socket.socket:
    """Ask the HTTP proxy at the other end of ``sock`` (TLS first for an ``https://`` proxy)
    for a tunnel to ``host:port``; returns the socket to speak TLS over. Credentials in the
    URL are sent as Basic proxy authentication."""
    parts = urllib.parse.urlsplit(proxy_url)
    if parts.scheme == "https":
        wrapped = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        sock = wrapped
    sock.settimeout(timeout)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = [("Host", target)]
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers.append(("Proxy-Authorization", f"Basic {token}"))
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="CONNECT", target=target, headers=headers)
    sock.sendall(connection.send(request) or b"")
    answer = _read_head(sock, connection)
    if answer.status_code != 200:
        raise ProxyRefused(answer.status_code, answer.reason.decode(errors="replace"))
    return sock


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]
    sent: float
    """Wall-clock time just before the request was sent."""
    received: float
    """... and just after the answer's head arrived."""

    def date(self) -> float | None:
        """The answer's ``Date`` (Unix time; whole seconds, as HTTP dates are)."""
        value = self.headers.get("date")
        if not value:
            return None
        try:
            return parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None


def http_get(sock: socket.socket, host: str, path: str, user_agent: str) -> Answer:
    """One ``GET`` (no WebSocket upgrade) and the head of its answer."""
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path or "/",
        headers=[("Host", host), ("User-Agent", user_agent), ("Connection", "close")],
    )
    sent = time.time()
    sock.sendall(connection.send(request) or b"")
    head = _read_head(sock, connection)
    received = time.time()
    return Answer(
        status=head.status_code,
        reason=head.reason.decode(errors="replace"),
        headers={
            name.decode().lower(): value.decode(errors="replace") for name, value in head.headers
        },
        sent=sent,
        received=received,
    )


def _read_head(sock: socket.socket, connection: h11.Connection) -> h11.Response:
    received = 0
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProbeError(f"the answer is not HTTP: {exc}") from exc
        if isinstance(event, h11.Response):
            return event
        if event is h11.NEED_DATA:
            data = sock.recv(4096)
            received += len(data)
            if received > MAX_HEAD:
                raise ProbeError("the answer's head is too long")
            connection.receive_data(data)
            if not data:
                raise ProbeError("the connection was closed before an answer")
            continue
        if isinstance(event, h11.ConnectionClosed):
            raise ProbeError("the connection was closed before an answer")
        raise ProbeError(f"unexpected HTTP event {type(event).__name__}")


def unverified_certificate(sock: socket.socket, server_name: str) -> bytes | None:
    """The DER certificate the server at the other end of ``sock`` presents, not verified (to
    say *what* failed verification); None if it cannot be had. Closes ``sock``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    finally:
        sock.close()
