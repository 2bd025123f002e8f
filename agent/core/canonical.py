"""JSON Canonicalization Scheme (RFC 8785): one byte string per JSON value, in any language.

Used where a value is hashed or signed and must be re-derived by a peer that parsed it from JSON
(the ``result_sha256`` of a receipt). Objects have their members sorted by the UTF-16 code units
of their names; no insignificant whitespace; strings are escaped minimally (``"``, ``\\``, and
control characters) and otherwise kept as UTF-8; numbers are written as ECMAScript's
``Number.prototype.toString`` writes them (RFC 8785 §3.2.2.3): the shortest digits that round-
trip, with an exponent only below 1e-6 or from 1e21 on. Every number is an IEEE-754 double, so
an integer beyond 2^53 is written as the double it rounds to.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

_json_string = json.JSONEncoder(ensure_ascii=False).encode

_EXACT_INTS = 2**53
"""Integers up to this magnitude are exact as doubles and written as they are."""


def _string(text: str) -> str:
    # The standard library's encoder escapes exactly what RFC 8785 §3.2.2.2 escapes (``"``,
    # ``\\``, \b \f \n \r \t, other control characters as lowercase \u00xx) and keeps the
    # rest: the same bytes, in C (tests/test_canonical.py checks both against the RFC).
    return _json_string(text)


def number(value: float) -> str:
    """ECMAScript's Number.prototype.toString for a finite number."""
    if not math.isfinite(value):
        raise ValueError("JSON has no NaN or Infinity")
    if value == 0:
        return "0"  # also -0
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digits that round-trip, as ECMAScript does; only the layout
    # differs. Decimal splits them: value = 0.<all_digits> x 10^n.
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    assert isinstance(exponent, int)  # noqa: S101  # finite
    all_digits = "".join(map(str, digit_tuple))
    n = exponent + len(all_digits)
    digits = all_digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        exp = n - 1
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp)}"
    return sign + text


def _encode(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if abs(value) <= _EXACT_INTS:
            return str(value)
        # RFC 8785 numbers are IEEE-754 doubles: a larger integer is written as the double it
        # rounds to, as JSON.stringify would (9007199254740993 -> 9007199254740992).
        try:
            return number(float(value))
        except OverflowError as exc:
            raise ValueError("integer out of the range of an IEEE-754 double") from exc
    if isinstance(value, float):
        return number(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda key: str(key).encode("utf-16-be"))
        return "{" + ",".join(f"{_string(str(k))}:{_encode(value[k])}" for k in keys) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonicalize(value: object) -> bytes:
    """The RFC 8785 canonical form of a JSON value, as UTF-8 bytes."""
    return _encode(value).encode("utf-8")
