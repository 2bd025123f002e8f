"""The commands an operator sends by hand, built one way for ``cp-stub send`` and the console.

Both turn the same few inputs into the same ``(type, params)``, which the operator API signs
and queues (:meth:`OperatorApi.queue_command`), so the console can send nothing that the CLI
could not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from control_plane_stub.errors import BadRequest

KINDS: Final = ("scale", "upgrade", "collect_metrics", "update_agent")
"""What an operator sends with ``cp-stub send`` (``collect-metrics``, ``update-agent`` on the
command line; the console has no form for ``update_agent``)."""
DEFAULT_TARGETS: Final = ("workload", "host")
MAX_TEXT: Final = 256
MAX_TARGETS: Final = 16


def operator_command(
    kind: str,
    *,
    replicas: int | None = None,
    version: str | None = None,
    targets: Sequence[str] = (),
    url: str | None = None,
    sha256: str | None = None,
) -> tuple[str, dict[str, object]]:
    """``(type, params)`` for one of :data:`KINDS`, as ``cp-stub send`` builds them.

    Raises :class:`BadRequest` for another kind, or a missing or malformed input."""
    if kind == "scale":
        if replicas is None:
            raise BadRequest("scale needs a number of replicas")
        return "scale", {"replicas": replicas}
    if kind == "upgrade":
        if not version or len(version) > MAX_TEXT:
            raise BadRequest(f"upgrade needs a version of 1..{MAX_TEXT} characters")
        return "upgrade", {"version": version}
    if kind == "update_agent":
        if not (version and url and sha256) or max(len(version), len(url), len(sha256)) > 2048:
            raise BadRequest("update_agent needs a version, the bundle's URL and its SHA-256")
        return "update_agent", {"version": version, "url": url, "sha256": sha256}
    if kind == "collect_metrics":
        if len(targets) > MAX_TARGETS or any(not t or len(t) > MAX_TEXT for t in targets):
            raise BadRequest(f"at most {MAX_TARGETS} targets of 1..{MAX_TEXT} characters")
        return "collect_metrics", {"targets": list(targets) or list(DEFAULT_TARGETS)}
    raise BadRequest(f"the console and cp-stub send only {', '.join(KINDS)}, not {kind!r}")


def parse_replicas(text: str) -> int:
    """A replica count typed by a person (what argparse's ``type=int`` accepts)."""
    try:
        if len(text) > 20:
            raise ValueError(text)
        return int(text.strip())
    except ValueError:
        raise BadRequest(f"replicas must be a whole number, not {text[:40]!r}") from None
