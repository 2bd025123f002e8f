"""Every member of every command, tried with every JSON type (docs/PROTOCOL.md §5.1-§5.3).

A command is fully typed before anything decides about it: the verifier refuses a ``cmd`` claim
of the wrong shape (``invalid_claims``, check 6: ``cmd`` not an object, ``type`` not a code,
``params`` present but not an object, another member), and the parser refuses a parameter of
the wrong JSON type (``invalid_params``). Nothing is coerced and no default stands in for a
value that was sent: a ``collect_metrics`` whose ``params`` is ``"junk"`` must never run with
the default targets, and a ``type`` of ``7`` must never become ``"7"``.
"""

from __future__ import annotations

from typing import Any, Final

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.commands import COMMAND_TYPES, parse_command
from agent.core.errors import CommandRejected
from agent.core.verifier import (
    COMMAND_TYP,
    CommandVerifier,
    TrustedKeys,
    VerifierSettings,
    jwk_thumbprint,
)

NOW: Final = 1_700_000_000
AGENT: Final = "agent-1"
ISSUER: Final = "cp"
KEY: Final = Ed25519PrivateKey.generate()
VERIFIER: Final = CommandVerifier(
    TrustedKeys.of([KEY.public_key()]),
    VerifierSettings(audience=AGENT, issuers=frozenset({ISSUER})),
)

_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
JSON_TYPES: Final = {
    "null": st.none(),
    "boolean": st.booleans(),
    "integer": st.integers(min_value=-(2**63), max_value=2**63),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "string": st.text(max_size=40),
    "array": st.lists(_scalar, max_size=4),
    "object": st.dictionaries(st.text(max_size=6), _scalar, max_size=3),
}
VALID: Final[dict[str, dict[str, Any]]] = {
    "scale": {"replicas": 3},
    "upgrade": {"version": "2.0.0"},
    "collect_metrics": {"targets": ["host"]},
    "open_stream": {"target": "db.internal:5432", "max_duration": 60},
    "update_agent": {
        "version": "0.2.0",
        "url": "https://releases.example/agent/0.2.0.bundle",
        "sha256": "0" * 64,
    },
}
MEMBER_TYPE: Final = {
    ("scale", "replicas"): "integer",
    ("upgrade", "version"): "string",
    ("collect_metrics", "targets"): "array",
    ("open_stream", "target"): "string",
    ("open_stream", "max_duration"): "integer",
    ("update_agent", "version"): "string",
    ("update_agent", "url"): "string",
    ("update_agent", "sha256"): "string",
}


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def signed(cmd: object) -> str:
    claims = {
        "iss": ISSUER,
        "aud": AGENT,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "jti": "j-1",
        "cmd": cmd,
    }
    headers = {"typ": COMMAND_TYP, "kid": jwk_thumbprint(KEY.public_key())}
    return jwt.encode(claims, KEY, algorithm="EdDSA", headers=headers)


def refusal(token: str) -> str:
    with pytest.raises(CommandRejected) as info:
        VERIFIER.verify(token, now=NOW)
    return info.value.code


def test_every_command_type_and_member_is_covered() -> None:
    """The table above lists every parameter of every command type the agent knows."""
    assert set(VALID) == set(COMMAND_TYPES)
    assert {(kind, member) for kind, params in VALID.items() for member in params} == set(
        MEMBER_TYPE
    )
    for kind, params in VALID.items():
        verified = VERIFIER.verify(signed({"type": kind, "params": params}), now=NOW)
        assert parse_command({"type": verified.command_type, "params": verified.params}).type == (
            kind
        )


@pytest.mark.parametrize("given_type", sorted(JSON_TYPES))
@pytest.mark.parametrize(("kind", "member"), sorted(MEMBER_TYPE))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_each_parameter_with_each_json_type(
    kind: str, member: str, given_type: str, data: st.DataObject
) -> None:
    value = data.draw(JSON_TYPES[given_type], label=f"{kind}.{member}")
    params = {**VALID[kind], member: value}
    verified = VERIFIER.verify(signed({"type": kind, "params": params}), now=NOW)
    assert dict(verified.params) == params  # the verifier passes params on untouched
    try:
        command = parse_command({"type": verified.command_type, "params": verified.params})
    except CommandRejected as exc:
        refused: str | None = exc.code
    else:
        refused = None
    if refused is not None:
        assert refused == "invalid_params"
        return
    # Accepted: only with the JSON type the protocol gives the member, and carrying exactly
    # the value sent (never a default, never a coerced value).
    assert json_type(value) == MEMBER_TYPE[(kind, member)]
    carried = command.params()[member]
    expected = value.lower().rstrip(".") if member == "target" and isinstance(value, str) else value
    assert carried == expected


@pytest.mark.parametrize("given_type", sorted(set(JSON_TYPES) - {"object"}))
@pytest.mark.parametrize("kind", sorted(VALID))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_params_that_is_not_an_object_is_invalid_claims(
    kind: str, given_type: str, data: st.DataObject
) -> None:
    """``"params": "junk"`` or ``["workload"]`` is refused at check 6, before the jti is
    stored: it can never run with default parameters."""
    value = data.draw(JSON_TYPES[given_type])
    assert refusal(signed({"type": kind, "params": value})) == "invalid_claims"


@pytest.mark.parametrize("given_type", sorted(set(JSON_TYPES) - {"string"}))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_type_that_is_not_a_string_is_invalid_claims(given_type: str, data: st.DataObject) -> None:
    value = data.draw(JSON_TYPES[given_type])
    assert refusal(signed({"type": value, "params": {}})) == "invalid_claims"


@pytest.mark.parametrize("value", ["", "Scale", "scale!", "7", "x" * 65, " scale"])
def test_type_that_is_not_a_code_is_invalid_claims(value: str) -> None:
    assert refusal(signed({"type": value, "params": {}})) == "invalid_claims"


@pytest.mark.parametrize("given_type", sorted(set(JSON_TYPES) - {"object"}))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_cmd_that_is_not_an_object_is_invalid_claims(given_type: str, data: st.DataObject) -> None:
    assert refusal(signed(data.draw(JSON_TYPES[given_type]))) == "invalid_claims"


@settings(max_examples=25, deadline=None)
@given(
    name=st.text(min_size=1, max_size=10).filter(lambda n: n not in ("type", "params")),
    value=_scalar,
)
def test_cmd_with_another_member_is_invalid_claims(name: str, value: object) -> None:
    assert refusal(signed({"type": "scale", "params": {"replicas": 1}, name: value})) == (
        "invalid_claims"
    )


def test_params_may_be_absent_but_not_null() -> None:
    verified = VERIFIER.verify(signed({"type": "collect_metrics"}), now=NOW)
    assert verified.params == {}
    assert refusal(signed({"type": "collect_metrics", "params": None})) == "invalid_claims"


def test_a_well_formed_unknown_type_is_accepted_then_rejected_as_unknown() -> None:
    """An unknown type that is a code passes verification (its jti is stored) and is then
    rejected with ``unknown_command_type`` (§5.2, after acceptance)."""
    verified = VERIFIER.verify(signed({"type": "reboot", "params": {}}), now=NOW)
    with pytest.raises(CommandRejected) as info:
        parse_command({"type": verified.command_type, "params": verified.params})
    assert info.value.code == "unknown_command_type"
