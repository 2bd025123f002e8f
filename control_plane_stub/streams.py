"""The stub's side of streams (docs/PROTOCOL.md §13): forwards, grants, and the stream
connections agents dial back.

A *forward* is a loopback listener in the stub process (``cp-stub forward``). Each connection
accepted on it becomes one stream: the stub signs an ``open_stream`` grant for the agent (jti =
stream id), queues it like any command, and waits until the agent dials
``/v1/agent/streams/<jti>`` with the certificate of that same agent, or until the grant ends
without a stream (refused by the policy, denied, expired, target unreachable). Then bytes flow
between the local connection and the agent's stream connection (agent/io/splice.py), in
version 2 framing when the agent offers it (agent/io/stream_transport.py) and ``offer_v2`` is
on, in version 1 (WebSocket messages) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from websockets.asyncio.server import ServerConnection

from agent.core.targets import (
    TargetError,
    format_host_port,
    is_loopback_host,
    parse_listen,
    parse_target,
)
from agent.io.splice import SocketEnd, Splice, StreamConnection
from agent.io.stream_transport import take_over
from control_plane_stub.errors import BadRequest, UnknownCommand, UnknownForward
from control_plane_stub.hub import Hub
from control_plane_stub.signer import CommandSigner
from control_plane_stub.store import StubStore

GRANT_TTL: Final = 60
"""Seconds a grant made for a forwarded connection is valid (time to approve it, if needed)."""
STREAM_PREFIX: Final = "/v1/agent/streams/"
MAX_FORWARDS: Final = 64
KEPT_OUTCOMES: Final = 20
"""A forward remembers how its latest connections ended (``cp-stub forward`` reports them)."""


@dataclass(frozen=True)
class Outcome:
    """How one forwarded connection ended: carried by a stream (``ok``; ``text`` says who
    ended it), or never given one: ``reason`` and ``detail`` are the agent's (the policy's
    refusal, ``target_unreachable``, a denial) or the stub's (the grant expired unanswered)."""

    n: int
    """The connection's number on its forward, from 1."""
    at: float
    ok: bool
    text: str
    reason: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "n": self.n,
            "at": self.at,
            "ok": self.ok,
            "outcome": self.text,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(eq=False)
class _Waiting:
    agent_id: str
    arrived: asyncio.Future[StreamConnection]
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class Forward:
    id: str
    agent_id: str
    target: str
    max_duration: int
    server: asyncio.Server
    listen: str
    connections: int = 0
    open: int = 0
    bytes_to_agent: int = 0
    bytes_from_agent: int = 0
    last_outcome: str | None = None
    last_framing: int | None = None
    """The framing of the last stream connection (1 or 2, docs/PROTOCOL.md §13.3.1)."""
    outcomes: deque[Outcome] = field(default_factory=lambda: deque(maxlen=KEPT_OUTCOMES))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    splices: set[Splice] = field(default_factory=set)

    @property
    def sent(self) -> int:
        """Bytes carried to the agent so far, open streams included."""
        return self.bytes_to_agent + sum(s.from_socket for s in self.splices)

    @property
    def received(self) -> int:
        return self.bytes_from_agent + sum(s.to_socket for s in self.splices)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "target": self.target,
            "listen": self.listen,
            "max_duration": self.max_duration,
            "connections": self.connections,
            "open": self.open,
            "bytes_to_agent": self.sent,
            "bytes_from_agent": self.received,
            "last_outcome": self.last_outcome,
            "last_framing": self.last_framing,
            "outcomes": [outcome.to_json() for outcome in self.outcomes],
        }


class StreamBroker:
    def __init__(
        self,
        store: StubStore,
        hub: Hub,
        signer: CommandSigner,
        log: structlog.typing.FilteringBoundLogger,
        *,
        offer_v2: bool = True,
    ) -> None:
        self.offer_v2 = offer_v2
        """Accept version 2 framing when an agent offers it (off: behave as an older stub)."""
        self._store = store
        self._hub = hub
        self._signer = signer
        self._log = log
        self._waiting: dict[str, _Waiting] = {}
        self.changed = asyncio.Condition()
        """Notified when a stream starts waiting for its agent."""
        self.forwards: dict[str, Forward] = {}

    # -- the agent's side -----------------------------------------------------------------

    def waiting_for(self, agent_id: str) -> list[str]:
        """The stream ids waiting for this agent to dial them."""
        return [sid for sid, w in self._waiting.items() if w.agent_id == agent_id]

    def expected(self, stream_id: str, agent_id: str) -> bool:
        """Is this agent expected to dial this stream right now? (Checked before the
        WebSocket handshake is accepted.)"""
        waiting = self._waiting.get(stream_id)
        return waiting is not None and waiting.agent_id == agent_id and not waiting.arrived.done()

    async def attach(self, websocket: ServerConnection, stream_id: str, agent_id: str) -> None:
        """Serve one stream connection from an agent until its stream ends."""
        connection = take_over(websocket)
        waiting = self._waiting.get(stream_id)
        if waiting is None or waiting.agent_id != agent_id or waiting.arrived.done():
            await connection.close(4404, "no such stream")
            return
        waiting.arrived.set_result(connection)
        await waiting.finished.wait()

    # -- forwards -------------------------------------------------------------------------

    async def start_forward(
        self, agent_id: str, target: str, listen: str, max_duration: int
    ) -> Forward:
        try:
            parse_target(target)
        except TargetError as exc:
            raise BadRequest(str(exc)) from exc
        try:
            host, port = parse_listen(listen)
        except TargetError as exc:
            raise BadRequest(f"listen: {exc}") from exc
        if not is_loopback_host(host):
            raise BadRequest(
                "listen must be a loopback address: a forward is as open as its listener"
            )
        if len(self.forwards) >= MAX_FORWARDS:
            raise BadRequest(f"at most {MAX_FORWARDS} forwards at a time")
        forward_id = uuid.uuid4().hex[:12]
        holder: list[Forward] = []

        async def accepted(client: SocketEnd) -> None:
            try:
                await self._carry(holder[0], client)
            except asyncio.CancelledError:
                pass  # the forward was stopped: the task is ours and ends here
            finally:
                if client.transport is not None:
                    client.transport.abort()

        def on_accept(client: SocketEnd) -> None:
            task = asyncio.get_running_loop().create_task(accepted(client))
            holder[0].tasks.add(task)
            task.add_done_callback(holder[0].tasks.discard)

        def client_end() -> SocketEnd:
            return _ClientEnd(on_accept)

        try:
            server = await asyncio.get_running_loop().create_server(client_end, host, port)
        except OSError as exc:
            raise BadRequest(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        bound = server.sockets[0].getsockname()
        forward = Forward(
            id=forward_id,
            agent_id=agent_id,
            target=target,
            max_duration=max_duration,
            server=server,
            listen=format_host_port(str(ipaddress.ip_address(bound[0])), bound[1]),
        )
        holder.append(forward)
        self.forwards[forward_id] = forward
        self._log.info(
            "forward_started",
            id=forward_id,
            agent_id=agent_id,
            target=target,
            listen=forward.listen,
        )
        return forward

    async def stop_forward(self, forward_id: str) -> Forward:
        forward = self.forwards.pop(forward_id, None)
        if forward is None:
            raise UnknownForward(f"no forward {forward_id!r}")
        forward.server.close()
        for task in list(forward.tasks):
            task.cancel()
        await asyncio.gather(*forward.tasks, return_exceptions=True)
        await forward.server.wait_closed()
        self._log.info("forward_stopped", id=forward_id, connections=forward.connections)
        return forward

    async def close(self) -> None:
        for forward_id in list(self.forwards):
            await self.stop_forward(forward_id)
        for waiting in self._waiting.values():
            waiting.finished.set()

    async def _carry(self, forward: Forward, client: SocketEnd) -> None:
        forward.connections += 1
        forward.open += 1
        number = forward.connections
        try:
            outcome = await self._stream(forward, number, client)
        finally:
            forward.open -= 1
            if client.transport is not None:
                client.transport.abort()
        forward.last_outcome = outcome.text
        forward.outcomes.append(outcome)
        if outcome.ok:
            self._log.info("forwarded_connection_ended", id=forward.id, outcome=outcome.text)
        else:  # the person at the forward is told too (cp-stub forward follows the outcomes)
            self._log.warning(
                "forwarded_connection_refused",
                id=forward.id,
                target=forward.target,
                reason=outcome.reason,
                detail=outcome.detail,
            )
        await self._hub.notify()

    async def _stream(self, forward: Forward, number: int, client: SocketEnd) -> Outcome:
        params: dict[str, object] = {"target": forward.target, "max_duration": forward.max_duration}
        signed = self._signer.sign(
            agent_id=forward.agent_id,
            command_type="open_stream",
            params=params,
            now=time.time(),
            ttl=GRANT_TTL,
        )
        waiting = _Waiting(
            agent_id=forward.agent_id, arrived=asyncio.get_running_loop().create_future()
        )
        self._waiting[signed.jti] = waiting
        async with self.changed:
            self.changed.notify_all()
        try:
            self._store.add_command(
                ref=signed.jti,
                agent_id=forward.agent_id,
                token=signed.token,
                origin="signed",
                jti=signed.jti,
                command_type="open_stream",
                params=params,
            )
            await self._store.wait_durable()
            self._hub.kick(forward.agent_id)
            connection = await self._wait_for_agent(signed.jti, waiting, signed.exp)
            if connection is None:
                await client.close_unused()
                record = self._store.get(signed.jti)
                reason = record.reason or ("expired" if not record.final else None)
                detail = record.detail or (
                    "the agent did not answer the grant in time" if not record.final else None
                )
                text = f"no stream: {record.state} {reason or ''}".strip()
                return Outcome(number, time.time(), False, text, reason, detail)
            forward.last_framing = connection.version
            splice = Splice(peer="agent", local="client")
            forward.splices.add(splice)
            try:
                ended_by = await splice.run(connection, client)
            finally:
                forward.splices.discard(splice)
                forward.bytes_to_agent += splice.from_socket
                forward.bytes_from_agent += splice.to_socket
            return Outcome(number, time.time(), True, ended_by)
        finally:
            self._waiting.pop(signed.jti, None)
            waiting.finished.set()
            if not waiting.arrived.done():
                waiting.arrived.cancel()

    async def _wait_for_agent(
        self, ref: str, waiting: _Waiting, exp: int
    ) -> StreamConnection | None:
        """The agent's stream connection, or None once the grant is final without one."""

        def final() -> bool:
            with contextlib.suppress(UnknownCommand):
                return self._store.get(ref).final
            return True

        async def ended() -> None:
            async with self._hub.changed:
                await self._hub.changed.wait_for(final)

        watcher = asyncio.create_task(ended())
        arrived = waiting.arrived
        either: list[asyncio.Future[Any]] = [arrived, watcher]
        try:
            # Past the grant's expiry (plus the agent's connect time) nothing can arrive.
            timeout = max(1.0, exp - time.time() + 30.0)
            await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if arrived.done() and not arrived.cancelled():
            return arrived.result()
        return None


class _ClientEnd(SocketEnd):
    """An operator's connection to a forward: its stream starts as soon as it is accepted."""

    def __init__(self, on_accept: Callable[[SocketEnd], object]) -> None:
        super().__init__()
        self._on_accept = on_accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_accept(self)
