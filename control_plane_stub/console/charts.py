"""Small line charts as inline SVG, rendered on the server: no script, no CDN, no network.

Every value that reaches the SVG is a number formatted here or text escaped here; colours and
fonts come from the console's stylesheet (classes only: the page's Content-Security-Policy
allows no inline styles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Final

from markupsafe import Markup

WIDTH: Final = 320
HEIGHT: Final = 120
_PAD_LEFT: Final = 52
_PAD_RIGHT: Final = 10
_PAD_TOP: Final = 12
_PAD_BOTTOM: Final = 22


@dataclass(frozen=True)
class Point:
    at: float
    """A Unix time (x)."""
    value: float


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    if high == low:
        return (start + end) / 2
    return start + (value - low) / (high - low) * (end - start)


def line_chart(points: Sequence[Point], *, chart_id: str, title: str, unit: str) -> Markup:
    """A line chart of ``points`` (sorted by time here) with its lowest and highest values
    labelled, named by ``title`` for assistive technology (``role="img"``). The numbers
    themselves belong in a table beside it: a chart is a picture of them, not a replacement."""
    ordered = sorted(points, key=lambda p: p.at)
    safe_id = escape(chart_id, quote=True)
    label = escape(title, quote=True)
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="{safe_id}-title" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{safe_id}-title">{label}</title>',
    ]
    left, right = _PAD_LEFT, WIDTH - _PAD_RIGHT
    top, bottom = _PAD_TOP, HEIGHT - _PAD_BOTTOM
    parts.append(f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom}"/>')
    if not ordered:
        parts.append(
            f'<text class="note" x="{(left + right) / 2:.0f}" y="{(top + bottom) / 2:.0f}" '
            f'text-anchor="middle">no data yet</text></svg>'
        )
        return Markup("".join(parts))  # noqa: S704  # built from numbers and escaped text
    values = [p.value for p in ordered]
    low, high = min(values), max(values)
    if high == low:  # a flat line sits mid-height, labelled with its value
        low, high = low - abs(low) * 0.1 - 1, high + abs(high) * 0.1 + 1
    first, last = ordered[0].at, ordered[-1].at
    xy = [
        (_scale(p.at, first, last, left + 6, right - 6), _scale(p.value, low, high, bottom, top))
        for p in ordered
    ]
    unit_text = escape(unit)
    for value, y in ((max(values), top + 4), (min(values), bottom)):
        parts.append(
            f'<text class="tick" x="{left - 4}" y="{y:.1f}" text-anchor="end">'
            f"{_number(value)} {unit_text}</text>"
        )
    if len(xy) > 1:
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        parts.append(f'<polyline class="series" points="{line}"/>')
    parts.extend(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in xy)
    span = last - first
    parts.append(
        f'<text class="tick" x="{right}" y="{HEIGHT - 6}" text-anchor="end">'
        f"{len(ordered)} collection{'s' if len(ordered) != 1 else ''}"
        f"{f' over {_duration(span)}' if span > 0 else ''}</text>"
    )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704  # built from numbers and escaped text


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
