"""agent.core.results: a driver's result made strict JSON and small enough for one frame."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.canonical import canonicalize
from agent.core.frames import MAX_FRAME_TO_CONTROL_PLANE, TO_CONTROL_PLANE, Status, decode, encode
from agent.core.results import RESULT_BUDGET, fit_result, strict_json


def size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def test_small_result_is_unchanged() -> None:
    result = {"replicas": 3, "ports": [1, 2, 3], "version": "2.0.0"}
    assert fit_result(result) == result


def test_non_finite_numbers_become_strings() -> None:
    result = {"value": math.nan, "nested": [math.inf, -math.inf, 1.5], "ok": True, "n": None}
    assert fit_result(result) == {
        "value": "NaN",
        "nested": ["+Inf", "-Inf", 1.5],
        "ok": True,
        "n": None,
    }


def test_other_objects_become_their_text() -> None:
    assert strict_json({"when": (1, 2), "what": {1: object}}) == {
        "when": [1, 2],
        "what": {"1": str(object)},
    }


def test_samples_are_truncated_to_fit_and_say_so() -> None:
    samples = [
        {"name": f"metric_{i}", "labels": {"replica": "0"}, "value": i} for i in range(20_000)
    ]
    fitted = fit_result({"samples": samples, "replicas": 6})
    assert fitted["truncated"] is True
    assert fitted["samples_total"] == 20_000
    kept = fitted["samples"]
    assert isinstance(kept, list)
    assert 0 < len(kept) < 20_000
    assert kept == samples[: len(kept)]  # a prefix, in order
    assert fitted["replicas"] == 6
    assert size(fitted) <= RESULT_BUDGET
    # One more sample would not have fitted.
    assert size({**fitted, "samples": samples[: len(kept) + 1]}) > RESULT_BUDGET


def test_any_other_large_result_is_replaced_by_a_note() -> None:
    fitted = fit_result({"blob": "x" * (2 * RESULT_BUDGET)})
    assert fitted == {"truncated": True, "result_bytes": size({"blob": "x" * (2 * RESULT_BUDGET)})}


def test_a_fitted_result_always_travels_in_one_status_frame() -> None:
    huge = fit_result({"samples": [{"v": "é" * 100, "n": math.nan}] * 50_000})
    frame = Status(
        seq=1, ref="r", jti="j", state="succeeded", at=1.0, detail="d" * 1024, result=huge
    )
    text = encode(frame)
    assert len(text.encode()) <= MAX_FRAME_TO_CONTROL_PLANE
    assert decode(text, accept=TO_CONTROL_PLANE, max_bytes=MAX_FRAME_TO_CONTROL_PLANE) == frame


def test_lone_surrogates_become_replacement_characters() -> None:
    """/tmp/review3/surrogate_result.py: a lone surrogate cannot be encoded as UTF-8, so the
    result could be neither sent nor hashed for its receipt."""
    fitted = fit_result({"l\udfff": ["a\ud800b", "\ud83d\ude00", "ok é"], "n": 1})
    assert fitted == {"l\ufffd": ["a\ufffdb", "\U0001f600", "ok é"], "n": 1}
    canonicalize(fitted).decode("utf-8")  # the receipt's hash input: raised before


# Any text at all, lone surrogates included: hypothesis' text() draws none, so strings are
# joined from characters, with some surrogates (lone, or pairs split in two) drawn explicitly.
ANY_CHAR = st.characters(exclude_categories=()) | st.sampled_from("\ud800\udbff\udc00\udfff")


def any_text(max_size: int) -> st.SearchStrategy[str]:
    return st.lists(ANY_CHAR, max_size=max_size).map("".join)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | any_text(20),
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(any_text(5), children, max_size=5)
        ),
        max_leaves=30,
    )
)
def test_anything_becomes_strict_json_within_budget(value: object) -> None:
    fitted = fit_result({"value": value}, budget=2_000)
    json.dumps(fitted, allow_nan=False, ensure_ascii=False).encode("utf-8")  # strict, encodable
    canonicalize(fitted)
    assert size(fitted) <= 2_000
