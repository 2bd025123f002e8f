"""RFC 8785 (JCS) canonical JSON, checked against the RFC's own examples."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.canonical import canonicalize, number


def ieee(hex_bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(hex_bits))[0]
    return value


# RFC 8785 Appendix B: IEEE 754 bit patterns and their expected serialisation.
@pytest.mark.parametrize(
    ("bits", "text"),
    [
        ("0000000000000000", "0"),
        ("8000000000000000", "0"),
        ("0000000000000001", "5e-324"),
        ("8000000000000001", "-5e-324"),
        ("7fefffffffffffff", "1.7976931348623157e+308"),
        ("ffefffffffffffff", "-1.7976931348623157e+308"),
        ("4340000000000000", "9007199254740992"),
        ("c340000000000000", "-9007199254740992"),
        ("4430000000000000", "295147905179352830000"),
        ("44b52d02c7e14af5", "9.999999999999997e+22"),
        ("44b52d02c7e14af6", "1e+23"),
        ("44b52d02c7e14af7", "1.0000000000000001e+23"),
        ("444b1ae4d6e2ef4e", "999999999999999700000"),
        ("444b1ae4d6e2ef4f", "999999999999999900000"),
        ("444b1ae4d6e2ef50", "1e+21"),
        ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
        ("3eb0c6f7a0b5ed8d", "0.000001"),
        ("41b3de4355555553", "333333333.3333332"),
        ("41b3de4355555554", "333333333.33333325"),
        ("41b3de4355555555", "333333333.3333333"),
        ("41b3de4355555556", "333333333.3333334"),
        ("41b3de4355555557", "333333333.33333343"),
        ("becbf647612f3696", "-0.0000033333333333333333"),
        ("43143ff3c1cb0959", "1424953923781206.2"),
    ],
)
def test_rfc8785_numbers(bits: str, text: str) -> None:
    assert number(ieee(bits)) == text


def test_rfc8785_example_object() -> None:
    """The example of RFC 8785 §3.2.3."""
    value = {
        "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
        "literals": [None, True, False],
    }
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonicalize(value) == expected.encode("utf-8")


def test_members_are_sorted_by_utf16_code_units() -> None:
    """RFC 8785 §3.2.3: U+1F600 (surrogates D83D DE00) sorts before U+FB33 in UTF-16."""
    value = {"\ufb33": 1, "\U0001f600": 2, "a": 3}
    assert canonicalize(value) == '{"a":3,"\U0001f600":2,"\ufb33":1}'.encode()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        # What JSON.stringify(JSON.parse(...)) writes (node), as RFC 8785 requires: integers
        # beyond 2^53 are the doubles they round to, in ECMAScript's number format.
        (9007199254740993, "9007199254740992"),
        (-9007199254740993, "-9007199254740992"),
        (10**23, "1e+23"),
        (10**21, "1e+21"),
        (18446744073709551616, "18446744073709552000"),
        (123456789012345678901, "123456789012345680000"),
        (99999999999999999999999999999, "1e+29"),
        # up to 2^53 an integer is exact, and written as it is
        (9007199254740992, "9007199254740992"),
        (-9007199254740992, "-9007199254740992"),
        (10**15 + 1, "1000000000000001"),
    ],
)
def test_integers_are_ieee754_doubles(value: int, text: str) -> None:
    assert canonicalize(value) == text.encode()
    assert canonicalize([value]) == f"[{text}]".encode()


def test_an_integer_beyond_every_double_is_refused() -> None:
    with pytest.raises(ValueError, match="IEEE-754"):
        canonicalize(10**400)


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        canonicalize({"x": math.nan})


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_round_trip(value: float) -> None:
    assert float(number(value)) == value


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_canonical_form_is_json_and_stable_after_a_round_trip(value: object) -> None:
    text = canonicalize(value)
    assert canonicalize(json.loads(text)) == text


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def reference_string(text: str) -> str:
    """RFC 8785 §3.2.2.2 written out character by character (what the encoder's fast path,
    the standard library's, must equal)."""
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_strings_are_escaped_as_the_rfc_says(text: str) -> None:
    assert canonicalize(text) == reference_string(text).encode()
    assert (
        canonicalize({text: text})
        == f"{{{reference_string(text)}:{reference_string(text)}}}".encode()
    )


def test_every_control_character_and_the_escapes() -> None:
    text = "".join(chr(c) for c in range(0x20)) + '"\\\x7f\u2028\u00e9\U0001f600'
    assert canonicalize(text) == reference_string(text).encode()
    assert b"\\u001f" in canonicalize(text)  # lowercase hex, as the RFC's examples
