"""Streams: one TCP connection carried between the control plane and a target inside the
customer's network, through the agent (docs/PROTOCOL.md §13).

A stream is the execution of an ``open_stream`` grant, after the same verification, policy and
approval as any command. The agent resolves the target, keeps only the addresses the policy
allows (link-local and metadata addresses need a rule that names them), connects to the target,
then dials a *second outbound* connection to the control plane, a WebSocket upgrade to
``<url>/streams/<jti>`` (agent/io/stream_transport.py), with the same client certificate and
route (proxy, private endpoint) as the tunnel. Bytes travel as version 2 records or, with an
older control plane, WebSocket binary messages; an end record (an empty message) ends one
direction (like a TCP FIN), so half-closed protocols work. Nothing listens on the agent's side:
the outbound-only property holds.

Why a connection per stream rather than multiplexing inside the tunnel: TCP gives each stream its
own flow control and the tunnel never waits behind bulk data (commands and heartbeats keep their
latency while a stream is saturated); load balancers and proxies see ordinary WebSocket
upgrades. Buffers are bounded per stream (agent/io/splice.py): each direction holds at most a
read of ``read_chunk`` bytes and a transport's write buffer; past that, reading stops and TCP
pushes back on the sender.

A stream ends when both directions have ended, when either side closes or fails, at
``max_duration``, when the tunnel session that authorised it is lost, or when the agent stops.
Each end is audited with the bytes each way and why it ended.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agent.core.commands import OpenStream
from agent.core.errors import CommandRejected, DriverError, RedirectRefused
from agent.core.policy import Policy
from agent.core.targets import IPAddress, format_host_port, unmapped
from agent.drivers.base import ExecContext
from agent.io.splice import MAX_STREAM_MESSAGE, SocketEnd, Splice, StreamConnection, close_code

AGENT_SIDE_ENDS: Final = frozenset(
    {"session_lost", "agent_stopping", "protocol_error", "message_too_large"}
)
"""Ends that make the command ``failed``: the stream was cut short on the agent's side or the
control plane broke the protocol. Any other end (either side closed, max_duration) is a stream
that did its job: ``succeeded``, with ``ended_by`` saying how."""


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    max_streams: int = 64
    """Open streams at any time; more grants are refused as ``busy`` until one ends."""
    connect_timeout: float = 10.0
    """Seconds to resolve and connect to the target, and to open the stream connection."""
    read_chunk: int = MAX_STREAM_MESSAGE


Dialer = Callable[[str], Awaitable[StreamConnection]]
"""Opens the stream connection for a stream id (the grant's jti)."""


class StreamManager:
    def __init__(
        self,
        *,
        settings: StreamSettings,
        dial: Dialer,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.settings = settings
        self._dial = dial
        self._log = log
        self.active: dict[str, Splice] = {}
        self.opened = 0
        self.bytes_to_targets = 0
        self.bytes_from_targets = 0

    def has_room(self) -> bool:
        return len(self.active) < self.settings.max_streams

    def abort_all(self, reason: str) -> None:
        """End every open stream (``session_lost``, ``agent_stopping``)."""
        for stream in list(self.active.values()):
            stream.abort(reason)

    def describe(self) -> dict[str, object]:
        return {
            "open": len(self.active),
            "max": self.settings.max_streams,
            "opened_total": self.opened,
            "bytes_to_targets": self.bytes_to_targets,
            "bytes_from_targets": self.bytes_from_targets,
        }

    async def run(
        self, jti: str, command: OpenStream, policy: Policy, ctx: ExecContext
    ) -> dict[str, object]:
        """Carry one stream from start to end; the result reports it. Raises DriverError when
        the stream could not be set up (its ``result`` says how far it got)."""
        target = str(command.target)
        started = time.monotonic()
        stream = Splice(peer="control_plane", local="target", read_chunk=self.settings.read_chunk)
        self.active[jti] = stream
        try:
            target_end, address = await self._connect_target(command, policy, ctx, stream)
            try:
                connection = await self._open_connection(jti, stream, ctx)
            except BaseException:
                if target_end.transport is not None:
                    target_end.transport.abort()
                raise
            self.opened += 1
            await ctx.audit("stream_opened", target=target, address=address)
            ctx.log.info("stream_opened", target=target, address=address)
            ended_by = await stream.run(
                connection, target_end, deadline=started + command.max_duration
            )
        finally:
            del self.active[jti]
            self.bytes_to_targets += stream.to_socket
            self.bytes_from_targets += stream.from_socket
        duration_ms = int((time.monotonic() - started) * 1000)
        result: dict[str, object] = {
            "target": target,
            "address": address,
            "bytes_to_target": stream.to_socket,
            "bytes_from_target": stream.from_socket,
            "ended_by": ended_by,
            "duration_ms": duration_ms,
        }
        await ctx.audit(
            "stream_closed",
            target=target,
            bytes_to_target=stream.to_socket,
            bytes_from_target=stream.from_socket,
            ended_by=ended_by,
            duration_ms=duration_ms,
        )
        ctx.log.info("stream_closed", **result)
        if ended_by in AGENT_SIDE_ENDS:
            raise DriverError(ended_by, f"the stream to {target} ended: {ended_by}", result=result)
        return result

    # -- set-up ---------------------------------------------------------------------------

    async def _connect_target(
        self, command: OpenStream, policy: Policy, ctx: ExecContext, stream: Splice
    ) -> tuple[SocketEnd, str]:
        target = command.target
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                resolved = await _resolve(command)
        except (TimeoutError, OSError) as exc:
            ctx.log.warning("stream_target_unresolvable", target=str(target), error=repr(exc))
            raise DriverError(
                "target_unresolvable", f"cannot resolve {target.host}: {_why(exc)}"
            ) from exc
        try:
            usable = policy.stream_addresses(command, resolved)
        except CommandRejected as exc:
            await ctx.audit(
                "stream_refused", target=str(target), reason=exc.code, detail=exc.detail
            )
            raise DriverError(exc.code, exc.detail) from exc
        await ctx.audit("stream_connecting", target=str(target), addresses=[str(a) for a in usable])
        errors: list[str] = []
        for address in usable:
            shown = format_host_port(str(address), target.port)
            try:
                async with asyncio.timeout(timeout):
                    _, end = await asyncio.get_running_loop().create_connection(
                        SocketEnd, str(address), target.port
                    )
            except (TimeoutError, OSError) as exc:
                ctx.log.warning("stream_target_connect_failed", address=shown, error=repr(exc))
                errors.append(f"{shown}: {_why(exc)}")
                continue
            if stream.aborted.is_set():
                if end.transport is not None:
                    end.transport.abort()
                raise DriverError(str(stream.abort_reason), "the stream was ended while connecting")
            return end, shown  # TCP_NODELAY set: small messages are not held back
        raise DriverError("target_unreachable", f"cannot connect to {target}: {'; '.join(errors)}")

    async def _open_connection(
        self, jti: str, stream: Splice, ctx: ExecContext
    ) -> StreamConnection:
        """Dial the stream connection. What the control plane hears back about a failure is a
        fixed text per reason, never an OS error: it must not learn anything about other hosts
        (docs/PROTOCOL.md §13.3). The details go to the local log and audit only."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                connection = await self._dial(jti)
        except RedirectRefused as exc:
            await ctx.audit(
                "stream_connection_failed",
                reason="redirect_refused",
                status=exc.status,
                location=(exc.location or "")[:200] or None,
            )
            ctx.log.error("stream_redirected", status=exc.status, location=exc.location)
            raise DriverError(
                "stream_refused",
                f"the control plane answered the stream connection with a redirect "
                f"(HTTP {exc.status}); redirects are never followed",
            ) from exc
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise DriverError(
                "stream_refused", f"the control plane refused the stream connection: HTTP {status}"
            ) from exc
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
            await ctx.audit(
                "stream_connection_failed", reason="control_plane_unreachable", error=repr(exc)
            )
            ctx.log.warning("stream_connection_failed", error=repr(exc))
            raise DriverError(
                "control_plane_unreachable", "the stream connection could not be opened"
            ) from exc
        if stream.aborted.is_set():
            reason = str(stream.abort_reason)
            await connection.close(close_code(reason), reason)
            raise DriverError(str(stream.abort_reason), "the stream was ended while connecting")
        return connection


def _why(exc: BaseException) -> str:
    """A failure to reach the allowed target, in a fixed vocabulary (never an OS error text)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "no such name" if exc.errno in _NO_NAME else "resolver failure"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    return "failed"


_NO_NAME: Final = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


async def _resolve(command: OpenStream) -> list[IPAddress]:
    target = command.target
    if target.address is not None:
        return [target.address]
    infos = await asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = unmapped(ipaddress.ip_address(sockaddr[0]))
        if address not in seen:
            seen.append(address)
    return seen
