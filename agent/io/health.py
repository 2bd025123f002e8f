"""The health and metrics endpoint: ``GET /healthz``, ``/livez``, ``/readyz``, ``/metrics``.

Bound to loopback by default (``[health] listen = "127.0.0.1:9464"``); a Kubernetes pod sets
it to the pod's address for its probes, which is the one inbound port the agent can have and
is an explicit, audited choice. ``listen = ""`` turns it off.

- ``/healthz``: 200 while the process runs its event loop.
- ``/livez``: liveness, for a Kubernetes ``livenessProbe``: 200 while the agent's own process
  is sound (its event loop answers and its background tasks run, or it is waiting to enroll);
  503 with the reason otherwise. It never depends on the control plane: a vendor outage must
  not get the agent restarted (or, as a sidecar, its database pod's containers disturbed).
- ``/readyz``: 200 when the tunnel is up and the client certificate is within its validity
  period; otherwise 503 with the reason (readiness). Use it where Ready means "connected" (the
  standalone Deployment); never as a sidecar's probe, since a sidecar's readiness counts in its
  pod's Ready condition.
- ``/metrics``: the Prometheus text format (prometheus_client), gathered when scraped.

HTTP/1.1 is parsed by h11 (sans-I/O); one request per connection, at most 8 KiB of request,
5 s to send it, ``GET``/``HEAD`` only. Nothing here changes the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import h11
import structlog

MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
TEXT: Final = "text/plain; charset=utf-8"


class HealthServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, str]],
        metrics: Callable[[], tuple[bytes, str]],
        log: structlog.typing.FilteringBoundLogger,
        live: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._metrics = metrics
        self._live = live or (lambda: (True, "alive"))
        self._log = log
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._log.info("health_listening", url=self.url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _read_request(connection, reader)
                status, content_type, body = self._answer(request)
                head = request.method == b"HEAD"
                for event in _response(status, content_type, body, head=head):
                    writer.write(connection.send(event) or b"")
                await writer.drain()
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            pass  # a client that cannot speak HTTP gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, TEXT, b"only GET and HEAD\n"
        path = request.target.split(b"?", 1)[0]
        if path == b"/healthz":
            return 200, TEXT, b"ok\n"
        if path in (b"/readyz", b"/livez"):
            ok, why = self._ready() if path == b"/readyz" else self._live()
            return (200 if ok else 503), TEXT, (why + "\n").encode()
        if path == b"/metrics":
            body, content_type = self._metrics()
            return 200, content_type, body
        return 404, TEXT, b"not found: /healthz, /livez, /readyz, /metrics\n"


async def _read_request(connection: h11.Connection, reader: asyncio.StreamReader) -> h11.Request:
    received = 0
    request: h11.Request | None = None
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            received += len(data)
            if received > MAX_REQUEST:
                raise h11.RemoteProtocolError("request too large")
            connection.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise ConnectionError("the client went away")


def _response(status: int, content_type: str, body: bytes, *, head: bool) -> list[h11.Event]:
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    events: list[h11.Event] = [h11.Response(status_code=status, headers=headers)]
    if not head:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    return events
