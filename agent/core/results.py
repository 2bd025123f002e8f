"""Make a driver's result fit the wire. Sans-I/O.

A result travels in a ``status`` frame, which must be strict JSON and at most
``MAX_FRAME_TO_CONTROL_PLANE`` bytes (docs/PROTOCOL.md §3). Drivers return whatever they
measured, so before a result is committed it is:

- made strict JSON: NaN and infinities become the strings ``"NaN"``, ``"+Inf"``, ``"-Inf"``
  (as metric samples already use), anything not JSON becomes its ``str()``, and a lone
  surrogate in a string (or a key) becomes U+FFFD, so the result encodes as UTF-8 (the wire,
  the receipt's RFC 8785 hash) whatever the driver read;
- kept under a byte budget: a result with a ``samples`` list keeps the first samples that fit
  and says so (``truncated``, ``samples_total``); any other result over budget is replaced by a
  short note (``truncated``, ``result_bytes``).

Without this, one oversized result would be resent, refused and resent on every connection,
blocking every status behind it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final

from agent.core.frames import MAX_FRAME_TO_CONTROL_PLANE

# Room for the rest of a status frame: ids, state, reason, detail (<= 1,024 chars), numbers.
RESULT_BUDGET: Final = MAX_FRAME_TO_CONTROL_PLANE - 16 * 1024


def well_formed(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (a surrogate pair becomes the
    character it encodes): a string that encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def strict_json(value: object) -> object:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts and whose text
    encodes as UTF-8."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return value
    if isinstance(value, str):
        return well_formed(value)
    if value is None or isinstance(value, int | bool):
        return value
    if isinstance(value, Mapping):
        return {well_formed(str(key)): strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return well_formed(str(value))


def _size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def fit_result(result: Mapping[str, object], budget: int = RESULT_BUDGET) -> dict[str, object]:
    """Return ``result`` as strict JSON no larger than ``budget`` bytes (see module docstring)."""
    clean = strict_json(result)
    assert isinstance(clean, dict)  # noqa: S101  # a Mapping stays a dict
    size = _size(clean)
    if size <= budget:
        return clean
    samples = clean.get("samples")
    if isinstance(samples, list):
        total = len(samples)
        # Binary search for the longest prefix of samples that fits, with the markers added.
        low, high = 0, total
        while low < high:
            middle = (low + high + 1) // 2
            candidate = {
                **clean,
                "samples": samples[:middle],
                "truncated": True,
                "samples_total": total,
            }
            if _size(candidate) <= budget:
                low = middle
            else:
                high = middle - 1
        fitted = {**clean, "samples": samples[:low], "truncated": True, "samples_total": total}
        if _size(fitted) <= budget:
            return fitted
    return {"truncated": True, "result_bytes": size}
