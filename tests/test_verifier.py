"""Command verification (agent.core.verifier): every rejection code, in order, and interop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.errors import CommandRejected
from agent.core.frames import MAX_TOKEN_CHARS
from agent.core.verifier import (
    COMMAND_TYP,
    REQUIRED_CLAIMS,
    CommandVerifier,
    TokenPeek,
    TrustedKeys,
    VerifiedToken,
    VerifierSettings,
    jwk_thumbprint,
    peek,
    token_sha256,
)
from certs.pki import PKIPaths
from control_plane_stub.signer import CommandSigner

NOW = 1_700_000_000
AGENT = "agent-1"
ISSUER = "byoc-control-plane"
SKEW = 60.0
MAX_LIFETIME = 900.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def load_signing_key(pki: PKIPaths) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pki.signing_key.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def load_signing_pub(pki: PKIPaths) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pki.signing_pub.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    return key


def claims(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AGENT,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "jti": "cmd-0001",
        "cmd": {"type": "scale", "params": {"replicas": 3}},
    }
    body.update(overrides)
    return body


def pyjwt_token(
    key: Ed25519PrivateKey, body: dict[str, Any], *, kid: str | None = None, **headers: Any
) -> str:
    """A token made with plain PyJWT, as the brief of the protocol says any JWS library can."""
    kid = kid if kid is not None else jwk_thumbprint(key.public_key())
    return jwt.encode(
        body, key, algorithm="EdDSA", headers={"typ": COMMAND_TYP, "kid": kid, **headers}
    )


def raw_token(
    header: dict[str, Any], payload: bytes | dict[str, Any], key: Ed25519PrivateKey
) -> str:
    """A token built by hand (any header, any payload bytes), signed with Ed25519."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    signing_input = f"{b64url_json(header)}.{b64url(body)}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode('ascii')))}"


def eddsa_header(key: Ed25519PrivateKey, **extra: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": COMMAND_TYP, "kid": jwk_thumbprint(key.public_key()), **extra}


@pytest.fixture(scope="module")
def key(pki: PKIPaths) -> Ed25519PrivateKey:
    return load_signing_key(pki)


@pytest.fixture(scope="module")
def verifier(pki: PKIPaths) -> CommandVerifier:
    return CommandVerifier(
        TrustedKeys.of([load_signing_pub(pki)]),
        VerifierSettings(
            audience=AGENT,
            issuers=frozenset({ISSUER, "other-issuer"}),
            max_lifetime=MAX_LIFETIME,
            clock_skew=SKEW,
        ),
    )


def rejected(verifier: CommandVerifier, token: str, *, now: float = NOW) -> str:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(token, now=now)
    return info.value.code


# -- acceptance -----------------------------------------------------------------------------------


def test_valid_token(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims())
    result = verifier.verify(token, now=NOW + 10)
    assert result == VerifiedToken(
        jti="cmd-0001",
        iss=ISSUER,
        aud=AGENT,
        kid=jwk_thumbprint(key.public_key()),
        iat=float(NOW),
        nbf=float(NOW),
        exp=float(NOW + 300),
        command_type="scale",
        params={"replicas": 3},
        token_sha256=hashlib.sha256(token.encode()).hexdigest(),
    )


def test_second_accepted_issuer(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    assert verifier.verify(pyjwt_token(key, claims(iss="other-issuer")), now=NOW).iss == (
        "other-issuer"
    )


def test_float_numeric_dates_accepted(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(iat=NOW + 0.5, nbf=NOW + 0.25, exp=NOW + 100.75))
    result = verifier.verify(token, now=NOW)
    assert (result.iat, result.nbf, result.exp) == (NOW + 0.5, NOW + 0.25, NOW + 100.75)


def test_freshly_generated_key_trusted(pki: PKIPaths) -> None:
    fresh = Ed25519PrivateKey.generate()
    verifier = CommandVerifier(
        TrustedKeys.of([load_signing_pub(pki), fresh.public_key()]),
        VerifierSettings(audience=AGENT, issuers=frozenset({ISSUER})),
    )
    assert verifier.verify(pyjwt_token(fresh, claims()), now=NOW).kid == jwk_thumbprint(
        fresh.public_key()
    )
    assert verifier.verify(
        pyjwt_token(load_signing_key(pki), claims()), now=NOW
    ).kid == jwk_thumbprint(load_signing_pub(pki))


def test_with_keys_replaces_keys(verifier: CommandVerifier) -> None:
    fresh = Ed25519PrivateKey.generate()
    rotated = verifier.with_keys(TrustedKeys.of([fresh.public_key()]))
    assert rotated.settings is verifier.settings
    assert rotated.verify(pyjwt_token(fresh, claims()), now=NOW).jti == "cmd-0001"
    assert rejected(verifier, pyjwt_token(fresh, claims())) == "unknown_kid"


# -- 1. shape -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "..",
        "a..c",
        ".b.c",
        "a.b..",
    ],
)
def test_malformed_shape(verifier: CommandVerifier, token: str) -> None:
    assert rejected(verifier, token) == "malformed_token"


def test_two_segments_of_a_real_token(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header, payload, _ = pyjwt_token(key, claims()).split(".")
    assert rejected(verifier, f"{header}.{payload}") == "malformed_token"


def test_empty_payload_segment(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header, _, signature = pyjwt_token(key, claims()).split(".")
    assert rejected(verifier, f"{header}..{signature}") == "malformed_token"


@pytest.mark.parametrize(
    "header_segment",
    [
        "!!!!",
        "é",
        b64url(b"not json"),
        b64url(b"[1,2]"),
        b64url(b'"EdDSA"'),
        b64url(b'{"alg":"EdDSA","alg":"EdDSA"}'),
        b64url(b'{"alg":NaN}'),
        b64url(b"\xff\xfe{}"),
    ],
)
def test_header_not_base64url_json_object(
    verifier: CommandVerifier, key: Ed25519PrivateKey, header_segment: str
) -> None:
    _, payload, signature = pyjwt_token(key, claims()).split(".")
    assert rejected(verifier, f"{header_segment}.{payload}.{signature}") == "malformed_token"


def test_oversize_token(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(pad="x" * MAX_TOKEN_CHARS))
    assert len(token) > MAX_TOKEN_CHARS
    assert rejected(verifier, token) == "malformed_token"


def test_oversize_header_within_token_limit(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    # The header is more than 4 KiB once decoded, but the token is under MAX_TOKEN_CHARS.
    token = pyjwt_token(key, claims(), pad="x" * 5000)
    assert len(token) < MAX_TOKEN_CHARS
    assert rejected(verifier, token) == "malformed_token"


@pytest.mark.parametrize("bad", ["@@@@", "a", "{sig}@", "{sig_short}"])
def test_non_base64_signature(verifier: CommandVerifier, key: Ed25519PrivateKey, bad: str) -> None:
    header, payload, signature = pyjwt_token(key, claims()).split(".")
    segment = bad.format(sig=signature, sig_short=signature[:-1])
    assert rejected(verifier, f"{header}.{payload}.{segment}") == "malformed_token"


def test_non_base64_payload(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header, _, signature = pyjwt_token(key, claims()).split(".")
    assert rejected(verifier, f"{header}.a.{signature}") == "malformed_token"


# -- 2. header parameters ----------------------------------------------------------------------


def test_crit_header_refused(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = raw_token(eddsa_header(key, crit=["exp"], exp=NOW + 10), claims(), key)
    assert rejected(verifier, token) == "malformed_token"


def test_b64_header_refused(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = raw_token(eddsa_header(key, b64=True), claims(), key)
    assert rejected(verifier, token) == "malformed_token"


def test_crit_checked_before_alg(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = raw_token({**eddsa_header(key, crit=["x"]), "alg": "none"}, claims(), key)
    assert rejected(verifier, token) == "malformed_token"


# -- 3. algorithm ---------------------------------------------------------------------------------


def test_alg_none_unsecured_token(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    """An unsecured JWS (RFC 7515 §A.5): ``header.payload.`` with an empty signature."""
    header = b64url_json(
        {"alg": "none", "typ": COMMAND_TYP, "kid": jwk_thumbprint(key.public_key())}
    )
    token = f"{header}.{b64url_json(claims())}."
    assert rejected(verifier, token) == "unsupported_alg"


def test_alg_none_with_a_signature_segment(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    token = raw_token(eddsa_header(key, alg="none"), claims(), key)
    assert rejected(verifier, token) == "unsupported_alg"


@pytest.mark.parametrize(
    "alg", ["None", "NONE", "eddsa", "ES256", "Ed25519", "", None, 5, ["EdDSA"]]
)
def test_other_alg_values(verifier: CommandVerifier, key: Ed25519PrivateKey, alg: object) -> None:
    token = raw_token(eddsa_header(key, alg=alg), claims(), key)
    assert rejected(verifier, token) == "unsupported_alg"


def test_missing_alg(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header = eddsa_header(key)
    del header["alg"]
    assert rejected(verifier, raw_token(header, claims(), key)) == "unsupported_alg"


def test_hs256_with_public_key_pem_as_secret(
    verifier: CommandVerifier, pki: PKIPaths, key: Ed25519PrivateKey
) -> None:
    """The algorithm-confusion attack: HMAC keyed with the trusted public key's PEM bytes."""
    secret = pki.signing_pub.read_bytes()
    header = {"alg": "HS256", "typ": COMMAND_TYP, "kid": jwk_thumbprint(key.public_key())}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims())}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    assert rejected(verifier, token) == "unsupported_alg"


def test_rs256(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(
        claims(),
        rsa_key,
        algorithm="RS256",
        headers={"typ": COMMAND_TYP, "kid": jwk_thumbprint(key.public_key())},
    )
    assert rejected(verifier, token) == "unsupported_alg"


def test_alg_checked_before_typ_and_kid(verifier: CommandVerifier) -> None:
    header = b64url_json({"alg": "HS256"})
    assert rejected(verifier, f"{header}.{b64url_json(claims())}.c2ln") == "unsupported_alg"


# -- 4. typ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typ", ["JWT", "jwt", "byoc-command+JWT", "application/byoc-command+jwt", ""]
)
def test_bad_typ(verifier: CommandVerifier, key: Ed25519PrivateKey, typ: str) -> None:
    assert rejected(verifier, raw_token(eddsa_header(key, typ=typ), claims(), key)) == "bad_typ"


def test_missing_typ(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header = eddsa_header(key)
    del header["typ"]
    assert rejected(verifier, raw_token(header, claims(), key)) == "bad_typ"


def test_pyjwt_default_typ_refused(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = jwt.encode(
        claims(), key, algorithm="EdDSA", headers={"kid": jwk_thumbprint(key.public_key())}
    )
    assert rejected(verifier, token) == "bad_typ"


# -- 5. kid ---------------------------------------------------------------------------------------


def test_unknown_kid(verifier: CommandVerifier) -> None:
    stranger = Ed25519PrivateKey.generate()
    assert rejected(verifier, pyjwt_token(stranger, claims())) == "unknown_kid"


@pytest.mark.parametrize("kid", ["", 5, None])
def test_missing_or_invalid_kid(
    verifier: CommandVerifier, key: Ed25519PrivateKey, kid: object
) -> None:
    header = eddsa_header(key, kid=kid)
    assert rejected(verifier, raw_token(header, claims(), key)) == "unknown_kid"


def test_absent_kid(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header = eddsa_header(key)
    del header["kid"]
    assert rejected(verifier, raw_token(header, claims(), key)) == "unknown_kid"


# -- 6. signature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 31, 63])
def test_flipped_signature_byte(
    verifier: CommandVerifier, key: Ed25519PrivateKey, index: int
) -> None:
    header, payload, signature = pyjwt_token(key, claims()).split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    assert len(raw) == 64
    raw[index] ^= 0x01
    assert rejected(verifier, f"{header}.{payload}.{b64url(bytes(raw))}") == "bad_signature"


def test_empty_signature_with_eddsa(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    # The shape check lets an empty signature through (for alg "none"); for EdDSA it must
    # still be refused by the signature check.
    header, payload, _ = pyjwt_token(key, claims()).split(".")
    assert rejected(verifier, f"{header}.{payload}.") == "bad_signature"


def test_signature_by_another_key_with_trusted_kid(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    impostor = Ed25519PrivateKey.generate()
    token = pyjwt_token(impostor, claims(), kid=jwk_thumbprint(key.public_key()))
    assert rejected(verifier, token) == "bad_signature"


def test_payload_swapped_under_a_valid_signature(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    header, _, signature = pyjwt_token(key, claims()).split(".")
    forged = b64url_json(claims(cmd={"type": "scale", "params": {"replicas": 1000}}))
    assert rejected(verifier, f"{header}.{forged}.{signature}") == "bad_signature"


def test_truncated_signature(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    header, payload, signature = pyjwt_token(key, claims()).split(".")
    raw = base64.urlsafe_b64decode(signature + "==")[:32]
    assert rejected(verifier, f"{header}.{payload}.{b64url(raw)}") == "bad_signature"


def test_signature_checked_before_claims(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    impostor = Ed25519PrivateKey.generate()
    token = pyjwt_token(impostor, {"garbage": True}, kid=jwk_thumbprint(key.public_key()))
    assert rejected(verifier, token) == "bad_signature"


# -- 7. claims ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_CLAIMS)
def test_missing_claim(verifier: CommandVerifier, key: Ed25519PrivateKey, name: str) -> None:
    body = claims()
    del body[name]
    with pytest.raises(CommandRejected) as info:
        verifier.verify(raw_token(eddsa_header(key), body, key), now=NOW)
    assert info.value.code == "invalid_claims"
    assert repr(name) in info.value.detail


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": [AGENT]},
        {"aud": 1},
        {"aud": None},
        {"iat": str(NOW)},
        {"iat": True},
        {"nbf": False},
        {"exp": None},
        {"exp": [NOW + 10]},
        {"iat": -1},
        {"exp": 2**41},
        {"iss": 5},
        {"iss": ""},
        {"iss": "x" * 257},
        {"jti": 7},
        {"jti": ""},
        {"cmd": "scale"},
        {"cmd": ["scale"]},
        {"cmd": None},
    ],
    ids=repr,
)
def test_mistyped_claims(
    verifier: CommandVerifier, key: Ed25519PrivateKey, overrides: dict[str, Any]
) -> None:
    token = raw_token(eddsa_header(key), claims(**overrides), key)
    assert rejected(verifier, token) == "invalid_claims"


def test_numeric_date_too_large_for_a_float(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    token = raw_token(eddsa_header(key), claims(iat=10**400), key)
    assert rejected(verifier, token) == "invalid_claims"


def test_numeric_date_overflowing_float_literal(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    payload = json.dumps(claims()).replace(f'"exp": {NOW + 300}', '"exp": 1e999').encode()
    assert b"1e999" in payload
    assert rejected(verifier, raw_token(eddsa_header(key), payload, key)) == "invalid_claims"


@pytest.mark.parametrize("jti", ["has space", "slash/jti", "é", "a" * 129, "semi;colon"])
def test_jti_must_match_pattern(
    verifier: CommandVerifier, key: Ed25519PrivateKey, jti: str
) -> None:
    assert rejected(verifier, raw_token(eddsa_header(key), claims(jti=jti), key)) == (
        "invalid_claims"
    )


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2,3]", b'{"iss":"a","iss":"b"}', b'{"exp":NaN}', b"\xff"],
)
def test_payload_not_a_json_object(
    verifier: CommandVerifier, key: Ed25519PrivateKey, payload: bytes
) -> None:
    assert rejected(verifier, raw_token(eddsa_header(key), payload, key)) == "invalid_claims"


@pytest.mark.parametrize(("iat", "nbf", "exp"), [(NOW, NOW, NOW), (NOW, NOW + 10, NOW + 10)])
def test_exp_not_after_iat_and_nbf(
    verifier: CommandVerifier, key: Ed25519PrivateKey, iat: int, nbf: int, exp: int
) -> None:
    token = raw_token(eddsa_header(key), claims(iat=iat, nbf=nbf, exp=exp), key)
    assert rejected(verifier, token) == "invalid_claims"


def test_claim_types_checked_before_issuer(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    token = raw_token(eddsa_header(key), claims(iss="evil", iat="soon"), key)
    assert rejected(verifier, token) == "invalid_claims"


# -- 8. issuer, 9. audience ---------------------------------------------------------------------


@pytest.mark.parametrize("iss", ["evil", "BYOC-CONTROL-PLANE", "byoc-control-plane "])
def test_bad_issuer(verifier: CommandVerifier, key: Ed25519PrivateKey, iss: str) -> None:
    assert rejected(verifier, pyjwt_token(key, claims(iss=iss))) == "bad_issuer"


def test_issuer_checked_before_audience(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    assert rejected(verifier, pyjwt_token(key, claims(iss="evil", aud="agent-2"))) == "bad_issuer"


def test_command_for_another_agent(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(pyjwt_token(key, claims(aud="agent-2")), now=NOW)
    assert info.value.code == "wrong_audience"
    assert "agent-2" in info.value.detail


@pytest.mark.parametrize("aud", ["", "agent-10", "AGENT-1", "agent-1 "])
def test_audience_exact_match(verifier: CommandVerifier, key: Ed25519PrivateKey, aud: str) -> None:
    assert rejected(verifier, raw_token(eddsa_header(key), claims(aud=aud), key)) == (
        "wrong_audience"
    )


def test_audience_checked_before_time(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(aud="agent-2"))
    assert rejected(verifier, token, now=NOW + 10_000) == "wrong_audience"


# -- 10. time window ------------------------------------------------------------------------------


def test_expired_by_less_than_skew_accepted(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    token = pyjwt_token(key, claims(exp=NOW + 300))
    assert verifier.verify(token, now=NOW + 300 + SKEW - 1).jti == "cmd-0001"
    assert verifier.verify(token, now=NOW + 300 + SKEW - 0.001).jti == "cmd-0001"


def test_expired_by_skew_or_more_refused(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(exp=NOW + 300))
    assert rejected(verifier, token, now=NOW + 300 + SKEW) == "expired"
    assert rejected(verifier, token, now=NOW + 300 + SKEW + 1) == "expired"
    assert rejected(verifier, token, now=NOW + 100_000) == "expired"


def test_not_yet_valid_boundaries(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(iat=NOW, nbf=NOW + 200, exp=NOW + 300))
    assert verifier.verify(token, now=NOW + 200 - SKEW).jti == "cmd-0001"
    assert verifier.verify(token, now=NOW + 200 - SKEW + 1).jti == "cmd-0001"
    assert rejected(verifier, token, now=NOW + 200 - SKEW - 0.001) == "not_yet_valid"
    assert rejected(verifier, token, now=NOW + 200 - SKEW - 1) == "not_yet_valid"


def test_issued_in_future_boundaries(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(iat=NOW + 100, nbf=NOW, exp=NOW + 300))
    assert verifier.verify(token, now=NOW + 100 - SKEW).jti == "cmd-0001"
    assert rejected(verifier, token, now=NOW + 100 - SKEW - 1) == "issued_in_future"
    assert rejected(verifier, token, now=NOW + 100 - SKEW - 0.001) == "issued_in_future"


def test_not_yet_valid_checked_before_issued_in_future(
    verifier: CommandVerifier, key: Ed25519PrivateKey
) -> None:
    token = pyjwt_token(key, claims(iat=NOW + 500, nbf=NOW + 500, exp=NOW + 600))
    assert rejected(verifier, token, now=NOW) == "not_yet_valid"


def test_expired_checked_before_lifetime(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(iat=NOW, nbf=NOW, exp=NOW + 10_000))
    assert rejected(verifier, token, now=NOW + 20_000) == "expired"


def test_lifetime_boundaries(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    at_max = pyjwt_token(key, claims(iat=NOW, nbf=NOW, exp=NOW + MAX_LIFETIME))
    assert verifier.verify(at_max, now=NOW).exp == NOW + MAX_LIFETIME
    over = pyjwt_token(key, claims(iat=NOW, nbf=NOW, exp=NOW + MAX_LIFETIME + 1))
    assert rejected(verifier, over) == "lifetime_too_long"
    barely_over = raw_token(
        eddsa_header(key), claims(iat=NOW, nbf=NOW, exp=NOW + MAX_LIFETIME + 0.5), key
    )
    assert rejected(verifier, barely_over) == "lifetime_too_long"


def test_zero_skew(key: Ed25519PrivateKey, pki: PKIPaths) -> None:
    strict = CommandVerifier(
        TrustedKeys.of([load_signing_pub(pki)]),
        VerifierSettings(audience=AGENT, issuers=frozenset({ISSUER}), clock_skew=0),
    )
    token = pyjwt_token(key, claims(iat=NOW, nbf=NOW, exp=NOW + 300))
    assert strict.verify(token, now=NOW).jti == "cmd-0001"
    assert strict.verify(token, now=NOW + 299.999).jti == "cmd-0001"
    assert rejected(strict, token, now=NOW + 300) == "expired"
    assert rejected(strict, token, now=NOW - 0.001) == "not_yet_valid"


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"issuers": frozenset()},
        {"max_lifetime": 0},
        {"max_lifetime": 86401},
        {"clock_skew": -1},
        {"clock_skew": 601},
    ],
)
def test_settings_validation(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"audience": AGENT, "issuers": frozenset({ISSUER})}
    with pytest.raises(ValueError, match=r"issuer|max_lifetime|clock_skew"):
        VerifierSettings(**{**base, **kwargs})


# -- interop --------------------------------------------------------------------------------------


def test_stub_signer_token_verifies_with_plain_pyjwt(pki: PKIPaths) -> None:
    signer = CommandSigner.from_file(pki.signing_key, issuer=ISSUER)
    now = time.time()
    signed = signer.sign(
        agent_id=AGENT, command_type="upgrade", params={"version": "2.0.0"}, now=now
    )
    decoded = jwt.decode(
        signed.token,
        load_signing_pub(pki),
        algorithms=["EdDSA"],
        audience=AGENT,
        issuer=ISSUER,
    )
    assert decoded["jti"] == signed.jti
    assert decoded["exp"] == signed.exp
    assert decoded["cmd"] == {"type": "upgrade", "params": {"version": "2.0.0"}}
    header = jwt.get_unverified_header(signed.token)
    assert header == {
        "alg": "EdDSA",
        "typ": COMMAND_TYP,
        "kid": jwk_thumbprint(load_signing_pub(pki)),
    }


def test_stub_signer_token_accepted_by_verifier(pki: PKIPaths, verifier: CommandVerifier) -> None:
    signer = CommandSigner.from_file(pki.signing_key, issuer=ISSUER)
    signed = signer.sign(
        agent_id=AGENT, command_type="scale", params={"replicas": 2}, now=NOW, jti="j-1"
    )
    result = verifier.verify(signed.token, now=NOW + 1)
    assert result.jti == "j-1"
    assert (result.command_type, result.params) == ("scale", {"replicas": 2})
    assert result.exp == signed.exp


def test_plain_pyjwt_token_accepted_by_verifier(pki: PKIPaths, verifier: CommandVerifier) -> None:
    private_pem = pki.signing_key.read_bytes()  # PyJWT also takes the PEM itself
    token = jwt.encode(
        claims(jti="from-pyjwt"),
        private_pem,
        algorithm="EdDSA",
        headers={"typ": COMMAND_TYP, "kid": jwk_thumbprint(load_signing_pub(pki))},
    )
    assert verifier.verify(token, now=NOW).jti == "from-pyjwt"


def test_plain_pyjwt_refuses_tampered_stub_token(pki: PKIPaths) -> None:
    signer = CommandSigner.from_file(pki.signing_key, issuer=ISSUER)
    signed = signer.sign(agent_id=AGENT, command_type="scale", params={"replicas": 2}, now=NOW)
    header, _, signature = signed.token.split(".")
    forged = f"{header}.{b64url_json(claims())}.{signature}"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, load_signing_pub(pki), algorithms=["EdDSA"], audience=AGENT)


# -- thumbprint and hashes ------------------------------------------------------------------------


def _thumbprint_from_raw(raw: bytes) -> str:
    """RFC 7638 §3: required members only, lexicographic order, no whitespace, SHA-256."""
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    members = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'
    digest = hashlib.sha256(members.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def test_jwk_thumbprint_rfc8037_vector() -> None:
    # RFC 8037 Appendix A.2/A.3: the Ed25519 example key and its RFC 7638 thumbprint.
    x = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    key = Ed25519PublicKey.from_public_bytes(x)
    assert jwk_thumbprint(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert _thumbprint_from_raw(x) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_jwk_thumbprint_of_pki_key(pki: PKIPaths) -> None:
    public = load_signing_pub(pki)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    thumbprint = jwk_thumbprint(public)
    assert thumbprint == _thumbprint_from_raw(raw)
    assert len(thumbprint) == 43
    assert "=" not in thumbprint


def test_jwk_thumbprint_matches_pyjwt_jwk(pki: PKIPaths) -> None:
    """The JWK PyJWT exports for the key, reduced to its required members, hashes the same."""
    public = load_signing_pub(pki)
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    required = {name: jwk[name] for name in ("crv", "kty", "x")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    assert jwk_thumbprint(public) == b64url(hashlib.sha256(canonical).digest())


def test_trusted_keys_by_thumbprint() -> None:
    keys = [Ed25519PrivateKey.generate().public_key() for _ in range(3)]
    trusted = TrustedKeys.of(keys)
    assert len(trusted) == 3
    assert set(trusted.by_kid) == {jwk_thumbprint(k) for k in keys}


def test_token_sha256() -> None:
    assert token_sha256("abc") == hashlib.sha256(b"abc").hexdigest()


# -- peek -----------------------------------------------------------------------------------------


def test_peek_reads_claims_of_a_valid_token(key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(jti="peek-1"))
    assert peek(token) == TokenPeek(
        jti="peek-1",
        iss=ISSUER,
        kid=jwk_thumbprint(key.public_key()),
        alg="EdDSA",
        type="scale",
        params={"replicas": 3},
    )
    assert peek(token).audit_fields() == {
        "jti": "peek-1",
        "iss": ISSUER,
        "kid": jwk_thumbprint(key.public_key()),
        "alg": "EdDSA",
        "command_type": "scale",
        "params": {"replicas": 3},
    }


def test_peek_reads_unverified_claims_of_a_forged_token() -> None:
    forger = Ed25519PrivateKey.generate()
    result = peek(pyjwt_token(forger, claims(jti="forged", iss="evil")))
    assert (result.jti, result.iss, result.type) == ("forged", "evil", "scale")


def test_peek_clips_and_ignores_wrong_types(key: Ed25519PrivateKey) -> None:
    token = raw_token(
        eddsa_header(key, alg="x" * 100),
        {"jti": "j" * 500, "iss": 5, "cmd": {"type": "t" * 100, "params": [1]}},
        key,
    )
    result = peek(token)
    assert result.jti == "j" * 128
    assert result.iss is None
    assert result.alg == "x" * 32
    assert result.type == "t" * 64
    assert result.params is None


@pytest.mark.parametrize("token", ["", "a", "a.b", "a.b.c.d", "!!.??.##", "é.é.é", "..."])
def test_peek_garbage(token: str) -> None:
    assert peek(token) == TokenPeek()


def test_peek_oversize_header_never_raises(key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(), pad="x" * 5000)
    assert peek(token) == TokenPeek()


def test_peek_oversize_payload_never_raises(key: Ed25519PrivateKey) -> None:
    token = pyjwt_token(key, claims(pad="x" * (MAX_TOKEN_CHARS + 10)))
    assert peek(token) == TokenPeek()


_segment = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=60).map(b64url),
    st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "jti", "iss", "cmd", "x"]),
        st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3),
        max_size=5,
    ).map(b64url_json),
)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_peek_never_raises_on_text(token: str) -> None:
    assert isinstance(peek(token), TokenPeek)


@settings(max_examples=500, deadline=None)
@given(st.lists(_segment, min_size=0, max_size=4).map(".".join))
def test_peek_never_raises_on_token_like_strings(token: str) -> None:
    assert isinstance(peek(token), TokenPeek)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_verify_never_raises_anything_else(token: str) -> None:
    fixed = CommandVerifier(
        TrustedKeys.of([]), VerifierSettings(audience=AGENT, issuers=frozenset({ISSUER}))
    )
    with pytest.raises(CommandRejected) as info:
        fixed.verify(token, now=NOW)
    assert info.value.code in {"malformed_token", "unsupported_alg", "bad_typ", "unknown_kid"}


def test_base64url_padding_is_refused(verifier: CommandVerifier, key: Ed25519PrivateKey) -> None:
    """One encoding per token: a padded copy would verify under another token_sha256."""
    token = pyjwt_token(key, claims())
    header, payload, signature = token.split(".")
    padded = f"{header}.{payload}.{signature}{'=' * (-len(signature) % 4) or '=='}"
    assert rejected(verifier, padded) == "malformed_token"
