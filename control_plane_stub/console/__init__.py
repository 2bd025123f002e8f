"""A small web console for the stub control plane: the fleet, each agent's commands as
timelines with their signed receipts, refusals and their reasons, streams, metrics per replica,
and forms that send scale, upgrade and collect_metrics, with results arriving live.

Served by the stub (``cp-stub serve --console HOST:PORT``) on loopback by default; another
address needs ``--console-remote`` and is then served over HTTPS with the stub's server
certificate. Every request needs the console token (made at start, shown once, never logged).

    auth      the token, sessions and CSRF tokens (no I/O)
    charts    inline SVG line charts (no script)
    render    Jinja2 templates and formatting helpers
    app       the aiohttp application: pages, forms, event stream, sign-in

Its data comes from the operator API's views (:class:`control_plane_stub.api.OperatorApi`), in
process; it raises the stub's own errors (:mod:`control_plane_stub.errors`) and shows them as
pages.
"""

from control_plane_stub.console.app import Console
from control_plane_stub.console.auth import ConsoleAuth

__all__ = ["Console", "ConsoleAuth"]
