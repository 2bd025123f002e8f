"""The console's HTML: Jinja2 templates (autoescaped) and the small formatting helpers they use.

Formatting is plain functions of values (and ``now`` where an age is shown), so the pages say
the same whatever the time zone or locale of the stub's host: times are UTC.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import jinja2
from markupsafe import Markup

from control_plane_stub.console.charts import Point, line_chart

STATE_LABELS: Final = {
    "sent": "delivered",
    "pending_approval": "pending approval",
    "delivery_rejected": "delivery refused",
}
STATE_CLASSES: Final = {
    "succeeded": "good",
    "failed": "bad",
    "rejected": "bad",
    "interrupted": "bad",
    "delivery_rejected": "bad",
    "pending_approval": "wait",
}


def state_label(state: object) -> str:
    return STATE_LABELS.get(str(state), str(state))


def state_class(state: object) -> str:
    return STATE_CLASSES.get(str(state), "busy")


def duration(seconds: object) -> str:
    """``42 s``, ``3 min``, ``5 h``, ``2 d`` (rounded down, for ages and lifetimes)."""
    if not isinstance(seconds, int | float):
        return "unknown"
    value = abs(float(seconds))
    if value < 120:
        text = f"{value:.0f} s"
    elif value < 7200:
        text = f"{value // 60:.0f} min"
    elif value < 172800:
        text = f"{value // 3600:.0f} h"
    else:
        text = f"{value // 86400:.0f} d"
    return text


def when(timestamp: object) -> str:
    """A Unix time as ``2026-12-06 14:29:30 UTC``."""
    if not isinstance(timestamp, int | float):
        return "never"
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(timestamp: object) -> str:
    """For ``<time datetime=...>``."""
    if not isinstance(timestamp, int | float):
        return ""
    return datetime.fromtimestamp(float(timestamp), UTC).isoformat(timespec="milliseconds")


def clock_time(timestamp: object) -> str:
    """``14:29:30.123`` (UTC): for steps of one timeline, which are seconds apart."""
    if not isinstance(timestamp, int | float):
        return ""
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%H:%M:%S.%f")[:-3]


def offset(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "unknown (no report yet)"
    sign = "+" if seconds >= 0 else "\u2212"
    value = abs(float(seconds))
    return f"{sign}{value:.3f} s" if value < 10 else f"{sign}{value:.1f} s"


def nbytes(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "\u2014"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"  # pragma: no cover  # the loop always returns


def params(value: object) -> str:
    """Command parameters as ``replicas=3`` (values as JSON)."""
    if not isinstance(value, Mapping):
        return "" if value is None else json.dumps(value)
    return ", ".join(
        f"{key}={json.dumps(item, separators=(',', ':'))}" for key, item in sorted(value.items())
    )


def short(value: object, length: int = 12) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= length else text[:length] + "\u2026"


def pretty_json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def memory_chart(replica: Mapping[str, Any], agent_id: str) -> Markup:
    points = [Point(at=float(at), value=float(v) / 2**20) for at, v in replica["memory_series"]]
    return line_chart(
        points,
        chart_id=f"chart-{agent_id}-{replica['replica']}",
        title=f"Replica {replica['replica']}: resident memory (MiB) per collection",
        unit="MiB",
    )


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("control_plane_stub.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        state_label=state_label,
        state_class=state_class,
        duration=duration,
        when=when,
        iso=iso,
        clock_time=clock_time,
        offset=offset,
        nbytes=nbytes,
        params=params,
        short=short,
        pretty_json=pretty_json,
    )
    env.globals.update(memory_chart=memory_chart)
    return env
