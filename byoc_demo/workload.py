"""The demo workload: a tiny HTTP service standing in for one database node.

``byoc-demo-workload --port P --version V [--host H] [--fail-health REASON]`` serves:

- ``GET /healthz``: ``200 ok``; with ``--fail-health REASON``, ``503 unhealthy: REASON`` (how the
  demo shows a broken release);
- ``GET /metrics``: Prometheus text exposition (``demo_workload_info{version=...}``, request
  counter, uptime, health, and the standard ``process_*`` metrics);
- ``GET /version``: ``{"version": V}``.

It prints one JSON line (``{"event": "listening", ...}``) to stdout once it is bound (and, as a
``Type=notify`` systemd unit, sends READY=1), logs no requests, and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import socketserver
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    generate_latest,
)

from agent.io.sdnotify import SystemdNotifier

KNOWN_PATHS = ("/healthz", "/metrics", "/version")
_SHUTDOWN_POLL_INTERVAL = 0.05
"""How often serve_forever() checks for a shutdown request: bounds the time SIGTERM takes."""


@dataclass(frozen=True)
class Workload:
    """What one workload process serves: its version, health and metrics."""

    version: str
    fail_health: str | None
    registry: CollectorRegistry
    requests: Counter

    @classmethod
    def create(cls, version: str, fail_health: str | None) -> Workload:
        registry = CollectorRegistry()
        started = time.monotonic()
        Info("demo_workload", "Demo workload build information.", registry=registry).info(
            {"version": version}
        )
        requests = Counter(
            "demo_workload_requests",
            "HTTP requests served, by path.",
            ["path"],
            registry=registry,
        )
        uptime = Gauge(
            "demo_workload_uptime_seconds", "Seconds since the workload started.", registry=registry
        )
        uptime.set_function(lambda: time.monotonic() - started)
        healthy = Gauge(
            "demo_workload_healthy", "1 when the workload is healthy, else 0.", registry=registry
        )
        healthy.set(0 if fail_health is not None else 1)
        ProcessCollector(registry=registry)
        return cls(version=version, fail_health=fail_health, registry=registry, requests=requests)

    def respond(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        """Return (status, content type, body) for a GET of ``path``."""
        path = path.split("?", 1)[0]
        self.requests.labels(path=path if path in KNOWN_PATHS else "other").inc()
        if path == "/healthz":
            if self.fail_health is not None:
                reason = f"unhealthy: {self.fail_health}".encode()
                return HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", reason
            return HTTPStatus.OK, "text/plain; charset=utf-8", b"ok"
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/version":
            return HTTPStatus.OK, "application/json", json.dumps({"version": self.version}).encode()
        return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        status, content_type, body = self.server.workload.respond(self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Requests are counted in /metrics, not logged."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], workload: Workload) -> None:
        self.workload = workload
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a host without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="byoc-demo-workload", description="Demo workload standing in for a database node."
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--version", required=True, help="the release this process runs")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--fail-health", metavar="REASON", help="answer 503 on /healthz with this reason"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    workload = Workload.create(args.version, args.fail_health)
    server = _Server((args.host, args.port), workload)

    def _stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listening = {
        "event": "listening",
        "host": server.server_name,
        "port": server.server_port,
        "version": args.version,
    }
    print(json.dumps(listening), flush=True)
    notifier = SystemdNotifier.from_environment()
    notifier.ready(f"version {args.version} serving on {server.server_name}:{server.server_port}")
    notifier.close()
    try:
        server.serve_forever(poll_interval=_SHUTDOWN_POLL_INTERVAL)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
